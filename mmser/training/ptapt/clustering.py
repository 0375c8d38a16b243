"""P-TAPT step (b): frame features of the training split -> k-means -> per-frame pseudo-labels.

PAPER.md "P-TAPT" (reference: FT-w2v2-ser cluster.py) step 2: the 512-d frame features
ReLU(conv(aggregator)) of step (a)'s model, every 20 ms frame of the training split (full
utterances, eval mode, fp32); k-means with 20 iterations for each K in (64, 512, 4096); each frame
gets one cluster id per K. The reference (cluster.py `train_kmeans`): faiss.Clustering with niter=20,
max_points_per_centroid=500000 (so faiss does not subsample at IEMOCAP's ~1M frames), faiss' default
initialisation (K random frames) and empty-cluster rule, on a float32 GpuIndexFlatL2; it fits on at
most max(K) x 1000 sampled frames (all of them with --sample_ratio 1.0).

k-means is hand-written in torch (Lloyd's algorithm, distances by chunked matmul) rather than
scikit-learn's, because the real problem is ~1M frames x 4,096 clusters x 512 dims (~43 TFLOP for 20
iterations): minutes on a GPU, hours on a CPU; sklearn has no GPU path and the reference's faiss-gpu
no longer installs. The same code runs on CPU for the tiny/synthetic corpora of the tests. Measured
on the 2-core (shared, loaded) CPU here, 50k x 512 frames, K=512, 20 iterations: this code 14 s,
sklearn KMeans (Lloyd, random init) 7 s, sklearn with its own k-means++ seeding 160-330 s. sklearn's
Lloyd loop is ~2x faster on CPU; torch is kept for the GPU and for one code path (same seeding and
empty-cluster policy on both devices). Initialisation (seeded): k-means++ by default, on a seeded
subsample of max(8 K, 4,096) frames (32,768 at K=4,096; README departures), or K distinct random
frames (`ptapt.kmeans_init=random`: faiss' default, the reference's). Iterations: exactly `iters`
(faiss' `niter`, no early stop).

Empty clusters (`ptapt.kmeans_empty`). "split" (default) is faiss' rule (Clustering.cpp
`split_clusters`, run after every centroid update): for each empty cluster, in index order, scan
the clusters cyclically from 0 and take cluster j with probability (n_j - 1) / (N - K) (so about
in proportion to its size; singletons never), copy its centroid into the empty one and move the two
apart symmetrically by a relative 1/1024 (even dimensions x (1 + eps) / (1 - eps), odd ones the
other way), and count half of its points for each (the next assignment splits them). "reseed" =
mmser before: the empty centroid moves to a random frame (seeded). The draws come from one seeded
stream per k-means (faiss seeds a generator with 1234 at every call). Measured how often it
matters: benchmarks/kmeans_empty.py (README departure 7).

Determinism: the per-cluster sums use `index_add_`, whose CUDA kernel (atomic adds) is
deterministic only under `torch.use_deterministic_algorithms(True)`, which a Lightning Trainer with
deterministic=True switches on for the whole process: so a fresh process (P-TAPT resumed at step
(b)) and one that built step (a)'s Trainer gave different pseudo-labels. The sums now run under
that setting in a block of their own (`deterministic_algorithms`), the caller's setting restored
after: the same labels whatever ran before, a function of (data, K, seed) on either device.

Output folder (files written atomically; `cluster_frames` adds DONE.json last):
    labels.npz      utterance id -> int32 array (F, len(cluster_sizes)), column i = cluster id for K_i
    centroids.npz   "k{K}" -> float32 (K, 512)
    meta.json       cluster sizes, iterations, frame counts, inertia per K, the ids used
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from mmser.config import Config
from mmser.data.dataset import read_audio
from mmser.data.manifest import Fold
from mmser.io import atomic_write_bytes, atomic_write_json, mark_stage_done
from mmser.models.frame_model import FrameEmotionModel
from mmser.progress import track
from mmser.training.ptapt.common import check_no_test_session

log = logging.getLogger(__name__)

LABELS_FILE = "labels.npz"
CENTROIDS_FILE = "centroids.npz"
META_FILE = "meta.json"


# ------------------------------------------------------------------------------------------------
# k-means
# ------------------------------------------------------------------------------------------------


def _chunk_rows(k: int, device: torch.device) -> int:
    """Rows per distance chunk: a (rows, K) float32 block of ~8 MB on CPU (cache-friendly; 4,096 rows
    for K=512 measured fastest here) and ~512 MB on GPU (few kernel launches)."""
    budget = (1 << 27) if device.type == "cuda" else (1 << 21)
    return max(1024, min(1 << 20, budget // max(k, 1)))


def assign_clusters(x: torch.Tensor, centroids: torch.Tensor, chunk: int | None = None, with_dist: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Nearest centroid (squared L2) of every row: x (N, D), centroids (K, D) -> ids (N,), sq. dists (N,)
    (None with with_dist=False, which skips the ||x||^2 term inside k-means iterations).

    ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2, one (chunk, K) matmul at a time."""
    chunk = chunk or _chunk_rows(centroids.shape[0], x.device)
    c_sq = (centroids * centroids).sum(-1)  # (K,)
    c_t = centroids.T.contiguous()  # (D, K)
    ids = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    dist = torch.empty(x.shape[0], dtype=x.dtype, device=x.device) if with_dist else None
    for start in range(0, x.shape[0], chunk):
        xb = x[start:start + chunk]  # (n, D)
        d = torch.addmm(c_sq[None, :], xb, c_t, alpha=-2.0)  # (n, K), without the per-row ||x||^2
        best, idx = d.min(dim=1)
        ids[start:start + chunk] = idx
        if dist is not None:
            dist[start:start + chunk] = (best + (xb * xb).sum(-1)).clamp_min(0)
    return ids, dist


def _kmeans_pp_init(x: torch.Tensor, k: int, gen: torch.Generator, max_points: int | None = None) -> torch.Tensor:
    """k-means++ seeding: each next centroid drawn with probability ~ squared distance to the nearest
    centroid so far (uniformly when every point already coincides with one). (K, D)

    Seeding costs one pass over the points per centroid, so it runs on a seeded random subsample of
    at most max(8 K, 4096) points (1M frames x K=4096 would be 4,096 passes over 2 GB)."""
    max_points = max_points or max(8 * k, 4096)
    if x.shape[0] > max_points:
        x = x[torch.randperm(x.shape[0], generator=gen)[:max_points].to(x.device)]
    n = x.shape[0]
    x_sq = (x * x).sum(-1)  # (N,)

    def sq_dist(i: int) -> torch.Tensor:  # squared distance of every point to point i, one mat-vec
        return (x_sq - 2.0 * (x @ x[i]) + x_sq[i]).clamp_min(0)  # (N,)

    idx = [int(torch.randint(0, n, (1,), generator=gen))]
    nearest = sq_dist(idx[0])  # (N,)
    for _ in range(1, k):
        cum = torch.cumsum(nearest.double(), 0)  # (N,) on x's device; one scalar crosses to the CPU
        total = float(cum[-1])
        if total > 0:
            u = float(torch.rand((), generator=gen, dtype=torch.float64)) * total
            nxt = min(int(torch.searchsorted(cum, torch.tensor([u], dtype=torch.float64, device=cum.device))), n - 1)
        else:
            nxt = int(torch.randint(0, n, (1,), generator=gen))
        idx.append(nxt)
        nearest = torch.minimum(nearest, sq_dist(nxt))
    return x[torch.tensor(idx, device=x.device)].clone()


EMPTY_POLICIES = ("split", "reseed")
SPLIT_EPS = 1.0 / 1024  # faiss Clustering.cpp: EPS (1 / 1024), the relative perturbation of a split


@contextmanager
def deterministic_algorithms() -> Iterator[None]:
    """`torch.use_deterministic_algorithms(True)` inside the block (CUDA `index_add_` then takes its
    sorted, deterministic path), the caller's setting (and warn_only) restored after."""
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


def cluster_sums(x: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """Per-cluster sums of the rows of x (N, D) by ids (N,) -> (K, D), deterministic on any device."""
    with deterministic_algorithms():
        return torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, ids, x)


def split_empty_clusters(centroids: torch.Tensor, counts: torch.Tensor, rng: np.random.Generator) -> int:
    """faiss' `split_clusters` (Clustering.cpp) on centroids (K, D) in place, given the cluster
    sizes counts (K,) of N = counts.sum() points; see the module docstring. Returns the number of
    empty clusters it filled."""
    h = counts.detach().cpu().double().numpy().copy()  # faiss' hassign (float: halves stay halves)
    k, n = h.shape[0], float(h.sum())
    empty = np.flatnonzero(h == 0)
    if empty.size == 0:
        return 0
    d = centroids.shape[1]
    up = torch.where(torch.arange(d, device=centroids.device) % 2 == 0, 1 + SPLIT_EPS, 1 - SPLIT_EPS)  # (D,)
    up = up.to(centroids.dtype)
    down = 2 - up  # (D,) the opposite perturbation
    for ci in empty.tolist():
        # faiss: for (cj = 0; ; cj = (cj + 1) % k) if (rand < (h[cj] - 1) / (n - k)) break; one
        # cycle's draws at a time (the same distribution). n == k: the first cluster with h > 1.
        p = (h - 1.0) / (n - k) if n > k else np.where(h > 1, 1.0, 0.0)  # (K,)
        while True:
            hits = np.flatnonzero(rng.random(k) < p)
            if hits.size:
                cj = int(hits[0])
                break
        centroids[ci] = centroids[cj] * up
        centroids[cj] = centroids[cj] * down
        h[ci] = h[cj] / 2
        h[cj] -= h[ci]
    return int(empty.size)


def kmeans(x: torch.Tensor, k: int, iters: int = 20, seed: int = 0, init: str = "k-means++",
           chunk: int | None = None, desc: str | None = None, empty: str = "split") -> tuple[torch.Tensor, dict]:
    """Lloyd's k-means on x (N, D) float32 (on x's device). Returns centroids (K, D) and stats
    {"inertia": mean squared distance after the last update, "empty_clusters": empty clusters met
    over all iterations (each filled by `empty`), "empty_per_iter": that count per iteration}.

    init: "k-means++" or "random" (K distinct points, faiss' default). empty: "split" (faiss) or
    "reseed" (a random point). desc: show progress per iteration under this name (`mmser.progress`)."""
    if x.dim() != 2:
        raise ValueError(f"kmeans: expected features (N, D), got shape {tuple(x.shape)}")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"kmeans: K={k} clusters need at least K frames, got {n}")
    if iters < 1:
        raise ValueError(f"kmeans: iters must be >= 1, got {iters}")
    if empty not in EMPTY_POLICIES:
        raise ValueError(f"kmeans: empty must be one of {EMPTY_POLICIES}, got {empty!r}")
    x = x.float()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    split_rng = np.random.default_rng([seed, 1024])
    if init == "k-means++":
        centroids = _kmeans_pp_init(x, k, gen)  # (K, D)
    elif init == "random":
        centroids = x[torch.randperm(n, generator=gen)[:k].to(x.device)].clone()  # (K, D)
    else:
        raise ValueError(f"kmeans: init must be 'k-means++' or 'random', got {init!r}")
    per_iter = []
    for _ in track(range(iters), desc=desc or "", unit="iter", mode=None if desc else "off"):
        ids, _ = assign_clusters(x, centroids, chunk, with_dist=False)
        sums = cluster_sums(x, ids, k)  # (K, D)
        counts = torch.bincount(ids, minlength=k)  # (K,)
        is_empty = counts == 0
        centroids = torch.where(is_empty[:, None], centroids, sums / counts.clamp_min(1)[:, None].to(x.dtype))
        if empty == "split":
            per_iter.append(split_empty_clusters(centroids, counts, split_rng))  # one (K,) copy to the CPU
        else:
            n_empty = int(is_empty.sum())
            if n_empty:
                pick = torch.randint(0, n, (n_empty,), generator=gen).to(x.device)
                centroids[is_empty] = x[pick]
            per_iter.append(n_empty)
    _, dist = assign_clusters(x, centroids, chunk)
    return centroids, {"inertia": float(dist.mean()), "empty_clusters": int(sum(per_iter)),
                       "empty_per_iter": per_iter}


# ------------------------------------------------------------------------------------------------
# Frame features
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def extract_frame_features(model: torch.nn.Module, records: Sequence[dict], sample_rate: int = 16000,
                           device: torch.device | str = "cpu") -> dict[str, np.ndarray]:
    """id -> float32 (F, 512) frame features of each full utterance (eval mode, fp32, one at a time).

    One utterance per forward because wav2vec 1.0's GroupNorm spans the whole time axis, so
    zero padding would change every frame (as the reference: batch size 1)."""
    model = model.to(device).float().eval()
    feats: dict[str, np.ndarray] = {}
    for r in track(records, desc="P-TAPT frame features", unit="utt"):
        wav = torch.from_numpy(read_audio(r["path"], sample_rate))[None].to(device)  # (1, T)
        mask = torch.ones_like(wav, dtype=torch.bool)
        with torch.autocast(device_type=torch.device(device).type, enabled=False):
            x, frame_mask = model.frame_features(wav, mask)  # (1, F, 512), (1, F)
        feats[r["id"]] = x[0, : int(frame_mask[0].sum())].float().cpu().numpy()
    return feats


# ------------------------------------------------------------------------------------------------
# The stage
# ------------------------------------------------------------------------------------------------


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def make_pseudo_labels(features: dict[str, np.ndarray], cluster_sizes: Sequence[int], iters: int,
                       seed: int, out_dir: str | Path, fit_fraction: float = 1.0, init: str = "k-means++",
                       device: torch.device | str = "cpu", extra_meta: dict | None = None,
                       empty: str = "split") -> Path:
    """k-means for every K on the frames of `features` (id -> (F, D)); label every frame; write the
    folder described in the module docstring (`cluster_frames` then adds DONE.json). Returns out_dir."""
    out_dir = Path(out_dir)
    if not features:
        raise ValueError("make_pseudo_labels: no utterances")
    if not 0.0 < fit_fraction <= 1.0:
        raise ValueError(f"ptapt.kmeans_fit_fraction must be in (0, 1], got {fit_fraction}")
    ids = list(features)
    frameless = [i for i in ids if features[i].shape[0] == 0]
    if frameless:
        raise ValueError(f"make_pseudo_labels: utterances without frames: {frameless[:5]}")
    counts = [features[i].shape[0] for i in ids]
    x_all = torch.from_numpy(np.concatenate([features[i] for i in ids])).float().to(device)  # (N, D)
    if fit_fraction < 1.0:  # the reference's per-utterance subsample (cluster.py sample_ratio)
        rng = np.random.default_rng(seed)
        offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
        pick = np.concatenate([o + rng.choice(c, size=max(1, int(c * fit_fraction)), replace=False)
                               for o, c in zip(offsets, counts, strict=True)])
        x_fit = x_all[torch.from_numpy(np.sort(pick)).to(device)]
    else:
        x_fit = x_all
    log.info("k-means on %d of %d frames (%d utterances), dim %d, K=%s, %d iterations, device %s",
             x_fit.shape[0], x_all.shape[0], len(ids), x_all.shape[1], list(cluster_sizes), iters, device)
    columns, centroids, stats = [], {}, {}
    for k in cluster_sizes:
        t0 = time.perf_counter()
        c, st = kmeans(x_fit, int(k), iters=iters, seed=seed, init=init, desc=f"k-means K={k}", empty=empty)
        labels, dist = assign_clusters(x_all, c)
        st["inertia_all_frames"] = float(dist.mean())
        st["seconds"] = round(time.perf_counter() - t0, 3)
        st["clusters_used"] = int(torch.unique(labels).numel())
        columns.append(labels.cpu().numpy().astype(np.int32))
        centroids[f"k{k}"] = c.cpu().numpy().astype(np.float32)
        stats[str(k)] = st
        log.info("k-means K=%d: inertia %.4g, %d clusters used, %d empty clusters filled (%s), %.1f s", k,
                 st["inertia"], st["clusters_used"], st["empty_clusters"], empty, st["seconds"])
    table = np.stack(columns, axis=1)  # (N, len(K))
    per_utt, start = {}, 0
    for uid, n in zip(ids, counts, strict=True):
        per_utt[uid] = table[start:start + n]
        start += n
    atomic_write_bytes(out_dir / LABELS_FILE, _npz_bytes(per_utt))
    atomic_write_bytes(out_dir / CENTROIDS_FILE, _npz_bytes(centroids))
    meta = {"cluster_sizes": [int(k) for k in cluster_sizes], "iters": iters, "seed": seed,
            "fit_fraction": fit_fraction, "init": init, "empty": empty, "n_utterances": len(ids),
            "n_frames": int(x_all.shape[0]),
            "n_fit_frames": int(x_fit.shape[0]), "dim": int(x_all.shape[1]), "kmeans": stats, "ids": ids,
            **(extra_meta or {})}
    atomic_write_json(out_dir / META_FILE, meta)
    return out_dir


def _device(cfg: Config) -> torch.device:
    wants_gpu = cfg.trainer.accelerator in ("auto", "gpu", "cuda")
    return torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")


def cluster_frames(cfg: Config, fold: Fold, model: FrameEmotionModel, stage_dir: Path, fp: str) -> None:
    """Step (b) on `fold.train`: the frame features of `model` (step (a)'s, best-validation weights)
    clustered for every K in `cfg.ptapt.cluster_sizes` into `stage_dir`, DONE.json (fingerprint `fp`) last."""
    pc = cfg.ptapt
    records = sorted(fold.train, key=lambda r: r["id"])
    check_no_test_session(records, fold, "step (b)")
    device = _device(cfg)
    t0 = time.perf_counter()
    feats = extract_frame_features(model, records, cfg.data.sample_rate, device)
    t_feat = time.perf_counter() - t0
    make_pseudo_labels(feats, pc.cluster_sizes, pc.kmeans_iters, pc.seed, stage_dir,
                       fit_fraction=pc.kmeans_fit_fraction, init=pc.kmeans_init, empty=pc.kmeans_empty,
                       device=device,
                       extra_meta={"hop_samples": model.hop_samples, "feature_seconds": round(t_feat, 3)})
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    mark_stage_done(stage_dir, fp, {"seconds": round(time.perf_counter() - t0, 3), "n_utterances": len(records),
                                    "rank": rank, "world_size": world})


# ------------------------------------------------------------------------------------------------
# Reading the folder (step (c))
# ------------------------------------------------------------------------------------------------


def load_pseudo_labels(path: str | Path) -> dict[str, np.ndarray]:
    """id -> int array (F, n_K) from a pseudo-label folder (or its labels.npz)."""
    path = Path(path)
    f = path / LABELS_FILE if path.is_dir() else path
    if not f.is_file():
        raise FileNotFoundError(f"{f}: no pseudo-labels (run P-TAPT step 2 first)")
    try:
        with np.load(f) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError) as e:
        raise ValueError(f"{f}: not a readable pseudo-label file ({e})") from None


def read_meta(path: str | Path) -> dict:
    f = Path(path) / META_FILE
    try:
        return json.loads(f.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{f}: cannot read pseudo-label metadata ({e})") from None
