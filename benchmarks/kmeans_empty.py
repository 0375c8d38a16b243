"""How often P-TAPT's k-means meets an empty cluster (K = 4,096), and what each rule does with it.

    .venv/bin/python benchmarks/kmeans_empty.py [--frames 102400 --dim 64 --k 4096 --iters 20] [--out FILE]

Synthetic frame features shaped like step (b)'s input: ReLU(W z + b) of a 16-d latent z = class
centre (4 classes) + utterance offset + an AR(1) walk over the utterance's frames (0.9 per 20 ms
frame, 250 frames = 5 s per utterance), W a random (D, 16) map, plus a little isotropic noise: frames
of one utterance are correlated and many features are exactly 0, as for ReLU(conv) features. The real
problem is ~1M frames x 512 dims at K=4,096 (~250 frames per cluster); on this 2-core CPU the default
here is 102,400 x 64 (25 frames per cluster, so empty clusters are MORE likely than on the corpus), the
size that runs in under 2 minutes per k-means. Reported per (init, empty rule): empty clusters over
the 20 iterations (each filled by the rule), per iteration, and the final inertia.
`--duplicates F` replaces a fraction F of the frames by one identical vector (digital silence, e.g.
zero-padded or muted audio, gives identical features): the case where empty clusters do occur.
A figure, not a test: it prints a table (and writes JSON with --out) and asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mmser.training.ptapt.clustering import kmeans

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for benchmarks/
from benchmarks.common import machine, save  # noqa: E402


def synthetic_frames(n_frames: int, dim: int, seed: int = 0, frames_per_utt: int = 250, latent: int = 16,
                     ar: float = 0.9) -> np.ndarray:
    """(n_frames, dim) float32 ReLU features (module docstring)."""
    rng = np.random.default_rng(seed)
    n_utt = -(-n_frames // frames_per_utt)
    centres = rng.standard_normal((4, latent)) * 2.0  # (4, L)
    w = rng.standard_normal((dim, latent)) / np.sqrt(latent)  # (D, L)
    b = rng.standard_normal(dim) * 0.5  # (D,)
    z = np.empty((n_utt, frames_per_utt, latent))  # (U, T, L)
    walk = rng.standard_normal((n_utt, latent))
    for t in range(frames_per_utt):
        walk = ar * walk + np.sqrt(1 - ar * ar) * rng.standard_normal((n_utt, latent))
        z[:, t] = walk
    z += centres[rng.integers(0, 4, n_utt)][:, None] + 0.5 * rng.standard_normal((n_utt, 1, latent))
    x = np.maximum(z.reshape(-1, latent)[:n_frames] @ w.T + b, 0)  # (N, D)
    x += 0.05 * rng.standard_normal(x.shape)
    return x.astype(np.float32)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=102_400)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--duplicates", type=float, default=0.0, help="fraction of frames made identical")
    ap.add_argument("--runs", default="random:split,k-means++:split,random:reseed,k-means++:reseed",
                    help="init:empty pairs, comma-separated")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    feats = synthetic_frames(args.frames, args.dim, args.seed)
    n_dup = int(args.duplicates * args.frames)
    if n_dup:
        feats[np.random.default_rng(args.seed + 1).choice(args.frames, n_dup, replace=False)] = feats[0]
    x = torch.from_numpy(feats)
    rows = []
    print(f"{args.frames} frames x {args.dim} dims, K={args.k}, {args.iters} iterations "
          f"({args.frames / args.k:.0f} frames per cluster), {n_dup} identical frames")
    print(f"{'init':10s} {'empty':7s} {'empty clusters':>14s} {'iters with any':>14s} {'inertia':>9s} {'s':>6s}"
          "  per iteration")
    for run in args.runs.split(","):
        init, empty = run.split(":")
        t0 = time.perf_counter()
        _, st = kmeans(x, args.k, iters=args.iters, seed=args.seed, init=init, empty=empty)
        sec = time.perf_counter() - t0
        per = st["empty_per_iter"]
        rows.append({"init": init, "empty": empty, "empty_clusters": st["empty_clusters"], "per_iter": per,
                     "iters_with_empty": sum(1 for v in per if v), "inertia": st["inertia"], "seconds": round(sec, 1)})
        print(f"{init:10s} {empty:7s} {st['empty_clusters']:14d} {rows[-1]['iters_with_empty']:14d} "
              f"{st['inertia']:9.4f} {sec:6.1f}  {per}", flush=True)
    result = {"machine": machine(), "frames": args.frames, "dim": args.dim, "k": args.k, "iters": args.iters,
              "seed": args.seed, "duplicates": args.duplicates, "runs": rows}
    if args.out:
        save(result, args.out)
    return result


if __name__ == "__main__":
    main()
