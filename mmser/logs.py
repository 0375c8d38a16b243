"""Console logging for the CLI: mmser's own lines by default, third-party chatter only with -v.

Default: mmser's INFO lines and everyone's warnings and errors; Lightning's INFO lines ("GPU
available: False", "TPU available", the litlogger tip, "Seed set to 0", "`Trainer.fit` stopped")
and known harmless deprecation warnings from libraries (Lightning's `_pytree` LeafSpec) are dropped.
-v: everything, at DEBUG. -q: results (printed to stdout) and errors only.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import TextIO

# Loggers whose INFO lines are library chatter, not progress of an mmser stage.
NOISY_LOGGERS = ("pytorch_lightning", "lightning", "lightning_fabric")
# Library warnings that say nothing actionable to an mmser user (message regexes).
# The eval-mode one: fusion's frozen audio branch stays in eval mode on purpose (run.TrainMode puts
# everything else in train mode), so Lightning's "Found N module(s) in eval mode" says nothing.
NOISY_WARNINGS = (r".*isinstance\(treespec, LeafSpec\)", r"Found \d+ module\(s\) in eval mode at the start of training")
QUIET, DEFAULT, VERBOSE = -1, 0, 1


class _DropLibraryInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        noisy = any(record.name == n or record.name.startswith(n + ".") for n in NOISY_LOGGERS)
        return not (noisy and record.levelno < logging.WARNING)


def configure_logging(verbosity: int = DEFAULT, stream: TextIO | None = None) -> logging.Handler | None:
    """One stderr handler on the root logger for `verbosity` (QUIET, DEFAULT or VERBOSE); returns it.

    Like `logging.basicConfig`, it leaves a root logger that already has handlers alone (pytest's
    capture, an application embedding mmser) unless `stream` is given; the warning filters apply
    either way. The level is set on the handler as well as the root: Lightning sets its own logger
    to INFO, so a root level alone would not quiet it."""
    if verbosity < VERBOSE:
        for pattern in NOISY_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
    if verbosity == QUIET:
        warnings.simplefilter("ignore")
    if stream is None and logging.getLogger().handlers:
        return None
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    level = {QUIET: logging.ERROR, DEFAULT: logging.INFO}.get(verbosity, logging.DEBUG)
    handler.setLevel(level)
    if verbosity < VERBOSE:
        handler.addFilter(_DropLibraryInfo())
    logging.basicConfig(level=level, handlers=[handler], force=True)
    return handler
