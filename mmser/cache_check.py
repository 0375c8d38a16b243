"""Content checksums of cached tensors: the feature caches (mmser.models.whisper's frames,
mmser.text.embed's text features) record the sha256 of each entry's tensor bytes with its shape,
and verify both on every read, so a file changed after writing (zeroed bytes, a flipped bit) is
recomputed instead of trusted."""

from __future__ import annotations

import hashlib

import torch


def tensor_sha256(*tensors: torch.Tensor) -> str:
    """sha256 of the tensors' bytes in C order, one after the other (dtype and shape are recorded
    separately by the caller)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
