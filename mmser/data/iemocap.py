"""IEMOCAP release tree -> utterance manifest (`mmser prepare iemocap ROOT --out DIR`).

Reads `IEMOCAP_full_release/` READ-ONLY (layout: /work/shared/IEMOCAP.md) and writes, atomically:
- `DIR/manifest.jsonl`: one record per utterance wav under `SessionN/sentences/wav/<dialog>/`,
  sorted by id, with the fields of `mmser.data.manifest.REQUIRED_FIELDS`, then the consensus line's
  [V, A, D] as `valence`, `arousal`, `dominance` (1-5; null without a consensus line) and
  `dim_scales` (the 1-5 scale of each; the dimensional task, mmser/tasks.py). Utterances
  outside the 4-class task are kept with `label: null` (their `emotion_code` as given, or null
  when the turn has no consensus line).
- `DIR/prepare_report.json`: counts per session/class/code (and `counts.dimensional`: the scales,
  turns with and without the three values), skipped files with reasons,
  clips under MIN_DURATION_S (`too_short`), warnings, the input fingerprint, the manifest's sha256.
- `DIR/folds/fold{k}.json`: leave-one-session-out ids (paper default: no validation).

No torch here. Durations come from `soundfile.info` (header only; no file is read whole).

What happens on bad input (decided per case; `strict=True` / `--strict` turns every SKIP into an
error, raised once as a ValueError that lists all problems):
- root is not a folder, or a `SessionN` folder (N = 1..5) or its `sentences/wav` or
  `dialog/EmoEvaluation` folder is missing: ERROR naming the folder. A fold needs every session.
- a wav that soundfile cannot read, that is not RIFF/WAVE, that holds no samples or NaN / Inf
  samples (a float-coded wav; read whole only then): SKIP, listed
  in the report. One damaged file should not block a 10,000-file corpus; the count check below
  and the report make the loss visible.
- a wav that is readable but not 16 kHz mono: ERROR (all such files listed at once). That means
  the copy was converted; the models assume 16 kHz mono and silently dropping or resampling would
  change the experiment.
- a wav whose name is not `<dialog>_<F|M><3 digits>.wav` inside its dialog folder, or a dialog
  folder that is neither `impro` nor `script`: SKIP.
- a consensus label file (`EmoEvaluation/<dialog>.txt`) that does not parse, or that is missing
  for a dialog that has wavs: ERROR naming the file (and line). Dropping a dialog would silently
  change the fold counts.
- a wav without a consensus line: kept with `emotion_code: null` (counted in the report).
- a readable wav shorter than MIN_DURATION_S (0.1 s): KEPT in the manifest (no extra field: its
  `duration` says it), listed in the report's `too_short` (ids, paths, durations, count) and in a
  WARNING. Whether a clip is too short depends on the encoder, so the training side decides: the
  datamodule skips clips under the encoder's minimum (400 samples for wav2vec 2.0) and counts them
  in metrics.json. Not a SKIP, so `--strict` accepts it.
- a missing transcription file or folder, or a wav without a transcript line: `transcript: null`,
  with a WARNING. Audio-only experiments do not need transcripts.
- a transcription file that is not UTF-8: read with U+FFFD for the undecodable bytes, with a
  WARNING; a turn transcribed twice: the first line counts, with a WARNING.
- macOS AppleDouble files (`._*`) and `.DS_Store`: ignored (counted in the report).

Every WARNING goes into one list (`_warn`) that prepare logs once, writes to the report's
`warnings` and prints in its summary: nothing is only in the log.

On what looks like the real corpus (all 5 sessions, >= 5,000 utterances with a consensus code)
a WARNING is logged unless the 4-class count is 5,531 with per-session counts
1,085 / 1,023 / 1,151 / 1,031 / 1,241 (PAPER.md; IEMOCAP.md).

Idempotent: a second run with unchanged inputs (fingerprint over the relevant files' paths, sizes
and mtimes, plus MANIFEST_FORMAT_VERSION) does no work and returns `reused=True`; `force=True`
rebuilds.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mmser.audio import NonFiniteAudio, UnreadableAudio, audio_info, check_finite_file
from mmser.data.manifest import (
    SESSIONS,
    describe_same_audio,
    fold_file_paths,
    reuse_prepared,
    same_audio,
    write_fold_files,
)
from mmser.io import atomic_write_json, check_not_inputs, file_sha256, fingerprint, remove_stale_temps, write_jsonl
from mmser.labels import CLASSES, label_of_code

log = logging.getLogger(__name__)

# Bump when the manifest's or the report's content or format changes: it invalidates earlier
# outputs. 2: the report lists too-short clips and every warning (transcript decoding, duplicates).
# 3: float wavs with NaN / Inf samples are skipped; the same audio under two ids is a warning.
# 4: the consensus line's [V, A, D] kept (valence, arousal, dominance + dim_scales; report "dimensional").
MANIFEST_FORMAT_VERSION = 4
SAMPLE_RATE = 16000  # IEMOCAP.md: sentence wavs are 16 kHz mono 16-bit PCM
# Clips under this are reported (`too_short`). IEMOCAP's shortest utterance is 0.6 s (IEMOCAP.md), so
# anything under 0.1 s on a real copy is damage (a truncated file), not speech; 0.1 s = 1,600 samples
# is also 4x one wav2vec 2.0 frame (400 samples), so every clip that passes gives the encoder frames.
MIN_DURATION_S = 0.1
# IEMOCAP.md / PAPER.md: expected 4-class counts on the real release (exc merged into hap).
EXPECTED_TASK_TOTAL = 5531
EXPECTED_PER_SESSION = {1: 1085, 2: 1023, 3: 1151, 4: 1031, 5: 1241}
# A tree "looks like the real corpus" from this many utterances with a consensus code on.
REAL_CORPUS_MIN_LABELLED = 5000
# Consensus codes of the release (IEMOCAP.md); xxx = no agreement.
EMOTION_CODES = frozenset({"neu", "hap", "exc", "ang", "sad", "fru", "sur", "fea", "oth", "dis", "xxx"})
# The consensus line's [V, A, D]: the mean of the evaluators' 1-5 ratings (IEMOCAP.md), IN THAT ORDER
# (valence first, arousal = "act" second). A value outside the scale is left out (null, counted).
DIM_SCALE = (1.0, 5.0)
DIM_ORDER = ("valence", "arousal", "dominance")

MANIFEST_NAME = "manifest.jsonl"
REPORT_NAME = "prepare_report.json"
FOLDS_DIR = "folds"
_MAX_LISTED = 20  # problems listed in an error message

# `[6.2901 - 8.2357]<TAB>Ses01F_impro01_F000<TAB>neu<TAB>[2.5000, 2.5000, 2.5000]`
_CONSENSUS_RE = re.compile(
    r"^\[\s*(?P<start>[0-9.]+)\s*-\s*(?P<end>[0-9.]+)\s*\]\s+(?P<id>\S+)\s+(?P<code>\S+)\s+"
    r"\[(?P<vad>[^\]]*)\]\s*$")
# A line that starts like a consensus line: `[` or a turn name.
_CONSENSUS_LIKE_RE = re.compile(r"^(\[|Ses\d)")
# `Ses01F_impro01_F000 [006.2901-008.2357]: Excuse me.` (time part optional, to be lenient)
_TRANSCRIPT_RE = re.compile(r"^(?P<id>Ses[^\s:\[]+)\s*(?:\[[^\]]*\])?\s*:\s?(?P<text>.*)$")
# An utterance (turn with a wav): dialog + `_` + speaking actor's gender + 3 digits.
_UTTERANCE_RE = re.compile(r"^(?P<dialog>Ses0(?P<session>\d)[FM]_\w+?)_(?P<gender>[FM])\d{3}$")


def _is_junk(name: str) -> bool:
    """macOS AppleDouble (`._x`), Finder metadata and other hidden files."""
    return name.startswith(".")


def _warn(warnings: list[str] | None, message: str) -> None:
    """The one way prepare warns: append to `warnings`, the list that prepare logs once and writes
    to prepare_report.json and its summary; with no list (a parser called on its own), log now."""
    if warnings is None:
        log.warning("%s", message)
    else:
        warnings.append(message)


def _read_text(path: Path, lenient: bool = False, warnings: list[str] | None = None) -> str:
    """UTF-8 text of `path`; undecodable bytes raise (labels) or become U+FFFD with a warning
    (transcripts: a stray byte in a transcript should not block the audio experiments)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if not lenient:
            raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); is this a real label file?") from None
        _warn(warnings, f"{path}: not UTF-8 text (byte {e.start}); undecodable bytes replaced by U+FFFD")
        return data.decode("utf-8", errors="replace")


# --------------------------------------------------------------------------------------------
# Label and transcript files
# --------------------------------------------------------------------------------------------


def parse_emo_evaluation(path: str | Path) -> dict[str, dict]:
    """Consensus labels of one `EmoEvaluation/<dialog>.txt`: {turn id: {code, start, end, vad}}.

    Only consensus lines count; annotator lines (`C-E2:`, `A-E3:`), the `%` header and blank lines
    are skipped. A line that starts like a consensus line (`[` or a turn name) but does not parse,
    an unknown emotion code, or a turn given twice with different codes raises ValueError naming
    file and line (a verbatim repeat keeps the first).
    """
    path = Path(path)
    out: dict[str, dict] = {}
    for lineno, raw in enumerate(_read_text(path).splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("%") or line.startswith(("C-", "A-")):
            continue
        if not _CONSENSUS_LIKE_RE.match(line):
            continue
        m = _CONSENSUS_RE.match(line)
        where = f"{path}:{lineno}"
        if m is None:
            raise ValueError(f"{where}: consensus label line does not parse: {line!r} "
                             "(expected '[START - END]<TAB>TURN<TAB>CODE<TAB>[V, A, D]')")
        try:
            start, end = float(m["start"]), float(m["end"])
            vad = [float(v) for v in m["vad"].split(",")]
        except ValueError:
            raise ValueError(f"{where}: bad number in consensus label line: {line!r}") from None
        if len(vad) != 3:
            raise ValueError(f"{where}: expected 3 values [V, A, D], got {len(vad)}: {line!r}")
        if end < start:
            raise ValueError(f"{where}: end time {end} before start time {start}")
        code = m["code"]
        if code not in EMOTION_CODES:
            raise ValueError(f"{where}: unknown emotion code {code!r} "
                             f"(known: {', '.join(sorted(EMOTION_CODES))})")
        if m["id"] in out:
            if out[m["id"]]["code"] != code:
                raise ValueError(f"{where}: turn {m['id']} labelled twice ({out[m['id']]['code']}, {code})")
            continue
        out[m["id"]] = {"code": code, "start": start, "end": end, "vad": vad}
    return out


def parse_transcriptions(path: str | Path, warnings: list[str] | None = None) -> dict[str, str]:
    """Transcripts of one `transcriptions/<dialog>.txt`: {utterance id: raw text}.

    Quirks of the release: lines without a turn id (`F: Yeah.`) and turns like `..._MXX0` (no wav,
    no label) are left out; bracketed tokens such as `[LAUGHTER]` stay in the raw text
    (normalisation belongs to the text stage). A turn given twice keeps its first text.
    Warnings (undecodable bytes, a turn given twice) are appended to `warnings` (logged when None).
    """
    path = Path(path)
    out: dict[str, str] = {}
    for raw in _read_text(path, lenient=True, warnings=warnings).splitlines():
        m = _TRANSCRIPT_RE.match(raw.strip())
        if m is None or not _UTTERANCE_RE.match(m["id"]):
            continue
        if m["id"] in out:
            _warn(warnings, f"{path}: turn {m['id']} transcribed twice; keeping the first")
            continue
        out[m["id"]] = m["text"].strip()
    return out


# --------------------------------------------------------------------------------------------
# Tree scan
# --------------------------------------------------------------------------------------------


@dataclass
class _Inputs:
    """The relevant files of a release tree (junk excluded), listed once."""

    root: Path
    wav_dirs: dict[int, dict[str, list[Path]]] = field(default_factory=dict)  # session -> dialog -> wavs
    stray: list[tuple[Path, str]] = field(default_factory=list)  # skipped while listing
    emo_files: dict[int, dict[str, Path]] = field(default_factory=dict)  # session -> dialog -> file
    transcript_files: dict[int, dict[str, Path]] = field(default_factory=dict)
    missing_transcript_dirs: list[Path] = field(default_factory=list)
    n_junk: int = 0

    def files(self) -> list[Path]:
        out: list[Path] = []
        for s in SESSIONS:
            for wavs in self.wav_dirs[s].values():
                out.extend(wavs)
            out.extend(self.emo_files[s].values())
            out.extend(self.transcript_files[s].values())
        return sorted(out)


def _listdir(path: Path, inputs: _Inputs) -> list[os.DirEntry]:
    """Entries of `path` sorted by name, junk dropped (and counted)."""
    entries = []
    with os.scandir(path) as it:
        for e in it:
            if _is_junk(e.name):
                inputs.n_junk += 1
            else:
                entries.append(e)
    return sorted(entries, key=lambda e: e.name)


def _txt_files(folder: Path, inputs: _Inputs) -> dict[str, Path]:
    return {e.name[:-4]: Path(e.path) for e in _listdir(folder, inputs)
            if e.name.endswith(".txt") and e.is_file()}


def _list_inputs(root: Path) -> _Inputs:
    if not root.is_dir():
        raise FileNotFoundError(f"IEMOCAP root {root}: no such folder")
    inputs = _Inputs(root=root)
    for s in SESSIONS:
        sess = root / f"Session{s}"
        if not sess.is_dir():
            hint = ""
            if (root / "IEMOCAP_full_release" / f"Session{s}").is_dir():
                hint = f" (did you mean {root / 'IEMOCAP_full_release'}?)"
            raise FileNotFoundError(f"IEMOCAP root {root}: missing session folder {sess}; "
                                    f"expected Session1 .. Session5{hint}")
        wav_root = sess / "sentences" / "wav"
        emo_root = sess / "dialog" / "EmoEvaluation"
        for folder in (wav_root, emo_root):
            if not folder.is_dir():
                raise FileNotFoundError(f"IEMOCAP root {root}: missing folder {folder}")
        dialogs: dict[str, list[Path]] = {}
        for d in _listdir(wav_root, inputs):
            if not d.is_dir():
                continue  # e.g. a stray file next to the dialog folders
            wavs = [Path(e.path) for e in _listdir(Path(d.path), inputs)
                    if e.name.endswith(".wav") and e.is_file()]
            if "_impro" not in d.name and "_script" not in d.name:
                inputs.stray.extend((w, f"dialog folder {d.name} is neither impro nor script")
                                    for w in wavs)
                continue
            dialogs[d.name] = wavs
        inputs.wav_dirs[s] = dialogs
        inputs.emo_files[s] = _txt_files(emo_root, inputs)
        tr_root = sess / "dialog" / "transcriptions"
        if tr_root.is_dir():
            inputs.transcript_files[s] = _txt_files(tr_root, inputs)
        else:
            inputs.transcript_files[s] = {}
            inputs.missing_transcript_dirs.append(tr_root)
    return inputs


def _input_fingerprint(inputs: _Inputs) -> str:
    def items():
        yield "format_version", MANIFEST_FORMAT_VERSION
        yield "root", str(inputs.root)
        for p in inputs.files():
            st = p.stat()
            yield str(p), [st.st_size, st.st_mtime_ns]

    return fingerprint(items())


@dataclass
class _Scan:
    records: list[dict]
    skipped: list[dict]
    warnings: list[str]
    errors: list[str]
    n_junk: int
    n_no_label_line: int
    n_no_transcript: int
    too_short: list[dict] = field(default_factory=list)


def _scan(inputs: _Inputs) -> _Scan:
    records: list[dict] = []
    skipped = [{"path": str(p), "reason": why} for p, why in inputs.stray]
    warnings: list[str] = []
    format_errors: list[str] = []
    n_no_label = 0
    no_text: list[str] = []
    for s in SESSIONS:
        emo_files = inputs.emo_files[s]
        tr_files = inputs.transcript_files[s]
        tr_dir_missing = inputs.root / f"Session{s}" / "dialog" / "transcriptions" in inputs.missing_transcript_dirs
        labelled_without_wav: list[str] = []
        for dialog, wavs in inputs.wav_dirs[s].items():
            if dialog not in emo_files:
                if not wavs:
                    continue
                raise FileNotFoundError(
                    f"{inputs.root / f'Session{s}' / 'dialog' / 'EmoEvaluation' / (dialog + '.txt')}: "
                    f"missing consensus label file for dialog {dialog} ({len(wavs)} wavs)")
            labels = parse_emo_evaluation(emo_files[dialog])
            texts: dict[str, str] | None = None
            if dialog in tr_files:
                texts = parse_transcriptions(tr_files[dialog], warnings)
            elif wavs and not tr_dir_missing:
                warnings.append(f"{inputs.root / f'Session{s}' / 'dialog' / 'transcriptions' / (dialog + '.txt')}: "
                                f"missing transcription file; transcripts of {dialog} are null")
            labelled_without_wav.extend(sorted(set(labels) - {w.name[:-4] for w in wavs}))
            for wav in wavs:
                rec = _record(wav, s, dialog, skipped, format_errors)
                if rec is None:
                    continue
                lab = labels.get(rec["id"])
                n_no_label += lab is None
                rec["emotion_code"] = lab["code"] if lab else None
                rec["label"] = label_of_code(rec["emotion_code"])
                for d, v in zip(DIM_ORDER, lab["vad"] if lab else (None,) * 3, strict=True):
                    rec[d] = v if v is None or DIM_SCALE[0] <= v <= DIM_SCALE[1] else None
                    if v is not None and rec[d] is None:
                        warnings.append(f"{emo_files[dialog]}: {rec['id']}: {d} {v} outside {list(DIM_SCALE)}; "
                                        "left out of the dimensional task")
                if texts is not None:
                    rec["transcript"] = texts.get(rec["id"])
                    if rec["transcript"] is None:
                        no_text.append(rec["id"])
                records.append(rec)
        for dialog in sorted(set(emo_files) - set(inputs.wav_dirs[s])):
            labelled_without_wav.extend(sorted(parse_emo_evaluation(emo_files[dialog])))
        if labelled_without_wav:
            warnings.append(f"Session{s}: {len(labelled_without_wav)} labelled turn(s) have no wav, "
                            f"e.g. {', '.join(labelled_without_wav[:3])}")
    for d in inputs.missing_transcript_dirs:
        warnings.append(f"{d}: missing transcriptions folder; transcripts of that session are null")
    if no_text:
        warnings.append(f"{len(no_text)} utterance(s) have no transcript line, e.g. {', '.join(no_text[:3])}")
    records.sort(key=lambda r: r["id"])
    min_frames = round(MIN_DURATION_S * SAMPLE_RATE)
    too_short = [{"id": r["id"], "path": r["path"], "duration": r["duration"]} for r in records
                 if round(r["duration"] * SAMPLE_RATE) < min_frames]
    if too_short:
        listed = ", ".join(f"{x['id']} ({x['duration']:.4f} s)" for x in too_short[:_MAX_LISTED])
        more = f" and {len(too_short) - _MAX_LISTED} more" if len(too_short) > _MAX_LISTED else ""
        warnings.append(f"{len(too_short)} clip(s) shorter than {MIN_DURATION_S:g} s, kept in the manifest "
                        f"(training skips clips too short for the encoder; see too_short in {REPORT_NAME}): "
                        f"{listed}{more}")
    return _Scan(records=records, skipped=skipped, warnings=warnings, errors=format_errors,
                 n_junk=inputs.n_junk, n_no_label_line=n_no_label, n_no_transcript=len(no_text),
                 too_short=too_short)


def _record(wav: Path, session: int, dialog: str, skipped: list[dict], errors: list[str]) -> dict | None:
    """The audio part of one manifest record (labels and transcript filled in by the caller),
    or None after appending the reason to `skipped` or `errors`."""
    utt = wav.name[:-4]
    m = _UTTERANCE_RE.match(utt)
    if m is None or m["dialog"] != dialog:
        skipped.append({"path": str(wav), "reason": f"file name is not {dialog}_<F|M><3 digits>.wav"})
        return None
    if int(m["session"]) != session:
        skipped.append({"path": str(wav), "reason": f"utterance of session {m['session']} inside Session{session}"})
        return None
    try:
        info = audio_info(wav)  # header only, through the one reader (mmser.audio)
    except UnreadableAudio as e:
        skipped.append({"path": str(wav), "reason": f"unreadable audio ({_short(e.reason)})"})
        return None
    if info.format not in ("WAV", "WAVEX"):
        skipped.append({"path": str(wav), "reason": f"not a RIFF/WAVE file (format {info.format})"})
        return None
    if info.frames <= 0:
        skipped.append({"path": str(wav), "reason": "no audio samples"})
        return None
    try:
        check_finite_file(wav, info)  # NaN / Inf samples (a float-coded wav only)
    except NonFiniteAudio as e:
        skipped.append({"path": str(wav), "reason": e.reason})
        return None
    if info.samplerate != SAMPLE_RATE or info.channels != 1:
        errors.append(f"{wav}: {info.samplerate} Hz, {info.channels} channel(s); expected {SAMPLE_RATE} Hz mono")
        return None
    gender = m["gender"]  # the speaking actor: the utterance's letter, not the dialog's
    return {
        "id": utt,
        "path": os.path.abspath(wav),
        "session": session,
        "speaker": f"Ses{session:02d}{gender}",
        "gender": gender,
        "dialog": dialog,
        "scripted": "_script" in dialog,
        "emotion_code": None,
        "label": None,
        "transcript": None,
        "duration": info.frames / info.samplerate,
        # dimensional targets (filled in from the consensus line by the caller; null without one)
        "arousal": None, "valence": None, "dominance": None,
        "dim_scales": {d: list(DIM_SCALE) for d in ("arousal", "valence", "dominance")},
    }


def _short(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]


def _raise_problems(title: str, problems: list[str]) -> None:
    shown = problems[:_MAX_LISTED]
    more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
    raise ValueError(f"{title}: {len(problems)} problem(s):\n  " + "\n  ".join(shown) + more)


def _check_scan(scan: _Scan, strict: bool) -> None:
    if scan.errors:
        _raise_problems("IEMOCAP audio is not 16 kHz mono (was the copy converted?)", scan.errors)
    if strict and scan.skipped:
        _raise_problems("IEMOCAP preparation (strict)", [f"{x['path']}: {x['reason']}" for x in scan.skipped])


def scan_iemocap(root: str | Path, strict: bool = False) -> list[dict]:
    """Manifest records (sorted by id) of an IEMOCAP release tree, read-only; writes nothing.

    Errors and skips follow the module docstring; skips and warnings are logged.
    """
    scan = _scan(_list_inputs(Path(os.path.abspath(root))))
    _check_scan(scan, strict)
    for x in scan.skipped:
        log.warning("skipped %s: %s", x["path"], x["reason"])
    for w in scan.warnings:
        log.warning("%s", w)
    return scan.records


def check_expected_counts(records: list[dict]) -> list[str]:
    """Warnings when records look like the real corpus but miss the paper's 4-class counts.

    "Looks like the real corpus": all 5 sessions and >= 5,000 utterances with a consensus code.
    """
    sessions = {r["session"] for r in records}
    n_coded = sum(r["emotion_code"] is not None for r in records)
    if sessions != set(SESSIONS) or n_coded < REAL_CORPUS_MIN_LABELLED:
        return []
    task = [r for r in records if r["label"] is not None]
    per_session = Counter(r["session"] for r in task)
    got = {s: per_session.get(s, 0) for s in SESSIONS}
    if len(task) == EXPECTED_TASK_TOTAL and got == EXPECTED_PER_SESSION:
        return []
    fmt = "/".join
    return [f"this looks like the real IEMOCAP release but its 4-class count is {len(task):,} "
            f"(per session {fmt(str(got[s]) for s in SESSIONS)}); the paper has {EXPECTED_TASK_TOTAL:,} "
            f"({fmt(str(EXPECTED_PER_SESSION[s]) for s in SESSIONS)}). Check the skipped files in "
            f"{REPORT_NAME} and whether the copy is complete."]


# --------------------------------------------------------------------------------------------
# prepare: tree -> manifest + report + fold files, idempotent
# --------------------------------------------------------------------------------------------


@dataclass
class PrepareResult:
    """What `prepare_iemocap` produced (or found up to date)."""

    manifest: Path
    report: Path
    folds: list[Path]
    counts: dict
    skipped: list[dict]
    warnings: list[str]
    reused: bool
    too_short: list[dict] = field(default_factory=list)  # kept clips under MIN_DURATION_S

    def summary(self) -> str:
        c = self.counts
        per_class = " / ".join(f"{k} {c['per_class'].get(k, 0)}" for k in CLASSES)
        head = "inputs unchanged, reused" if self.reused else "wrote"
        lines = [f"IEMOCAP: {head} {self.manifest}: {c['utterances']} utterances, "
                 f"{c['task']} in the 4-class task ({per_class}), {c['task_hours']:.2f} h",
                 f"  skipped {len(self.skipped)} file(s), {len(self.too_short)} too short "
                 f"(< {MIN_DURATION_S:g} s, kept), {len(self.warnings)} warning(s); "
                 f"details in {self.report}"]
        lines += [f"  skipped {x['path']}: {x['reason']}" for x in self.skipped[:_MAX_LISTED]]
        if len(self.skipped) > _MAX_LISTED:
            lines.append(f"  ... and {len(self.skipped) - _MAX_LISTED} more skipped file(s) in {self.report}")
        lines += [f"  warning: {w}" for w in self.warnings[:_MAX_LISTED]]
        if len(self.warnings) > _MAX_LISTED:
            lines.append(f"  ... and {len(self.warnings) - _MAX_LISTED} more warning(s) in {self.report}")
        return "\n".join(lines)


def _counts(records: list[dict]) -> dict:
    task = [r for r in records if r["label"] is not None]
    per_session = {}
    for s in SESSIONS:
        srecs = [r for r in records if r["session"] == s]
        stask = [r for r in srecs if r["label"] is not None]
        cc = Counter(r["label"] for r in stask)
        per_session[str(s)] = {**{k: cc.get(k, 0) for k in CLASSES}, "task": len(stask),
                               "utterances": len(srecs),
                               "task_hours": round(sum(r["duration"] for r in stask) / 3600, 4)}
    cc = Counter(r["label"] for r in task)
    with_values = sum(all(r.get(d) is not None for d in DIM_ORDER) for r in records)
    return {
        # the dimensional task (mmser/tasks.py): every turn with the three values, on the 1-5 scale
        "dimensional": {"scales": {d: list(DIM_SCALE) for d in ("arousal", "valence", "dominance")},
                        "with_values": with_values, "without_values": len(records) - with_values},
        "utterances": len(records),
        "task": len(task),
        "task_hours": round(sum(r["duration"] for r in task) / 3600, 4),
        "per_class": {k: cc.get(k, 0) for k in CLASSES},
        "per_session": per_session,
        "per_code": dict(sorted(Counter(r["emotion_code"] or "none" for r in records).items())),
    }


def prepare_iemocap(root: str | Path, out_dir: str | Path, strict: bool = False,
                    force: bool = False) -> PrepareResult:
    """Prepare the IEMOCAP release at `root` (read-only) into `out_dir`; see the module docstring."""
    root = Path(os.path.abspath(root))
    out_dir = Path(out_dir)
    inputs = _list_inputs(root)
    fp = _input_fingerprint(inputs)
    report = None if force else reuse_prepared(out_dir, fp, MANIFEST_NAME, REPORT_NAME)
    if report is not None:
        if strict and report["skipped"]:
            _raise_problems("IEMOCAP preparation (strict)",
                            [f"{x['path']}: {x['reason']}" for x in report["skipped"]])
        log.info("IEMOCAP inputs unchanged (fingerprint %s): reusing %s", fp, out_dir / MANIFEST_NAME)
        for w in report["warnings"]:
            log.warning("%s", w)
        return PrepareResult(manifest=out_dir / MANIFEST_NAME, report=out_dir / REPORT_NAME,
                             folds=[out_dir / f for f in report["fold_files"]], counts=report["counts"],
                             skipped=report["skipped"], warnings=report["warnings"], reused=True,
                             too_short=report.get("too_short", {}).get("clips", []))

    scan = _scan(inputs)
    _check_scan(scan, strict)
    warnings = scan.warnings + check_expected_counts(scan.records)
    # The same audio under two utterance ids: reported, not refused (the release is a fixed tree,
    # read as it is; a duplicate across sessions would be leakage, so it is named in the warnings).
    for recs, leaks in same_audio(scan.records):
        warnings.append(f"{describe_same_audio(recs)}" + (" in different sessions: LEAKAGE, a fold tests on audio "
                        "it trains on; remove one file" if leaks else " within one session"))
    for x in scan.skipped:
        log.warning("skipped %s: %s", x["path"], x["reason"])
    for w in warnings:
        log.warning("%s", w)

    manifest = out_dir / MANIFEST_NAME
    check_not_inputs([manifest, out_dir / REPORT_NAME, *fold_file_paths(scan.records, out_dir / FOLDS_DIR)],
                     inputs.files(), "--out")  # never write over the release (e.g. --out inside it)
    for folder in (out_dir, out_dir / FOLDS_DIR):
        remove_stale_temps(folder)  # left by a killed prepare
    fold_paths = write_fold_files(scan.records, out_dir / FOLDS_DIR)
    write_jsonl(manifest, scan.records)
    counts = _counts(scan.records)
    report = {
        "format_version": MANIFEST_FORMAT_VERSION,
        "root": str(root),
        "fingerprint": fp,
        "manifest_sha256": file_sha256(manifest),
        "counts": counts,
        "no_label_line": scan.n_no_label_line,
        "no_transcript": scan.n_no_transcript,
        "ignored_junk_files": scan.n_junk,
        "skipped": scan.skipped,
        "too_short": {"min_duration_s": MIN_DURATION_S, "count": len(scan.too_short), "clips": scan.too_short},
        "warnings": warnings,
        "fold_files": [str(p.relative_to(out_dir)) for p in fold_paths],
    }
    # Written last: the report's fingerprint marks the outputs as complete.
    atomic_write_json(out_dir / REPORT_NAME, report)
    log.info("IEMOCAP: %d utterances (%d in the 4-class task) -> %s", counts["utterances"],
             counts["task"], manifest)
    return PrepareResult(manifest=manifest, report=out_dir / REPORT_NAME, folds=fold_paths,
                         counts=counts, skipped=scan.skipped, warnings=warnings, reused=False,
                         too_short=scan.too_short)
