"""A small fake IEMOCAP release in the real layout (/work/shared/IEMOCAP.md), for tests.

    release = make_fake_iemocap(tmp_path)                 # -> tmp_path / "IEMOCAP_full_release"
    release = make_fake_iemocap(tmp_path, corrupt_wav=True, missing_session=4)
    expected = expected_records(release)                  # the manifest prepare must write

The tree is fixed by `UTTERANCES` below: a few dialogs per session, tiny valid 16 kHz mono wavs
(written with soundfile), consensus files with annotator lines and annotator subfolders,
transcriptions with the release's quirks (a line without an id, an `_MXX0` turn, `[LAUGHTER]`),
AppleDouble `._*` junk and `.DS_Store` next to real files, and a stereo whole-dialog wav (which
prepare must never open). `expected_records` spells the expected manifest from the same table,
with the expected label, speaker and gender written out, so tests do not reuse the code they test.

Options (each damages one known file, named by the constants below):
- corrupt_wav: CORRUPT_WAV_ID holds junk bytes, not RIFF.
- flac_wav: FLAC_WAV_ID is valid FLAC audio behind a .wav name.
- empty_wav: EMPTY_WAV_ID is a RIFF/WAVE file without samples.
- bad_rate_wav: BAD_RATE_WAV_ID is 44.1 kHz.
- stereo_wav: STEREO_WAV_ID has 2 channels.
- malformed_label: a consensus line of MALFORMED_LABEL_DIALOG does not parse (line MALFORMED_LINE).
- missing_label_file: the consensus file of MISSING_LABEL_DIALOG is absent.
- missing_transcription: the transcription file of MISSING_TRANSCRIPT_DIALOG is absent.
- orphan_label: a consensus line for ORPHAN_LABEL_ID, which has no wav.
- missing_session: that SessionN folder is absent.
- latin1_transcript: the transcription file of LATIN1_TRANSCRIPT_DIALOG is Latin-1, not UTF-8:
  LATIN1_TRANSCRIPT_ID's text ends in "café" (byte 0xE9), which prepare reads as U+FFFD.
- short_wav: SHORT_WAV_ID holds SHORT_WAV_FRAMES (60) samples, 3.75 ms: a valid wav far below
  prepare's minimum duration and one wav2vec 2.0 frame (400 samples).
- duplicate_transcript_line: DUPLICATE_TRANSCRIPT_ID is transcribed twice (a second, different
  line at the end of its file); the first line counts.
- junk: AppleDouble / .DS_Store files (default True).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf

SR = 16000

# (dialog template, utterance suffix, consensus code or None = no consensus line,
#  transcript or None = no transcript line, expected 4-class label, speaking gender)
_TEMPLATE = [
    ("Ses0{s}F_impro01", "F000", "neu", "Excuse me.", "neutral", "F"),
    ("Ses0{s}F_impro01", "M000", "exc", "Do you have your forms? [LAUGHTER]", "happy", "M"),
    ("Ses0{s}F_impro01", "F001", "ang", "Yeah, I think so.", "angry", "F"),
    ("Ses0{s}F_impro01", "M001", "fru", "Well, that's not enough.", None, "M"),
    ("Ses0{s}F_impro01", "F002", None, "Hmm. [BREATHING]", None, "F"),
    ("Ses0{s}M_script01_1", "M000", "sad", "I'm sorry.", "sad", "M"),
    ("Ses0{s}M_script01_1", "F000", "hap", "What a lovely day.", "happy", "F"),
    ("Ses0{s}M_script01_1", "M001", "xxx", "Maybe.", None, "M"),
    ("Ses0{s}M_script01_1", "F001", "sad", None, "sad", "F"),
]
_EXTRA = {  # dialog names of the release with a letter suffix
    3: [("Ses03M_impro05a", "M000", "neu", "Okay.", "neutral", "M"),
        ("Ses03M_impro05a", "F000", "ang", "No!", "angry", "F"),
        ("Ses03M_impro05b", "M000", "hap", "Great news.", "happy", "M")],
    5: [("Ses05M_script01_1b", "F000", "neu", "Right.", "neutral", "F")],
}


def _utterances() -> list[dict]:
    rows = []
    for s in range(1, 6):
        for dialog_t, suffix, code, text, label, gender in _TEMPLATE + _EXTRA.get(s, []):
            dialog = dialog_t.format(s=s)
            rows.append({"id": f"{dialog}_{suffix}", "session": s, "dialog": dialog, "code": code,
                         "transcript": text, "label": label, "gender": gender})
    for i, r in enumerate(rows):
        r["frames"] = 1600 + 160 * i  # 0.1 s .. ~0.9 s, all different
        # the consensus line's [V, A, D]: ranges that never overlap (V 1-3, A 3.5-4.5, D 4.75-5), so
        # a test sees which value went where
        r["vad"] = (1.0 + 0.5 * (i % 5), 3.5 + 0.5 * (i % 3), 4.75 + 0.25 * (i % 2))
    return rows


UTTERANCES: list[dict] = _utterances()
N_UTTERANCES = len(UTTERANCES)  # 49
N_TASK = sum(r["label"] is not None for r in UTTERANCES)  # 34

CORRUPT_WAV_ID = "Ses02F_impro01_F001"
FLAC_WAV_ID = "Ses02M_script01_1_F000"
EMPTY_WAV_ID = "Ses02M_script01_1_M000"
BAD_RATE_WAV_ID = "Ses04F_impro01_F000"
STEREO_WAV_ID = "Ses04M_script01_1_M000"
MALFORMED_LABEL_DIALOG = "Ses03F_impro01"
MALFORMED_LINE = 3  # line number of the broken consensus line in that file
MISSING_LABEL_DIALOG = "Ses05M_script01_1"
MISSING_TRANSCRIPT_DIALOG = "Ses01M_script01_1"
ORPHAN_LABEL_ID = "Ses01F_impro01_M009"
LATIN1_TRANSCRIPT_DIALOG = "Ses02F_impro01"
LATIN1_TRANSCRIPT_ID = "Ses02F_impro01_F000"
LATIN1_TEXT = "Excuse me, café."  # written as Latin-1
DUPLICATE_TRANSCRIPT_ID = "Ses03F_impro01_M000"
SHORT_WAV_ID = "Ses01F_impro01_F001"  # angry: in the 4-class task
SHORT_WAV_FRAMES = 60

_APPLEDOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(range(64))


def _wav(path: Path, frames: int, sr: int = SR, channels: int = 1, fmt: str = "WAV") -> None:
    rng = np.random.default_rng(frames)
    data = (rng.standard_normal((frames, channels)) * 0.1).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data if channels > 1 else data[:, 0], sr, subtype="PCM_16", format=fmt)


def _emo_block(utt: dict, start: float) -> str:
    end = start + utt["frames"] / SR
    v, a, d = utt["vad"]
    return (f"[{start:.4f} - {end:.4f}]\t{utt['id']}\t{utt['code']}\t[{v:.4f}, {a:.4f}, {d:.4f}]\n"
            f"C-E2:\tNeutral;\t()\nC-E3:\tNeutral;\t()\n"
            f"A-E3:\tval 3; act 2; dom  2;\t()\nA-F1:\tval 2; act 3; dom  3;\t()\n\n")


def make_fake_iemocap(root: Path, *, corrupt_wav: bool = False, flac_wav: bool = False,
                      empty_wav: bool = False, bad_rate_wav: bool = False, stereo_wav: bool = False,
                      malformed_label: bool = False, missing_label_file: bool = False,
                      missing_transcription: bool = False, orphan_label: bool = False,
                      missing_session: int | None = None, latin1_transcript: bool = False,
                      duplicate_transcript_line: bool = False, short_wav: bool = False,
                      junk: bool = True) -> Path:
    """Build the fake tree under `root`; returns `root / "IEMOCAP_full_release"`."""
    release = Path(root) / "IEMOCAP_full_release"
    dialogs: dict[str, list[dict]] = {}
    for u in UTTERANCES:
        dialogs.setdefault(u["dialog"], []).append(u)
    for dialog, utts in dialogs.items():
        s = utts[0]["session"]
        if s == missing_session:
            continue
        sess = release / f"Session{s}"
        wav_dir = sess / "sentences" / "wav" / dialog
        for u in utts:
            path = wav_dir / f"{u['id']}.wav"
            if corrupt_wav and u["id"] == CORRUPT_WAV_ID:
                path.write_bytes(b"this is not a wav file, just text\n" * 4)
            elif flac_wav and u["id"] == FLAC_WAV_ID:
                _wav(path, u["frames"], fmt="FLAC")
            elif empty_wav and u["id"] == EMPTY_WAV_ID:
                _wav(path, 0)
            elif bad_rate_wav and u["id"] == BAD_RATE_WAV_ID:
                _wav(path, u["frames"], sr=44100)
            elif stereo_wav and u["id"] == STEREO_WAV_ID:
                _wav(path, u["frames"], channels=2)
            elif short_wav and u["id"] == SHORT_WAV_ID:
                _wav(path, SHORT_WAV_FRAMES)
            else:
                _wav(path, u["frames"])
            if junk:
                (wav_dir / f"._{u['id']}.wav").write_bytes(_APPLEDOUBLE)
        if junk:
            (wav_dir / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(32))
            (sess / "sentences" / "wav" / f"._{dialog}").write_bytes(_APPLEDOUBLE)
        # The whole dialog, stereo: not needed for SER and never opened by prepare.
        _wav(sess / "dialog" / "wav" / f"{dialog}.wav", 800, channels=2)

        emo_dir = sess / "dialog" / "EmoEvaluation"
        emo_dir.mkdir(parents=True, exist_ok=True)
        text = "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"
        t = 1.0
        for u in reversed(utts):  # the release does not sort turns by name
            if u["code"] is not None:
                text += _emo_block(u, t)
            t += 2.0
        if malformed_label and dialog == MALFORMED_LABEL_DIALOG:
            # Line MALFORMED_LINE (after the header and a blank line): a broken consensus line.
            text = text.replace("\n\n", f"\n\n[7.0000 - ]\t{dialog}_F009\tneu\t[2.5000, 2.5000]\n", 1)
        if orphan_label and dialog == ORPHAN_LABEL_ID.rsplit("_", 1)[0]:
            text += f"[99.0000 - 100.5000]\t{ORPHAN_LABEL_ID}\tang\t[1.5000, 4.0000, 4.0000]\n\n"
        if not (missing_label_file and dialog == MISSING_LABEL_DIALOG):
            (emo_dir / f"{dialog}.txt").write_text(text)
        for sub, name, line in (("Categorical", f"{dialog}_e2_cat.txt", ":Neutral state; ()"),
                                ("Attribute", f"{dialog}_e3_atr.txt", ":val 3; act 2; dom  2;  ()"),
                                ("Self-evaluation", f"{dialog}.txt", ":Neutral state; ()")):
            (emo_dir / sub).mkdir(exist_ok=True)
            (emo_dir / sub / name).write_text("".join(f"{u['id']} {line}\n" for u in utts))
        if junk:
            (emo_dir / f"._{dialog}.txt").write_bytes(_APPLEDOUBLE)

        tr_dir = sess / "dialog" / "transcriptions"
        tr_dir.mkdir(parents=True, exist_ok=True)
        lines, t = [], 1.0
        for u in utts:
            text = u["transcript"]
            if latin1_transcript and u["id"] == LATIN1_TRANSCRIPT_ID:
                text = LATIN1_TEXT
            if text is not None:
                lines.append(f"{u['id']} [{t:08.4f}-{t + u['frames'] / SR:08.4f}]: {text}")
            t += 2.0
        lines.insert(1, "F: Yeah.")  # a line without a turn id
        gender = dialog[5]
        lines.append(f"{dialog}_{gender}XX0 [{t:08.4f}-{t + 1:08.4f}]: Mm-hmm.")  # no wav, no label
        if duplicate_transcript_line and dialog == DUPLICATE_TRANSCRIPT_ID.rsplit("_", 1)[0]:
            lines.append(f"{DUPLICATE_TRANSCRIPT_ID} [{t:08.4f}-{t + 1:08.4f}]: A second, different line.")
        encoding = "latin-1" if latin1_transcript and dialog == LATIN1_TRANSCRIPT_DIALOG else "utf-8"
        if not (missing_transcription and dialog == MISSING_TRANSCRIPT_DIALOG):
            (tr_dir / f"{dialog}.txt").write_text("\n".join(lines) + "\n", encoding=encoding)
        if junk:
            (tr_dir / f"._{dialog}.txt").write_bytes(_APPLEDOUBLE)
    if junk:
        release.mkdir(parents=True, exist_ok=True)
        (release / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    return release


def expected_records(release: Path, *, missing_transcription: bool = False,
                     latin1_transcript: bool = False, short_wav: bool = False,
                     exclude: tuple[str, ...] = ()) -> list[dict]:
    """The manifest records prepare should write for a tree built with the given options
    (`exclude`: ids expected to be skipped), sorted by id."""
    out = []
    for u in UTTERANCES:
        if u["id"] in exclude:
            continue
        s = u["session"]
        text = u["transcript"]
        if missing_transcription and u["dialog"] == MISSING_TRANSCRIPT_DIALOG:
            text = None
        if latin1_transcript and u["id"] == LATIN1_TRANSCRIPT_ID:
            text = "Excuse me, caf\ufffd."  # the Latin-1 byte 0xE9 is not UTF-8: replaced
        out.append({
            "id": u["id"],
            "path": str(Path(release) / f"Session{s}" / "sentences" / "wav" / u["dialog"] / f"{u['id']}.wav"),
            "session": s,
            "speaker": f"Ses0{s}{u['gender']}",
            "gender": u["gender"],
            "dialog": u["dialog"],
            "scripted": "script" in u["dialog"],
            "emotion_code": u["code"],
            "label": u["label"],
            "transcript": text,
            "duration": (SHORT_WAV_FRAMES if short_wav and u["id"] == SHORT_WAV_ID else u["frames"]) / SR,
            # [V, A, D] of the consensus line (none without one), on IEMOCAP's 1-5 scale
            "arousal": u["vad"][1] if u["code"] is not None else None,
            "valence": u["vad"][0] if u["code"] is not None else None,
            "dominance": u["vad"][2] if u["code"] is not None else None,
            "dim_scales": {"arousal": [1.0, 5.0], "valence": [1.0, 5.0], "dominance": [1.0, 5.0]},
        })
    return sorted(out, key=lambda r: r["id"])
