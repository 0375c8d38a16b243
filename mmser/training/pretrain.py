"""Pre-training stages, once per fold: the fold's training split in, an encoder folder out.

`mmser cv` calls `pretrain_fold` for each test session when `cfg.pretrain` is "tapt" or "ptapt",
then fine-tunes (V-FT) every seed from the returned folder, by explicit path. Only the fold's
training split is seen (never the test session; with a validation policy, not the validation
split either).
"""

from __future__ import annotations

from pathlib import Path

from mmser.config import Config
from mmser.data.manifest import FoldId, load_manifest, split_fold


def pretrain_fold(cfg: Config, test_session: FoldId, out_dir: Path) -> Path:
    """Run (or reuse) the fold's pre-training stage; return the encoder folder for V-FT."""
    fold = split_fold(load_manifest(cfg.data.manifest), test_session, cfg.data)
    if cfg.pretrain == "tapt":
        from mmser.training.tapt import run_tapt

        return run_tapt(cfg, fold, Path(out_dir))
    if cfg.pretrain == "ptapt":
        from mmser.training.ptapt import run_ptapt

        return run_ptapt(cfg, fold, Path(out_dir))
    raise ValueError(f"pretrain_fold: cfg.pretrain={cfg.pretrain!r} has no pre-training stage")
