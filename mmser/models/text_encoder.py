"""Fine-tuned text encoders (text.freeze=false): a BERT-family model inside the classifier.

With frozen text (the default) batches carry cached features ("text", "text_mask",
"text_pooled"). With a fine-tuned text encoder they carry token ids instead ("text_ids",
"text_ids_mask"), and `WithTextEncoder` turns them into the same three keys on the fly before
calling the text-only or fusion model, so those models are the same in both cases.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmser.models.heads import masked_mean


class TextEncoder(nn.Module):
    """A transformers encoder (AutoModel) -> token states, token mask and a pooled vector."""

    def __init__(self, model: nn.Module, pooling: str = "mean"):
        super().__init__()
        if pooling not in ("cls", "mean", "sentence"):
            raise ValueError(f"text pooling must be cls, mean or sentence, got {pooling!r}")
        self.model = model
        self.pooling = pooling

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def forward(self, ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """ids, mask (B, L) -> tokens (B, L, D) float32, mask (B, L) bool, pooled (B, D)."""
        mask = mask.bool()
        tokens = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state.float()  # (B, L, D)
        if self.pooling == "cls":
            pooled = tokens[:, 0]  # (B, D)
        else:
            pooled = masked_mean(tokens, mask)  # (B, D)
            if self.pooling == "sentence":  # sentence-transformers' mean + L2 norm (all-MiniLM-L6-v2)
                pooled = F.normalize(pooled, dim=-1)
        return tokens, mask, pooled


class WithTextEncoder(nn.Module):
    """`inner` (forward(batch) -> logits, reading text / text_mask / text_pooled) with a trainable
    text encoder that computes those keys from the batch's token ids."""

    def __init__(self, inner: nn.Module, text_encoder: TextEncoder, text_lr: float | None = None):
        super().__init__()
        self.inner = inner
        self.text_encoder = text_encoder
        self.text_lr = text_lr

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        for key in ("text_ids", "text_ids_mask"):
            if key not in batch:
                raise KeyError(f"WithTextEncoder: batch has no '{key}' (text.freeze=false needs token ids)")
        tokens, mask, pooled = self.text_encoder(batch["text_ids"], batch["text_ids_mask"])
        return self.inner({**batch, "text": tokens, "text_mask": mask, "text_pooled": pooled})

    def auxiliary_logits(self) -> list:
        aux = getattr(self.inner, "auxiliary_logits", None)
        return aux() if callable(aux) else []

    def optimizer_groups(self, lr: float) -> list[dict]:
        """Adam parameter groups: the text encoder at `text_lr` (BERT fine-tuning wants a smaller
        rate than freshly initialised heads), everything else at `lr`."""
        text = [p for p in self.text_encoder.parameters() if p.requires_grad]
        rest = [p for p in self.inner.parameters() if p.requires_grad]
        groups = [{"params": rest, "lr": lr}] if rest else []
        if text:
            groups.append({"params": text, "lr": self.text_lr if self.text_lr is not None else lr})
        return groups


def tokenize(texts: Mapping[str, str], tokenizer, max_length: int) -> dict[str, Tensor]:
    """id -> token ids (L,) ([CLS] text [SEP], truncated to max_length), for the dataset."""
    out = {}
    for uid, text in texts.items():
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        out[uid] = torch.tensor(ids, dtype=torch.long)
    return out
