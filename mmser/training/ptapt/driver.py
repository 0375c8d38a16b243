"""P-TAPT's driver: steps (a) -> (b) -> (c) on one fold, each skipped once done.

Every stage sees only the fold's training split (`fold.train`): never the test session, and
never a validation split of the fine-tuning protocol. `run_ptapt` runs (a) -> (b) -> (c):

    out_dir/frame_model/     model.pt (best-validation weights), split.json, checkpoints/, csv/, DONE.json
    out_dir/pseudo_labels/   labels.npz, centroids.npz, meta.json, DONE.json
    out_dir/encoder_training/  checkpoints/ (last.ckpt: resume point), csv/
    out_dir/encoder/         save_pretrained folder of the encoder (heads dropped) + DONE.json

Several processes (DDP, `trainer.strategy=ddp`, any number of nodes): steps (a) and (c) are one
distributed training each (every rank takes its share of the batches; rank 0 writes the folder,
the others wait); step (b) (frame features + k-means) runs once, on global rank 0, while the others
wait for it (`common.on_global_rank_zero`), then step (c) reads its labels on every rank.

A stage whose DONE.json exists with the same input fingerprint is skipped; one made from other
inputs is refused (delete it or use another out_dir). Interrupted training resumes from the
stage's last.ckpt. Each fingerprint includes its upstream stage's, so the stages after a changed
one are refused as well, never reused.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from pytorch_lightning.utilities import rank_zero_only

from mmser.config import Config, to_dict
from mmser.data.manifest import Fold
from mmser.io import fingerprint, hold_folder, stage_done
from mmser.training.ptapt.clustering import cluster_frames
from mmser.training.ptapt.common import check_no_test_session, on_global_rank_zero
from mmser.training.ptapt.frame_training import load_frame_model, train_frame_model
from mmser.training.ptapt.masked_prediction import train_encoder

log = logging.getLogger(__name__)


def _encoder_fingerprint_items(cfg: Config) -> dict:
    # V-FT SpecAugment and freezing flags do not affect P-TAPT (it sets its own); the attention
    # kernel is a speed switch (the same function).
    return {k: v for k, v in to_dict(cfg.encoder).items()
            if not k.startswith(("mask_", "freeze_")) and k != "attn_implementation"}


def _run_stage(step: str, what: str, done_dir: Path, fp: str, run: Callable[[], object],
               timings: dict[str, float], key: str, work_dir: Path | None = None) -> None:
    """Skip step `step` when `done_dir` holds its DONE.json for `fp` (`stage_done` refuses one made from
    other inputs); otherwise create its working folder (`done_dir` unless given), run it and record
    its seconds in timings[key]."""
    if stage_done(done_dir, fp):
        log.info("P-TAPT step %s: done, skipped (%s)", step, done_dir)
        return
    t0 = time.perf_counter()
    (work_dir or done_dir).mkdir(parents=True, exist_ok=True)
    log.info("P-TAPT step %s: %s -> %s", step, what, done_dir)
    run()
    timings[key] = time.perf_counter() - t0


def run_ptapt(cfg: Config, fold: Fold, out_dir: str | Path) -> Path:
    """P-TAPT steps (a) -> (b) -> (c) on `fold.train`; returns the encoder folder (save_pretrained
    format, pseudo-label heads dropped) that V-FT loads with `encoder.name=<that path>`."""
    out_dir = Path(out_dir)
    pc = cfg.ptapt
    if not fold.train:
        raise ValueError(f"fold {fold.test_session}: empty training split")
    check_no_test_session(fold.train, fold, "input")
    train_ids = sorted(r["id"] for r in fold.train)
    frame_fields = {k: v for k, v in to_dict(pc).items() if k.startswith(("frame_", "wav2vec1_"))}
    fp_a = fingerprint([("stage", "ptapt-frame-model"), ("ptapt", frame_fields), ("seed", pc.seed),
                        ("encoder", _encoder_fingerprint_items(cfg) if pc.frame_model == "wav2vec2" else None),
                        ("sample_rate", cfg.data.sample_rate), ("train_ids", train_ids)])
    fp_b = fingerprint([("stage", "ptapt-pseudo-labels"), ("upstream", fp_a), ("cluster_sizes", list(pc.cluster_sizes)),
                        ("iters", pc.kmeans_iters), ("fit_fraction", pc.kmeans_fit_fraction),
                        ("init", pc.kmeans_init), ("empty", pc.kmeans_empty)])
    step_c_keys = ("lr", "warmup_steps", "hold_steps", "total_steps", "max_batch_seconds", "accumulate_grad_batches",
                   "num_buckets", "crop_s", "mask_time_prob", "mask_time_length", "mask_time_min_masks",
                   "head_hidden_size")
    step_c = {k: v for k, v in to_dict(pc).items() if k in step_c_keys}
    fp_c = fingerprint([("stage", "ptapt-encoder"), ("upstream", fp_b), ("ptapt", step_c),
                        ("encoder", _encoder_fingerprint_items(cfg))])

    # One process per fold folder (all three steps); another live one holding it raises
    # mmser.io.FolderHeld. The steps' DONE.json checks run under the lock.
    with hold_folder(out_dir, enabled=rank_zero_only.rank == 0):
        return _run_steps(cfg, fold, out_dir, fp_a, fp_b, fp_c)


def _run_steps(cfg: Config, fold: Fold, out_dir: Path, fp_a: str, fp_b: str, fp_c: str) -> Path:
    frame_dir, labels_dir = out_dir / "frame_model", out_dir / "pseudo_labels"
    work_dir, enc_dir = out_dir / "encoder_training", out_dir / "encoder"
    timings: dict[str, float] = {}
    _run_stage("(a)", "frame-level emotion model", frame_dir, fp_a, timings=timings, key="frame_model",
               run=lambda: train_frame_model(cfg, fold, frame_dir, fp_a))
    # (b) clusters the features of the best-validation weights, reloaded from frame_model/ (eval mode);
    # under DDP once, on global rank 0, while the other ranks wait (step (c) reads the folder).
    def step_b() -> None:
        frame_model = load_frame_model(cfg, frame_dir, len(fold.classes) or None)
        cluster_frames(cfg, fold, frame_model, labels_dir, fp_b)

    on_global_rank_zero(lambda: _run_stage("(b)", "frame features + k-means", labels_dir, fp_b, timings=timings,
                                           key="pseudo_labels", run=step_b), "P-TAPT step (b)")
    _run_stage("(c)", "masked pseudo-label prediction", enc_dir, fp_c, timings=timings, key="encoder",
               work_dir=work_dir, run=lambda: train_encoder(cfg, fold, labels_dir, work_dir, enc_dir, fp_c))
    if timings:
        log.info("P-TAPT stage times (s): %s", {k: round(v, 1) for k, v in timings.items()})
    if not cfg.finetune.keep_checkpoints and stage_done(enc_dir, fp_c):
        # Resume points are not needed once the stages are done (full models + Adam state:
        # about 1 GB each at base size). The selected frame model stays as frame_model/model.pt.
        for d in (frame_dir / "checkpoints", work_dir / "checkpoints"):
            shutil.rmtree(d, ignore_errors=True)
    return enc_dir
