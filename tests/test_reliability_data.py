"""Reliability of the data path: clips too short for the encoder never fail a fold (they are
skipped and counted), and a crafted `last.ckpt` is refused when a run resumes from it."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shlex
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import soundfile as sf
import torch
from helpers import (  # noqa: F401 (single_torch_thread: autouse fixture)
    single_torch_thread,
    tiny_config,
    write_toy_corpus,
)

from mmser.data.datamodule import SERDataModule
from mmser.data.dataset import MIN_ENCODER_SAMPLES
from mmser.data.manifest import load_manifest, split_fold
from mmser.io import read_jsonl, write_jsonl

SR = 16000


def _add_clip(manifest: Path, uid: str, session: int, label: str, n_samples: int) -> None:
    """Append one utterance of `n_samples` samples (noise) to a toy manifest."""
    gender = uid[5]
    path = manifest.parent / "short" / f"{uid}.wav"
    path.parent.mkdir(parents=True, exist_ok=True)
    wav = (0.1 * np.random.default_rng(n_samples).standard_normal(n_samples)).astype(np.float32)
    sf.write(str(path), wav, SR, subtype="PCM_16")
    records = read_jsonl(manifest)
    records.append({"id": uid, "path": str(path), "session": session, "speaker": f"Ses{session:02d}{gender}",
                    "gender": gender, "dialog": uid.rsplit("_", 1)[0], "scripted": False,
                    "emotion_code": label[:3], "label": label, "transcript": None,
                    "duration": n_samples / SR})
    write_jsonl(manifest, records)


SHORT_TRAIN = "Ses02F_impro09_F060"  # 60 samples: the clip
SHORT_TEST = "Ses01M_impro09_M061"
EDGE_KEPT = "Ses03F_impro09_F400"  # exactly the minimum: kept
EDGE_SKIPPED = "Ses04M_impro09_M399"  # one sample short: skipped


@pytest.fixture(scope="module")
def short_manifest(tmp_path_factory) -> Path:
    manifest = write_toy_corpus(tmp_path_factory.mktemp("toy"), per_class=1)
    _add_clip(manifest, SHORT_TRAIN, 2, "angry", 60)
    _add_clip(manifest, SHORT_TEST, 1, "sad", 61)
    _add_clip(manifest, EDGE_KEPT, 3, "neutral", 400)
    _add_clip(manifest, EDGE_SKIPPED, 4, "happy", 399)
    return manifest


def _ids(loader) -> list[str]:
    return [uid for batch in loader for uid in batch["ids"]]


def test_datamodule_skips_and_counts_clips_shorter_than_the_encoder_minimum(tmp_path, short_manifest, caplog):
    """A 60-sample clip used to reach the encoder (and fail the fold with "batch of 60 samples is
    shorter than one encoder frame" whenever it was batched alone). The datamodule drops clips under
    `min_samples` (default: one wav2vec 2.0 frame, 400 samples) from every split, counts them per
    split in counts() (-> metrics.json) and names them in a warning."""
    assert MIN_ENCODER_SAMPLES == 400
    cfg = tiny_config(tmp_path, short_manifest, ["data.validation=speaker", "data.val_speaker=Ses04M"])
    fold = split_fold(load_manifest(short_manifest), 1, cfg.data)
    assert SHORT_TRAIN in {r["id"] for r in fold.train} and SHORT_TEST in {r["id"] for r in fold.test}
    assert EDGE_SKIPPED in {r["id"] for r in fold.val}
    with caplog.at_level(logging.WARNING, logger="mmser.data.datamodule"):
        dm = SERDataModule(fold, cfg.data, seed=0)
    train, val, test = _ids(dm.train_dataloader()), _ids(dm.val_dataloader()), _ids(dm.test_dataloader())
    assert sorted(train) == sorted(r["id"] for r in fold.train if r["id"] != SHORT_TRAIN)
    assert EDGE_KEPT in train
    assert sorted(val) == sorted(r["id"] for r in fold.val if r["id"] != EDGE_SKIPPED)
    assert sorted(test) == sorted(r["id"] for r in fold.test if r["id"] != SHORT_TEST)
    counts = dm.counts()
    assert counts["skipped_too_short"] == {"min_samples": 400, "train": 1, "val": 1, "test": 1}
    assert counts["train"]["n"] == len(fold.train) - 1 and counts["test"]["n"] == len(fold.test) - 1
    json.dumps(counts)  # goes into metrics.json
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert SHORT_TRAIN in text and SHORT_TEST in text and EDGE_SKIPPED in text
    assert "the test set" in text  # skipping test clips changes the test set: said out loud
    # The caller can pass the encoder's real minimum.
    dm = SERDataModule(fold, cfg.data, seed=0, min_samples=1)
    assert dm.counts()["skipped_too_short"] == {"min_samples": 1, "train": 0, "val": 0, "test": 0}
    assert SHORT_TEST in _ids(dm.test_dataloader())
    with pytest.raises(ValueError, match="min_samples"):
        SERDataModule(fold, cfg.data, min_samples=0)


def test_run_one_finishes_with_a_60_sample_training_clip(tmp_path, short_manifest):
    """batch_size=1 puts the 60-sample clip in a batch of its own: before the datamodule skipped it,
    the tiny encoder (85-sample receptive field) raised mid-epoch and the fold was lost."""
    from mmser.training.run import run_one

    manifest = Path(tmp_path) / "manifest.jsonl"
    write_jsonl(manifest, [r for r in read_jsonl(short_manifest) if r["id"] != SHORT_TEST])
    cfg = tiny_config(tmp_path, manifest, ["data.batch_size=1", "finetune.epochs=1"])
    m = run_one(cfg, test_session=1, seed=0, run_dir=tmp_path / "run")
    assert m["counts"]["skipped_too_short"] == {"min_samples": 400, "train": 2, "val": 0, "test": 0}
    assert (tmp_path / "run" / "metrics.json").is_file()


def test_run_one_finishes_with_a_too_short_test_clip(tmp_path, short_manifest):
    from mmser.training.run import run_one

    cfg = tiny_config(tmp_path, short_manifest, ["finetune.epochs=1"])
    m = run_one(cfg, test_session=1, seed=0, run_dir=tmp_path / "run")
    assert m["counts"]["skipped_too_short"]["test"] == 1


# --------------------------------------------------------------------------------------------
# Resuming never unpickles code: a crafted checkpoints/last.ckpt is refused
# --------------------------------------------------------------------------------------------


class _RunsShell:
    """Pickles as a call to os.system: unpickling it with full pickle runs the command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _crafted_checkpoint(path: Path, marker: Path) -> None:
    """A file shaped like a Lightning checkpoint whose unpickling writes `marker` (the classic
    `__reduce__` payload) if the loader allows arbitrary globals."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 0, "global_step": 1, "pytorch-lightning_version": pl.__version__,
                "state_dict": {}, "payload": _RunsShell(f"echo pwned > {shlex.quote(str(marker))}")}, path)


# torch's refusal under weights_only=True: "Weights only load failed ... Unsupported global: GLOBAL
# posix.system" (the module of os.system; nt.system on Windows).
_REFUSED = r"(?s)Weights only load failed.*(posix|nt)\.system"


def test_resume_refuses_a_crafted_last_ckpt(tmp_path):
    """run_one resumes from run_dir/checkpoints/last.ckpt (trainer.fit(ckpt_path=...)). With torch
    >= 2.6 and pytorch-lightning >= 2.6 (pyproject.toml's floors) that load is weights_only, so a
    crafted file is refused (run_one reads the step with weights_only=True first: one CheckpointError
    naming the file, weights_only and the global it refused), and the payload never runs.
    Under torch < 2.6 or Lightning 2.4-2.5
    (which passed weights_only=False) the marker would be written and this test would fail."""
    from mmser.training.run import CheckpointError, run_one

    manifest = write_toy_corpus(tmp_path / "toy", per_class=1, sessions=(1, 2), with_unlabelled=False)
    cfg = tiny_config(tmp_path, manifest, ["finetune.epochs=1"])
    run_dir = tmp_path / "run"
    marker = tmp_path / "marker"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    _crafted_checkpoint(ckpt, marker)
    with pytest.raises(CheckpointError, match=_REFUSED):  # one line naming the file and the refused global
        run_one(cfg, test_session=1, seed=0, run_dir=run_dir)
    assert not marker.exists()
    assert not (run_dir / "metrics.json").exists()

    # Lightning's own resume loader, with trainer.fit's default (weights_only=None: torch's default).
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    with pytest.raises(pickle.UnpicklingError, match=_REFUSED):
        trainer.strategy.load_checkpoint(str(ckpt))
    assert not marker.exists()

    # Control: the file really is malicious; full unpickling runs the payload.
    torch.load(ckpt, weights_only=False)
    assert marker.read_text().strip() == "pwned"
