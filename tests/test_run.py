"""run_one: a complete, self-consistent run dir; resume after an interruption; no retraining of
complete runs; checkpoint policy; W&B offline files under the run dir."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import (  # noqa: F401 (single_torch_thread: autouse fixture)
    single_torch_thread,
    tiny_config,
    write_toy_corpus,
)

from mmser.config import ConfigError, TrainerConfig, load_config, to_dict
from mmser.data.batching import collate_batch
from mmser.data.dataset import UtteranceDataset
from mmser.data.manifest import load_manifest
from mmser.labels import CLASSES
from mmser.metrics import classification_report
from mmser.training import run as runmod
from mmser.training.run import default_run_dir, load_model, resolve_precision, run_one


@pytest.fixture(scope="module")
def toy_manifest(tmp_path_factory) -> Path:
    return write_toy_corpus(tmp_path_factory.mktemp("toy"), per_class=2)


def _read_predictions(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_run_one_writes_a_complete_consistent_run_dir(tmp_path, toy_manifest, monkeypatch):
    cfg = tiny_config(tmp_path, toy_manifest, ["finetune.epochs=3"])
    run_dir = default_run_dir(cfg, 2, 7)
    assert run_dir == tmp_path / "runs" / "tiny-vft" / "s2-seed7"
    m = run_one(cfg, test_session=2, seed=7, run_dir=run_dir)

    for name in ("config.yaml", "metrics.json", "predictions.csv", "model/model.safetensors",
                 "model/config.json", "csv/metrics.csv"):
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "checkpoints").exists()  # resume-only state, removed once complete
    assert json.loads((run_dir / "metrics.json").read_text()) == json.loads(json.dumps(m))
    assert to_dict(load_config(run_dir / "config.yaml")) == to_dict(cfg)

    # predictions.csv covers exactly the test session, and metrics.json agrees with it
    records = {r["id"]: r for r in load_manifest(toy_manifest)}
    rows = _read_predictions(run_dir / "predictions.csv")
    expected_ids = sorted(i for i, r in records.items() if r["session"] == 2 and r["label"] is not None)
    assert sorted(r["id"] for r in rows) == expected_ids
    assert all(r["true"] == records[r["id"]]["label"] for r in rows)
    assert list(rows[0]) == ["id", "true", "pred"] + [f"prob_{c}" for c in CLASSES]
    idx = {c: i for i, c in enumerate(CLASSES)}
    report = classification_report([idx[r["true"]] for r in rows], [idx[r["pred"]] for r in rows], CLASSES)
    for key in ("ua", "wa", "macro_f1"):
        assert m["test"][key] == pytest.approx(report[key])
    assert m["test"]["confusion"] == report["confusion"] and m["test"]["n"] == report["n"]
    impro = [r for r in rows if not records[r["id"]]["scripted"]]
    assert m["test_improvised"]["n"] == len(impro) < len(rows)
    for r in rows:  # argmax of the stored probabilities is the stored prediction
        probs = [float(r[f"prob_{c}"]) for c in CLASSES]
        assert CLASSES[max(range(4), key=probs.__getitem__)] == r["pred"]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)

    assert m["epochs_trained"] == 3 and m["test_session"] == 2 and m["seed"] == 7
    assert m["counts"]["train"]["n"] == 64 and m["counts"]["test"]["n"] == 16
    assert sum(m["class_weights"].values()) == pytest.approx(1.0)
    assert 0 < m["padding_efficiency"] <= 1 and m["throughput"] > 0 and m["train_seconds"] > 0
    assert m["val"] is None and m["precision"] == "32-true"
    # the tiny model learns the toy tones (chance UA = 0.25)
    assert m["test"]["ua"] >= 0.75, m["test"]

    # the saved model rebuilds and reproduces the stored probabilities
    model = load_model(run_dir / "model")
    test_recs = [records[i] for i in expected_ids]
    batch = collate_batch([UtteranceDataset(test_recs)[i] for i in range(len(test_recs))])
    with torch.no_grad():
        probs = torch.softmax(model(batch), -1)
    by_id = {r["id"]: r for r in rows}
    stored = torch.tensor([[float(by_id[i][f"prob_{c}"]) for c in CLASSES] for i in batch["ids"]])
    assert torch.allclose(probs, stored, atol=1e-4)

    # a complete run is returned as is, without building a Trainer
    def no_trainer(*a, **k):
        raise AssertionError("a complete run must not train again")

    monkeypatch.setattr(runmod.pl, "Trainer", no_trainer)
    assert run_one(cfg, test_session=2, seed=7, run_dir=run_dir) == m


class _Interrupt(pl.Callback):
    """Simulates a killed job: fails when the second epoch starts (epoch 1's checkpoint is saved)."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise RuntimeError("simulated kill")


def test_interrupted_run_resumes_to_completion(tmp_path, toy_manifest):
    cfg = tiny_config(tmp_path, toy_manifest, ["finetune.epochs=2"])
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated kill"):
        run_one(cfg, test_session=1, seed=0, run_dir=run_dir, callbacks=[_Interrupt()])
    assert not (run_dir / "metrics.json").exists()
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 0
    steps_per_epoch = ckpt["mmser_stats"]["steps"]
    assert steps_per_epoch == 8  # 64 training utterances / batch 8

    m = run_one(cfg, test_session=1, seed=0, run_dir=run_dir)
    assert m["epochs_trained"] == 2
    assert m["train_steps"] == 2 * steps_per_epoch  # the first epoch was not redone
    assert (run_dir / "metrics.json").is_file()
    assert len(_read_predictions(run_dir / "predictions.csv")) == m["counts"]["test"]["n"] == 16
    # one training log holds both attempts' epochs (tests/test_reliability_runs.py: each step once)
    rows = _read_predictions(run_dir / "csv" / "metrics.csv")
    assert {r["epoch"] for r in rows if r["train/loss_step"]} == {"0", "1"}
    assert not list((run_dir / "csv").glob("metrics.attempt-*.csv"))


def test_best_val_needs_a_validation_set(tmp_path, toy_manifest):
    cfg = tiny_config(tmp_path, toy_manifest, ["finetune.test_checkpoint=best_val"])
    with pytest.raises(ValueError, match="needs a validation set"):
        run_one(cfg, test_session=1, seed=0, run_dir=tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_speaker_validation_best_val_and_wandb_offline(tmp_path, toy_manifest):
    cfg = tiny_config(tmp_path, toy_manifest, [
        "data.validation=speaker", "finetune.test_checkpoint=best_val", "finetune.epochs=2",
        "tracking.wandb=offline", "finetune.keep_checkpoints=true"])
    run_dir = tmp_path / "run"
    m = run_one(cfg, test_session=1, seed=0, run_dir=run_dir)
    # validation = the F actor of session 2, never the test session
    assert m["counts"]["val"]["n"] == 8 and m["counts"]["train"]["n"] == 56
    assert m["val"] is not None and m["test_checkpoint"] == "best_val"
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb")), offline
    assert list(offline[0].glob("files/media/table/test/confusion_matrix*.table.json"))  # logged at the end


def test_wandb_failure_does_not_fail_the_run(tmp_path, monkeypatch):
    from mmser import tracking

    def broken(*a, **k):
        raise RuntimeError("no wandb today")

    monkeypatch.setattr(tracking, "WandbLogger", broken)
    cfg = tiny_config(tmp_path, overrides=["tracking.wandb=online"])
    loggers = tracking.make_loggers(cfg, tmp_path / "run", name="x", group="g", job_type="finetune")
    assert len(loggers) == 1 and isinstance(loggers[0], tracking.CSVLogger)


def test_precision_auto_is_fp32_on_cpu():
    assert resolve_precision(TrainerConfig(accelerator="cpu")) == "32-true"
    assert resolve_precision(TrainerConfig(precision="16-mixed")) == "16-mixed"


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_via_the_cli(tmp_path, toy_manifest):
    """`mmser train` with strategy=ddp, 2 CPU processes (gloo): no code change, one complete run."""
    import subprocess
    import sys

    from helpers import TINY_CONFIGS

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "mmser.cli", "train", "--session", "1", "--seed", "0", "--run-dir", str(run_dir)]
    for c in TINY_CONFIGS:
        cmd += ["-c", str(c)]
    cmd += [f"data.manifest={toy_manifest}", "trainer.strategy=ddp", 'trainer.devices="2"']
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["world_size"] == 2
    assert m["test"]["n"] == 16  # gathered from both ranks, no duplicates
    assert m["train_steps"] == 2 * 64 // 8 // 2  # each rank ran half of every epoch's batches
    assert len(_read_predictions(run_dir / "predictions.csv")) == 16
    # the gathered test predictions are those of one process evaluating the saved model alone
    import numpy as np

    from mmser.data.dataset import read_audio

    model = load_model(run_dir / "model")
    records = {r["id"]: r for r in load_manifest(toy_manifest)}
    with open(run_dir / "predictions.csv") as f:
        for row in csv.DictReader(f):
            wav = torch.from_numpy(np.asarray(read_audio(records[row["id"]]["path"], 16000)))[None]
            with torch.no_grad():
                probs = torch.softmax(model({"audio": wav, "audio_mask": torch.ones_like(wav, dtype=torch.bool)}),
                                      -1)[0]
            assert [float(row[f"prob_{c}"]) for c in CLASSES] == pytest.approx(probs.tolist(), abs=1e-4)
    assert m["perf"]["epochs"] and m["perf"]["epochs"][-1]["steps"] == 4


def test_a_run_dir_of_another_config_is_never_reused_or_resumed(tmp_path, toy_manifest):
    cfg = tiny_config(tmp_path, toy_manifest, ["finetune.epochs=1"])
    run_dir = tmp_path / "run"
    run_one(cfg, test_session=1, seed=0, run_dir=run_dir)
    other = tiny_config(tmp_path, toy_manifest, ["finetune.epochs=1", "finetune.lr=0.5"])
    with pytest.raises(ConfigError, match=r"config.yaml: this run folder was made with another config "
                                          r"\(finetune.lr: 0.001 -> 0.5\)"):
        run_one(other, test_session=1, seed=0, run_dir=run_dir)
    # a volatile field (W&B mode) is not another config: the finished run is returned as it is
    same = tiny_config(tmp_path, toy_manifest, ["finetune.epochs=1", "tracking.wandb=offline"])
    assert run_one(same, test_session=1, seed=0, run_dir=run_dir)["seed"] == 0
