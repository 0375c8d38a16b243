"""One log line per training epoch where no progress bar shows (stderr not a terminal, or the bar
off, as by default): epoch, training loss, validation UA when there is validation, seconds per
epoch and the time left; and, when more than one process trains, one line with the batch
arithmetic (per-device batch x devices x nodes = the global batch: `data.batch_size` is per device,
so 4 GPUs at the default 64 train with 256). Lives beside the trainer factory (`run.make_trainer`),
so every stage gets it."""

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


def batch_line(per_device: float, unit: str, devices: int, nodes: int, accumulate: int = 1) -> str:
    """'batch: 16 utterances per device x 4 devices x 1 node = 64 utterances per optimizer step'
    (' x 2 accumulated' before '=' when gradients are accumulated)."""
    total = per_device * devices * nodes * accumulate
    acc = f" x {accumulate} accumulated" if accumulate > 1 else ""
    return (f"batch: {per_device:g} {unit} per device x {devices} device{'s' if devices != 1 else ''} x {nodes} "
            f"node{'s' if nodes != 1 else ''}{acc} = {total:g} {unit} per optimizer step (global batch)")


def _per_device_batch(loader, sample_rate: int) -> tuple[float, str] | None:
    """The training loader's batch: (items, "utterances") for a fixed batch size, (seconds, "s of padded
    audio") for dynamic batches (mmser.data.batching.BucketBatchSampler's max_batch_samples)."""
    sampler = getattr(loader, "batch_sampler", None)
    size = getattr(sampler, "batch_size", None) or getattr(loader, "batch_size", None)
    if size:
        return float(size), "utterances"
    samples = getattr(sampler, "max_batch_samples", None)
    if samples:
        return samples / sample_rate, "s of padded audio"
    return None


class BatchArithmetic(Callback):
    """Logs `batch_line` once per fit on global rank 0 when more than one process trains."""

    def __init__(self, sample_rate: int = 16000) -> None:
        self.sample_rate = sample_rate
        self.line: str | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.world_size <= 1:
            return
        batch = _per_device_batch(trainer.train_dataloader, self.sample_rate)
        per_device, unit = batch if batch is not None else (float("nan"), "items")
        self.line = batch_line(per_device, unit, trainer.num_devices, trainer.num_nodes,
                               int(trainer.accumulate_grad_batches))
        if trainer.is_global_zero:
            log.info(self.line)
