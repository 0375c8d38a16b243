"""Experiment tracking: Lightning loggers for one run. The only module that imports wandb.

Every run gets a CSVLogger in its run dir (csv/metrics.csv, continued across resumes). W&B is
optional and can never fail or stall a run: mode "offline" writes local files under run_dir/wandb/
(upload later with `wandb sync run_dir/wandb/offline-run-*`), "online" needs an account and
network, "disabled" skips it. Any W&B error at start-up or at the end becomes a warning and the run
goes on without it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from lightning_fabric.loggers.logger import rank_zero_experiment
from pytorch_lightning.loggers import CSVLogger, Logger, WandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

from mmser.config import Config, to_dict
from mmser.io import atomic_write_text
from mmser.provenance import provenance

log = logging.getLogger(__name__)


def make_loggers(cfg: Config, run_dir: str | Path, name: str, group: str, job_type: str,
                 resume_step: int | None = None) -> list[Logger]:
    """[CSVLogger(run_dir/csv)] plus a WandbLogger when `cfg.tracking.wandb` != "disabled" and it starts.

    name: W&B run name (e.g. "vft-s1-seed0"); group: the experiment; job_type: the stage
    ("finetune", "tapt", ...). The W&B run id is derived from run_dir, so a resumed run continues
    the same W&B run when online.

    resume_step: the optimizer steps of the checkpoint a resumed run starts from. csv/metrics.csv
    then keeps the rows logged before it (step < resume_step), drops those logged after it (they
    are logged again) and continues: every step and epoch once. Without it (a fresh start) an
    earlier attempt's metrics.csv is kept aside as metrics.attempt-K.csv.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if resume_step is None:
        _keep_previous_csv(run_dir / "csv")
    else:
        _drop_rows_after(run_dir / "csv" / "metrics.csv", resume_step)
    # Lightning's logger connector saves the CSV after every log call: a killed run keeps the rows
    # logged before it died.
    loggers: list[Logger] = [_ContinuedCSVLogger(save_dir=str(run_dir), name="csv", version="")]
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
            config={**to_dict(cfg), "provenance": provenance()},
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


def _drop_rows_after(path: Path, step: int) -> None:
    """Keep the rows of metrics.csv logged before optimizer step `step` (a checkpoint's global_step:
    its training rows have step < global_step, and its epoch-end rows step global_step - 1)."""
    if not path.is_file():
        return
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        header, rows = reader.fieldnames or [], list(reader)
    kept = [r for r in rows if r.get("step") not in (None, "") and float(r["step"]) < step]
    if len(kept) < len(rows):
        log.info("%s: resuming at step %d: %d rows kept, %d logged after the checkpoint dropped", path, step,
                 len(kept), len(rows) - len(kept))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    w.writeheader()
    w.writerows(kept)
    atomic_write_text(path, buf.getvalue())


class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer, except that an existing metrics.csv is continued, not deleted (on a
    resumed run it holds the rows logged before the checkpoint; `make_loggers` moves any other
    earlier file aside first)."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                # the columns so far: a new key makes the writer rewrite the file with their union
                self.metrics_keys = list(next(csv.reader(f), []))


class _ContinuedCSVLogger(CSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment


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
