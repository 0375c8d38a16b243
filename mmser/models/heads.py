"""The paper's utterance classifier on top of an audio encoder (PAPER.md "V-FT").

    logits = Linear(H, C)( ReLU( masked_mean_t( ReLU(frames) ) ) )

The mean runs over each utterance's valid frames only. (The reference divides by len-1 and drops
the last frame; mmser does not copy that off-by-one.) The outer ReLU is kept for fidelity although a
mean of non-negative values is already non-negative, so it never changes anything. No dropout.
"""

from __future__ import annotations

import torch
from torch import nn

from mmser.labels import CLASSES
from mmser.models.audio_encoders import audio_encoder_dict, audio_encoder_from_dict, encode_audio


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` (B, T, D) over the positions where `mask` (B, T) is True -> (B, D).

    Hand-written (transformers' Wav2Vec2ForSequenceClassification does the same inline in its
    forward, with no guard): padding is removed with masked_fill rather than a multiplication, so
    NaN/inf garbage in padded positions cannot leak (0 * inf = NaN), and a row with no valid
    position pools to zeros instead of 0/0 = NaN. Divides by the number of valid positions (the
    reference's len-1 off-by-one is not copied).
    """
    x = x.masked_fill(~mask.unsqueeze(-1), 0.0)  # (B, T, D)
    count = mask.sum(dim=1, keepdim=True).clamp(min=1).to(x.dtype)  # (B, 1)
    return x.sum(dim=1) / count  # (B, D)


class AttentivePooling(nn.Module):
    """Learned attentive pooling over the valid frames: a_t = softmax_t(w . tanh(W x_t)) over the
    positions `mask` marks, pooled = sum_t a_t x_t (B, D). Padded positions get -inf scores (never
    any weight) and are zeroed first (non-finite garbage cannot leak); a row with no valid position
    pools to zeros. Not the paper's head (an option: encoder.pooling=attentive)."""

    def __init__(self, dim: int, hidden: int = 128):
        super().__init__()
        self.score = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x.masked_fill(~mask.unsqueeze(-1), 0.0)  # (B, T, D)
        scores = self.score(x).squeeze(-1).float().masked_fill(~mask, float("-inf"))  # (B, T)
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # (B, T); all -inf rows -> 0
        return (weights.unsqueeze(-1) * x.float()).sum(dim=1)  # (B, D)


class AudioClassifier(nn.Module):
    """forward(batch) -> logits (B, num_classes); embed(batch) -> pooled utterance vector (B, H).

    `encoder`: any audio encoder of mmser.models.audio_encoders (wav2vec 2.0-style, Whisper).
    pooling="mean": the paper's head (ReLU -> masked mean -> ReLU -> Linear); "attentive":
    AttentivePooling over the raw frames -> Linear."""

    def __init__(self, encoder: nn.Module, num_classes: int = len(CLASSES), pooling: str = "mean"):
        super().__init__()
        if pooling not in ("mean", "attentive"):
            raise ValueError(f"AudioClassifier: pooling must be 'mean' or 'attentive', got {pooling!r}")
        self.encoder = encoder
        self.num_classes = num_classes
        self.pooling = pooling
        self.attention = AttentivePooling(encoder.hidden_size) if pooling == "attentive" else None
        self.classifier = nn.Linear(encoder.hidden_size, num_classes)

    def embed(self, batch: dict) -> torch.Tensor:
        """Pooled utterance vector (B, H) over the valid frames only."""
        frames, frame_mask = encode_audio(self.encoder, batch)  # (B, F, H), (B, F)
        if self.attention is not None:
            return self.attention(frames, frame_mask)  # (B, H)
        pooled = masked_mean(torch.relu(frames).float(), frame_mask)  # (B, H), summed in fp32 under AMP
        return torch.relu(pooled)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.classifier(self.embed(batch))  # (B, C)

    # -- rebuild from a saved folder (mmser.training.run.save_model / load_model) -----------------

    def config_dict(self) -> dict:
        """Everything needed to rebuild this module's architecture without the original weights."""
        return {"model": "AudioClassifier", "num_classes": self.num_classes, "pooling": self.pooling,
                **audio_encoder_dict(self.encoder)}

    @classmethod
    def from_config_dict(cls, d: dict) -> AudioClassifier:
        """A randomly initialised AudioClassifier of the architecture described by `config_dict()`."""
        return cls(audio_encoder_from_dict(d, "saved model config"), num_classes=int(d["num_classes"]),
                   pooling=d.get("pooling", "mean"))
