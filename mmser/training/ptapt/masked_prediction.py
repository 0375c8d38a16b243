"""P-TAPT step (c): wav2vec 2.0 trained to predict step (b)'s pseudo-labels of time-masked frames.

PAPER.md "P-TAPT" (reference: FT-w2v2-ser run_second.py): wav2vec 2.0 base (CNN, feature projection
and masked_spec_embed frozen) trained to predict the pseudo-labels of time-masked frames: time mask
p=0.06, span 15, min 2, inside valid frames; masked frames replaced by masked_spec_embed (HF
`mask_time_indices`); one head Linear(H, 256)-Tanh-Linear(256, K) per K on ReLU(encoder output);
loss = sum over heads of the CE on masked frames only; Adam 1e-4, warm-up 100 / flat 1,000 / linear
decay to 0 at 20,000 steps; dynamic ~250 s length-bucketed batches (per optimizer step: in
`ptapt.accumulate_grad_batches` micro-batches, as TAPT); utterances longer than 10 s randomly
cropped to 10 s, the pseudo-label sequence cropped alongside.

Label alignment: crops start on a multiple of the encoder's frame hop (320 samples), so frame j of
a crop starting at frame s is frame s + j of the full utterance; the label sequence (made on the
frame model's 20 ms grid) is cut at s and truncated / padded with -100 to the crop's wav2vec 2.0
frame count (the two grids differ by a frame or two at the end).

The data is fine-tuning's: `PseudoLabelDataset` is an `UtteranceDataset` (same records, label
check, bucketing lengths and item fields) whose crop is random and hop-aligned rather than the
first `crop_s` seconds, and whose items add the pseudo-labels.

Folders (`train_encoder`):
    encoder_training/  checkpoints/ (last.ckpt: resume point), csv/
    encoder/           save_pretrained folder of the encoder (heads dropped) + DONE.json
"""

from __future__ import annotations

import dataclasses
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
from torch.utils.data import DataLoader
from transformers import PreTrainedModel

from mmser import tracking
from mmser.config import Config, PtaptConfig
from mmser.data.batching import BucketBatchSampler, collate_batch, micro_batch_samples
from mmser.data.dataset import UtteranceDataset, num_samples, read_audio
from mmser.data.manifest import Fold, fold_tag
from mmser.io import mark_stage_done
from mmser.models.wav2vec2 import build_encoder, compute_time_mask, uses_attention_mask
from mmser.perf import add_audio_lengths
from mmser.training.finite import FiniteGuard
from mmser.training.ptapt.clustering import load_pseudo_labels, read_meta
from mmser.training.ptapt.common import check_no_test_session, stage_trainer
from mmser.training.run import apply_speed_switches, throughput_monitor
from mmser.training.schedule import make_scheduler
from mmser.training.step_rng import micro_batch_number, step_rng

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


def conv_frames(n_samples: int, kernels: Sequence[int], strides: Sequence[int]) -> int:
    """wav2vec 2.0 CNN frame count of `n_samples` (floor((L - k) / s) + 1 per layer), >= 0."""
    n = int(n_samples)
    for k, s in zip(kernels, strides, strict=True):
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


class PseudoLabelDataset(UtteranceDataset):
    """Items: {"id", "audio" (T,), "label" (class index), "pseudo_labels" LongTensor (F, n_K)}, where
    F = the encoder's frame count of the (cropped) audio and rows past the label sequence are -100.
    Utterances longer than `crop_s` are cropped at random, on the encoder's frame hop."""

    def __init__(self, records: Sequence[dict], labels: Mapping[str, np.ndarray], conv_kernel: Sequence[int],
                 conv_stride: Sequence[int], crop_s: float | None, sample_rate: int = 16000,
                 classes: Sequence[str] | None = None):
        super().__init__(records, sample_rate, crop_s, classes=classes)  # lengths = min(len, crop) for bucketing
        self.require(labels, "pseudo-labels")
        self.labels = labels
        self.kernels, self.strides = list(conv_kernel), list(conv_stride)
        self.hop = int(np.prod(self.strides))
        self.max_samples = None if crop_s is None else int(round(crop_s * sample_rate))

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        wav = read_audio(r["path"], self.sample_rate)
        wav, lab, _ = crop_with_labels(wav, self.labels[r["id"]], self.hop, self.max_samples)
        lab = align_labels(lab, conv_frames(wav.shape[0], self.kernels, self.strides))
        return {**self.make_item(r, wav), "pseudo_labels": torch.from_numpy(lab)}


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


def loss_indices(time_mask: torch.Tensor, labels: torch.Tensor) -> dict:
    """Where `ptapt_loss` reads, from the CPU batch: "masked_index" (M,) the flat (B * F) indices of
    the masked frames; per head i, "head_index"[i] (M_i,) those with a target and "head_targets"[i]
    (M_i,) their labels, and "head_counts"[i] = M_i (a Python int); "n_masked" = M (int). Row-major
    order, as a boolean selection `frames[time_mask]` gives it. time_mask (B, F), labels (B, F, n_K)."""
    flat_mask = time_mask.reshape(-1)  # (B * F,)
    flat_labels = labels.reshape(-1, labels.shape[-1])  # (B * F, n_K)
    head_index, head_targets, head_counts = [], [], []
    for i in range(labels.shape[-1]):
        idx = (flat_mask & (flat_labels[:, i] != IGNORE_INDEX)).nonzero().squeeze(1)  # (M_i,)
        head_index.append(idx)
        head_targets.append(flat_labels[idx, i])
        head_counts.append(int(idx.numel()))
    return {"masked_index": flat_mask.nonzero().squeeze(1), "head_index": head_index, "head_targets": head_targets,
            "head_counts": head_counts, "n_masked": int(flat_mask.sum())}


def ptapt_loss(frames: torch.Tensor, heads: Sequence[nn.Module], labels: torch.Tensor, time_mask: torch.Tensor,
               indices: dict | None = None) -> dict[str, torch.Tensor]:
    """Sum over heads of the CE on MASKED frames only.

    frames (B, F, H) = ReLU(encoder output); labels (B, F, n_K) with -100 = no target; time_mask (B, F)
    bool. Each head's CE is the mean over masked frames that have a target (the reference's
    `CrossEntropyLoss(ignore_index=-100)` on `reps[maskidx]`), in float32. indices: `loss_indices`
    of (time_mask, labels) made on the CPU batch (`PtaptModule.prepare_masks`: no host-device sync
    here); without it they are made here (from a GPU batch: a sync)."""
    if labels.shape[:2] != frames.shape[:2] or time_mask.shape != frames.shape[:2]:
        raise ValueError(f"ptapt_loss: frames {tuple(frames.shape)}, labels {tuple(labels.shape)} and mask "
                         f"{tuple(time_mask.shape)} disagree on (B, F)")
    if labels.shape[2] != len(heads):
        raise ValueError(f"ptapt_loss: {labels.shape[2]} label columns for {len(heads)} heads")
    if indices is None:
        ix = loss_indices(time_mask.cpu(), labels.cpu())
        indices = {k: ([t.to(frames.device) for t in v] if k in ("head_index", "head_targets")
                       else v.to(frames.device) if torch.is_tensor(v) else v) for k, v in ix.items()}
    flat = frames.reshape(-1, frames.shape[-1])  # (B * F, H)
    total = frames.new_zeros((), dtype=torch.float32)
    out: dict[str, torch.Tensor] = {}
    for i, head in enumerate(heads):
        if indices["head_counts"][i] == 0:
            # No target in this batch: contribute 0 while keeping the graph connected.
            total = total + 0.0 * head(flat.index_select(0, indices["masked_index"])).float().sum()
            out[f"ce_{i}"] = total.new_zeros(())
            out[f"acc_{i}"] = total.new_zeros(())
            continue
        logits = head(flat.index_select(0, indices["head_index"][i])).float()  # (M_i, K_i)
        t = indices["head_targets"][i]  # (M_i,)
        ce = F.cross_entropy(logits, t)
        total = total + ce
        out[f"ce_{i}"] = ce.detach()
        out[f"acc_{i}"] = (logits.argmax(-1) == t).float().mean().detach()
    out["loss"] = total
    out["n_masked"] = indices["n_masked"]
    return out


class PtaptModule(pl.LightningModule):
    """Step (c): wav2vec 2.0 encoder + one Linear(H, 256)-Tanh-Linear(256, K) head per K.

    As `TaptModule`: the time masks and the loss's indices are drawn on the CPU batch before the
    device transfer (`prepare_masks`, no host-device sync in the step), from `step_rng(seed, global
    rank, micro-batch number)` (each rank its own masks)."""

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
        self.finite = FiniteGuard("P-TAPT")

    def frame_mask(self, audio_mask: torch.Tensor, num_frames: int) -> torch.Tensor:
        lengths = self.encoder._get_feat_extract_output_lengths(audio_mask.sum(-1)).long()  # (B,)
        return torch.arange(num_frames, device=audio_mask.device)[None, :] < lengths[:, None]  # (B, F)

    def _num_frames(self, audio_mask: torch.Tensor) -> int:
        return int(self.encoder._get_feat_extract_output_lengths(torch.tensor(audio_mask.shape[1])))

    def draw_time_mask(self, audio_mask: torch.Tensor) -> torch.Tensor:
        """The reference's sampler (transformers 4.10: spans counted from the padded length, min 2,
        valid frames kept; FeatureFuser.py Wav2vec2Wrapper(pretrain=True)) on bucketed batches, as its.
        audio_mask (B, T) -> (B, F) bool, from the global RNGs (`prepare_masks` seeds them)."""
        c = self.cfg
        return compute_time_mask(self.frame_mask(audio_mask, self._num_frames(audio_mask)), c.mask_time_prob,
                                 c.mask_time_length, c.mask_time_min_masks, policy="padded")  # (B, F)

    def prepare_masks(self, batch: dict, rank: int = 0, draw: int = 0) -> dict:
        """The CPU batch plus "time_mask" (B, F), "loss_indices" (`loss_indices`) and "counts" (Python
        ints), the mask drawn from `step_rng(ptapt.seed, rank, draw)`."""
        with step_rng(self.cfg.seed, rank, draw):
            time_mask = self.draw_time_mask(batch["audio_mask"])  # (B, F)
        ix = loss_indices(time_mask, batch["pseudo_labels"])
        return {**batch, "time_mask": time_mask, "loss_indices": ix,
                "counts": {"masked": ix["n_masked"], "samples": int(batch["audio_mask"].sum())}}

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if self._trainer is not None and self.trainer.training:
            batch = self.prepare_masks(batch, self.global_rank, micro_batch_number(self))
        return add_audio_lengths(batch)  # the ThroughputMonitor's lengths, read before the batch moves

    def compute_loss(self, batch: dict, time_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Run the encoder with the batch's time mask (`time_mask`, else the batch's "time_mask" from
        `prepare_masks`, else one drawn here), then `ptapt_loss`."""
        audio, audio_mask = batch["audio"], batch["audio_mask"]
        indices = None
        if time_mask is None and "time_mask" in batch:
            time_mask, indices = batch["time_mask"], batch["loss_indices"]
        elif time_mask is None:
            time_mask = self.draw_time_mask(audio_mask)
        attn = audio_mask.long() if self.pass_attention_mask else None
        out = self.encoder(audio, attention_mask=attn, mask_time_indices=time_mask)
        frames = F.relu(out.last_hidden_state)  # (B, F, H)
        labels = batch["pseudo_labels"]
        if labels.shape[1] != frames.shape[1]:
            raise ValueError(f"pseudo-labels have {labels.shape[1]} frames, the encoder {frames.shape[1]}: "
                             "collate them with collate_pseudo for this encoder")
        return ptapt_loss(frames, self.heads, labels, time_mask, indices)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        parts = self.compute_loss(batch)
        loss = parts["loss"]
        self.finite.update(loss, self.global_step, self.trainer.log_every_n_steps if self._trainer is not None else 1)
        n = batch.get("counts") or {"masked": parts["n_masked"], "samples": int(batch["audio_mask"].sum())}
        logs = {"ptapt/loss": loss.detach(), "ptapt/masked_frames": float(n["masked"]),
                "ptapt/audio_seconds": n["samples"] / self.sample_rate}
        for i, k in enumerate(self.cluster_sizes):
            logs[f"ptapt/ce_k{k}"] = parts[f"ce_{i}"]
            logs[f"ptapt/acc_k{k}"] = parts[f"acc_{i}"]
        self.log_dict(logs, batch_size=batch["audio"].shape[0], on_step=True)
        return loss

    def on_train_end(self) -> None:
        self.finite.check(self.global_step)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=self.cfg.lr)
        # interval "step": once per optimizer step, so accumulation leaves the schedule unchanged
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


def train_encoder(cfg: Config, fold: Fold, labels_dir: Path, work_dir: Path, enc_dir: Path, fp: str) -> None:
    """Step (c) on `fold.train` with the pseudo-labels of `labels_dir`: trains in `work_dir` (resuming
    from its last.ckpt), then writes the encoder folder `enc_dir` whole (DONE.json, fingerprint `fp`, inside)."""
    t0 = time.perf_counter()
    pc = cfg.ptapt
    meta = read_meta(labels_dir)
    labels = load_pseudo_labels(labels_dir)
    records = sorted(fold.train, key=lambda r: r["id"])
    check_no_test_session(records, fold, "step (c)")
    pl.seed_everything(pc.seed, workers=True)
    encoder = build_ptapt_encoder(cfg)
    speed = apply_speed_switches(cfg, encoder)
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
    dataset = PseudoLabelDataset(keep, labels, hc.conv_kernel, hc.conv_stride, pc.crop_s, sr,
                                 classes=fold.classes or None)
    # ptapt.max_batch_seconds of audio per optimizer step, in accumulate_grad_batches micro-batches
    budget = micro_batch_samples(pc.max_batch_seconds, pc.accumulate_grad_batches, sr)
    sampler = BucketBatchSampler(dataset.lengths, max_batch_samples=budget,
                                 num_buckets=pc.num_buckets, shuffle=True, seed=pc.seed)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_pseudo,
                        num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available())
    module = PtaptModule(encoder, meta["cluster_sizes"], pc, attention_mask=cfg.encoder.attention_mask,
                         sample_rate=cfg.data.sample_rate)
    ckpt_dir = work_dir / "checkpoints"
    # last.ckpt every 1,000 steps: the resume point of an interrupted run (final weights: enc_dir)
    last_cb = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                              every_n_train_steps=max(1, min(1000, pc.total_steps)))
    name = f"{cfg.experiment}-ptapt-{fold_tag(fold.test_session)}"
    trainer, loggers = stage_trainer(cfg, work_dir, pc.total_steps, [last_cb], name, "ptapt", validate=False,
                                     test_session=fold.test_session, accumulate_grad_batches=pc.accumulate_grad_batches)
    resume = ckpt_dir / "last.ckpt"
    try:
        trainer.fit(module, loader, ckpt_path=str(resume) if resume.is_file() else None)
        if trainer.global_rank == 0:
            # Save the encoder (heads dropped) into a temporary folder, then rename it into place.
            if enc_dir.exists():
                shutil.rmtree(enc_dir)  # an incomplete folder (no DONE.json) of an earlier attempt
            tmp = Path(tempfile.mkdtemp(prefix=f".{enc_dir.name}.", dir=enc_dir.parent))
            encoder.save_pretrained(str(tmp))
            mark_stage_done(tmp, fp, {"seconds": round(time.perf_counter() - t0, 3),
                                      "steps": int(trainer.global_step), "n_utterances": len(keep),
                                      "cluster_sizes": meta["cluster_sizes"], "world_size": int(trainer.world_size),
                                      "perf": {**throughput_monitor(trainer).summary(), **speed}})
            os.replace(tmp, enc_dir)
            # the encoder as an artifact of this stage's W&B run (fine-tuning runs declare it as input)
            tracking.log_artifact(loggers, cfg, tracking.encoder_artifact(cfg.experiment, "ptapt", fold.test_session),
                                  "encoder", enc_dir, large=True,
                                  metadata={"stage": "ptapt", "test_session": fold.test_session, "fingerprint": fp})
    finally:
        tracking.finish(loggers)
    trainer.strategy.barrier()  # other ranks go on only once rank 0 has written the folder
