"""run_one: a complete, self-consistent run dir; resume after an interruption; no retraining of
complete runs; checkpoint policy; W&B offline files under the run dir."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
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
    assert resolve_precision(TrainerConfig(accelerator="cpu", precision="auto-bf16")) == "32-true"
    assert resolve_precision(TrainerConfig(precision="16-mixed")) == "16-mixed"


def _mock_gpu(monkeypatch, capability: tuple[int, int], count: int = 1) -> None:
    """A CUDA machine as torch reports it: `count` GPUs of compute `capability`; is_bf16_supported
    counts emulation by default (True on 7.x), as torch's does."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: capability[0] >= 8 or including_emulation)


@pytest.mark.parametrize("capability, auto_bf16", [((7, 0), "16-mixed"), ((7, 5), "16-mixed"),
                                                   ((8, 0), "bf16-mixed"), ((9, 0), "bf16-mixed")])
def test_precision_auto_is_the_references_fp16_and_auto_bf16_needs_native_bf16(monkeypatch, capability, auto_bf16):
    """issue 22 A2 / issue 23 item 2: "auto" = fp16 AMP on every GPU (the reference's --precision 16);
    "auto-bf16" = bf16 only from compute capability 8.0 (V100 / T4 emulate it: no cuDNN convolutions,
    no memory-efficient attention), whatever is_bf16_supported() says with emulation."""
    _mock_gpu(monkeypatch, capability)
    assert torch.cuda.is_bf16_supported()  # the emulation-counting answer main trusted
    assert resolve_precision(TrainerConfig()) == "16-mixed"
    assert resolve_precision(TrainerConfig(accelerator="gpu", precision="auto-bf16")) == auto_bf16
    assert resolve_precision(TrainerConfig(accelerator="cpu", precision="auto-bf16")) == "32-true"
    from mmser.perf import native_bf16  # the one check benchmarks/gpu_smoke.py and tests/test_gpu.py use

    assert native_bf16() is (auto_bf16 == "bf16-mixed")
    assert load_config(overrides=["trainer.precision=auto-bf16"]).trainer.precision == "auto-bf16"
    with pytest.raises(ConfigError, match="trainer.precision"):
        load_config(overrides=["trainer.precision=bf17-mixed"])


def test_one_device_by_default_and_every_multi_process_strategy_finds_unused_parameters(monkeypatch):
    """issue 23 item 1: the default config trains on one device; "auto" with several processes (where
    Lightning picks plain DDP, which LayerDrop breaks) and "ddp" both find unused parameters."""
    from mmser.training.run import resolve_strategy, trainer_kwargs, world_size

    assert TrainerConfig().devices == 1 and load_config("base").trainer.devices == 1
    _mock_gpu(monkeypatch, (8, 0), count=4)
    assert trainer_kwargs(load_config("base"))["strategy"] == "auto"  # one GPU of four: no DDP
    cases = [(dict(), 1, "auto"),
             (dict(devices="auto"), 4, "ddp_find_unused_parameters_true"),
             (dict(devices=-1), 4, "ddp_find_unused_parameters_true"),
             (dict(devices="0,1"), 2, "ddp_find_unused_parameters_true"),
             (dict(devices=2, accelerator="cpu"), 2, "ddp_find_unused_parameters_true"),
             (dict(devices="auto", accelerator="cpu"), 1, "auto"),
             (dict(num_nodes=2), 2, "ddp_find_unused_parameters_true"),
             (dict(strategy="ddp"), 1, "ddp_find_unused_parameters_true"),
             (dict(devices=2, strategy="ddp_find_unused_parameters_true"), 2, "ddp_find_unused_parameters_true"),
             (dict(devices=2, strategy="fsdp"), 2, "fsdp")]
    for fields, processes, strategy in cases:
        tc = TrainerConfig(**fields)
        assert (world_size(tc), resolve_strategy(tc)) == (processes, strategy), fields
    for bad in ("ddp_spawn", "ddp_fork", "ddp_notebook", "ddp_find_unused_parameters_false"):
        with pytest.raises(ValueError, match=bad):
            resolve_strategy(TrainerConfig(strategy=bad))
        with pytest.raises(ConfigError, match="trainer.strategy"):
            load_config(overrides=[f"trainer.strategy={bad}"])


def test_batch_arithmetic_line():
    from mmser.training.progress import batch_line

    assert batch_line(16, "utterances", 4, 1) == \
        "batch: 16 utterances per device x 4 devices x 1 node = 64 utterances per optimizer step (global batch)"
    assert batch_line(125, "s of padded audio", 2, 2, accumulate=2) == \
        ("batch: 125 s of padded audio per device x 2 devices x 2 nodes x 2 accumulated = 1000 s of padded audio "
         "per optimizer step (global batch)")


def _run_process_group(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run `cmd` in a session of its own; on timeout kill the whole group (Lightning's DDP launcher
    starts rank 1 as a child of rank 0: killing rank 0 alone would leave it behind) and fail."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd[:4])} ...: no result after {timeout:.0f} s (ranks hung); stderr: {err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_two_processes_with_the_default_strategy_and_layerdrop_train_via_the_cli(tmp_path):
    """issue 23 item 1, as the issue reproduced it: `mmser train ... trainer.accelerator=cpu
    trainer.devices=2 encoder.layerdrop=0.5` with the default strategy (auto). On main Lightning took
    plain DDP: LayerDrop left parameters unused and the ranks hung in their collectives (or DDP raised
    "parameters that were not used"). ~12 s on 2 busy CPU cores."""
    from helpers import TINY_CONFIGS

    manifest = write_toy_corpus(tmp_path / "toy", per_class=1, with_unlabelled=False)
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "mmser.cli", "train", "--session", "1", "--seed", "0", "--run-dir", str(run_dir)]
    for c in TINY_CONFIGS:
        cmd += ["-c", str(c)]
    cmd += [f"data.manifest={manifest}", "trainer.accelerator=cpu", "trainer.devices=2", "encoder.layerdrop=0.5",
            "finetune.epochs=2"]
    proc = _run_process_group(cmd, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["test"]["n"] == 8
    assert m["train_steps"] == 2 * 32 // 8 // 2  # 2 epochs, 4 batches of 8 shared by 2 ranks
    assert "batch: 8 utterances per device x 2 devices x 1 node = 16 utterances per optimizer step" in proc.stderr


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_via_the_cli(tmp_path, toy_manifest):
    """`mmser train` with strategy=ddp, 2 CPU processes (gloo): no code change, one complete run."""
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


def test_a_compiled_run_checks_its_saved_model_eagerly(tmp_path, toy_manifest, monkeypatch):
    """issue 23 item 9: trainer.compile=true compiles the encoder's layers; the saved-model check after
    testing (on the CPU, where Lightning hands the model back) must not run, nor compile, them. A
    counting Dynamo backend (eager underneath: no C++ compiler) sees every compile and every compiled
    call; none may happen inside check_saved_model."""
    from mmser import perf

    in_check = {"now": False}
    seen = {"compiled_calls": 0, "in_check": []}

    def counting_backend(gm, example_inputs):
        if in_check["now"]:
            seen["in_check"].append("compile")

        def compiled(*args):
            seen["compiled_calls"] += 1
            if in_check["now"]:
                seen["in_check"].append("call")
            return gm.forward(*args)

        return compiled

    monkeypatch.setattr(runmod, "compile_transformer_layers",
                        lambda hf: perf.compile_transformer_layers(hf, backend=counting_backend))
    real_check = runmod.check_saved_model

    def check(*args, **kwargs):
        in_check["now"] = True
        try:
            return real_check(*args, **kwargs)
        finally:
            in_check["now"] = False

    monkeypatch.setattr(runmod, "check_saved_model", check)
    cfg = tiny_config(tmp_path, toy_manifest, ["finetune.epochs=1", "trainer.compile=true"])
    m = run_one(cfg, test_session=1, seed=0, run_dir=tmp_path / "run")
    assert m["perf"]["compiled_layers"] == 2
    assert seen["compiled_calls"] > 0  # training and testing ran the compiled layers
    assert seen["in_check"] == []  # the check ran them eagerly
    assert (tmp_path / "run" / "metrics.json").is_file()
