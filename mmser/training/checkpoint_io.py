"""Lightning checkpoints written the way every mmser output is (mmser.io.atomic_open): to a temp
file in the checkpoint's own folder, fsynced, renamed over `last.ckpt` / `best.ckpt` with
os.replace, the folder fsynced.

Why not Lightning's TorchCheckpointIO: it saves through fsspec's transaction, whose local temp
file lives in TMPDIR; when TMPDIR is another file system than the run folder (common on clusters:
a node-local /tmp, the run on shared storage) the commit is a copy into the destination, so a kill
during it truncates `last.ckpt` in place (the previous good checkpoint is gone, the rerun refuses
the broken file) and leaves the full-size temp file behind in TMPDIR. Here a kill at any point
leaves the previous checkpoint intact; the temp file of a killed writer (`.last.ckpt.tmp-PID.*`,
beside the checkpoint) is deleted when the next run starts (`clean`), or by the next save.
Remote paths (s3://, gs://, ...) keep Lightning's own writer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from mmser.io import atomic_open, remove_stale_temps

log = logging.getLogger(__name__)


def _is_local(path: str | os.PathLike) -> bool:
    text = os.fspath(path)
    return "://" not in text or text.startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO whose saves are atomic in the destination folder (module docstring).

    Temp files of killed writers are deleted from a checkpoint folder the first time this plugin
    touches it: at the resume's load (the start of a resumed run) or at the first save; `clean`
    names folders to clean at once."""

    def __init__(self, clean: Iterable[str | os.PathLike] = ()):
        super().__init__()
        self._cleaned: set[Path] = set()
        for folder in clean:
            self._clean(Path(folder))

    def _clean(self, folder: Path) -> None:
        if folder not in self._cleaned:
            remove_stale_temps(folder)
            self._cleaned.add(folder)

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(os.fspath(path).removeprefix("file://"))
        self._clean(path.parent)
        with atomic_open(path, "wb") as f:  # temp beside `path`, fsync, os.replace, fsync the folder
            torch.save(checkpoint, f)

    def load_checkpoint(self, path, *args, **kwargs) -> dict[str, Any]:
        if _is_local(path):
            self._clean(Path(os.fspath(path).removeprefix("file://")).parent)
        return super().load_checkpoint(path, *args, **kwargs)
