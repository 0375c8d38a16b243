"""TAPT: continue wav2vec 2.0's own pre-training objective on the fold's training audio.

PAPER.md "TAPT": contrastive loss over masked frames (cosine similarity, temperature 0.1,
100 negatives from the same utterance, 2 x 320 codevectors, dim 256) + 0.1 x diversity loss;
all parameters trainable (CNN and quantizer included); Adam 1e-4, warm-up 100, flat 1,000,
linear decay to 0 at 20,000 steps; dynamic ~250 s batches, random crops <= 10 s.

The model is transformers' `Wav2Vec2ForPreTraining`; its forward gives the projected context and
quantized vectors, and this module computes the loss itself in float32 with autocast off (the
reference summed it in fp16 and users report NaN losses). The loss is divided by the number of
masked frames (fairseq's sample_size normalisation) so the lr does not depend on batch size.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from transformers import Wav2Vec2ForPreTraining
from transformers.models.wav2vec2.modeling_wav2vec2 import (
    _compute_mask_indices,
    _sample_negative_indices,
)

from mmser.config import TaptConfig
from mmser.training.schedule import make_scheduler

log = logging.getLogger(__name__)


def frame_lengths(model: Wav2Vec2ForPreTraining, audio_mask: torch.Tensor) -> torch.Tensor:
    """Valid frame count per item, from the valid sample count. (B,)"""
    return model._get_feat_extract_output_lengths(audio_mask.sum(-1)).long()


def tapt_masks(lengths: torch.Tensor, num_frames: int, cfg: TaptConfig, rng: np.random.Generator | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Time masks inside valid frames (min 2 spans) and negative indices (from masked frames of the
    same utterance), both as numpy arrays: (B, F) bool and (B, F, num_negatives) int."""
    b = lengths.numel()
    frame_mask = (torch.arange(num_frames)[None, :] < lengths.cpu()[:, None]).long()
    if num_frames < cfg.mask_time_length:
        raise ValueError(f"batch of {num_frames} frames is shorter than the mask span "
                         f"{cfg.mask_time_length}; filter such clips out before TAPT")
    mask = _compute_mask_indices((b, num_frames), cfg.mask_time_prob, cfg.mask_time_length,
                                 attention_mask=frame_mask, min_masks=cfg.mask_time_min_masks)
    # _sample_negative_indices needs >= 2 masked frames per item
    if (mask.sum(-1) < 2).any():
        raise ValueError("an utterance got fewer than 2 masked frames; filter clips shorter than "
                         f"{2 * cfg.mask_time_length} frames out before TAPT")
    negatives = _sample_negative_indices((b, num_frames), cfg.num_negatives, mask)
    return mask, negatives


def contrastive_diversity_loss(model: Wav2Vec2ForPreTraining, out, mask: torch.Tensor,
                               negatives: torch.Tensor, cfg: TaptConfig) -> dict[str, torch.Tensor]:
    """wav2vec 2.0's loss, in float32, summed over masked frames. Returns the parts."""
    with torch.autocast(device_type=out.projected_states.device.type, enabled=False):
        pred = out.projected_states.float()  # (B, F, D)
        q = out.projected_quantized_states.float()  # (B, F, D)
        b, f, d = q.shape
        neg = q.reshape(-1, d)[negatives.long().reshape(-1)].reshape(b, f, -1, d).permute(2, 0, 1, 3)  # (K, B, F, D)
        targets = torch.cat([q[None], neg], dim=0)  # (1+K, B, F, D)
        logits = F.cosine_similarity(pred[None], targets, dim=-1) / cfg.contrastive_temperature  # (1+K, B, F)
        neg_is_pos = (q[None] == neg).all(-1)  # (K, B, F): a negative identical to the positive
        logits = torch.cat([logits[:1], logits[1:].masked_fill(neg_is_pos, float("-inf"))], dim=0)
        logits = logits.permute(1, 2, 0)[mask]  # (M, 1+K): masked frames only
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        contrastive = F.cross_entropy(logits, target, reduction="sum")
        g, v = model.config.num_codevector_groups, model.config.num_codevectors_per_group
        n_masked = mask.sum()
        diversity = ((g * v - out.codevector_perplexity.float()) / (g * v)) * n_masked
        loss = contrastive + cfg.diversity_loss_weight * diversity
        with torch.no_grad():
            acc = (logits.argmax(-1) == 0).float().mean()
    return {"loss_sum": loss, "contrastive": contrastive, "diversity": diversity,
            "n_masked": n_masked, "accuracy": acc, "perplexity": out.codevector_perplexity.detach()}


def gumbel_temperature(step: int, start: float = 2.0, end: float = 0.5, decay: float = 0.999995) -> float:
    """wav2vec 2.0's Gumbel-softmax temperature annealing (fairseq: max(2 * 0.999995^step, 0.5))."""
    return max(start * decay ** step, end)


class TaptModule(pl.LightningModule):
    """Lightning wrapper: one step = masks + negatives -> forward -> fp32 loss / masked frames."""

    def __init__(self, model: Wav2Vec2ForPreTraining, cfg: TaptConfig, seed: int = 0):
        super().__init__()
        if cfg.mask_time_prob <= 0:
            # transformers: a model built with mask_time_prob = 0 fails when given masks
            raise ValueError("tapt.mask_time_prob must be > 0")
        self.model = model
        self.cfg = cfg
        self.rng_seed = seed

    def training_step(self, batch, batch_idx):
        audio, audio_mask = batch["audio"], batch["audio_mask"]
        self.model.set_gumbel_temperature(gumbel_temperature(self.global_step))
        lengths = frame_lengths(self.model, audio_mask)
        num_frames = int(self.model._get_feat_extract_output_lengths(audio.shape[1]))
        mask_np, neg_np = tapt_masks(lengths, num_frames, self.cfg)
        mask = torch.as_tensor(mask_np, device=audio.device)
        negatives = torch.as_tensor(neg_np, device=audio.device, dtype=torch.long)
        attn = audio_mask.long() if self.model.config.feat_extract_norm == "layer" else None
        out = self.model(audio, attention_mask=attn, mask_time_indices=mask)
        parts = contrastive_diversity_loss(self.model, out, mask, negatives, self.cfg)
        loss = parts["loss_sum"] / parts["n_masked"].clamp(min=1)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"TAPT loss is not finite at step {self.global_step}: {parts}")
        bs = audio.shape[0]
        self.log_dict({"tapt/loss": loss.detach(),
                       "tapt/contrastive": parts["contrastive"].detach() / parts["n_masked"],
                       "tapt/diversity": parts["diversity"].detach() / parts["n_masked"],
                       "tapt/accuracy": parts["accuracy"], "tapt/perplexity": parts["perplexity"],
                       "tapt/audio_seconds": audio_mask.sum().float() / 16000.0},
                      batch_size=bs, on_step=True, prog_bar=False)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=self.cfg.lr)
        sched = make_scheduler(opt, self.cfg.warmup_steps, self.cfg.hold_steps, self.cfg.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def min_tapt_samples(model: Wav2Vec2ForPreTraining, cfg: TaptConfig) -> int:
    """Shortest clip (in samples) that yields >= 2 x mask span frames."""
    need = 2 * cfg.mask_time_length
    n = 400
    while int(model._get_feat_extract_output_lengths(n)) < need:
        n = math.ceil(n * 1.25)
    return n
