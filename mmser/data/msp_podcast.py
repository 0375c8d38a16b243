"""MSP-Podcast release tree -> the manifest contract (`mmser prepare msp-podcast ROOT --out DIR`).

Reads the release READ-ONLY and hands its utterances to the generic corpus preparation
(mmser.data.corpus.prepare_rows), so the outputs, checks and report are `mmser prepare csv`'s:
`DIR/manifest.jsonl`, `DIR/prepare_report.json`, `DIR/folds/fold-test1.json`, ...

Layout read:

    ROOT/Labels/labels_consensus.csv   FileName,EmoClass,EmoAct,EmoVal,EmoDom,SpkrID,Gender,Split_Set
    ROOT/Audios/<FileName>             one WAV per speaking turn (FileName includes `.wav`)
    ROOT/Transcripts/<stem>.txt        the turn's human transcript (optional; null without it)

- label: EmoClass, a one-letter consensus code: N neutral, H happy, S sad, A angry, U surprise,
  C contempt, D disgust, F fear, O other, X no agreement. The default class set is the common 4
  (N, H, S, A -> neutral, happy, sad, angry: IEMOCAP's class names, so models and tables line up);
  `classes=8` (`--classes 8`) adds U, C, D, F. O, X and codes outside the set stay in the manifest
  with label null (their code in emotion_code), outside the task.
- split: Split_Set Train -> "train", Development -> "dev", Test1 -> "test1", Test2 -> "test2",
  Test3 -> "test3". The predefined split is the protocol: one fold per labelled test set ("test1",
  "test2"), each training on Train, validating on Development (the validation set; checkpoint
  selection with finetune.test_checkpoint=best_val looks at it only) and testing on its test set.
  `mmser cv --sessions test1` runs one of them.
- speaker: SpkrID (an empty one becomes "Unknown"); gender: Gender; id: FileName without `.wav`.
- arousal / valence / dominance: EmoAct / EmoVal / EmoDom, the consensus of the 1-7 ratings
  (`dim_scales` [1, 7]; issue 19's dimensional task, mmser/tasks.py). An empty one (e.g. a Test3
  turn) is null: outside the dimensional task, counted in the report's `counts.dimensional`.

What was checked against public descriptions, and what is a guess (no copy of the corpus here):
- Checked: the folder names Labels/, Audios/, Transcripts/ and the files Labels/labels_consensus.csv
  (+ .json, labels_detailed.*) of release 1.12's readme; the column names and order FileName,
  EmoClass, EmoAct, EmoVal, EmoDom, SpkrID, Gender, Split_Set and FileName ending in `.wav`, as
  public preparation scripts read them (by name and by position); the EmoClass letters above
  (public scripts map the same ten letters); the Split_Set values Train, Development, Test1, Test2
  (public scripts filter on them) and Test3 (the corpus page: its labels, speakers and transcripts
  are hidden; only the audio is released); Transcripts/<stem>.txt holding the turn's text (public
  scripts read them so); older releases spelled the file labels_concensus.csv (public scripts open
  that name): it is read when labels_consensus.csv is absent.
- Guesses: that Test3 turns, where listed at all, have an empty EmoClass (they are kept with label
  null, so Test3 is never a fold); that SpkrID is "Unknown" (or empty) for turns without a speaker
  (such turns are kept; the speaker only matters for data.validation=speaker, which this protocol
  does not use); that the WAVs are 16 kHz mono 16-bit (not assumed: every file's header is checked,
  and `--resample` writes 16 kHz mono copies of any other); the transcript files' encoding (UTF-8;
  undecodable bytes become U+FFFD with a warning).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from mmser.data.corpus import CorpusPrepareResult, CorpusSpec, Row, prepare_rows, read_table

log = logging.getLogger(__name__)

CORPUS_NAME = "MSP-Podcast"
LABEL_FILES = ("labels_consensus.csv", "labels_concensus.csv")  # the second: older releases' spelling
COLUMNS = ("FileName", "EmoClass", "EmoAct", "EmoVal", "EmoDom", "SpkrID", "Gender", "Split_Set")
EMO_CODES = {"N": "neutral", "H": "happy", "S": "sad", "A": "angry", "U": "surprise", "C": "contempt",
             "D": "disgust", "F": "fear", "O": "other", "X": "no agreement"}
CLASS_SETS = {4: ("N", "H", "S", "A"), 8: ("N", "H", "S", "A", "U", "C", "D", "F")}
# manifest dimension <- the labels file's column (all on MSP-Podcast's 1-7 scale)
DIMENSION_COLUMNS = {"arousal": "EmoAct", "valence": "EmoVal", "dominance": "EmoDom"}
DIM_SCALE = [1.0, 7.0]
SPLITS = {"Train": "train", "Development": "dev", "Test1": "test1", "Test2": "test2", "Test3": "test3"}


def labels_file(root: Path) -> Path:
    for name in LABEL_FILES:
        if (root / "Labels" / name).is_file():
            return root / "Labels" / name
    hint = ""
    for sub in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        if (sub / "Labels" / LABEL_FILES[0]).is_file():
            hint = f" (did you mean {sub}?)"
    raise FileNotFoundError(f"MSP-Podcast root {root}: missing {root / 'Labels' / LABEL_FILES[0]}{hint}")


def read_msp_rows(root: Path, warnings: list[str]) -> tuple[Path, list[str], list[Row]]:
    """(labels file, columns, rows) with the roles mmser.data.corpus reads: id, path, label (the
    EmoClass code), speaker, gender, split, transcript."""
    labels = labels_file(root)
    audios = root / "Audios"
    if not audios.is_dir():
        raise FileNotFoundError(f"MSP-Podcast root {root}: missing folder {audios}")
    transcripts = root / "Transcripts"
    if not transcripts.is_dir():
        warnings.append(f"{transcripts}: missing folder; transcripts are null")
    header, table = read_table(labels, fmt="csv", delimiter=",")  # UTF-8, field counts, as any CSV corpus
    missing = [c for c in ("FileName", "EmoClass", "SpkrID", "Split_Set") if c not in header]
    if missing:
        raise ValueError(f"{labels}:1: missing column(s) {', '.join(missing)} (expected {', '.join(COLUMNS)}; "
                         f"got {', '.join(header) or 'nothing'})")
    problems, rows, no_text = [], [], 0
    for row in table:
        lineno, v = row.line, {h: x or "" for h, x in row.values.items()}
        name = v["FileName"]
        if not name:
            problems.append(f"{labels}:{lineno}: empty FileName")
            continue
        code = v["EmoClass"] or None
        if code is not None and code not in EMO_CODES:
            problems.append(f"{labels}:{lineno}: unknown EmoClass {code!r} (known: {', '.join(EMO_CODES)})")
            continue
        split = SPLITS.get(v["Split_Set"])
        if split is None:
            problems.append(f"{labels}:{lineno}: unknown Split_Set {v['Split_Set']!r} (known: {', '.join(SPLITS)})")
            continue
        file_name = name if name.lower().endswith(".wav") else name + ".wav"
        stem = file_name[:-4]
        transcript = None
        tfile = transcripts / f"{stem}.txt"
        if tfile.is_file():
            raw = tfile.read_bytes()
            try:
                transcript = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                warnings.append(f"{tfile}: not UTF-8 text (byte {e.start}); undecodable bytes replaced by U+FFFD")
                transcript = raw.decode("utf-8", errors="replace")
            transcript = " ".join(transcript.split()) or None
        no_text += transcript is None
        rows.append(Row(str(labels), lineno, {
            "id": stem, "path": str(audios / file_name), "label": code, "speaker": v.get("SpkrID") or "Unknown",
            "gender": v.get("Gender") or None, "split": split, "transcript": transcript,
            **{role: v.get(col) or None for role, col in DIMENSION_COLUMNS.items()}}))
    if problems:
        from mmser.data.corpus import CorpusError

        raise CorpusError(problems)
    if no_text and transcripts.is_dir():
        warnings.append(f"{no_text} turn(s) have no transcript file in {transcripts}; their transcripts are null")
    dims = [role for role, col in DIMENSION_COLUMNS.items() if col in header]
    return labels, ["id", "path", "label", "speaker", "gender", "split", "transcript", *dims], rows


def prepare_msp_podcast(root: str | Path, out_dir: str | Path, classes: int = 4, resample: bool = False,
                        skip_bad_audio: bool = False, force: bool = False) -> CorpusPrepareResult:
    """Prepare the MSP-Podcast release at `root` (read only) into `out_dir`; see the module docstring."""
    if classes not in CLASS_SETS:
        raise ValueError(f"--classes {classes}: MSP-Podcast class sets are {', '.join(map(str, CLASS_SETS))}")
    root = Path(os.path.abspath(root))
    if not root.is_dir():
        raise FileNotFoundError(f"MSP-Podcast root {root}: no such folder")
    warnings: list[str] = []
    labels, columns, rows = read_msp_rows(root, warnings)
    if not rows:
        raise ValueError(f"{labels}: no rows")
    codes = CLASS_SETS[classes]
    spec = CorpusSpec(name=CORPUS_NAME, labels=[EMO_CODES[c] for c in codes],
                      map={c: EMO_CODES[c] for c in codes}, folds="split", resample=resample,
                      skip_bad_audio=skip_bad_audio, scale=list(DIM_SCALE))
    transcripts = root / "Transcripts"
    extra = sorted(transcripts.glob("*.txt")) if transcripts.is_dir() else []
    result = prepare_rows(columns, rows, spec, root, out_dir, labels, corpus=CORPUS_NAME, force=force,
                          extra_inputs=extra, warnings=warnings,
                          report_extra={"msp_podcast": {"root": str(root), "classes": classes}})
    return result
