"""The paper's pre-training learning-rate schedule (TAPT, P-TAPT and P-TAPT step (a)):
linear warm-up from 0, a flat stretch, then linear decay to 0 at `total_steps`."""

from __future__ import annotations

import torch


def warmup_hold_decay(step: int, warmup: int, hold: int, total: int) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based)."""
    if total <= 0:
        raise ValueError(f"total steps must be > 0, got {total}")
    if warmup + hold > total:
        raise ValueError(f"warm-up ({warmup}) + flat ({hold}) exceed total steps ({total})")
    if step < warmup:
        return (step + 1) / warmup
    if step < warmup + hold:
        return 1.0
    decay = total - warmup - hold
    if decay == 0:
        return 0.0
    return max(0.0, (total - step) / decay)


def make_scheduler(optimizer: torch.optim.Optimizer, warmup: int, hold: int, total: int):
    """A LambdaLR stepping once per optimizer step (Lightning: interval='step')."""
    warmup_hold_decay(0, warmup, hold, total)  # validate early
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_hold_decay(s, warmup, hold, total))
