"""Supervised fine-tuning of any `forward(batch) -> logits` classifier (V-FT; fusion reuses it).

PAPER.md V-FT: cross-entropy weighted by N/n_c (normalised to sum 1) from the training split;
Adam, lr 1e-4, no scheduler, over the trainable parameters only.

The task (mmser.tasks.Task: categorical / dimensional / multitask) decides what the model's outputs
mean and the loss: the classes' logits and / or the dimensions (scaled to [0, 1]) of one output row;
cross-entropy, 1 - CCC (or MSE) per dimension on the batch, or both (multitask).

Evaluation metrics (UA / WA / macro-F1; CCC / Pearson r / MAE per dimension and the mean CCC) are
computed by `mmser.metrics` from the predictions collected over the whole split (never an average
of batch values), gathered across processes and de-duplicated by utterance id (the
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
from mmser.metrics import classification_report, dimensional_report
from mmser.perf import add_audio_lengths, audio_lengths
from mmser.tasks import Task

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
    {"id", "true", "pred", "probs"} (class indices into `class_names`; categorical and multitask)
    and {"true_dims", "pred_dims"} ({dimension: value on the corpus's scale}; dimensional and
    multitask), and `test_report` the mmser.metrics classification and / or dimensional report.
    Likewise `val_predictions` / `val_report` after each validation epoch. `task` (default: the
    categorical task over `class_names`) says what the outputs are.
    """

    def __init__(self, model: nn.Module, class_weights: torch.Tensor | None = None, lr: float = 1e-4,
                 class_names: Sequence[str] = CLASSES, sample_rate: int = 16000, task: Task | None = None):
        super().__init__()
        self.model = model
        self.lr = lr
        self.task = task if task is not None else Task(kind="categorical", classes=tuple(class_names))
        self.class_names = tuple(self.task.classes)
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
        return self.model(batch)  # (B, C + K): class logits, then the scaled dimensions

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Class-weighted cross-entropy (fp32 under mixed precision)."""
        wnll, w = weighted_nll(logits, labels, self.class_weights)
        return wnll.sum() / w.sum()

    def task_loss(self, outputs: torch.Tensor, batch: dict) -> torch.Tensor:
        """The task's training loss on one batch: cross-entropy (categorical), the dimensional loss
        (dimensional), or cross-entropy + target.dimensional_weight x the dimensional loss (multitask)."""
        logits, dims = self.task.split(outputs)  # (B, C), (B, K)
        loss = self.loss(logits, batch["labels"]) if self.task.categorical else None
        if self.task.dimensional:
            dim_loss = self.task.dimensional_loss(dims, batch["targets"])
            loss = dim_loss if loss is None else loss + self.task.dimensional_weight * dim_loss
        return loss

    # -- training -----------------------------------------------------------------------------

    def on_train_epoch_start(self) -> None:
        self._epoch_start = time.perf_counter()
        self._epoch_audio = 0.0

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        outputs = self(batch)
        loss = self.task_loss(outputs, batch)
        # Models with extra supervised outputs (decision fusion's branches) name them here.
        aux = getattr(self.model, "auxiliary_logits", None)
        if callable(aux):
            for weight, extra in aux():
                loss = loss + weight * self.task_loss(extra, batch)
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
        task = self.task
        logits, dims = (t.float() for t in task.split(self(batch)))  # (B, C), (B, K)
        parts = []
        if task.categorical:
            labels = batch["labels"]
            # Per-item weighted NLL and weight, so the split's loss equals the weighted CE over all of it.
            wnll, w = weighted_nll(logits, labels, self.class_weights)  # (B,), (B,)
            probs = torch.softmax(logits, dim=-1)  # (B, C)
            parts += [probs, wnll[:, None], w[:, None]]
        if task.dimensional:  # predictions and targets scaled to [0, 1]; the corpus scale is applied per split
            parts += [dims, batch["targets"].float()]
        # one device -> host copy per batch (not one per item and value)
        host = torch.cat(parts, dim=1).cpu()  # (B, [C + 2] + [2 K])
        c, k = task.num_classes, len(task.dimensions) if task.dimensional else 0
        preds = host[:, :c].argmax(dim=-1).tolist() if task.categorical else None  # (B,)
        trues = batch["labels"].tolist()
        for i, uid in enumerate(batch["ids"]):
            row = host[i].tolist()
            out: dict = {"id": uid}
            if task.categorical:
                out.update({"true": int(trues[i]), "pred": preds[i], "probs": row[:c], "wnll": row[c], "w": row[c + 1]})
            if k:
                off = c + 2 if task.categorical else 0
                out.update({"pred_scaled": row[off:off + k], "true_scaled": row[off + k:off + 2 * k]})
            self._eval_outputs.append(out)

    def _eval_epoch_end(self, stage: str) -> tuple[list[dict], dict | None]:
        gathered = _gather_objects(self._eval_outputs)
        self._eval_outputs = []
        unique: dict[str, dict] = {}
        for row in gathered:
            unique.setdefault(row["id"], row)
        rows = [unique[k] for k in sorted(unique)]
        if not rows:
            return [], None
        task = self.task
        report: dict = {}
        loss = 0.0
        if task.categorical:
            ce = sum(r.pop("wnll") for r in rows) / max(sum(r.pop("w") for r in rows), 1e-12)
            report.update(classification_report([r["true"] for r in rows], [r["pred"] for r in rows],
                                                self.class_names))
            loss = float(ce)
        if task.dimensional:
            dims = task.dimensions
            pred_s = torch.tensor([r.pop("pred_scaled") for r in rows])  # (N, K)
            true_s = torch.tensor([r.pop("true_scaled") for r in rows])  # (N, K)
            for r, p, t in zip(rows, pred_s.tolist(), true_s.tolist(), strict=True):
                r["pred_dims"] = {d: task.to_corpus_scale([p[k]], d)[0] for k, d in enumerate(dims)}
                r["true_dims"] = {d: task.to_corpus_scale([t[k]], d)[0] for k, d in enumerate(dims)}
            # CCC, r and MAE over the WHOLE split, on the corpus's own scale (mmser.metrics)
            dim_report = dimensional_report({d: [r["true_dims"][d] for r in rows] for d in dims},
                                            {d: [r["pred_dims"][d] for r in rows] for d in dims})
            n = report.get("n")
            report.update(dim_report)
            if n is not None:
                report["n"] = n
            # the split's dimensional loss, as training defines it but over the whole split
            dim_loss = float(task.dimensional_loss(pred_s, true_s))
            loss = dim_loss if not task.categorical else loss + task.dimensional_weight * dim_loss
        report["loss"] = float(loss)
        # Every rank holds the same gathered numbers; sync_dist only averages identical values.
        self.log(f"{stage}/loss", float(loss), sync_dist=True)
        if task.categorical:
            for key in ("ua", "wa", "macro_f1"):
                self.log(f"{stage}/{key}", report[key], sync_dist=True)
        if task.dimensional:
            self.log(f"{stage}/ccc_mean", report["ccc_mean"], sync_dist=True)
            for d, v in report["ccc"].items():
                self.log(f"{stage}/ccc/{d}", v, sync_dist=True)
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
