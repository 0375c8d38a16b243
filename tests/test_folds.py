"""Leave-one-session-out folds (mmser.data.manifest): no test-session leakage under any validation
policy, speaker hold-out outside the test session, seeded stratified fraction hold-out."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from mmser.config import DataConfig
from mmser.data.manifest import Fold, fold_table, split_fold, write_fold_files
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
    with pytest.raises(ValueError, match="Ses07F has no 4-class utterances"):
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
