"""A non-finite-loss guard that does not stop the GPU every step.

`if not torch.isfinite(loss)` reads a GPU value on the host: every training step waits for the
device to finish. `FiniteGuard` keeps the flag on the device (an `|=` per step, no sync) and reads it
every `every` steps (Lightning's `log_every_n_steps`, where it reads the logged values anyway) and
once more when training ends, so a NaN is reported at most `every` steps late, naming the range.
"""

from __future__ import annotations

import torch


class FiniteGuard:
    def __init__(self, what: str):
        self.what = what
        self._bad: torch.Tensor | None = None  # () bool on the loss's device
        self._since = 0  # first step of the window not yet checked
        self._calls = 0

    def update(self, loss: torch.Tensor, step: int, every: int = 1) -> None:
        """Record `loss` of optimizer step `step`; check the window every `every` calls."""
        bad = ~torch.isfinite(loss.detach())
        self._bad = bad if self._bad is None else self._bad | bad
        self._calls += 1
        if self._calls % max(1, every) == 0:
            self.check(step)

    def check(self, step: int) -> None:
        """Raise FloatingPointError if a loss since the last check was NaN or infinite."""
        if self._bad is not None and bool(self._bad):
            where = f"step {step}" if self._since >= step else f"a step in [{self._since}, {step}]"
            raise FloatingPointError(f"{self.what} loss is not finite at {where}")
        self._bad, self._since = None, step + 1
