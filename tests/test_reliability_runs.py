"""Runs and cross-validations, reliably: runs are identified by their data's content, processes
share an experiment folder, a resumed run keeps its whole training log, inputs are checked before
training or writing anything, and a failed start does not block the corrected rerun (the
reliability issue's items 3, 4, 5, 6, 11 and 13)."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import pytorch_lightning as pl
from helpers import (  # noqa: F401 (single_torch_thread: autouse fixture)
    REPO,
    TINY_CONFIGS,
    single_torch_thread,
    tiny_config,
    write_toy_corpus,
)

from mmser import io as mio
from mmser.config import ConfigError, load_config
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


def _prepare_again_from_another_tree(manifest: Path, tmp_path: Path) -> None:
    """`mmser prepare` run again into the same folder from another tree: same path, same utterance
    ids, other content (the records point at the other tree's files)."""
    other = _corpus(tmp_path / "other-tree", seed=1)
    shutil.copyfile(other, manifest)


def _fake_run(calls: list):
    def run(cfg, test_session, seed, run_dir):
        calls.append((test_session, seed))
        m = {"test_session": test_session, "seed": seed, "test": {"ua": 0.5, "wa": 0.5, "macro_f1": 0.5}}
        atomic_write_json(Path(run_dir) / "metrics.json", m)
        return m

    return run


class _Stop(pl.Callback):
    """A run killed at epoch `epoch`, after `batches` of its batches (its last.ckpt is of the epoch
    before)."""

    def __init__(self, epoch: int, batches: int = 0):
        self.epoch, self.batches = epoch, batches

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batches:
            raise RuntimeError("simulated kill")


def _no_trainer(*a, **k):
    raise AssertionError("no Trainer may be built")


# -- item 3: runs are identified by their data's content, not the manifest's path -------------------


def test_cv_refuses_to_mix_two_corpora_prepared_into_one_folder(tmp_path):
    manifest = _corpus(tmp_path / "tree")
    cfg = load_config(overrides=["experiment=x", f"data.manifest={manifest}"])
    out, calls = tmp_path / "x", []
    cvmod.run_cv(cfg, sessions=[1], seeds=[0], out_dir=out, run_fn=_fake_run(calls))
    recorded = hashlib.sha256(manifest.read_bytes()).hexdigest()

    _prepare_again_from_another_tree(manifest, tmp_path)
    with pytest.raises(ValueError, match=rf"{out}: this experiment was made from other data \(manifest "
                                         rf"{recorded[:12]} -> [0-9a-f]{{12}} \({manifest}\) sha256\)"):
        cvmod.run_cv(cfg, sessions=[1, 2], seeds=[0], out_dir=out, run_fn=_fake_run(calls))
    assert calls == [(1, 0)]  # nothing trained on the new corpus
    assert not (out / "s2-seed0").exists()


def test_a_finished_or_partial_run_of_other_data_is_refused(tmp_path, monkeypatch):
    manifest = _corpus(tmp_path / "tree")
    cfg = tiny_config(tmp_path, manifest, ["finetune.epochs=1"])
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated kill"):  # a partial run: config, data, no metrics
        run_one(cfg, test_session=1, seed=0, run_dir=run_dir, callbacks=[_Stop(epoch=0)])
    assert (run_dir / "config.yaml").is_file() and not (run_dir / "metrics.json").exists()

    _prepare_again_from_another_tree(manifest, tmp_path)
    monkeypatch.setattr(runmod.pl, "Trainer", _no_trainer)
    with pytest.raises(ValueError, match=rf"{run_dir}: this unfinished run was made from other data \(manifest "):
        run_one(cfg, test_session=1, seed=0, run_dir=run_dir)
    atomic_write_json(run_dir / "metrics.json", {"test_session": 1, "seed": 0})  # as if it had finished
    with pytest.raises(ValueError, match=rf"{run_dir}: this run was made from other data \(manifest "):
        run_one(cfg, test_session=1, seed=0, run_dir=run_dir)


def test_text_runs_are_identified_by_their_transcript_file_too(tmp_path, manifest):
    asr = tmp_path / "asr.jsonl"
    asr.write_text('{"id": "a", "text": "hello"}\n')
    audio = runmod.data_inputs(tiny_config(tmp_path, manifest, [f"text.source={asr}"]))
    gold = runmod.data_inputs(tiny_config(tmp_path, manifest, ["task=text"]))
    text = runmod.data_inputs(tiny_config(tmp_path, manifest, ["task=text", f"text.source={asr}"]))
    assert set(audio) == set(gold) == {"manifest"} and set(text) == {"manifest", "text_source"}
    atomic_write_json(tmp_path / "run" / "inputs.json", text)
    atomic_write_json(tmp_path / "run" / "metrics.json", {"seed": 0})
    asr.write_text('{"id": "a", "text": "other words"}\n')
    cfg = tiny_config(tmp_path, manifest, ["task=text", f"text.source={asr}"])
    with pytest.raises(ValueError, match=r"made from other data \(text_source [0-9a-f]{12} -> "):
        runmod.finished_run(cfg, tmp_path / "run", runmod.data_inputs(cfg))


def test_a_pretraining_stage_of_another_corpus_is_refused(tmp_path, monkeypatch):
    """The TAPT / P-TAPT fingerprints hold the training utterance ids, which a corpus prepared again
    from another tree keeps: the stage folder records the manifest's content as well."""
    import mmser.training.pretrain as pretrain

    manifest = _corpus(tmp_path / "tree")
    monkeypatch.setattr(pretrain, "pretrain_fold", lambda cfg, test_session, out_dir: Path(out_dir) / "encoder")
    cfg = load_config(overrides=["pretrain=tapt", f"data.manifest={manifest}"])
    assert cvmod.pretrained_fold_config(cfg, 1, tmp_path / "x").encoder.name == str(tmp_path / "x/pretrain/s1/encoder")
    _prepare_again_from_another_tree(manifest, tmp_path)
    with pytest.raises(ValueError, match=r"pretrain/s1: this pre-training stage was made from other data"):
        cvmod.pretrained_fold_config(cfg, 1, tmp_path / "x")


# -- item 4: one process per run folder -----------------------------------------------------------

_HOLD = textwrap.dedent("""
    import sys, time
    from mmser.io import hold_folder
    with hold_folder(sys.argv[1]):
        print("held", flush=True)
        time.sleep(120)
""")


def _holder(folder: Path) -> subprocess.Popen:
    """Another process holding `folder`'s lock (until killed)."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                            cwd=REPO)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_cv_skips_a_run_another_live_process_holds(tmp_path, manifest, caplog, monkeypatch):
    cfg = tiny_config(tmp_path, manifest)
    out = tmp_path / "x"
    proc = _holder(out / "s1-seed0")
    try:
        monkeypatch.setattr(runmod.pl, "Trainer", _no_trainer)
        with caplog.at_level(logging.INFO):
            s = cvmod.run_cv(cfg, sessions=[1], seeds=[0], out_dir=out)
    finally:
        proc.kill()
        proc.wait()
    host = socket.gethostname()
    assert not s.failed and not s.completed
    assert s.held == [{"session": 1, "seed": 0, "stage": "finetune", "holder": s.held[0]["holder"]}]
    assert s.held[0]["holder"] == f"pid {proc.pid} on host {host}"
    assert f"s1 seed 0: {out / 's1-seed0'}: held by pid {proc.pid} on host {host}, skipped (held since " \
           in caplog.text
    assert caplog.text.count(", skipped") == 1
    assert "1 run(s) skipped, held by another live process" in s.markdown
    assert not (out / "s1-seed0" / "config.yaml").exists() and not (out / "failures.json").exists()


def test_a_dead_holders_lock_is_taken_over(tmp_path, caplog):
    folder = tmp_path / "run"
    proc = _holder(folder)
    with pytest.raises(mio.FolderHeld, match=rf"{folder}: held by pid {proc.pid} on host .*, skipped"):
        with mio.hold_folder(folder):
            pass
    proc.send_signal(signal.SIGKILL)  # dies holding it: no clean-up
    proc.wait()
    with caplog.at_level(logging.WARNING), mio.hold_folder(folder):
        owner = json.loads((folder / ".lock-owner.json").read_text())
        assert owner["pid"] == os.getpid()
    assert f"taking over the lock of pid {proc.pid}" in caplog.text
    assert not (folder / ".lock-owner.json").exists()  # released


@pytest.mark.slow
def test_two_cv_processes_on_one_folder_share_the_runs(tmp_path, manifest):
    """The issue's reproduction: two `mmser cv` into one experiment folder, 0.3 s apart."""
    import time

    cmd = [sys.executable, "-m", "mmser.cli", "cv", "--sessions", "1-2", "--seeds", "2", "--out", str(tmp_path / "x")]
    for c in TINY_CONFIGS:
        cmd += ["-c", str(c)]
    cmd += [f"data.manifest={manifest}", f"output_dir={tmp_path}"]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    time.sleep(0.3)
    second = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    outs = [p.communicate(timeout=600) for p in (first, second)]
    for p, (_, err) in zip((first, second), outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert len(list((tmp_path / "x").glob("s*-seed*/metrics.json"))) == 4
    assert "error" not in outs[0][1].lower() + outs[1][1].lower()


# -- item 5: a resumed run's training log holds every step and epoch once ---------------------------


def test_a_resumed_run_logs_every_epoch_once(tmp_path, manifest):
    cfg = tiny_config(tmp_path, manifest, ["finetune.epochs=3"])
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated kill"):  # in epoch 1, after 2 of its 4 steps
        run_one(cfg, test_session=1, seed=0, run_dir=run_dir, callbacks=[_Stop(epoch=1, batches=2)])
    # csv/metrics.csv now holds epoch 0 and steps 4-5 of epoch 1; last.ckpt is of epoch 0 (step 4)
    m = run_one(cfg, test_session=1, seed=0, run_dir=run_dir)
    assert m["train_steps"] == 12  # 32 training clips / batch 8 = 4 steps x 3 epochs
    with (run_dir / "csv" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    steps = [(r["epoch"], int(r["step"])) for r in rows if r["train/loss_step"]]
    assert steps == [(str(s // 4), s) for s in range(12)]  # every step once, in order
    assert [r["epoch"] for r in rows if r["train/loss_epoch"]] == ["0", "1", "2"]


# -- item 6: a failed start does not block the corrected rerun -------------------------------------


def test_a_failed_start_writes_nothing_and_an_unfinished_folder_takes_a_new_config(tmp_path, manifest, caplog):
    run_dir = tmp_path / "run"
    bad = tiny_config(tmp_path, manifest)
    bad.trainer.strategy = "ddp_spawn"  # refused at load since issue 23; run_one refuses it again
    with pytest.raises(ValueError, match="not a spawn-based strategy"):
        run_one(bad, test_session=1, seed=0, run_dir=run_dir)
    assert not run_dir.exists()

    first = tiny_config(tmp_path, manifest, ["finetune.epochs=2"])
    with pytest.raises(RuntimeError, match="simulated kill"):  # killed in epoch 1: last.ckpt of epoch 0
        run_one(first, test_session=1, seed=0, run_dir=run_dir, callbacks=[_Stop(epoch=1)])
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    fixed = tiny_config(tmp_path, manifest, ["finetune.epochs=2", "finetune.lr=0.002"])
    with caplog.at_level(logging.WARNING):
        m = run_one(fixed, test_session=1, seed=0, run_dir=run_dir)
    assert "unfinished run of another config (finetune.lr: 0.001 -> 0.002): reused with this config, its " \
           "checkpoints deleted" in caplog.text
    assert m["train_steps"] == 8  # both epochs under the new config: nothing resumed from the old one
    assert load_config(run_dir / "config.yaml").finetune.lr == 0.002
    with pytest.raises(ConfigError, match="made with another config"):  # a finished run is never replaced
        run_one(first, test_session=1, seed=0, run_dir=run_dir)


def test_cv_checks_before_writing_and_an_experiment_without_finished_runs_takes_a_new_config(tmp_path, manifest):
    out = tmp_path / "x"
    bad = load_config(overrides=[f"data.manifest={manifest}", "finetune.test_checkpoint=best_val"])
    with pytest.raises(ValueError, match="needs a validation set"):
        cvmod.run_cv(bad, sessions=[1], seeds=[0], out_dir=out, run_fn=_fake_run([]))
    assert not out.exists()

    def failing(cfg, test_session, seed, run_dir):
        raise RuntimeError("out of memory")

    first = load_config(overrides=[f"data.manifest={manifest}"])
    assert cvmod.run_cv(first, sessions=[1], seeds=[0], out_dir=out, run_fn=failing).failed
    fixed = load_config(overrides=[f"data.manifest={manifest}", "data.batch_size=16"])
    s = cvmod.run_cv(fixed, sessions=[1], seeds=[0], out_dir=out, run_fn=_fake_run([]))
    assert s.completed == [(1, 0)] and load_config(out / "cv_config.yaml").data.batch_size == 16
    with pytest.raises(ConfigError, match="this experiment folder was made with another config"):
        cvmod.run_cv(first, sessions=[1], seeds=[0], out_dir=out, run_fn=_fake_run([]))


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
    with pytest.raises(ValueError, match=rf"sessions 7: not in {manifest} \(its sessions with task "
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
