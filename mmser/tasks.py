"""What a run predicts: a `Task` (categorical / dimensional / multitask), chosen once from the
config (`target.kind`) and passed down, so that the trainer, the run folder and the summaries ask
the task instead of branching on the kind (issue 19; STYLE.md "a task is a small object").

- categorical: the paper's task, one logit per class, class-weighted cross-entropy.
- dimensional: one regression output per dimension of `target.dimensions` (arousal, valence,
  dominance), trained on targets scaled to [0, 1] by the corpus's scale (IEMOCAP 1-5, MSP-Podcast
  1-7, a CSV corpus's given or inferred one: the manifest's `dim_scales`), reported back on the
  corpus's own scale. Loss: 1 - CCC per dimension, averaged (the MSP-Podcast baseline's choice:
  computed on the batch, while the METRIC is over the whole set, mmser.metrics.ccc);
  `target.loss=mse` is the switch to mean squared error.
- multitask: the class-weighted cross-entropy + `target.dimensional_weight` x the dimensional loss.

Outputs: every head keeps ONE final Linear with `num_outputs = len(classes) + len(dimensions)`
outputs (the classes first, then the dimensions in `dimensions` order); `split` cuts them. So a
saved model is rebuilt by the unchanged `num_classes` field of its config (= num_outputs), and the
saved-model check compares these raw outputs (logits and scaled dimensions) as it does logits.
Decision fusion is the one head that pools its branches' class posteriors: its dimension outputs are
pooled as a learned weighted average instead (mmser.models.fusion.DecisionFusion).

Which utterances are in the task (`in_task`): categorical = a label among the classes;
dimensional = a value for every task dimension (the label does not matter: IEMOCAP's dimensional task
is every turn with a consensus line); multitask = both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

DIMENSIONS = ("arousal", "valence", "dominance")  # the manifest's field names
KINDS = ("categorical", "dimensional", "multitask")
SCALES_FIELD = "dim_scales"  # a manifest record's {dimension: [low, high]} (the corpus's own scale)


class TaskError(ValueError):
    """A task that the manifest cannot serve (no values for a dimension, scales that disagree)."""


@dataclass(frozen=True)
class Task:
    kind: str = "categorical"
    classes: tuple[str, ...] = ()
    dimensions: tuple[str, ...] = ()
    scales: Mapping[str, tuple[float, float]] = field(default_factory=dict)  # dim -> (low, high)
    loss: str = "ccc"  # dimensional loss: "ccc" (1 - CCC) or "mse"
    dimensional_weight: float = 1.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task kind must be one of {KINDS}, got {self.kind!r}")
        if self.categorical and not self.classes:
            raise ValueError(f"a {self.kind} task needs classes")
        if self.dimensional:
            if not self.dimensions:
                raise ValueError(f"a {self.kind} task needs at least one dimension")
            missing = [d for d in self.dimensions if d not in self.scales]
            if missing:
                raise ValueError(f"no scale for dimension(s) {', '.join(missing)}")

    # -- what the model outputs -------------------------------------------------------------------

    @property
    def categorical(self) -> bool:
        return self.kind in ("categorical", "multitask")

    @property
    def dimensional(self) -> bool:
        return self.kind in ("dimensional", "multitask")

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.categorical else 0

    @property
    def num_outputs(self) -> int:
        """Width of the head's final Linear: the classes, then the dimensions."""
        return self.num_classes + (len(self.dimensions) if self.dimensional else 0)

    def split(self, outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """outputs (B, C + K) -> (class logits (B, C), scaled dimensions (B, K))."""
        c = self.num_classes
        return outputs[:, :c], outputs[:, c:]

    @property
    def monitor(self) -> str:
        """The validation metric best_val selects on (never a test one): UA for the categorical and
        multitask kinds (the classes stay the primary task there), the mean CCC for dimensional."""
        return "val/ccc_mean" if self.kind == "dimensional" else "val/ua"

    # -- which utterances, and their targets ------------------------------------------------------

    def in_task(self, record: Mapping) -> bool:
        if self.categorical and record.get("label") not in self.classes:
            return False
        return not self.dimensional or all(record.get(d) is not None for d in self.dimensions)

    def scaled_targets(self, record: Mapping) -> list[float]:
        """The record's task dimensions on [0, 1] (corpus scale (low, high) -> (0, 1))."""
        out = []
        for d in self.dimensions:
            lo, hi = self.scales[d]
            out.append((float(record[d]) - lo) / (hi - lo))
        return out

    def to_corpus_scale(self, values: Sequence[float], dim: str) -> list[float]:
        lo, hi = self.scales[dim]
        return [lo + float(v) * (hi - lo) for v in values]

    # -- losses (torch) --------------------------------------------------------------------------

    def dimensional_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """pred, target (B, K) scaled -> scalar: mean over dimensions of 1 - batch CCC (or MSE)."""
        pred, target = pred.float(), target.float()
        if self.loss == "mse":
            return ((pred - target) ** 2).mean()
        return (1.0 - batch_ccc(pred, target)).mean()

    def describe(self) -> dict:
        """JSON-ready: kind, classes, dimensions, scales (metrics.json, the saved model's config)."""
        return {"kind": self.kind, "classes": list(self.classes) if self.categorical else [],
                "dimensions": list(self.dimensions) if self.dimensional else [],
                "scales": {d: list(self.scales[d]) for d in self.dimensions} if self.dimensional else {},
                "loss": self.loss if self.dimensional else None}


def batch_ccc(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Concordance correlation coefficient per column of (B, K) tensors -> (K,), population moments
    (Lin 1989): 2 cov / (var_p + var_t + (mean_p - mean_t)^2). The loss's batch estimate only."""
    mp, mt = pred.mean(dim=0), target.mean(dim=0)  # (K,)
    vp, vt = pred.var(dim=0, unbiased=False), target.var(dim=0, unbiased=False)  # (K,)
    cov = ((pred - mp) * (target - mt)).mean(dim=0)  # (K,)
    return 2 * cov / (vp + vt + (mp - mt) ** 2 + eps)


# -- from the config and the manifest ------------------------------------------------------------


def manifest_scales(records: Sequence[Mapping], dimensions: Sequence[str], where: str = "the manifest"
                    ) -> dict[str, tuple[float, float]]:
    """One (low, high) per dimension from the records' `dim_scales` (records with a value of it);
    a dimension without any value, or two scales for one dimension, is a TaskError."""
    out: dict[str, tuple[float, float]] = {}
    for d in dimensions:
        seen = {tuple(float(x) for x in (r.get(SCALES_FIELD) or {}).get(d, ()))
                for r in records if r.get(d) is not None}
        if not seen:
            raise TaskError(f"{where}: no utterance has a value of {d} (dimensional targets come from `mmser prepare`: "
                            "IEMOCAP's consensus [V, A, D], MSP-Podcast's EmoAct / EmoVal / EmoDom, or "
                            f"--column {d}=NAME of a CSV corpus)")
        if len(seen) > 1 or () in seen:
            raise TaskError(f"{where}: {d} values on {len(seen)} different scales ({sorted(seen)}); "
                            "prepare the corpus again")
        out[d] = seen.pop()  # type: ignore[assignment]
    return out


def task_from_config(cfg, records: Sequence[Mapping], classes: Sequence[str] | None = None) -> Task:
    """The run's Task from `cfg.target` (kind, dimensions, loss, weight), the manifest's scales and
    the run's classes (`classes`: mmser.data.manifest.classes_for; unused by the dimensional kind)."""
    t = cfg.target
    dims = tuple(t.dimensions) if t.kind != "categorical" else ()
    scales = manifest_scales(records, dims, str(cfg.data.manifest)) if dims else {}
    if t.kind != "dimensional" and classes is None:
        from mmser.data.manifest import classes_for

        classes = classes_for(records, cfg.data)
    return Task(kind=t.kind, classes=tuple(classes or ()) if t.kind != "dimensional" else (), dimensions=dims,
                scales=scales, loss=t.loss, dimensional_weight=t.dimensional_weight)


def record_filter(cfg) -> dict:
    """The manifest filter keywords of the config's task kind for mmser.data.manifest's fold
    functions (`dimensions`, `categorical`)."""
    t = cfg.target
    return {"dimensions": tuple(t.dimensions) if t.kind != "categorical" else None,
            "categorical": t.kind != "dimensional"}


def num_dimension_outputs(cfg) -> int:
    """K, the regression outputs of the config's task (0 for the categorical kind): a model factory
    given the head's total width C + K splits it with this (decision fusion pools them apart)."""
    return len(cfg.target.dimensions) if cfg.target.kind != "categorical" else 0


def headline(test: Mapping | None) -> str:
    """One line of a test report: 'UA 0.6123 WA 0.6011' and / or 'CCC mean 0.512 (arousal 0.6, ...)'."""
    if not test:
        return "no test metrics"
    parts = []
    if test.get("ua") is not None:
        parts.append(f"UA {test['ua']:.4f} WA {test['wa']:.4f}")
    if test.get("ccc_mean") is not None:
        per = ", ".join(f"{d} {v:.3f}" for d, v in (test.get("ccc") or {}).items())
        parts.append(f"CCC mean {test['ccc_mean']:.4f} ({per})")
    return "; ".join(parts) or "no test metrics"
