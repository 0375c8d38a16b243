"""Metrics as pure functions, and the paper's Table 11 aggregation.

- UA (unweighted average recall) = mean of per-class recalls: the paper's headline metric.
- WA (weighted accuracy) = overall accuracy.
- macro-F1 = mean of per-class F1.
Classes absent from `y_true` are left out of UA and macro-F1 (their recall is undefined), and the
classes used are reported. Built on scikit-learn where it does the same thing.

Dimensional emotion (arousal / valence / dominance): the concordance correlation coefficient (CCC,
Lin 1989), Pearson r and MAE per dimension, and the mean CCC, each computed over the WHOLE set of
predictions at once: CCC is not a mean of per-item terms, so an average of batch CCCs is a different
(and batch-size dependent) number. Hand-written CCC (three lines of numpy; neither scikit-learn nor
scipy has it); Pearson r from numpy's corrcoef.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import confusion_matrix as _sk_confusion


def confusion(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """Confusion matrix C[i, j] = count of true class i predicted as j."""
    return _sk_confusion(np.asarray(y_true), np.asarray(y_pred), labels=list(range(num_classes)))


def per_class_recall(cm: np.ndarray) -> np.ndarray:
    """Recall per class; NaN for a class with no true examples."""
    support = cm.sum(axis=1).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)


def per_class_f1(cm: np.ndarray) -> np.ndarray:
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1).astype(float)
    predicted = cm.sum(axis=0).astype(float)
    denom = support + predicted
    f1 = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)
    return np.where(support > 0, f1, np.nan)


def ua(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> float:
    """Unweighted average recall over the classes present in y_true."""
    return float(np.nanmean(per_class_recall(confusion(y_true, y_pred, num_classes))))


def wa(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Weighted accuracy = overall accuracy."""
    t, p = np.asarray(y_true), np.asarray(y_pred)
    if t.size == 0:
        raise ValueError("wa: empty input")
    return float((t == p).mean())


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> float:
    """Mean F1 over the classes present in y_true."""
    return float(np.nanmean(per_class_f1(confusion(y_true, y_pred, num_classes))))


def classification_report(
    y_true: Sequence[int], y_pred: Sequence[int], class_names: Sequence[str]
) -> dict:
    """All metrics of one evaluation, JSON-ready."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"length mismatch: {len(y_true)} labels vs {len(y_pred)} predictions")
    if len(y_true) == 0:
        raise ValueError("classification_report: no examples")
    k = len(class_names)
    cm = confusion(y_true, y_pred, k)
    rec = per_class_recall(cm)
    return {
        "ua": float(np.nanmean(rec)),
        "wa": wa(y_true, y_pred),
        "macro_f1": float(np.nanmean(per_class_f1(cm))),
        "n": int(len(y_true)),
        "classes": list(class_names),
        "per_class_recall": {c: (None if np.isnan(r) else float(r)) for c, r in zip(class_names, rec, strict=True)},
        "support": {c: int(s) for c, s in zip(class_names, cm.sum(axis=1), strict=True)},
        "confusion": cm.tolist(),
    }


# --------------------------------------------------------------------------------------------
# Dimensional metrics
# --------------------------------------------------------------------------------------------


def _pair(y_true: Sequence[float], y_pred: Sequence[float], what: str) -> tuple[np.ndarray, np.ndarray]:
    t, p = np.asarray(y_true, dtype=np.float64), np.asarray(y_pred, dtype=np.float64)
    if t.shape != p.shape or t.ndim != 1:
        raise ValueError(f"{what}: expected two 1-d sequences of one length, got {t.shape} and {p.shape}")
    if t.size == 0:
        raise ValueError(f"{what}: empty input")
    return t, p


def ccc(y_true: Sequence[float], y_pred: Sequence[float]) -> float:
    """Concordance correlation coefficient over the whole set, population moments:
    2 cov(t, p) / (var t + var p + (mean t - mean p)^2). 1 = identical; 0 when both are constant."""
    t, p = _pair(y_true, y_pred, "ccc")
    mt, mp = t.mean(), p.mean()
    cov = ((t - mt) * (p - mp)).mean()
    denom = t.var() + p.var() + (mt - mp) ** 2
    return float(2 * cov / denom) if denom > 0 else (1.0 if np.array_equal(t, p) else 0.0)


def pearson(y_true: Sequence[float], y_pred: Sequence[float]) -> float | None:
    """Pearson r over the whole set; None when either side is constant (undefined)."""
    t, p = _pair(y_true, y_pred, "pearson")
    if t.std() == 0 or p.std() == 0:
        return None
    return float(np.corrcoef(t, p)[0, 1])


def mae(y_true: Sequence[float], y_pred: Sequence[float]) -> float:
    t, p = _pair(y_true, y_pred, "mae")
    return float(np.abs(t - p).mean())


def dimensional_report(y_true: dict[str, Sequence[float]], y_pred: dict[str, Sequence[float]]) -> dict:
    """{"ccc": {dim: ...}, "ccc_mean", "pearson": {dim: ...}, "mae": {dim: ...}, "n"} over the whole
    set of each dimension (values on the corpus's own scale; CCC and r do not depend on it, MAE does)."""
    dims = list(y_true)
    if not dims or set(dims) != set(y_pred):
        raise ValueError(f"dimensional_report: dimensions {dims} vs {list(y_pred)}")
    cccs = {d: ccc(y_true[d], y_pred[d]) for d in dims}
    return {"ccc": cccs, "ccc_mean": float(np.mean(list(cccs.values()))),
            "pearson": {d: pearson(y_true[d], y_pred[d]) for d in dims},
            "mae": {d: mae(y_true[d], y_pred[d]) for d in dims}, "n": int(len(y_true[dims[0]])),
            "dimensions": dims}


# --------------------------------------------------------------------------------------------
# Table 11: per session mean ± std (ddof 0) over seeds; "Average" = mean of the session means.
# --------------------------------------------------------------------------------------------


def _fold_key(s) -> tuple:
    """Sessions in order: integers first, then fold names (mmser.data.manifest.fold_sort_key)."""
    return (0, s, "") if isinstance(s, int) else (1, 0, str(s))


def table11(scores: dict[int | str, Sequence[float]]) -> dict:
    """Aggregate {session: [score per seed]} the way the paper's Table 11 does (a session is any
    fold id: IEMOCAP's 1..5, a fold name, a predefined split's test set).

    Returns {"sessions": {s: {"mean", "std", "n"}}, "average": mean of session means,
    "std_of_session_means": population std of the session means, "std_all_runs": population std
    over every (session, seed) score pooled}. Never best-of-N.
    """
    if not scores:
        raise ValueError("table11: no scores")
    sessions = {}
    for s in sorted(scores, key=_fold_key):
        v = np.asarray(scores[s], dtype=float)
        if v.size == 0:
            raise ValueError(f"table11: session {s} has no scores")
        sessions[s] = {"mean": float(v.mean()), "std": float(v.std(ddof=0)), "n": int(v.size)}
    means = np.array([sessions[s]["mean"] for s in sessions])
    pooled = np.concatenate([np.asarray(scores[s], dtype=float) for s in sorted(scores, key=_fold_key)])
    return {
        "sessions": sessions,
        "average": float(means.mean()),
        "std_of_session_means": float(means.std(ddof=0)),
        "std_all_runs": float(pooled.std(ddof=0)),
    }
