"""Is experiment B better than experiment A, or is the difference within the seed noise?

Two experiments of a cross-validation are compared over the (test session, seed) runs both have:
each such pair is one paired observation d = score_B - score_A (same test session, same seed, so
the same data split and initialisation seed). Three numbers come out, each defined here once:

- **Mean difference** and a **paired bootstrap 95% confidence interval** of it: the pairs are
  resampled with replacement (`n_boot` times, numpy's default_rng seeded with `seed`, so the interval
  is reproducible) and the 2.5th / 97.5th percentiles of the resampled means are the interval.
- **Wilcoxon signed-rank p-value** (two-sided, `scipy.stats.wilcoxon`, zero differences dropped):
  exact null distribution when there are at most 50 non-zero differences and no ties among their
  absolute values, the normal approximation otherwise (scipy's `method="auto"`). With n pairs all
  of one sign and no ties, p = 2 / 2^n.
- **Seed noise** sigma_seed: the square root of the mean, over every (experiment, session) cell of
  the two experiments on the shared sessions, of the sample variance (ddof 1) of the scores over
  that cell's seeds: how much one run moves when only the seed changes. Cells with one seed carry
  no information on it and are left out; without any cell of two seeds it is undefined (None).

Two marks, reported side by side: `within_noise` = |mean difference| < sigma_seed (the difference is
smaller than what changing the seed alone does to one run); and the verdict, "B better" / "A better"
when p < alpha (0.05) and the bootstrap interval excludes 0, "not significant" otherwise. A small
difference can be both consistent (significant over many pairs) and within the seed noise: a
table shows both rather than one hiding the other.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

Key = tuple[int, int]  # (test session, seed)


@dataclass(frozen=True)
class PairedTest:
    a: str
    b: str
    n_pairs: int
    mean_diff: float | None  # mean of (B - A) over the shared (session, seed) pairs
    ci_low: float | None
    ci_high: float | None
    p_value: float | None  # Wilcoxon signed-rank, two-sided
    seed_noise: float | None  # sigma_seed (see the module docstring)
    within_noise: bool | None  # |mean_diff| < seed_noise; None when the seed noise is undefined
    verdict: str


def seed_noise(*experiments: Mapping[Key, float], sessions: Sequence[int] | None = None) -> float | None:
    """sqrt(mean over (experiment, session) cells with >= 2 seeds of the ddof-1 variance over seeds)."""
    variances = []
    for scores in experiments:
        by_session: dict[int, list[float]] = {}
        for (session, _seed), value in scores.items():
            if sessions is None or session in sessions:
                by_session.setdefault(session, []).append(float(value))
        variances += [float(np.var(v, ddof=1)) for v in by_session.values() if len(v) >= 2]
    return math.sqrt(float(np.mean(variances))) if variances else None


def bootstrap_ci(diffs: Sequence[float], n_boot: int = 10000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the mean of `diffs` over `n_boot` resamples with replacement."""
    d = np.asarray(diffs, dtype=float)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)  # (n_boot,)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def wilcoxon_p(diffs: Sequence[float]) -> float | None:
    """Two-sided Wilcoxon signed-rank p-value (zeros dropped); 1.0 when every difference is 0."""
    from scipy.stats import wilcoxon

    d = np.asarray(diffs, dtype=float)
    if d.size == 0:
        return None
    if not np.any(d != 0):
        return 1.0
    return float(wilcoxon(d, zero_method="wilcox", alternative="two-sided", method="auto").pvalue)


def paired_test(a: Mapping[Key, float], b: Mapping[Key, float], name_a: str = "A", name_b: str = "B",
                n_boot: int = 10000, seed: int = 0, alpha: float = 0.05) -> PairedTest:
    """B vs A over the (session, seed) pairs both have (see the module docstring)."""
    keys = sorted(set(a) & set(b))
    if len(keys) < 2:
        return PairedTest(name_a, name_b, len(keys), None, None, None, None, None, None,
                          "too few shared (session, seed) runs")
    diffs = np.array([float(b[k]) - float(a[k]) for k in keys])
    mean = float(diffs.mean())
    lo, hi = bootstrap_ci(diffs, n_boot=n_boot, seed=seed)
    p = wilcoxon_p(diffs)
    sessions = sorted({s for s, _ in keys})
    noise = seed_noise({k: a[k] for k in keys}, {k: b[k] for k in keys}, sessions=sessions)
    within = None if noise is None else abs(mean) < noise
    if p is not None and p < alpha and (lo > 0 or hi < 0):
        verdict = f"{name_b if mean > 0 else name_a} better"
    else:
        verdict = "not significant"
    return PairedTest(name_a, name_b, len(keys), mean, lo, hi, p, noise, within, verdict)
