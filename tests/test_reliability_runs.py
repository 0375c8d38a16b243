"""Runs and cross-validations, reliably: a cross-validation checks its sessions before creating
anything, and an empty summary is valid Markdown (the reliability issue's item 13)."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import (  # noqa: F401 (single_torch_thread: autouse fixture)
    single_torch_thread,
    write_toy_corpus,
)

from mmser.config import load_config
from mmser.io import atomic_write_json
from mmser.report import collect, write_summary
from mmser.training import cv as cvmod


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
