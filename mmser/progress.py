"""Progress of long loops outside training (frame features, k-means, transcription, text embedding).

`Progress(total, desc)` shows a tqdm bar when stderr is a terminal, and otherwise logs one line at
every ~10% of the work (and at the end): done/total, rate, elapsed and time left. Training epochs
have their own line (`mmser.training.progress.EpochLog`) or Lightning's bar. `MMSER_PROGRESS=bar|log|off`
overrides the choice (e.g. `log` in a terminal multiplexer that records output).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("mmser.progress")


def _fmt(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def progress_mode() -> str:
    """'bar' (stderr is a terminal), 'log' (it is not), or MMSER_PROGRESS's value."""
    mode = os.environ.get("MMSER_PROGRESS", "").strip().lower()
    if mode in ("bar", "log", "off"):
        return mode
    return "bar" if sys.stderr.isatty() else "log"


class Progress:
    """Counts work done; `update(n)` after each piece. Use as a context manager (closes the bar)."""

    def __init__(self, total: int, desc: str, unit: str = "it", every: float = 0.1, mode: str | None = None,
                 logger: logging.Logger | None = None):
        self.total, self.desc, self.unit, self.done = max(int(total), 0), desc, unit, 0
        self.mode = mode or progress_mode()
        self.log = logger or log
        self._step = max(1, int(round(self.total * every))) if self.total else 1
        self._next = self._step
        self._t0 = time.perf_counter()
        self._bar = None
        if self.mode == "bar" and self.total:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)

    def line(self) -> str:
        """'k-means K=512: 10/20 it (50%), 2.0 it/s, 0m05s elapsed, 0m05s left'."""
        elapsed = time.perf_counter() - self._t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        text = (f"{self.desc}: {self.done}/{self.total} {self.unit}{pct}, {rate:.2f} {self.unit}/s, "
                f"{_fmt(elapsed)} elapsed")
        if 0 < self.done < self.total and rate > 0:
            text += f", {_fmt((self.total - self.done) / rate)} left"
        return text

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.mode == "log" and (self.done >= self._next or self.done == self.total):
            self.log.info(self.line())
            while self._next <= self.done:
                self._next += self._step

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(items: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it",
          mode: str | None = None) -> Iterator[T]:
    """Yield `items`, reporting progress as `Progress` does (total from len() when not given)."""
    if total is None:
        total = len(items)  # type: ignore[arg-type]
    with Progress(total, desc, unit, mode=mode) as p:
        for item in items:
            yield item
            p.update()
