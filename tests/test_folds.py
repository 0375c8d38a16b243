"""Leave-one-session-out folds (mmser.data.manifest): no test-session leakage under any validation
policy, speaker hold-out outside the test session, seeded stratified fraction hold-out."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from mmser.cli import main
from mmser.config import DataConfig
from mmser.data.manifest import Fold, ManifestError, fold_table, load_manifest, split_fold, write_fold_files
from mmser.labels import CLASSES

POLICIES = [DataConfig(validation="none"), DataConfig(validation="speaker"),
            DataConfig(validation="speaker", val_speaker="Ses01M"),
            DataConfig(validation="fraction", val_fraction=0.2, val_seed=7)]


def _records() -> list[dict]:
    """IEMOCAP-shaped records: 5 sessions x 2 actors x 4 classes (uneven counts) + out-of-task."""
    out = []
    for s in range(1, 6):
        for g in "FM":
            for ci, c in enumerate(CLASSES):
                for i in range(2 + ci + s + (g == "M")):
                    out.append({"id": f"Ses0{s}{g}_impro01_{g}{ci}{i:02d}", "session": s,
                                "speaker": f"Ses0{s}{g}", "label": c, "duration": 1.5})
            out.append({"id": f"Ses0{s}{g}_impro01_{g}900", "session": s, "speaker": f"Ses0{s}{g}",
                        "label": None, "duration": 2.0})
    return out


RECORDS = _records()
TASK = [r for r in RECORDS if r["label"] is not None]


def _ids(part: list[dict]) -> list[str]:
    return [r["id"] for r in part]


@pytest.mark.parametrize("cfg", POLICIES, ids=lambda c: f"{c.validation}-{c.val_speaker}")
@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_no_test_session_leaks_and_counts_add_up(cfg, k):
    if cfg.val_speaker and cfg.val_speaker.startswith(f"Ses0{k}"):
        with pytest.raises(ValueError, match="belongs to the test session"):
            split_fold(RECORDS, k, cfg)
        return
    fold = split_fold(RECORDS, k, cfg)
    assert fold.test_session == k
    assert not any(r["session"] == k for r in fold.train + fold.val)
    assert sorted(_ids(fold.test)) == sorted(r["id"] for r in TASK if r["session"] == k)
    all_ids = _ids(fold.train) + _ids(fold.val) + _ids(fold.test)
    assert len(all_ids) == len(set(all_ids)) == len(TASK)  # disjoint, complete, 4-class only
    assert set(all_ids) == {r["id"] for r in TASK}
    if cfg.validation == "none":
        assert fold.val == []
    else:
        assert fold.val and fold.train


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
def test_speaker_policy_holds_out_one_training_actor(k):
    fold = split_fold(RECORDS, k, DataConfig(validation="speaker"))
    expected = f"Ses0{k % 5 + 1}F"  # default: F actor of the next session, 5 wraps to 1
    assert {r["speaker"] for r in fold.val} == {expected} and fold.val_detail == expected
    assert len(fold.val) == sum(r["speaker"] == expected for r in TASK)  # all of that actor
    assert expected not in {r["speaker"] for r in fold.train}
    assert not any(r["speaker"].startswith(f"Ses0{k}") for r in fold.val)


def test_speaker_policy_refuses_a_test_session_or_unknown_speaker():
    with pytest.raises(ValueError, match="Ses02M belongs to the test session 2"):
        split_fold(RECORDS, 2, DataConfig(validation="speaker", val_speaker="Ses02M"))
    with pytest.raises(ValueError, match="Ses07F has no task utterances"):
        split_fold(RECORDS, 2, DataConfig(validation="speaker", val_speaker="Ses07F"))


def test_fraction_policy_is_deterministic_and_stratified():
    cfg = DataConfig(validation="fraction", val_fraction=0.2, val_seed=7)
    fold = split_fold(RECORDS, 3, cfg)
    shuffled = RECORDS[:]
    random.Random(0).shuffle(shuffled)
    again = split_fold(shuffled, 3, cfg)  # same seed, any record order -> same split
    assert sorted(_ids(again.val)) == sorted(_ids(fold.val))
    rest = Counter(r["label"] for r in TASK if r["session"] != 3)
    val = Counter(r["label"] for r in fold.val)
    assert {c: val[c] for c in CLASSES} == {c: round(rest[c] * 0.2) for c in CLASSES}  # per class
    other = split_fold(RECORDS, 3, DataConfig(validation="fraction", val_fraction=0.2, val_seed=8))
    assert sorted(_ids(other.val)) != sorted(_ids(fold.val))  # the seed matters
    with pytest.raises(ValueError, match="val_fraction must be in"):
        split_fold(RECORDS, 3, DataConfig(validation="fraction", val_fraction=1.0))


def test_bad_session_and_fold_check():
    with pytest.raises(ValueError, match="test session must be one of"):
        split_fold(RECORDS, 6)
    fold = split_fold(RECORDS, 1)
    leaky = Fold(test_session=1, train=fold.train + fold.test[:1], test=fold.test)
    with pytest.raises(AssertionError, match="test-session utterances in train"):
        leaky.check()


def test_fold_files_match_split_fold(tmp_path):
    paths = write_fold_files(RECORDS, tmp_path / "folds")
    assert [p.name for p in paths] == [f"fold{k}.json" for k in range(1, 6)]
    for k, p in enumerate(paths, 1):
        obj = json.loads(p.read_text())
        fold = split_fold(RECORDS, k)
        assert obj == {"test_session": k, "train": sorted(_ids(fold.train)), "test": sorted(_ids(fold.test))}
    cfg = DataConfig(validation="speaker")
    obj = json.loads(write_fold_files(RECORDS, tmp_path / "spk", cfg)[0].read_text())
    assert obj["val_policy"] == "speaker" and obj["val"] == sorted(_ids(split_fold(RECORDS, 1, cfg).val))


def test_fold_table_counts():
    table = fold_table(RECORDS, DataConfig(validation="speaker"))
    n1 = sum(r["session"] == 1 for r in TASK)
    per_class = Counter(r["label"] for r in TASK if r["session"] == 1)
    row = f"| 1 | test | {n1} | " + " | ".join(str(per_class[c]) for c in CLASSES)
    assert row in table
    assert "| 1 | val (Ses02F) |" in table and "| 5 | val (Ses01F) |" in table
    assert "val" not in fold_table(RECORDS)  # paper default: no validation rows


# --------------------------------------------------------------------------------------------
# Manifest validation at load time (load_manifest)
# --------------------------------------------------------------------------------------------


def _manifest_record(uid: str = "Ses01F_impro01_F000", **fields) -> dict:
    rec = {"id": uid, "path": f"/data/{uid}.wav", "session": 1, "speaker": "Ses01F", "gender": "F",
           "dialog": "Ses01F_impro01", "scripted": False, "emotion_code": "neu", "label": "neutral",
           "transcript": "Excuse me.", "duration": 1.5}
    rec.update(fields)
    return rec


def _write_lines(path, lines: list[str]):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _clean_manifest_lines() -> list[str]:
    return [json.dumps(_manifest_record(f"Ses0{s}F_impro01_F00{i}", session=s, speaker=f"Ses0{s}F",
                                        dialog=f"Ses0{s}F_impro01"))
            for s in range(1, 6) for i in range(2)]


def test_load_manifest_accepts_a_valid_manifest_with_blank_lines_and_null_labels(tmp_path):
    lines = _clean_manifest_lines()
    lines.insert(3, "")
    lines.append(json.dumps(_manifest_record("Ses01F_impro01_M000", label=None, emotion_code=None,
                                             transcript=None, gender="M", speaker="Ses01M")))
    records = load_manifest(_write_lines(tmp_path / "manifest.jsonl", lines))
    assert len(records) == 11 and records[-1]["label"] is None


def test_duplicate_id_is_a_load_error_naming_file_and_lines(tmp_path, capsys):
    """A duplicate id used to pass load_manifest and fail in split_fold with Fold.check's
    `AssertionError: an utterance is in two splits` (also from `mmser folds`)."""
    lines = _clean_manifest_lines()
    dup = json.loads(lines[1])
    lines.append(json.dumps({**dup, "label": "sad"}))  # line 11 repeats line 2's id
    manifest = _write_lines(tmp_path / "manifest.jsonl", lines)
    with pytest.raises(ManifestError) as e:
        load_manifest(manifest)
    msg = str(e.value)
    assert isinstance(e.value, ValueError) and "\n" not in msg
    assert msg == f"{manifest}:11: duplicate utterance id {dup['id']!r} (first on line 2)"
    # The CLI says the same in one line and exits 2 (it used to end in an AssertionError).
    assert main(["folds", str(manifest)]) == 2
    assert f"{manifest}:11: duplicate utterance id" in capsys.readouterr().err


@pytest.mark.parametrize("line, problem", [
    (lambda r: {k: v for k, v in r.items() if k not in ("duration", "label")},
     "record (Ses01F_impro01_F009) lacks field(s) label, duration"),
    (lambda r: {**r, "session": 0},
     "record (Ses01F_impro01_F009) session is 0; expected an integer >= 1 or a fold name"),
    (lambda r: {**r, "session": "1"}, "session is '1'; expected an integer >= 1 or a fold name"),
    (lambda r: {**r, "session": True}, "session is True; expected an integer >= 1 or a fold name"),
    (lambda r: {**r, "session": None}, "session is None; expected an integer >= 1 or a fold name"),
    (lambda r: {**r, "session": "a b"}, "session is 'a b'; expected an integer >= 1 or a fold name"),
    (lambda r: {**r, "split": "test 1"}, "split is 'test 1'; expected null, 'train', 'dev' or a test"),
    (lambda r: {**r, "label": ""}, "label is ''; expected null or a non-empty class name"),
    (lambda r: {**r, "label": 3}, "label is 3; expected null or a non-empty class name"),
    (lambda r: {**r, "duration": "1.5"}, "duration is '1.5'; expected a positive number of seconds"),
    (lambda r: {**r, "duration": 0}, "duration is 0; expected a positive number"),
    (lambda r: {**r, "scripted": "no"}, "scripted is 'no'; expected true, false or null"),
    (lambda r: {**r, "path": None}, "path is None; expected a non-empty string"),
    (lambda r: {**r, "transcript": 3}, "transcript is 3; expected a string or null"),
    (lambda r: {**r, "id": 17}, "record id is 17; expected a non-empty string"),
    (lambda r: [r], "expected a JSON object, got list"),
])
def test_bad_record_is_a_load_error_naming_file_line_and_problem(tmp_path, line, problem):
    lines = _clean_manifest_lines()
    lines.insert(4, json.dumps(line(_manifest_record("Ses01F_impro01_F009"))))  # line 5
    manifest = _write_lines(tmp_path / "manifest.jsonl", lines)
    with pytest.raises(ManifestError) as e:
        load_manifest(manifest)
    msg = str(e.value)
    assert msg.startswith(f"{manifest}:5: ") and problem in msg and "\n" not in msg


def test_several_problems_report_the_first_and_a_count(tmp_path):
    lines = _clean_manifest_lines()
    lines[0] = "{not json"
    lines[2] = json.dumps({**json.loads(lines[2]), "session": 0})
    manifest = _write_lines(tmp_path / "manifest.jsonl", lines)
    with manifest.open("ab") as f:
        f.write(b'{"id": "caf\xe9"}\n')  # line 11: Latin-1, not UTF-8
    with pytest.raises(ManifestError) as e:
        load_manifest(manifest)
    assert str(e.value).startswith(f"{manifest}:1: not valid JSON")
    assert str(e.value).endswith("(and 2 more problem(s))")
    assert [p.split(":")[0] for p in e.value.problems] == ["1", "3", "11"]
    assert e.value.problems[2].startswith("11: not UTF-8 text")
