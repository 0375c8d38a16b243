"""P-TAPT: pseudo-label task-adaptive pre-training, the paper's three steps on one fold.

PAPER.md "P-TAPT" (reference: FT-w2v2-ser run_pretrain.py, cluster.py, run_second.py):
(a) a frame-level emotion model (`mmser.models.frame_model`) trained on the fold's training split,
    itself divided 90/10 (seed 58) to keep the checkpoint of lowest validation loss; Adam 1e-4,
    batch 64 cropped to the batch's shortest item, warm-up 500 / flat 500 / linear decay to 0 at
    10,000 steps;
(b) its 20 ms frame features, clustered by k-means (K = 64, 512, 4,096) into per-frame
    pseudo-labels (`mmser.training.pseudo_labels`);
(c) wav2vec 2.0 base (CNN, feature projection and masked_spec_embed frozen) trained to predict the
    pseudo-labels of time-masked frames: time mask p=0.06, span 15, min 2, inside valid frames;
    masked frames replaced by masked_spec_embed (HF `mask_time_indices`); one head
    Linear(H, 256)-Tanh-Linear(256, K) per K on ReLU(encoder output); loss = sum over heads of the
    CE on masked frames only; Adam 1e-4, warm-up 100 / flat 1,000 / linear decay to 0 at 20,000
    steps; dynamic ~250 s length-bucketed batches; utterances longer than 10 s randomly cropped to
    10 s, the pseudo-label sequence cropped alongside.

Every stage sees only the fold's training split (`fold.train`): never the test session, and
never a validation split of the fine-tuning protocol. `run_ptapt` runs (a) -> (b) -> (c):

    out_dir/frame_model/     model.pt (best-validation weights), split.json, checkpoints/, csv/, DONE.json
    out_dir/pseudo_labels/   labels.npz, centroids.npz, meta.json, DONE.json
    out_dir/encoder_training/  checkpoints/ (last.ckpt: resume point), csv/
    out_dir/encoder/         save_pretrained folder of the encoder (heads dropped) + DONE.json

A stage whose DONE.json exists with the same input fingerprint is skipped; one made from other
inputs is refused (delete it or use another out_dir). Interrupted training resumes from the
stage's last.ckpt.

Label alignment in (c): crops start on a multiple of the encoder's frame hop (320 samples), so
frame j of a crop starting at frame s is frame s + j of the full utterance; the label sequence
(made on the frame model's 20 ms grid) is cut at s and truncated / padded with -100 to the
crop's wav2vec 2.0 frame count (the two grids differ by a frame or two at the end).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedModel

from mmser import tracking
from mmser.config import Config, PtaptConfig, to_dict
from mmser.data.batching import BucketBatchSampler, collate_batch
from mmser.data.datamodule import class_weights as compute_class_weights
from mmser.data.dataset import UtteranceDataset, num_samples, read_audio
from mmser.data.manifest import Fold
from mmser.io import atomic_write_bytes, atomic_write_json, fingerprint, mark_stage_done, stage_done
from mmser.labels import CLASS_TO_INDEX
from mmser.models.frame_model import FrameEmotionModel, build_frame_model
from mmser.models.wav2vec2 import build_encoder, compute_time_mask, uses_attention_mask
from mmser.training import pseudo_labels as pl_stage
from mmser.training.run import make_trainer
from mmser.training.schedule import make_scheduler

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


# ================================================================================================
# Step (a): the frame-level emotion model
# ================================================================================================


def split_train_val(records: Sequence[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded random 90/10 split (the reference's `random_split(..., manual_seed(58))`: the first
    int(n * (1 - val_fraction)) of a permutation train, the rest validate), over records sorted by id."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"ptapt.frame_val_fraction must be in (0, 1), got {val_fraction}")
    recs = sorted(records, key=lambda r: r["id"])
    n_train = int(len(recs) * (1.0 - val_fraction))
    if n_train < 1 or n_train >= len(recs):
        raise ValueError(f"P-TAPT step (a): {len(recs)} training utterances cannot be split "
                         f"{1 - val_fraction:.0%}/{val_fraction:.0%} into two non-empty parts")
    perm = torch.randperm(len(recs), generator=torch.Generator().manual_seed(seed)).tolist()
    return [recs[i] for i in perm[:n_train]], [recs[i] for i in perm[n_train:]]


class CropToShortest:
    """Collate that crops every item to the batch's shortest one (the reference's `truncCollate`):
    a random window in training, the centre window otherwise (a stable validation loss)."""

    def __init__(self, random_crop: bool):
        self.random_crop = random_crop

    def __call__(self, items: list[dict]) -> dict:
        n = min(int(it["audio"].shape[0]) for it in items)
        out = []
        for it in items:
            over = int(it["audio"].shape[0]) - n
            start = int(torch.randint(0, over + 1, ()).item()) if self.random_crop else over // 2
            out.append({**it, "audio": it["audio"][start:start + n]})
        return collate_batch(out)


class FrameModule(pl.LightningModule):
    """Step (a) training: `FrameEmotionModel.loss`, Adam over trainable parameters, paper schedule."""

    def __init__(self, model: FrameEmotionModel, class_weights: torch.Tensor | None, cfg: PtaptConfig):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.register_buffer("class_weights", class_weights, persistent=False)

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        parts = self.model.loss(batch, self.class_weights)
        bs = batch["labels"].shape[0]
        fm = parts["frame_mask"]
        frame_acc = (parts["frame_logits"].argmax(-1) == batch["labels"][:, None])[fm].float().mean()
        utt_acc = (parts["utterance_logits"].argmax(-1) == batch["labels"]).float().mean()
        on_step = stage == "train"
        self.log_dict({f"{stage}/loss": parts["loss"].detach(), f"{stage}/utterance_ce": parts["utterance"].detach(),
                       f"{stage}/frame_ce": parts["frame"].detach(), f"{stage}/frame_acc": frame_acc,
                       f"{stage}/utterance_acc": utt_acc},
                      batch_size=bs, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step)
        return parts["loss"]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, "train")
        if not torch.isfinite(loss):
            raise FloatingPointError(f"P-TAPT frame model loss is not finite at step {self.global_step}")
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=self.cfg.frame_lr)
        sched = make_scheduler(opt, self.cfg.frame_warmup_steps, self.cfg.frame_hold_steps, self.cfg.frame_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ================================================================================================
# Step (c): masked pseudo-label prediction
# ================================================================================================


def conv_frames(n_samples: int, kernels: Sequence[int], strides: Sequence[int]) -> int:
    """wav2vec 2.0 CNN frame count of `n_samples` (floor((L - k) / s) + 1 per layer), >= 0."""
    n = int(n_samples)
    for k, s in zip(kernels, strides):
        n = (n - k) // s + 1
    return max(n, 0)


def crop_with_labels(wav: np.ndarray, labels: np.ndarray, hop: int, max_samples: int | None,
                     start_frame: int | None = None, rng: np.random.Generator | None = None
                     ) -> tuple[np.ndarray, np.ndarray, int]:
    """Crop `wav` to at most `max_samples`, starting on a frame boundary (start = start_frame * hop),
    and cut `labels` (F, n_K) at the same frame. Shorter utterances are kept whole (start 0).
    Returns (wav crop, labels from the start frame on, start frame)."""
    if max_samples is None or wav.shape[0] <= max_samples:
        return wav, labels, 0
    last = (wav.shape[0] - max_samples) // hop  # last start frame that still fits a full crop
    if start_frame is None:  # numpy's global RNG by default: seeded per worker by seed_everything
        start_frame = int(rng.integers(0, last + 1)) if rng is not None else int(np.random.randint(0, last + 1))
    if not 0 <= start_frame <= last:
        raise ValueError(f"crop start frame {start_frame} outside [0, {last}]")
    s = start_frame * hop
    return wav[s:s + max_samples], labels[start_frame:], start_frame


def align_labels(labels: np.ndarray, n_frames: int) -> np.ndarray:
    """Labels (F', n_K) truncated or padded with -100 to exactly n_frames rows."""
    out = np.full((n_frames, labels.shape[1]), IGNORE_INDEX, dtype=np.int64)
    n = min(n_frames, labels.shape[0])
    out[:n] = labels[:n]
    return out


class PseudoLabelDataset(Dataset):
    """Items: {"id", "audio" (T,), "label" (4-class index), "pseudo_labels" LongTensor (F, n_K)}, where
    F = the encoder's frame count of the (cropped) audio and rows past the label sequence are -100."""

    def __init__(self, records: Sequence[dict], labels: Mapping[str, np.ndarray], conv_kernel: Sequence[int],
                 conv_stride: Sequence[int], crop_s: float | None, sample_rate: int = 16000):
        self.records = list(records)
        missing = [r["id"] for r in self.records if r["id"] not in labels]
        if missing:
            raise KeyError(f"pseudo-labels missing for {len(missing)} utterances, e.g. {missing[:3]}")
        self.labels = labels
        self.kernels, self.strides = list(conv_kernel), list(conv_stride)
        self.hop = int(np.prod(self.strides))
        self.sample_rate = sample_rate
        self.max_samples = None if crop_s is None else int(round(crop_s * sample_rate))
        self.lengths = [num_samples(r, sample_rate, crop_s) for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        wav = read_audio(r["path"], self.sample_rate)
        wav, lab, _ = crop_with_labels(wav, self.labels[r["id"]], self.hop, self.max_samples)
        lab = align_labels(lab, conv_frames(wav.shape[0], self.kernels, self.strides))
        return {"id": r["id"], "audio": torch.from_numpy(np.ascontiguousarray(wav)),
                "label": CLASS_TO_INDEX.get(r.get("label"), -1), "pseudo_labels": torch.from_numpy(lab)}


def collate_pseudo(items: list[dict]) -> dict:
    """The batch contract plus "pseudo_labels" LongTensor (B, F, n_K), padded with -100."""
    batch = collate_batch(items)
    f = max(int(it["pseudo_labels"].shape[0]) for it in items)
    n_k = int(items[0]["pseudo_labels"].shape[1])
    pseudo = torch.full((len(items), f, n_k), IGNORE_INDEX, dtype=torch.long)  # (B, F, n_K)
    for i, it in enumerate(items):
        pseudo[i, : it["pseudo_labels"].shape[0]] = it["pseudo_labels"]
    batch["pseudo_labels"] = pseudo
    return batch


def ptapt_loss(frames: torch.Tensor, heads: Sequence[nn.Module], labels: torch.Tensor, time_mask: torch.Tensor
               ) -> dict[str, torch.Tensor]:
    """Sum over heads of the CE on MASKED frames only.

    frames (B, F, H) = ReLU(encoder output); labels (B, F, n_K) with -100 = no target; time_mask (B, F)
    bool. Each head's CE is the mean over masked frames that have a target (the reference's
    `CrossEntropyLoss(ignore_index=-100)` on `reps[maskidx]`), in float32."""
    if labels.shape[:2] != frames.shape[:2] or time_mask.shape != frames.shape[:2]:
        raise ValueError(f"ptapt_loss: frames {tuple(frames.shape)}, labels {tuple(labels.shape)} and mask "
                         f"{tuple(time_mask.shape)} disagree on (B, F)")
    if labels.shape[2] != len(heads):
        raise ValueError(f"ptapt_loss: {labels.shape[2]} label columns for {len(heads)} heads")
    selected = frames[time_mask]  # (M, H)
    targets = labels[time_mask]  # (M, n_K)
    total = frames.new_zeros((), dtype=torch.float32)
    out: dict[str, torch.Tensor] = {}
    for i, head in enumerate(heads):
        t = targets[:, i]
        valid = t != IGNORE_INDEX
        if not bool(valid.any()):
            # No target in this batch: contribute 0 while keeping the graph connected.
            total = total + 0.0 * head(selected).float().sum()
            out[f"ce_{i}"] = total.new_zeros(())
            out[f"acc_{i}"] = total.new_zeros(())
            continue
        logits = head(selected[valid]).float()  # (M', K_i)
        ce = F.cross_entropy(logits, t[valid])
        total = total + ce
        out[f"ce_{i}"] = ce.detach()
        out[f"acc_{i}"] = (logits.argmax(-1) == t[valid]).float().mean().detach()
    out["loss"] = total
    out["n_masked"] = time_mask.sum()
    return out


class PtaptModule(pl.LightningModule):
    """Step (c): wav2vec 2.0 encoder + one Linear(H, 256)-Tanh-Linear(256, K) head per K."""

    def __init__(self, encoder: PreTrainedModel, cluster_sizes: Sequence[int], cfg: PtaptConfig,
                 attention_mask: str = "auto", sample_rate: int = 16000):
        super().__init__()
        self.sample_rate = sample_rate
        if cfg.mask_time_prob <= 0:
            raise ValueError("ptapt.mask_time_prob must be > 0 (the loss is computed on masked frames)")
        if getattr(encoder, "masked_spec_embed", None) is None:
            raise ValueError("P-TAPT encoder has no masked_spec_embed (build it with mask_time_prob > 0)")
        self.encoder = encoder
        self.cfg = cfg
        self.cluster_sizes = [int(k) for k in cluster_sizes]
        hidden = int(encoder.config.hidden_size)
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(hidden, cfg.head_hidden_size), nn.Tanh(), nn.Linear(cfg.head_hidden_size, k))
            for k in self.cluster_sizes)
        self.pass_attention_mask = uses_attention_mask(encoder.config, attention_mask)

    def frame_mask(self, audio_mask: torch.Tensor, num_frames: int) -> torch.Tensor:
        lengths = self.encoder._get_feat_extract_output_lengths(audio_mask.sum(-1)).long()  # (B,)
        return torch.arange(num_frames, device=audio_mask.device)[None, :] < lengths[:, None]  # (B, F)

    def compute_loss(self, batch: dict, time_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Draw a time mask inside valid frames (unless given), run the encoder with it, `ptapt_loss`."""
        audio, audio_mask = batch["audio"], batch["audio_mask"]
        num_frames = int(self.encoder._get_feat_extract_output_lengths(torch.tensor(audio.shape[1])))
        if time_mask is None:
            c = self.cfg
            time_mask = compute_time_mask(self.frame_mask(audio_mask, num_frames), c.mask_time_prob,
                                          c.mask_time_length, c.mask_time_min_masks)  # (B, F)
        attn = audio_mask.long() if self.pass_attention_mask else None
        out = self.encoder(audio, attention_mask=attn, mask_time_indices=time_mask)
        frames = F.relu(out.last_hidden_state)  # (B, F, H)
        labels = batch["pseudo_labels"]
        if labels.shape[1] != frames.shape[1]:
            raise ValueError(f"pseudo-labels have {labels.shape[1]} frames, the encoder {frames.shape[1]}: "
                             "collate them with collate_pseudo for this encoder")
        return ptapt_loss(frames, self.heads, labels, time_mask)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        parts = self.compute_loss(batch)
        loss = parts["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"P-TAPT loss is not finite at step {self.global_step}")
        logs = {"ptapt/loss": loss.detach(), "ptapt/masked_frames": parts["n_masked"].float(),
                "ptapt/audio_seconds": batch["audio_mask"].sum().float() / self.sample_rate}
        for i, k in enumerate(self.cluster_sizes):
            logs[f"ptapt/ce_k{k}"] = parts[f"ce_{i}"]
            logs[f"ptapt/acc_k{k}"] = parts[f"acc_{i}"]
        self.log_dict(logs, batch_size=batch["audio"].shape[0], on_step=True)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=self.cfg.lr)
        sched = make_scheduler(opt, self.cfg.warmup_steps, self.cfg.hold_steps, self.cfg.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def build_ptapt_encoder(cfg: Config) -> PreTrainedModel:
    """`cfg.encoder` with P-TAPT's settings: CNN, feature projection and masked_spec_embed frozen;
    time mask from `cfg.ptapt`; no channel mask (the reference's pre-training wrapper sets
    mask_feature_prob = 0)."""
    pc = cfg.ptapt
    enc_cfg = dataclasses.replace(
        cfg.encoder, freeze_feature_encoder=True, freeze_feature_projection=True,
        mask_time_prob=pc.mask_time_prob, mask_time_length=pc.mask_time_length,
        mask_time_min_masks=pc.mask_time_min_masks, mask_feature_prob=0.0)
    return build_encoder(enc_cfg)


# ================================================================================================
# The driver
# ================================================================================================


def _trainer(cfg: Config, stage_dir: Path, max_steps: int, callbacks: list, name: str, job_type: str,
             validate: bool, **extra) -> tuple[pl.Trainer, list]:
    loggers = tracking.make_loggers(cfg, stage_dir, name=name, group=cfg.experiment, job_type=job_type)
    trainer = make_trainer(cfg, max_steps=max_steps, max_epochs=-1, logger=loggers,
                           callbacks=callbacks, default_root_dir=str(stage_dir),
                           limit_val_batches=None if validate else 0, **extra)
    return trainer, loggers


def _check_no_test_session(records: Sequence[dict], fold: Fold, stage: str) -> None:
    bad = [r["id"] for r in records if r["session"] == fold.test_session]
    if bad:
        raise AssertionError(f"P-TAPT {stage}: test-session {fold.test_session} utterances in its input: {bad[:5]}")


def _encoder_fingerprint_items(cfg: Config) -> dict:
    # V-FT SpecAugment and freezing flags do not affect P-TAPT (it sets its own).
    return {k: v for k, v in to_dict(cfg.encoder).items() if not k.startswith(("mask_", "freeze_"))}


def _stage_a(cfg: Config, fold: Fold, stage_dir: Path, fp: str) -> FrameEmotionModel:
    t0 = time.perf_counter()
    pc = cfg.ptapt
    train, val = split_train_val(fold.train, pc.frame_val_fraction, pc.frame_val_seed)
    _check_no_test_session(train + val, fold, "step (a)")
    atomic_write_json(stage_dir / "split.json", {"train": sorted(r["id"] for r in train),
                                                  "val": sorted(r["id"] for r in val)})
    pl.seed_everything(pc.seed, workers=True)
    model = build_frame_model(cfg)
    # Class weights N / n_c from the whole training split, as the reference (before its 90/10 split).
    module = FrameModule(model, compute_class_weights(list(fold.train)), pc)
    sr = cfg.data.sample_rate
    train_set, val_set = UtteranceDataset(train, sr, None), UtteranceDataset(val, sr, None)
    train_sampler = BucketBatchSampler(train_set.lengths, batch_size=pc.frame_batch_size, num_buckets=1,
                                       shuffle=True, seed=pc.seed, drop_last=len(train) > pc.frame_batch_size)
    val_sampler = BucketBatchSampler(val_set.lengths, batch_size=pc.frame_batch_size, shuffle=False)
    kw = {"num_workers": cfg.data.num_workers, "pin_memory": torch.cuda.is_available()}
    train_loader = DataLoader(train_set, batch_sampler=train_sampler, collate_fn=CropToShortest(True), **kw)
    val_loader = DataLoader(val_set, batch_sampler=val_sampler, collate_fn=CropToShortest(False), **kw)
    ckpt_dir = stage_dir / "checkpoints"
    best_cb = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/loss", mode="min", save_top_k=1,
                              save_last=True)
    name = f"{cfg.experiment}-ptapt-frame-s{fold.test_session}"
    # Validate once per epoch (the reference), or more often when the whole stage is shorter than
    # a few epochs, so that a best checkpoint always exists.
    every = min(len(train_sampler), max(1, pc.frame_steps // 4))
    trainer, loggers = _trainer(cfg, stage_dir, pc.frame_steps, [best_cb], name, "ptapt-frame", validate=True,
                                val_check_interval=every, check_val_every_n_epoch=None)
    resume = ckpt_dir / "last.ckpt"
    try:
        trainer.fit(module, train_loader, val_loader, ckpt_path=str(resume) if resume.is_file() else None)
    finally:
        tracking.finish(loggers)
    if not best_cb.best_model_path:
        raise RuntimeError(f"{stage_dir}: no validation checkpoint was saved (an earlier attempt may have "
                           f"reached ptapt.frame_steps without validating: delete {stage_dir} to redo step (a))")
    state = torch.load(best_cb.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    atomic_write_bytes(stage_dir / "model.pt", _torch_bytes(model.state_dict()))
    mark_stage_done(stage_dir, fp, {"seconds": round(time.perf_counter() - t0, 3),
                               "best_val_loss": float(best_cb.best_model_score),
                               "best_checkpoint": Path(best_cb.best_model_path).name,
                               "steps": int(trainer.global_step), "n_train": len(train), "n_val": len(val)})
    return model


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def load_frame_model(cfg: Config, stage_dir: Path) -> FrameEmotionModel:
    """The step-(a) model with its best-validation weights (built from `cfg`, weights from model.pt)."""
    path = Path(stage_dir) / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no frame model weights (P-TAPT step (a) has not finished)")
    model = build_frame_model(cfg)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def _device(cfg: Config) -> torch.device:
    wants_gpu = cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    return torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")


def _stage_b(cfg: Config, fold: Fold, model: FrameEmotionModel, stage_dir: Path, fp: str) -> None:
    pc = cfg.ptapt
    records = sorted(fold.train, key=lambda r: r["id"])
    _check_no_test_session(records, fold, "step (b)")
    device = _device(cfg)
    t0 = time.perf_counter()
    feats = pl_stage.extract_frame_features(model, records, cfg.data.sample_rate, device)
    t_feat = time.perf_counter() - t0
    pl_stage.make_pseudo_labels(feats, pc.cluster_sizes, pc.kmeans_iters, pc.seed, stage_dir,
                                fit_fraction=pc.kmeans_fit_fraction, init=pc.kmeans_init, device=device,
                                extra_meta={"hop_samples": model.hop_samples, "feature_seconds": round(t_feat, 3)})
    mark_stage_done(stage_dir, fp, {"seconds": round(time.perf_counter() - t0, 3), "n_utterances": len(records)})


def _stage_c(cfg: Config, fold: Fold, labels_dir: Path, work_dir: Path, enc_dir: Path, fp: str) -> None:
    t0 = time.perf_counter()
    pc = cfg.ptapt
    meta = pl_stage.read_meta(labels_dir)
    labels = pl_stage.load_pseudo_labels(labels_dir)
    records = sorted(fold.train, key=lambda r: r["id"])
    _check_no_test_session(records, fold, "step (c)")
    pl.seed_everything(pc.seed, workers=True)
    encoder = build_ptapt_encoder(cfg)
    hc = encoder.config
    hop = int(np.prod(hc.conv_stride))
    if meta.get("hop_samples") != hop:
        raise ValueError(f"{labels_dir}: pseudo-labels are on a {meta.get('hop_samples')}-sample frame grid, "
                         f"the encoder's frames are {hop} samples apart: the frame model and encoder must agree")
    # Utterances shorter than one mask span cannot be masked (HF needs frames >= span).
    sr = cfg.data.sample_rate
    keep = [r for r in records
            if conv_frames(num_samples(r, sr, pc.crop_s), hc.conv_kernel, hc.conv_stride) >= pc.mask_time_length]
    if len(keep) < len(records):
        log.warning("P-TAPT step (c): %d of %d utterances are shorter than the mask span (%d frames) and are skipped",
                    len(records) - len(keep), len(records), pc.mask_time_length)
    if not keep:
        raise ValueError("P-TAPT step (c): no training utterance is longer than the mask span")
    dataset = PseudoLabelDataset(keep, labels, hc.conv_kernel, hc.conv_stride, pc.crop_s, sr)
    sampler = BucketBatchSampler(dataset.lengths, max_batch_samples=int(pc.max_batch_seconds * sr),
                                 num_buckets=cfg.data.num_buckets, shuffle=True, seed=pc.seed)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_pseudo,
                        num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available())
    module = PtaptModule(encoder, meta["cluster_sizes"], pc, attention_mask=cfg.encoder.attention_mask,
                         sample_rate=cfg.data.sample_rate)
    ckpt_dir = work_dir / "checkpoints"
    # last.ckpt every 1,000 steps: the resume point of an interrupted run (final weights: enc_dir)
    last_cb = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                              every_n_train_steps=max(1, min(1000, pc.total_steps)))
    name = f"{cfg.experiment}-ptapt-s{fold.test_session}"
    trainer, loggers = _trainer(cfg, work_dir, pc.total_steps, [last_cb], name, "ptapt", validate=False)
    resume = ckpt_dir / "last.ckpt"
    try:
        trainer.fit(module, loader, ckpt_path=str(resume) if resume.is_file() else None)
    finally:
        tracking.finish(loggers)
    if trainer.global_rank == 0:
        # Save the encoder (heads dropped) into a temporary folder, then rename it into place.
        if enc_dir.exists():
            shutil.rmtree(enc_dir)  # an incomplete folder (no DONE.json) of an earlier attempt
        tmp = Path(tempfile.mkdtemp(prefix=f".{enc_dir.name}.", dir=enc_dir.parent))
        encoder.save_pretrained(str(tmp))
        mark_stage_done(tmp, fp, {"seconds": round(time.perf_counter() - t0, 3),
                                  "steps": int(trainer.global_step), "n_utterances": len(keep),
                                  "cluster_sizes": meta["cluster_sizes"]})
        os.replace(tmp, enc_dir)
    trainer.strategy.barrier()  # other ranks go on only once rank 0 has written the folder


def run_ptapt(cfg: Config, fold: Fold, out_dir: str | Path) -> Path:
    """P-TAPT steps (a) -> (b) -> (c) on `fold.train`; returns the encoder folder (save_pretrained
    format, pseudo-label heads dropped) that V-FT loads with `encoder.name=<that path>`."""
    out_dir = Path(out_dir)
    pc = cfg.ptapt
    if not fold.train:
        raise ValueError(f"fold {fold.test_session}: empty training split")
    _check_no_test_session(fold.train, fold, "input")
    train_ids = sorted(r["id"] for r in fold.train)
    frame_fields = {k: v for k, v in to_dict(pc).items() if k.startswith(("frame_", "wav2vec1_"))}
    fp_a = fingerprint([("stage", "ptapt-frame-model"), ("ptapt", frame_fields), ("seed", pc.seed),
                        ("encoder", _encoder_fingerprint_items(cfg) if pc.frame_model == "wav2vec2" else None),
                        ("sample_rate", cfg.data.sample_rate), ("train_ids", train_ids)])
    fp_b = fingerprint([("stage", "ptapt-pseudo-labels"), ("upstream", fp_a), ("cluster_sizes", list(pc.cluster_sizes)),
                        ("iters", pc.kmeans_iters), ("fit_fraction", pc.kmeans_fit_fraction),
                        ("init", pc.kmeans_init)])
    step_c = {k: v for k, v in to_dict(pc).items()
              if k in ("lr", "warmup_steps", "hold_steps", "total_steps", "max_batch_seconds", "crop_s",
                       "mask_time_prob", "mask_time_length", "mask_time_min_masks", "head_hidden_size")}
    fp_c = fingerprint([("stage", "ptapt-encoder"), ("upstream", fp_b), ("ptapt", step_c),
                        ("encoder", _encoder_fingerprint_items(cfg)), ("num_buckets", cfg.data.num_buckets)])

    frame_dir, labels_dir = out_dir / "frame_model", out_dir / "pseudo_labels"
    work_dir, enc_dir = out_dir / "encoder_training", out_dir / "encoder"
    timings: dict[str, float] = {}

    model = None
    if stage_done(frame_dir, fp_a):
        log.info("P-TAPT step (a): done, skipped (%s)", frame_dir)
    else:
        t0 = time.perf_counter()
        frame_dir.mkdir(parents=True, exist_ok=True)
        log.info("P-TAPT step (a): frame-level emotion model -> %s", frame_dir)
        model = _stage_a(cfg, fold, frame_dir, fp_a)
        timings["frame_model"] = time.perf_counter() - t0
    if stage_done(labels_dir, fp_b):
        log.info("P-TAPT step (b): done, skipped (%s)", labels_dir)
    else:
        t0 = time.perf_counter()
        labels_dir.mkdir(parents=True, exist_ok=True)
        log.info("P-TAPT step (b): frame features + k-means -> %s", labels_dir)
        model = load_frame_model(cfg, frame_dir)  # best-validation weights, eval mode
        _stage_b(cfg, fold, model, labels_dir, fp_b)
        timings["pseudo_labels"] = time.perf_counter() - t0
    del model
    if stage_done(enc_dir, fp_c):
        log.info("P-TAPT step (c): done, skipped (%s)", enc_dir)
    else:
        t0 = time.perf_counter()
        work_dir.mkdir(parents=True, exist_ok=True)
        log.info("P-TAPT step (c): masked pseudo-label prediction -> %s", enc_dir)
        _stage_c(cfg, fold, labels_dir, work_dir, enc_dir, fp_c)
        timings["encoder"] = time.perf_counter() - t0
    if timings:
        log.info("P-TAPT stage times (s): %s", {k: round(v, 1) for k, v in timings.items()})
    if not cfg.finetune.keep_checkpoints and stage_done(enc_dir, fp_c):
        # Resume points are not needed once the stages are done (full models + Adam state:
        # about 1 GB each at base size). The selected frame model stays as frame_model/model.pt.
        for d in (frame_dir / "checkpoints", work_dir / "checkpoints"):
            shutil.rmtree(d, ignore_errors=True)
    return enc_dir
