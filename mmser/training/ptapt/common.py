"""What P-TAPT's stages share: the guard that keeps the test session out of every stage's input,
and the trainer of the two training stages ((a) and (c)), built by `make_trainer` (the one Trainer
factory: the config's Trainer settings and the `TrainMode` callback) with the stage's loggers."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch.distributed as dist

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


def on_global_rank_zero(run: Callable[[], object], what: str, timeout_hours: float = 24.0) -> None:
    """Run `run` once: on global rank 0 when torch.distributed is up with several processes (the
    others wait, then go on), else here. Every rank must call it at the same point. The wait is a
    broadcast on a gloo group of its own with a long timeout (k-means at full scale can outlast the
    default 30 min process-group timeout); a failure on rank 0 is raised on every rank.

    Processes that Lightning starts later (its DDP launcher re-runs the script at the first `fit`)
    arrive after rank 0 has finished such a step and find it done."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        run()
        return
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=timeout_hours))
    try:
        error: list = [None]
        if dist.get_rank() == 0:
            try:
                run()
            except BaseException as e:
                error = [f"{type(e).__name__}: {e}"]
                dist.broadcast_object_list(error, src=0, group=group)
                raise
        dist.broadcast_object_list(error, src=0, group=group)
        if error[0] is not None:
            raise RuntimeError(f"{what} failed on rank 0: {error[0]}")
    finally:
        dist.destroy_process_group(group)
