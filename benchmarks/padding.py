"""Padding efficiency (real samples / padded samples) of length-bucketed vs random batches.

    .venv/bin/python benchmarks/padding.py [--manifest runs/demo/data/manifest.jsonl] [--out FILE]

Two length distributions:
1. IEMOCAP-like: 5,531 durations drawn from a log-normal fitted to the corpus facts in
   ../shared/IEMOCAP.md (median 3.6 s, mean 4.6 s -> mu = ln 3.6, sigma = sqrt(2 ln(4.6/3.6)) = 0.70;
   clipped to [0.6, 34] s; this gives about 7% over 10 s, the corpus has 369/5531 = 6.7%);
   the generator is shared with benchmarks/masking.py (benchmarks/durations.py).
2. A prepared manifest (e.g. the synthetic corpus), when given.
Training lengths are cropped to the first 10 s (V-FT); batch 64 (V-FT) and a 250 s budget (TAPT).
A figure, not a test: it prints a table (and writes JSON with --out) and asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from mmser.data.batching import BucketBatchSampler, padding_efficiency

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for benchmarks/
from benchmarks.common import machine, save  # noqa: E402
from benchmarks.durations import SR, iemocap_like_durations  # noqa: E402


def random_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    perm = np.random.default_rng(seed).permutation(n)
    return [perm[i:i + batch_size].tolist() for i in range(0, n, batch_size)]


def random_budget_batches(lengths: np.ndarray, budget: int, seed: int) -> list[list[int]]:
    perm = np.random.default_rng(seed).permutation(len(lengths))
    batches, cur, cur_max = [], [], 0
    for i in perm.tolist():
        m = max(cur_max, int(lengths[i]))
        if cur and m * (len(cur) + 1) > budget:
            batches.append(cur)
            cur, m = [], int(lengths[i])
        cur.append(i)
        cur_max = m
    return batches + ([cur] if cur else [])


def report(name: str, durations: np.ndarray, epochs: int = 5, records: list | None = None) -> list[str]:
    lengths = (np.minimum(durations, 10.0) * SR).astype(int)
    rows = []
    for label, kw, rand in (
        ("batch 64", {"batch_size": 64}, lambda e: random_batches(len(lengths), 64, e)),
        ("250 s budget", {"max_batch_samples": 250 * SR},
         lambda e: random_budget_batches(lengths, 250 * SR, e)),
    ):
        s = BucketBatchSampler(lengths, num_buckets=50, shuffle=True, seed=0, **kw)
        bucketed = np.mean([padding_efficiency(s.all_batches(e), lengths) for e in range(epochs)])
        nb = np.mean([len(s.all_batches(e)) for e in range(epochs)])
        rnd = np.mean([padding_efficiency(rand(e), lengths) for e in range(epochs)])
        nr = np.mean([len(rand(e)) for e in range(epochs)])
        rows.append(f"| {name} | {len(lengths)} | {label} | {rnd:.3f} ({nr:.0f} batches) | "
                    f"{bucketed:.3f} ({nb:.0f} batches) | {bucketed / rnd:.2f}x |")
        if records is not None:
            records.append({"lengths": name, "n": len(lengths), "batching": label, "random": float(rnd),
                            "random_batches": float(nr), "bucketed": float(bucketed),
                            "bucketed_batches": float(nb), "gain": float(bucketed / rnd)})
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", default=None, help="a prepared manifest.jsonl (4-class utterances)")
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args(argv)
    rows = ["| lengths | n | batching | random: efficiency | bucketed (50 buckets) | gain |",
            "|---|---|---|---|---|---|"]
    records: list[dict] = []
    rows += report("IEMOCAP-like", iemocap_like_durations(), records=records)
    if args.manifest:
        from mmser.data.manifest import load_manifest, task_records

        recs = task_records(load_manifest(args.manifest))
        rows += report(args.manifest, np.array([r["duration"] for r in recs]), records=records)
    print("\n".join(rows))
    result = {"benchmark": "padding", "machine": machine(), "rows": records}
    save(result, args.out)
    return result


if __name__ == "__main__":
    main()
