"""IEMOCAP-like utterance durations, shared by the benchmarks and benchmarks/padding.py.

A log-normal fitted to the corpus facts in ../shared/IEMOCAP.md: 5,531 utterances, median 3.6 s,
mean 4.6 s -> mu = ln 3.6, sigma = sqrt(2 ln(4.6/3.6)) = 0.70, clipped to [0.6, 34] s. This gives
about 7% over 10 s (the corpus has 369/5531 = 6.7%).
"""

from __future__ import annotations

import numpy as np

SR = 16000  # IEMOCAP: 16 kHz mono


def iemocap_like_durations(n: int = 5531, seed: int = 0) -> np.ndarray:
    """(n,) float durations in seconds."""
    rng = np.random.default_rng(seed)
    mu, sigma = np.log(3.6), np.sqrt(2 * np.log(4.6 / 3.6))
    return np.clip(rng.lognormal(mu, sigma, n), 0.6, 34.0)
