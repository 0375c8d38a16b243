"""`mmser prepare iemocap`: fake release trees (tests/fake_iemocap.py) -> exact manifests, errors,
skips, idempotence, CLI. The real corpus is checked only under the opt-in `corpus` marker."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from fake_iemocap import (
    BAD_RATE_WAV_ID,
    CORRUPT_WAV_ID,
    DUPLICATE_TRANSCRIPT_ID,
    EMPTY_WAV_ID,
    FLAC_WAV_ID,
    LATIN1_TRANSCRIPT_DIALOG,
    MALFORMED_LABEL_DIALOG,
    MALFORMED_LINE,
    MISSING_LABEL_DIALOG,
    MISSING_TRANSCRIPT_DIALOG,
    N_TASK,
    N_UTTERANCES,
    ORPHAN_LABEL_ID,
    SHORT_WAV_FRAMES,
    SHORT_WAV_ID,
    STEREO_WAV_ID,
    UTTERANCES,
    expected_records,
)

from mmser.cli import main
from mmser.data.iemocap import (
    MIN_DURATION_S,
    PrepareResult,
    check_expected_counts,
    parse_emo_evaluation,
    parse_transcriptions,
    prepare_iemocap,
    scan_iemocap,
)
from mmser.data.manifest import REQUIRED_FIELDS, load_manifest


def _wav_path(release: Path, utt_id: str) -> Path:
    u = next(u for u in UTTERANCES if u["id"] == utt_id)
    return release / f"Session{u['session']}" / "sentences" / "wav" / u["dialog"] / f"{utt_id}.wav"


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


# --------------------------------------------------------------------------------------------
# Parsers
# --------------------------------------------------------------------------------------------


def test_parse_emo_evaluation_keeps_consensus_lines_only(tmp_path):
    f = tmp_path / "Ses01F_impro01.txt"
    f.write_text("% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"
                 "[6.2901 - 8.2357]\tSes01F_impro01_F000\tneu\t[2.5000, 2.0000, 3.5000]\n"
                 "C-E2:\tNeutral;\t()\nC-E3:\tAnger;\t()\nA-E3:\tval 3; act 2; dom  2;\t()\n\n"
                 "[10.0100 - 11.3925]\tSes01F_impro01_M000\texc\t[3.0000, 3.5000, 3.0000]\r\n"
                 "C-E1:\tExcited;\t()\n")
    out = parse_emo_evaluation(f)
    assert out == {
        "Ses01F_impro01_F000": {"code": "neu", "start": 6.2901, "end": 8.2357, "vad": [2.5, 2.0, 3.5]},
        "Ses01F_impro01_M000": {"code": "exc", "start": 10.01, "end": 11.3925, "vad": [3.0, 3.5, 3.0]},
    }


@pytest.mark.parametrize("line, problem", [
    ("[6.2901 - ]\tSes01F_impro01_F000\tneu\t[2.5, 2.5, 2.5]", "does not parse"),
    ("Ses01F_impro01_F000\tneu\t[2.5, 2.5, 2.5]", "does not parse"),
    ("[6.2901 - 8.2357]\tSes01F_impro01_F000\tneu\t[2.5, 2.5]", "expected 3 values"),
    ("[6.2901 - 8.2357]\tSes01F_impro01_F000\tjoy\t[2.5, 2.5, 2.5]", "unknown emotion code 'joy'"),
    ("[6.2901 - 8.2357]\tSes01F_impro01_F000\tneu\t[2.5, x, 2.5]", "bad number"),
])
def test_parse_emo_evaluation_bad_consensus_line_names_file_and_line(tmp_path, line, problem):
    f = tmp_path / "Ses01F_impro01.txt"
    f.write_text("% header\n\n" + "C-E2:\tNeutral;\t()\n" + line + "\n")
    with pytest.raises(ValueError, match=rf"Ses01F_impro01\.txt:4: .*{problem}"):
        parse_emo_evaluation(f)


def test_parse_emo_evaluation_duplicate_turn_and_binary_junk(tmp_path):
    f = tmp_path / "a.txt"
    line = "[1.0 - 2.0]\tSes01F_impro01_F000\tneu\t[2.5, 2.5, 2.5]\n"
    f.write_text(line + line)  # a verbatim repeat is harmless
    assert parse_emo_evaluation(f)["Ses01F_impro01_F000"]["code"] == "neu"
    f.write_text(line + line.replace("neu", "sad") + line)
    with pytest.raises(ValueError, match=r"a\.txt:2: turn Ses01F_impro01_F000 labelled twice \(neu, sad\)"):
        parse_emo_evaluation(f)
    f.write_bytes(b"\x00\x05\x16\x07\xff\xfe junk")
    with pytest.raises(ValueError, match=r"a\.txt: not UTF-8"):
        parse_emo_evaluation(f)


def test_parse_transcriptions_quirks(tmp_path):
    f = tmp_path / "Ses01F_impro01.txt"
    f.write_text("Ses01F_impro01_F000 [006.2901-008.2357]: Excuse me.\n"
                 "F: Yeah.\n"
                 "Ses01F_impro01_M000 [008.5000-010.0000]: Do you have [LAUGHTER] your forms?  \n"
                 "Ses01F_impro01_MXX0 [010.0000-011.0000]: Mm-hmm.\n"
                 "\n"
                 "Ses01F_impro01_F001 [011.0000-012.0000]:\n")
    f.write_bytes(f.read_bytes() + b"Ses01F_impro01_F002 [012.0000-013.0000]: caf\xe9\n")  # latin-1
    assert parse_transcriptions(f) == {
        "Ses01F_impro01_F002": "caf\ufffd",
        "Ses01F_impro01_F000": "Excuse me.",
        "Ses01F_impro01_M000": "Do you have [LAUGHTER] your forms?",
        "Ses01F_impro01_F001": "",
    }


# --------------------------------------------------------------------------------------------
# The manifest of a clean tree
# --------------------------------------------------------------------------------------------


def test_prepare_writes_exact_manifest(fake_iemocap, tmp_path):
    before = _snapshot(fake_iemocap)
    res = prepare_iemocap(fake_iemocap, tmp_path / "out")
    assert _snapshot(fake_iemocap) == before  # read-only: nothing written or touched in the tree
    assert not res.reused and res.skipped == []
    records = load_manifest(res.manifest)
    assert records == expected_records(fake_iemocap)
    assert len(records) == N_UTTERANCES and sum(r["label"] is not None for r in records) == N_TASK
    assert all(tuple(r) == REQUIRED_FIELDS + ("arousal", "valence", "dominance", "dim_scales") for r in records)
    assert all(os.path.isabs(r["path"]) and Path(r["path"]).is_file() for r in records)
    # AppleDouble and .DS_Store files sit next to the real ones but are ignored.
    assert not any("/._" in r["path"] or r["id"].startswith(".") for r in records)
    # The only warning of the default tree: one utterance per session without a transcript line.
    assert len(res.warnings) == 1 and "5 utterance(s) have no transcript line" in res.warnings[0]
    assert scan_iemocap(fake_iemocap) == records


def test_manifest_fields_spelled_out(fake_iemocap, tmp_path):
    recs = {r["id"]: r for r in load_manifest(prepare_iemocap(fake_iemocap, tmp_path / "o").manifest)}
    wav = fake_iemocap / "Session1/sentences/wav/Ses01F_impro01/Ses01F_impro01_M000.wav"
    # exc -> happy; the male actor speaks in the female actor's dialog.
    assert recs["Ses01F_impro01_M000"] == {
        "id": "Ses01F_impro01_M000", "path": str(wav), "session": 1, "speaker": "Ses01M",
        "gender": "M", "dialog": "Ses01F_impro01", "scripted": False, "emotion_code": "exc",
        "label": "happy", "transcript": "Do you have your forms? [LAUGHTER]", "duration": 1760 / 16000,
        # its consensus line ends in [1.5000, 4.0000, 5.0000]: [V, A, D]
        "arousal": 4.0, "valence": 1.5, "dominance": 5.0,
        "dim_scales": {"arousal": [1.0, 5.0], "valence": [1.0, 5.0], "dominance": [1.0, 5.0]}}
    assert recs["Ses01F_impro01_M001"]["emotion_code"] == "fru"
    assert recs["Ses01F_impro01_M001"]["label"] is None  # out of the 4-class task, still listed
    assert recs["Ses01F_impro01_F002"]["emotion_code"] is None  # wav without a consensus line
    assert recs["Ses01F_impro01_F002"]["label"] is None
    s = recs["Ses02M_script01_1_F000"]
    assert (s["scripted"], s["gender"], s["speaker"], s["label"]) == (True, "F", "Ses02F", "happy")
    assert recs["Ses02M_script01_1_F001"]["transcript"] is None  # no transcript line
    assert recs["Ses02M_script01_1_M001"]["emotion_code"] == "xxx"
    assert recs["Ses03M_impro05b_M000"]["dialog"] == "Ses03M_impro05b"
    assert recs["Ses05M_script01_1b_F000"]["scripted"] is True
    assert not any("XX0" in i for i in recs)  # transcript-only turns have no wav, no record


def test_report_and_fold_files(fake_iemocap, tmp_path):
    out = tmp_path / "out"
    res = prepare_iemocap(fake_iemocap, out)
    report = json.loads(res.report.read_text())
    per_session = {s: report["counts"]["per_session"][str(s)]["task"] for s in range(1, 6)}
    assert per_session == {1: 6, 2: 6, 3: 9, 4: 6, 5: 7}
    assert report["counts"]["per_class"] == {"angry": 6, "happy": 11, "neutral": 7, "sad": 10}
    assert report["counts"]["per_code"]["none"] == 5 and report["counts"]["per_code"]["exc"] == 5
    assert report["no_label_line"] == 5
    assert report["ignored_junk_files"] > N_UTTERANCES  # one ._x.wav per wav, plus more
    assert len(report["fingerprint"]) == 16 and report["skipped"] == []
    records = load_manifest(res.manifest)
    task_ids = {r["id"] for r in records if r["label"] is not None}
    assert [p.name for p in res.folds] == [f"fold{k}.json" for k in range(1, 6)]
    for k in range(1, 6):
        fold = json.loads((out / "folds" / f"fold{k}.json").read_text())
        assert set(fold) == {"test_session", "train", "test"} and fold["test_session"] == k
        assert len(fold["test"]) == per_session[k]
        assert all(i.startswith(f"Ses0{k}") for i in fold["test"])
        assert not any(i.startswith(f"Ses0{k}") for i in fold["train"])
        assert set(fold["train"]) | set(fold["test"]) == task_ids
        assert fold["train"] == sorted(fold["train"])


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_unreadable_wavs_are_skipped_with_reasons(fake_iemocap_factory, tmp_path):
    release = fake_iemocap_factory(corrupt_wav=True, flac_wav=True, empty_wav=True)
    res = prepare_iemocap(release, tmp_path / "out")
    reasons = {Path(x["path"]).stem: x["reason"] for x in res.skipped}
    assert set(reasons) == {CORRUPT_WAV_ID, FLAC_WAV_ID, EMPTY_WAV_ID}
    assert reasons[CORRUPT_WAV_ID].startswith("unreadable audio")
    assert reasons[FLAC_WAV_ID] == "not a RIFF/WAVE file (format FLAC)"
    assert reasons[EMPTY_WAV_ID] == "no audio samples"
    bad = (CORRUPT_WAV_ID, FLAC_WAV_ID, EMPTY_WAV_ID)
    assert {x["path"] for x in res.skipped} == {str(_wav_path(release, u)) for u in bad}
    assert load_manifest(res.manifest) == expected_records(release, exclude=bad)
    assert json.loads(res.report.read_text())["skipped"] == res.skipped
    assert f"skipped {_wav_path(release, CORRUPT_WAV_ID)}: unreadable audio" in res.summary()

    # --strict: the same skips become one error listing every file; nothing is written.
    with pytest.raises(ValueError, match=r"strict\): 3 problem") as e:
        prepare_iemocap(release, tmp_path / "strict", strict=True)
    for utt in bad:
        assert str(_wav_path(release, utt)) in str(e.value)
    assert not (tmp_path / "strict").exists()
    # A reused result keeps --strict honest too.
    with pytest.raises(ValueError, match=r"strict\): 3 problem"):
        prepare_iemocap(release, tmp_path / "out", strict=True)


def test_audio_not_16k_mono_is_an_error_naming_each_file(fake_iemocap_factory, tmp_path):
    release = fake_iemocap_factory(bad_rate_wav=True, stereo_wav=True)
    with pytest.raises(ValueError, match="not 16 kHz mono") as e:
        prepare_iemocap(release, tmp_path / "out")
    msg = str(e.value)
    assert f"{_wav_path(release, BAD_RATE_WAV_ID)}: 44100 Hz, 1 channel(s)" in msg
    assert f"{_wav_path(release, STEREO_WAV_ID)}: 16000 Hz, 2 channel(s)" in msg
    assert not (tmp_path / "out").exists()


def test_malformed_label_file_is_an_error_naming_file_and_line(fake_iemocap_factory, tmp_path):
    release = fake_iemocap_factory(malformed_label=True)
    label_file = release / "Session3/dialog/EmoEvaluation" / f"{MALFORMED_LABEL_DIALOG}.txt"
    problem = "consensus label line does not parse"
    with pytest.raises(ValueError, match=rf"^{re.escape(str(label_file))}:{MALFORMED_LINE}: {problem}"):
        prepare_iemocap(release, tmp_path / "out")


def test_missing_label_file_is_an_error(fake_iemocap_factory, tmp_path):
    release = fake_iemocap_factory(missing_label_file=True)
    label_file = release / "Session5/dialog/EmoEvaluation" / f"{MISSING_LABEL_DIALOG}.txt"
    with pytest.raises(FileNotFoundError, match=rf"^{re.escape(str(label_file))}: missing consensus label file"):
        prepare_iemocap(release, tmp_path / "out")


def test_missing_session_is_always_an_error(fake_iemocap_factory, tmp_path):
    release = fake_iemocap_factory(missing_session=4)
    with pytest.raises(FileNotFoundError, match=re.escape(f"missing session folder {release / 'Session4'};")):
        prepare_iemocap(release, tmp_path / "out")
    # Pointing at the folder above the release gets a hint.
    with pytest.raises(FileNotFoundError, match="did you mean .*IEMOCAP_full_release"):
        prepare_iemocap(release.parent, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        prepare_iemocap(tmp_path / "nowhere", tmp_path / "out")


def test_missing_transcription_and_orphan_label_are_warnings(fake_iemocap_factory, tmp_path):
    release = fake_iemocap_factory(missing_transcription=True, orphan_label=True)
    res = prepare_iemocap(release, tmp_path / "out")
    assert load_manifest(res.manifest) == expected_records(release, missing_transcription=True)
    tr_file = release / "Session1/dialog/transcriptions" / f"{MISSING_TRANSCRIPT_DIALOG}.txt"
    assert any(w.startswith(f"{tr_file}: missing transcription file") for w in res.warnings)
    assert any(w.startswith("Session1: 1 labelled turn(s) have no wav") and ORPHAN_LABEL_ID in w
               for w in res.warnings)
    assert res.skipped == []
    prepare_iemocap(release, tmp_path / "strict", strict=True)  # warnings are not skips


def test_every_prepare_warning_is_in_the_report_and_summary(fake_iemocap_factory, tmp_path, caplog, capsys):
    """A Latin-1 transcript and a duplicated transcript line used to warn only in the log while
    prepare_report.json and the printed summary said nothing about them. Every warning prepare
    emits goes into one list that the log, the report and the summary all show."""
    release = fake_iemocap_factory(latin1_transcript=True, duplicate_transcript_line=True)
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="mmser.data.iemocap"):
        assert main(["prepare", "iemocap", str(release), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    latin1 = release / "Session2/dialog/transcriptions" / f"{LATIN1_TRANSCRIPT_DIALOG}.txt"
    dup = release / "Session3/dialog/transcriptions" / f"{DUPLICATE_TRANSCRIPT_ID.rsplit('_', 1)[0]}.txt"
    expected = [f"{latin1}: not UTF-8 text", f"{dup}: turn {DUPLICATE_TRANSCRIPT_ID} transcribed twice"]
    report = json.loads((out / "prepare_report.json").read_text())
    logged = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    for start in expected:
        assert sum(w.startswith(start) for w in report["warnings"]) == 1, start
        assert any(w.startswith(start) for w in logged), start
        assert f"  warning: {start}" in printed, start
    # One list: what is logged is what is reported (3 = the two above + the missing transcript lines).
    assert sorted(logged) == sorted(report["warnings"]) and len(report["warnings"]) == 3
    assert "3 warning(s)" in printed
    assert load_manifest(out / "manifest.jsonl") == expected_records(release, latin1_transcript=True)
    # Reusing the outputs reports the same warnings.
    again = prepare_iemocap(release, out)
    assert again.reused and again.warnings == report["warnings"]


def test_summary_lists_at_most_20_warnings_and_points_to_the_report(tmp_path):
    res = PrepareResult(manifest=tmp_path / "manifest.jsonl", report=tmp_path / "prepare_report.json",
                        folds=[], counts={"utterances": 0, "task": 0, "task_hours": 0.0, "per_class": {}},
                        skipped=[], warnings=[f"w{i}" for i in range(25)], reused=False)
    text = res.summary()
    assert "25 warning(s)" in text and "  warning: w19" in text and "w20" not in text
    assert f"... and 5 more warning(s) in {tmp_path / 'prepare_report.json'}" in text


def test_too_short_clips_are_kept_and_reported(fake_iemocap_factory, tmp_path, capsys):
    """A 60-sample clip used to pass prepare unremarked and fail a whole fold late in training.
    Prepare keeps it in the manifest (the datamodule skips what the encoder cannot take) and lists
    it in prepare_report.json (`too_short`) and in the printed summary."""
    assert MIN_DURATION_S == 0.1
    release = fake_iemocap_factory(short_wav=True)
    out = tmp_path / "out"
    assert main(["prepare", "iemocap", str(release), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "prepare_report.json").read_text())
    duration = SHORT_WAV_FRAMES / 16000
    assert report["too_short"] == {
        "min_duration_s": 0.1, "count": 1,
        "clips": [{"id": SHORT_WAV_ID, "path": str(_wav_path(release, SHORT_WAV_ID)), "duration": duration}]}
    # The fake tree's shortest normal clip is exactly 0.1 s (1,600 samples): not "under".
    assert min(u["frames"] for u in UTTERANCES) == 1600
    assert load_manifest(out / "manifest.jsonl") == expected_records(release, short_wav=True)
    assert "1 too short (< 0.1 s, kept)" in printed
    assert any(w.startswith("1 clip(s) shorter than 0.1 s") and SHORT_WAV_ID in w for w in report["warnings"])
    assert "warning: 1 clip(s) shorter than 0.1 s" in printed and SHORT_WAV_ID in printed
    prepare_iemocap(release, tmp_path / "strict", strict=True)  # kept, not skipped: strict passes
    again = prepare_iemocap(release, out)
    assert again.reused and [c["id"] for c in again.too_short] == [SHORT_WAV_ID]
    # A clean tree: none.
    clean = prepare_iemocap(fake_iemocap_factory(), tmp_path / "clean")
    assert clean.too_short == [] and json.loads(clean.report.read_text())["too_short"]["count"] == 0


def test_real_corpus_count_check():
    def recs(per_session: dict[int, int]) -> list[dict]:
        out = []
        for s, n in per_session.items():
            out += [{"session": s, "emotion_code": "neu", "label": "neutral"}] * n
            out += [{"session": s, "emotion_code": "fru", "label": None}] * 800
        return out

    paper = {1: 1085, 2: 1023, 3: 1151, 4: 1031, 5: 1241}
    assert check_expected_counts(recs(paper)) == []
    warn = check_expected_counts(recs({**paper, 3: 1150}))
    assert len(warn) == 1 and "5,530" in warn[0] and "1085/1023/1150/1031/1241" in warn[0]
    assert "5,531" in warn[0]
    assert check_expected_counts(recs({1: 100, 2: 100, 3: 100, 4: 100, 5: 100})) == []  # not the corpus
    assert check_expected_counts(recs({1: 1085, 2: 1023, 3: 1151, 4: 1031})) == []  # 4 sessions


# --------------------------------------------------------------------------------------------
# Idempotence
# --------------------------------------------------------------------------------------------


def test_second_run_reuses_and_changes_rebuild(fake_iemocap, tmp_path):
    out = tmp_path / "out"
    first = prepare_iemocap(fake_iemocap, out)
    manifest_bytes = first.manifest.read_bytes()
    folds_bytes = [p.read_bytes() for p in first.folds]
    outputs = _snapshot(out)

    second = prepare_iemocap(fake_iemocap, out)
    assert second.reused and "reused" in second.summary()
    assert _snapshot(out) == outputs  # no work: not even a rewrite
    assert second.counts == first.counts and second.warnings == first.warnings

    wav = _wav_path(fake_iemocap, "Ses02F_impro01_M000")
    st = wav.stat()
    os.utime(wav, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touch
    third = prepare_iemocap(fake_iemocap, out)
    assert not third.reused
    assert third.manifest.read_bytes() == manifest_bytes  # byte-identical output
    assert [p.read_bytes() for p in third.folds] == folds_bytes
    assert prepare_iemocap(fake_iemocap, out).reused

    assert not prepare_iemocap(fake_iemocap, out, force=True).reused
    # A hand-edited manifest is not trusted.
    first.manifest.write_text(first.manifest.read_text().replace('"neu"', '"sad"', 1))
    again = prepare_iemocap(fake_iemocap, out)
    assert not again.reused and again.manifest.read_bytes() == manifest_bytes


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def test_cli_prepare_prints_fold_table(fake_iemocap, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prepare", "iemocap", str(fake_iemocap), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"IEMOCAP: wrote {out / 'manifest.jsonl'}: {N_UTTERANCES} utterances, {N_TASK} in" in text
    # fold | split | n | angry | happy | neutral | sad | hours
    assert "| 1 | train | 28 | 5 | 9 | 6 | 8 |" in text
    assert "| 1 | test | 6 | 1 | 2 | 1 | 2 |" in text
    assert "| 3 | test | 9 | 2 | 3 | 2 | 2 |" in text
    assert (out / "folds" / "fold5.json").is_file()
    assert main(["prepare", "iemocap", str(fake_iemocap), "--out", str(out)]) == 0
    assert "inputs unchanged, reused" in capsys.readouterr().out


def test_cli_prepare_bad_input_exits_2_naming_the_file(fake_iemocap_factory, tmp_path, capsys):
    release = fake_iemocap_factory(corrupt_wav=True)
    rc = main(["prepare", "iemocap", str(release), "--out", str(tmp_path / "out"), "--strict"])
    assert rc == 2
    assert str(_wav_path(release, CORRUPT_WAV_ID)) in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# The real corpus (opt-in): MMSER_IEMOCAP_ROOT=/path/to/IEMOCAP_full_release pytest -m corpus
# --------------------------------------------------------------------------------------------


@pytest.mark.corpus
def test_real_corpus_counts(tmp_path):
    root = os.environ.get("MMSER_IEMOCAP_ROOT")
    if not root:
        pytest.skip("set MMSER_IEMOCAP_ROOT to the IEMOCAP_full_release folder")
    res = prepare_iemocap(Path(root), tmp_path / "out")
    assert res.counts["task"] == 5531
    assert res.counts["per_class"] == {"angry": 1103, "happy": 1636, "neutral": 1708, "sad": 1084}
    assert [res.counts["per_session"][str(s)]["task"] for s in range(1, 6)] == [1085, 1023, 1151, 1031, 1241]
    assert res.counts["per_code"]["exc"] == 1041 and res.counts["per_code"]["hap"] == 595
    assert res.skipped == [] and not any("looks like the real" in w for w in res.warnings)
