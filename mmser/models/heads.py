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
from mmser.models.wav2vec2 import ENCODER_CLASSES, AudioEncoder


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


class AudioClassifier(nn.Module):
    """forward(batch) -> logits (B, num_classes); embed(batch) -> pooled utterance vector (B, H)."""

    def __init__(self, encoder: AudioEncoder, num_classes: int = len(CLASSES)):
        super().__init__()
        self.encoder = encoder
        self.num_classes = num_classes
        self.classifier = nn.Linear(encoder.hidden_size, num_classes)

    def embed(self, batch: dict) -> torch.Tensor:
        """ReLU(masked mean over valid frames of ReLU(encoder frames)) -> (B, H)."""
        frames, frame_mask = self.encoder.encode(batch["audio"], batch["audio_mask"])  # (B, F, H), (B, F)
        pooled = masked_mean(torch.relu(frames).float(), frame_mask)  # (B, H), summed in fp32 under AMP
        return torch.relu(pooled)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.classifier(self.embed(batch))  # (B, C)

    # -- rebuild from a saved folder (mmser.training.run.save_model / load_model) -----------------

    def config_dict(self) -> dict:
        """Everything needed to rebuild this module's architecture without the original weights."""
        return {
            "model": "AudioClassifier",
            "num_classes": self.num_classes,
            "encoder_kind": _kind_of(self.encoder.model),
            "encoder_attention_mask": self.encoder.attention_mask_policy,
            "encoder_config": self.encoder.model.config.to_dict(),
        }

    @classmethod
    def from_config_dict(cls, d: dict) -> AudioClassifier:
        """A randomly initialised AudioClassifier of the architecture described by `config_dict()`."""
        kind = d["encoder_kind"]
        if kind not in ENCODER_CLASSES:
            raise ValueError(f"unknown encoder kind {kind!r} in saved model config")
        config_cls, model_cls = ENCODER_CLASSES[kind]
        hf_config = config_cls.from_dict(d["encoder_config"])
        encoder = AudioEncoder(model_cls(hf_config), attention_mask=d.get("encoder_attention_mask", "auto"))
        return cls(encoder, num_classes=int(d["num_classes"]))


def _kind_of(model: nn.Module) -> str:
    for kind, (_, model_cls) in ENCODER_CLASSES.items():
        if isinstance(model, model_cls):
            return kind
    raise ValueError(f"unsupported encoder model {type(model).__name__}")
