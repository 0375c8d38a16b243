"""Experiment tracking: Lightning loggers for one run. The only module that imports wandb.

Every run gets a CSVLogger in its run dir. W&B is optional and can never fail or stall a run:
mode "offline" writes local files under run_dir/wandb/ (upload later with
`wandb sync run_dir/wandb/offline-run-*`), "online" needs an account and network, "disabled" skips
it. Any W&B error at start-up or at the end becomes a warning and the run goes on without it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger

from mmser.config import Config, to_dict

log = logging.getLogger(__name__)


def make_loggers(cfg: Config, run_dir: str | Path, name: str, group: str, job_type: str) -> list[Logger]:
    """[CSVLogger(run_dir/csv)] plus a WandbLogger when `cfg.tracking.wandb` != "disabled" and it starts.

    name: W&B run name (e.g. "vft-s1-seed0"); group: the experiment; job_type: the stage
    ("finetune", "tapt", ...). The W&B run id is derived from run_dir, so a resumed run continues
    the same W&B run when online.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    _keep_previous_csv(run_dir / "csv")
    loggers: list[Logger] = [CSVLogger(save_dir=str(run_dir), name="csv", version="")]
    mode = cfg.tracking.wandb
    if mode == "disabled":
        return loggers
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    try:
        import wandb

        run_id = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:8]
        wandb_logger = WandbLogger(
            name=name,
            save_dir=str(run_dir),
            dir=str(run_dir),
            id=f"{name}-{run_id}"[:64],
            project=cfg.tracking.project,
            entity=cfg.tracking.entity,
            group=group,
            job_type=job_type,
            tags=list(cfg.tracking.tags),
            config=to_dict(cfg),
            mode=mode,
            resume="allow",
            settings=wandb.Settings(init_timeout=cfg.tracking.init_timeout_s, silent=True,
                                    console="off"),
        )
        _ = wandb_logger.experiment  # start now, so a failure is caught here and not inside fit
    except Exception as e:  # W&B must never fail a run
        log.warning("W&B disabled for this run (%s: %s); CSV logs are in %s", type(e).__name__, e, run_dir)
        _finish_wandb_quietly()
        return loggers
    loggers.append(wandb_logger)
    return loggers


def _keep_previous_csv(csv_dir: Path) -> None:
    """Lightning's CSVLogger deletes an existing metrics.csv; a resumed run keeps the earlier
    attempt's rows as metrics.attempt-K.csv instead."""
    current = csv_dir / "metrics.csv"
    if not current.is_file():
        return
    k = 1
    while (csv_dir / f"metrics.attempt-{k}.csv").exists():
        k += 1
    current.rename(csv_dir / f"metrics.attempt-{k}.csv")


def log_final(loggers: Sequence[Logger], metrics: dict, y_true: Sequence[int], y_pred: Sequence[int],
              class_names: Sequence[str]) -> None:
    """Final test metrics into the W&B summary, plus the test confusion matrix (no-op without W&B)."""
    for lg in loggers:
        if not isinstance(lg, WandbLogger):
            continue
        try:
            import wandb

            run = lg.experiment
            flat = {}
            for split in ("test", "test_improvised", "val"):
                rep = metrics.get(split)
                if rep:
                    for key in ("ua", "wa", "macro_f1", "n"):
                        flat[f"final/{split}/{key}"] = rep[key]
            for key in ("padding_efficiency", "throughput", "train_seconds", "epochs_trained"):
                if metrics.get(key) is not None:
                    flat[f"final/{key}"] = metrics[key]
            run.summary.update(flat)
            if len(y_true):
                run.log({"test/confusion_matrix": wandb.plot.confusion_matrix(
                    y_true=list(y_true), preds=list(y_pred), class_names=list(class_names))})
        except Exception as e:
            log.warning("W&B: could not log final metrics (%s: %s)", type(e).__name__, e)


def finish(loggers: Sequence[Logger], exit_code: int = 0) -> None:
    """Close the W&B run (so the next run in this process starts a new one)."""
    for lg in loggers:
        if not isinstance(lg, WandbLogger):
            continue
        try:
            exp = lg._experiment
            if exp is not None:
                exp.finish(exit_code=exit_code)
        except Exception as e:
            log.warning("W&B: could not finish the run (%s: %s)", type(e).__name__, e)
    _finish_wandb_quietly(exit_code)


def _finish_wandb_quietly(exit_code: int = 0) -> None:
    try:
        import wandb

        if wandb.run is not None:
            wandb.finish(exit_code=exit_code)
    except Exception:  # noqa: BLE001 - best effort clean-up
        pass
