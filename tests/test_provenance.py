"""Provenance (issue 12): the mmser version, git commit + dirty flag from a clone (None elsewhere,
and never an error without git), and library versions, in metrics.json and the W&B config."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from helpers import single_torch_thread, tiny_config, write_toy_corpus  # noqa: F401 (autouse fixture)

import mmser
from mmser import provenance as prov

REPO = Path(__file__).resolve().parents[1]


def test_provenance_from_this_clone():
    p = prov.provenance()
    assert p["mmser"] == mmser.__version__
    assert set(p["libraries"]) == set(prov.LIBRARIES)
    import torch
    import transformers

    assert p["libraries"]["torch"] == torch.__version__
    assert p["libraries"]["transformers"] == transformers.__version__
    if (REPO / ".git").exists() and prov.git_state(REPO)[0] is not None:
        # (the exact commit is checked on a throw-away repository below: this clone's HEAD may move
        # while the suite runs, and provenance() is computed once per process)
        assert re.fullmatch(r"[0-9a-f]{40}", p["git_commit"]) and isinstance(p["git_dirty"], bool)


def test_git_state_of_a_clean_then_dirty_clone(tmp_path):
    if subprocess.run(["git", "--version"], capture_output=True).returncode != 0:
        pytest.skip("no git")
    git = ["git", "-C", str(tmp_path), "-c", "user.email=t@t", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.txt").write_text("1")
    subprocess.run([*git, "add", "a.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "x"], check=True)
    commit, dirty = prov.git_state(tmp_path)
    assert len(commit) == 40 and dirty is False
    (tmp_path / "a.txt").write_text("2")
    assert prov.git_state(tmp_path) == (commit, True)


def test_no_clone_or_no_git_gives_none_not_an_error(tmp_path, monkeypatch):
    assert prov.git_state(tmp_path) == (None, None)  # an installed package: no .git above it
    (tmp_path / ".git").mkdir()  # a broken clone: git fails
    assert prov.git_state(tmp_path) == (None, None)
    monkeypatch.setattr(prov.shutil, "which", lambda name: None)  # no git at all
    assert prov.git_state(REPO) == (None, None)


def test_a_library_that_is_not_installed_is_none(monkeypatch):
    monkeypatch.setattr(prov, "LIBRARIES", ("torch", "no-such-dist-mmser"))
    prov.provenance.cache_clear()
    try:
        libs = prov.provenance()["libraries"]
    finally:
        prov.provenance.cache_clear()
    assert libs["no-such-dist-mmser"] is None and libs["torch"]


def test_metrics_json_records_provenance(tmp_path):
    import json

    from mmser.training.run import run_one

    manifest = write_toy_corpus(tmp_path / "toy", per_class=1)
    cfg = tiny_config(tmp_path, manifest, ["finetune.epochs=1"])
    run_one(cfg, test_session=1, seed=0, run_dir=tmp_path / "run")
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["provenance"] == json.loads(json.dumps(prov.provenance()))


def test_wandb_config_records_provenance(tmp_path, monkeypatch):
    # What the SDK is given: WandbLogger is replaced by a recorder (no wandb files to parse).
    from mmser import tracking

    seen = {}

    class Recorder:
        def __init__(self, **kwargs):
            seen.update(kwargs)
            self.experiment = object()

    monkeypatch.setattr(tracking, "WandbLogger", Recorder)
    cfg = tiny_config(tmp_path, None, ["tracking.wandb=offline"])
    loggers = tracking.make_loggers(cfg, tmp_path / "run", name="n", group="g", job_type="finetune")
    assert any(isinstance(lg, Recorder) for lg in loggers)
    assert seen["config"]["provenance"] == prov.provenance()
    assert seen["config"]["experiment"] == cfg.experiment  # the run config is still all there
