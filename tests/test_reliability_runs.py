"""Runs and cross-validations, reliably: inputs are checked before training or writing anything
(the reliability issue's items 11 and 13)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import (  # noqa: F401 (single_torch_thread: autouse fixture)
    single_torch_thread,
    tiny_config,
    write_toy_corpus,
)

from mmser.config import load_config
from mmser.io import atomic_write_json
from mmser.report import collect, write_summary
from mmser.training import cv as cvmod
from mmser.training import run as runmod
from mmser.training.run import run_one


def _corpus(root: Path, seed: int = 0) -> Path:
    """40 clips (5 sessions x 2 actors x 4 classes), 5 training steps of 8 a fold."""
    return write_toy_corpus(root, per_class=1, seed=seed, with_unlabelled=False)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return _corpus(tmp_path_factory.mktemp("toy"))


def _fake_run(calls: list):
    def run(cfg, test_session, seed, run_dir):
        calls.append((test_session, seed))
        m = {"test_session": test_session, "seed": seed, "test": {"ua": 0.5, "wa": 0.5, "macro_f1": 0.5}}
        atomic_write_json(Path(run_dir) / "metrics.json", m)
        return m

    return run


def _no_trainer(*a, **k):
    raise AssertionError("no Trainer may be built")


# -- item 11: every audio file of the fold is checked before training ------------------------------


def test_missing_or_unreadable_audio_fails_before_training(tmp_path, monkeypatch):
    manifest = _corpus(tmp_path / "tree")
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    test_wav = next(r["path"] for r in records if r["session"] == 1)
    train_wav = next(r["path"] for r in records if r["session"] == 3)
    Path(test_wav).unlink()
    Path(train_wav).write_bytes(b"not a wav")
    monkeypatch.setattr(runmod.pl, "Trainer", _no_trainer)
    cfg = tiny_config(tmp_path, manifest)
    with pytest.raises(ValueError) as e:
        run_one(cfg, test_session=1, seed=0, run_dir=tmp_path / "run")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"fold 1 ({manifest}): 2 of 40 audio files missing or unreadable: ")
    assert f"{test_wav} (missing)" in msg and f"{train_wav} (unreadable: " in msg
    assert not (tmp_path / "run").exists()


# -- item 13: sessions are checked before anything is created; an empty summary is valid -----------


def test_cv_refuses_a_session_the_manifest_lacks_before_creating_anything(tmp_path, manifest):
    cfg = load_config(overrides=[f"data.manifest={manifest}"])
    with pytest.raises(ValueError, match=rf"sessions 7: not in {manifest} \(its sessions with 4-class "
                                         r"utterances: 1, 2, 3, 4, 5\)"):
        cvmod.run_cv(cfg, sessions=[1, 7], seeds=[0], out_dir=tmp_path / "x", run_fn=_fake_run([]))
    assert not (tmp_path / "x").exists()


def test_an_empty_summary_is_well_formed_markdown(tmp_path):
    (tmp_path / "x").mkdir()
    md = write_summary([collect(tmp_path / "x")], tmp_path)
    for block in md.split("\n\n"):
        table = [line for line in block.splitlines() if line.startswith("|")]
        if table:  # header, separator and rows with the same number of cells
            assert len({line.count("|") for line in table}) == 1, block
    assert md.count("_no finished runs_") == 2
