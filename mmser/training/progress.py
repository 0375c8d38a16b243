"""One log line per training epoch where no progress bar shows (stderr not a terminal, or the bar
off, as by default): epoch, training loss, validation UA when there is validation, seconds per
epoch and the time left. Lives beside the trainer factory (`run.make_trainer`), so every stage gets it."""

from __future__ import annotations

import logging
import sys
import time

from pytorch_lightning.callbacks import Callback

log = logging.getLogger("mmser.training")


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def epoch_line(epoch: int, max_epochs: int, metrics: dict, seconds: float) -> str:
    """'epoch 2/10: loss 1.2345, val UA 0.5000, 3.2 s/epoch, ETA 0m26s' (absent values left out)."""
    parts = [f"epoch {epoch}/{max_epochs}" if max_epochs > 0 else f"epoch {epoch}"]
    stats = []
    for key, label in (("train/loss_epoch", "loss"), ("train/loss", "loss"), ("val/ua", "val UA")):
        value = metrics.get(key)
        if value is not None and not any(s.startswith(label + " ") for s in stats):
            stats.append(f"{label} {float(value):.4f}")
    stats.append(f"{seconds:.1f} s/epoch")
    if max_epochs > epoch:
        stats.append(f"ETA {_fmt_seconds(seconds * (max_epochs - epoch))}")
    return parts[0] + ": " + ", ".join(stats)


class EpochLog(Callback):
    """Logs `epoch_line` at the end of every training epoch unless Lightning's progress bar shows."""

    def __init__(self) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or (trainer.progress_bar_callback is not None and sys.stderr.isatty()):
            return
        log.info(epoch_line(trainer.current_epoch + 1, trainer.max_epochs or 0, dict(trainer.callback_metrics),
                            time.perf_counter() - self._t0))
