"""Supervised fine-tuning of any `forward(batch) -> logits` classifier (V-FT; fusion reuses it).

PAPER.md V-FT: cross-entropy weighted by N/n_c (normalised to sum 1) from the training split;
Adam, lr 1e-4, no scheduler, over the trainable parameters only.

Evaluation metrics (UA / WA / macro-F1) are computed by `mmser.metrics` from the predictions
collected over the whole split, gathered across processes and de-duplicated by utterance id (the
distributed sampler may repeat a few items to even out ranks), so the logged numbers are exactly
those of metrics.json.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch import nn

from mmser.labels import CLASSES
from mmser.metrics import classification_report
from mmser.perf import add_audio_lengths, audio_lengths

log = logging.getLogger(__name__)


def _gather_objects(obj: list) -> list:
    """Concatenate a Python list across processes (identity without torch.distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return obj
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return [x for p in parts for x in p]


def weighted_nll(logits: torch.Tensor, labels: torch.Tensor,
                 weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-item w_y * NLL and w_y, so that weighted CE = sum(first) / sum(second)
    (= F.cross_entropy(logits, labels, weight=weight)).

    Hand-written because torch's NLLLoss is on the list of CUDA ops that raise under
    torch.use_deterministic_algorithms(True) (Trainer(deterministic=True)); log_softmax + gather
    are deterministic. Computed in fp32.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, C)
    nll = -logp.gather(1, labels[:, None]).squeeze(1)  # (B,)
    w = weight.to(nll.dtype)[labels] if weight is not None else torch.ones_like(nll)  # (B,)
    return w * nll, w


class ClassifierModule(pl.LightningModule):
    """Weighted-CE training of `model`, with evaluation that collects per-utterance predictions.

    After `trainer.test`, `test_predictions` holds one dict per test utterance:
    {"id", "true", "pred", "probs"} (class indices into `class_names`), and `test_report` the
    mmser.metrics classification report. Likewise `val_predictions` / `val_report` after each
    validation epoch.
    """

    def __init__(self, model: nn.Module, class_weights: torch.Tensor | None = None, lr: float = 1e-4,
                 class_names: Sequence[str] = CLASSES, sample_rate: int = 16000):
        super().__init__()
        self.model = model
        self.lr = lr
        self.class_names = tuple(class_names)
        self.sample_rate = sample_rate
        if class_weights is not None:
            class_weights = torch.as_tensor(class_weights, dtype=torch.float32)
            if class_weights.shape != (len(self.class_names),):
                raise ValueError(f"class_weights: expected shape ({len(self.class_names)},), "
                                 f"got {tuple(class_weights.shape)}")
        self.register_buffer("class_weights", class_weights, persistent=False)
        self._eval_outputs: list[dict] = []
        self.val_predictions: list[dict] = []
        self.val_report: dict | None = None
        self.test_predictions: list[dict] = []
        self.test_report: dict | None = None
        # Training statistics over the whole run (saved in checkpoints, so resumed runs add up).
        self.stats = {"real_samples": 0, "padded_samples": 0, "audio_seconds": 0.0, "train_seconds": 0.0,
                      "steps": 0}
        self._epoch_start: float | None = None
        self._epoch_audio = 0.0

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        return add_audio_lengths(batch)  # valid lengths as Python ints, read before the batch moves

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(batch)  # (B, C)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Class-weighted cross-entropy (fp32 under mixed precision)."""
        wnll, w = weighted_nll(logits, labels, self.class_weights)
        return wnll.sum() / w.sum()

    # -- training -----------------------------------------------------------------------------

    def on_train_epoch_start(self) -> None:
        self._epoch_start = time.perf_counter()
        self._epoch_audio = 0.0

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(batch)
        loss = self.loss(logits, batch["labels"])
        # Models with extra supervised outputs (decision fusion's branches) name them here.
        aux = getattr(self.model, "auxiliary_logits", None)
        if callable(aux):
            for weight, extra in aux():
                loss = loss + weight * self.loss(extra, batch["labels"])
        bsz = batch["labels"].shape[0]
        self.log("train/loss", loss, on_step=True, on_epoch=True, batch_size=bsz)
        real = sum(audio_lengths(batch))  # from the CPU batch: no host-device sync per step
        self.stats["real_samples"] += real
        self.stats["padded_samples"] += batch["audio_mask"].numel()  # (B, T): the shape only
        self.stats["steps"] += 1
        self._epoch_audio += real / self.sample_rate
        return loss

    def on_train_epoch_end(self) -> None:
        if self._epoch_start is None:
            return
        elapsed = time.perf_counter() - self._epoch_start
        self.stats["train_seconds"] += elapsed
        self.stats["audio_seconds"] += self._epoch_audio
        if elapsed > 0:
            self.log("train/throughput_audio_s_per_s", self._epoch_audio / elapsed, sync_dist=True)
        if self.stats["padded_samples"]:
            self.log("train/padding_efficiency", self.stats["real_samples"] / self.stats["padded_samples"],
                     sync_dist=True)

    def training_summary(self) -> dict:
        """Padding efficiency and throughput (audio seconds per wall second) of this process."""
        s = self.stats
        return {
            "padding_efficiency": s["real_samples"] / s["padded_samples"] if s["padded_samples"] else None,
            "train_seconds": s["train_seconds"],
            "throughput": s["audio_seconds"] / s["train_seconds"] if s["train_seconds"] > 0 else None,
            "train_audio_seconds": s["audio_seconds"],
            "train_steps": s["steps"],
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["mmser_stats"] = dict(self.stats)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.stats.update(checkpoint.get("mmser_stats", {}))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("ClassifierModule: the model has no trainable parameters")
        groups = getattr(self.model, "optimizer_groups", None)  # e.g. a smaller lr for a text encoder
        return torch.optim.Adam(groups(self.lr) if callable(groups) else params, lr=self.lr)

    # -- evaluation ---------------------------------------------------------------------------

    def _eval_step(self, batch: dict) -> None:
        logits = self(batch).float()  # (B, C)
        labels = batch["labels"]
        # Per-item weighted NLL and weight, so the split's loss equals the weighted CE over all of it.
        wnll, w = weighted_nll(logits, labels, self.class_weights)  # (B,), (B,)
        probs = torch.softmax(logits, dim=-1)  # (B, C)
        # one device -> host copy per batch (not one per item and value)
        host = torch.cat([probs, wnll[:, None], w[:, None]], dim=1).cpu()  # (B, C + 2)
        preds = host[:, :-2].argmax(dim=-1).tolist()  # (B,)
        trues = labels.tolist()
        for i, uid in enumerate(batch["ids"]):
            row = host[i].tolist()
            self._eval_outputs.append({"id": uid, "true": int(trues[i]), "pred": preds[i], "probs": row[:-2],
                                       "wnll": row[-2], "w": row[-1]})

    def _eval_epoch_end(self, stage: str) -> tuple[list[dict], dict | None]:
        gathered = _gather_objects(self._eval_outputs)
        self._eval_outputs = []
        unique: dict[str, dict] = {}
        for row in gathered:
            unique.setdefault(row["id"], row)
        rows = [unique[k] for k in sorted(unique)]
        if not rows:
            return [], None
        loss = sum(r.pop("wnll") for r in rows) / max(sum(r.pop("w") for r in rows), 1e-12)
        report = classification_report([r["true"] for r in rows], [r["pred"] for r in rows], self.class_names)
        report["loss"] = float(loss)
        # Every rank holds the same gathered numbers; sync_dist only averages identical values.
        self.log(f"{stage}/loss", float(loss), sync_dist=True)
        self.log(f"{stage}/ua", report["ua"], sync_dist=True)
        self.log(f"{stage}/wa", report["wa"], sync_dist=True)
        self.log(f"{stage}/macro_f1", report["macro_f1"], sync_dist=True)
        return rows, report

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_validation_epoch_end(self) -> None:
        if self.trainer is not None and self.trainer.sanity_checking:
            self._eval_outputs = []
            return
        self.val_predictions, self.val_report = self._eval_epoch_end("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch)

    def on_test_epoch_end(self) -> None:
        self.test_predictions, self.test_report = self._eval_epoch_end("test")
