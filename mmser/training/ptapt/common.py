"""What P-TAPT's stages share: the guard that keeps the test session out of every stage's input,
and the trainer of the two training stages ((a) and (c)), built by `make_trainer` (the one Trainer
factory: the config's Trainer settings and the `TrainMode` callback) with the stage's loggers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl

from mmser import tracking
from mmser.config import Config
from mmser.data.manifest import Fold
from mmser.training.run import make_trainer


def check_no_test_session(records: Sequence[dict], fold: Fold, stage: str) -> None:
    bad = [r["id"] for r in records if fold.is_test(r)]
    if bad:
        raise AssertionError(f"P-TAPT {stage}: test-session {fold.test_session} utterances in its input: {bad[:5]}")


def stage_trainer(cfg: Config, stage_dir: Path, max_steps: int, callbacks: list, name: str, job_type: str,
                  validate: bool, test_session: int | None = None, **extra) -> tuple[pl.Trainer, list]:
    """A step-bounded trainer writing under `stage_dir`, and its loggers (finish them after fit)."""
    loggers = tracking.make_loggers(cfg, stage_dir, name=name, group=cfg.experiment, job_type=job_type,
                                    identity=tracking.run_identity(cfg, test_session, stage=job_type))
    trainer = make_trainer(cfg, max_steps=max_steps, max_epochs=-1, logger=loggers,
                           callbacks=callbacks, default_root_dir=str(stage_dir),
                           limit_val_batches=None if validate else 0, **extra)
    return trainer, loggers
