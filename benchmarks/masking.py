"""Expected fraction of VALID frames that SpecAugment's time mask masks: the reference vs mmser.

    .venv/bin/python benchmarks/masking.py [--epochs 3 --seed 0 --out FILE] [--n-utterances 5531]

Prints ONE JSON line (and writes it to --out when given):
    reference_vft, mmser_vft, before_vft, reference_tapt, mmser_tapt, before_tapt  (fractions)
plus the settings (n_utterances, epochs, seed), mmser's policies, batch counts per epoch and
"utterance_mean" (the same masks' fraction averaged per utterance instead of per frame).
Each fraction = total masked valid frames / total valid frames, over every batch of `epochs`
epochs, on IEMOCAP-like durations (benchmarks/durations.py: 5,531 log-normal durations, median
3.6 s, mean 4.6 s, clipped to [0.6, 34] s; 16 kHz). Valid frames of an item of n samples = the
wav2vec 2.0 base CNN's output length (kernels 10,3,3,3,3,2,2, strides 5,2,2,2,2,2,2); the batch's
frame count F = that of its longest (cropped) item. A figure, not a test: nothing is asserted.

Where each simulated behaviour comes from:
- The reference's span sampler: transformers 4.10.0 `_compute_mask_indices`
  (transformers/models/wav2vec2/modeling_wav2vec2.py), re-implemented here (`reference_time_mask`):
  ONE span count per batch, n = max(int(p * F / span + U), min_masks), U ~ U[0, 1) drawn once per
  call, n = F // span if n * span > F; every row draws n distinct starts uniformly in [0, F - span];
  the mask is the union of the spans; only valid frames count.
- reference_vft: FT-w2v2-ser fine-tuning (modules/FeatureFuser.py calls the sampler WITHOUT an
  attention mask, then `& mask`): RANDOM batches of 64 (shuffled, last partial batch kept), each
  utterance cropped to its first 10 s; time mask p=0.08, span 15, min 2 (PAPER.md V-FT).
- reference_tapt: FT-w2v2-ser TAPT (pretrain/trainer.py ContinueFinetuningBaseline +
  pretrain/dataloader.py RandomBucketSampler -> SingleRandomBucketSampler, dynamic batching):
  lengths min(len, 10 s); argsort, 50 equal-count buckets of N // 50 items (+ one bucket of the
  remainder); each bucket shuffled, buckets kept in order; batches filled until the SUM of lengths
  >= 250 s x 16 kHz; last partial batch dropped; batch order shuffled. Time mask from the HF
  wav2vec2-base config (p=0.05, span 10) with min 2 spans and the attention mask.
- mmser_vft / before_vft: mmser's real batches, `mmser.data.batching.BucketBatchSampler(lengths
  cropped to 10 s, batch_size=64, num_buckets=50, shuffle=True)`.all_batches(epoch), and mmser's
  real sampler `mmser.models.wav2vec2.compute_time_mask(frame_mask, 0.08, 15, 2, policy)` with
  policy = `EncoderConfig().mask_time_policy` (mmser_vft) or "per_utterance" (before_vft, mmser's
  old behaviour).
- mmser_tapt / before_tapt: `BucketBatchSampler(lengths cropped to 10 s, max_batch_samples=250 s x
  16 kHz, num_buckets=50, shuffle=True)` and `compute_time_mask(..., 0.05, 10, 2, policy)` with
  policy = `TaptConfig().mask_time_policy` (mmser_tapt) or "per_utterance" (before_tapt).
Randomness: numpy (durations, the reference's batches, HF's per_utterance sampler) and torch
(the span samplers), all seeded from --seed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for benchmarks/
from benchmarks.durations import SR, iemocap_like_durations  # noqa: E402
from mmser.config import EncoderConfig, TaptConfig  # noqa: E402
from mmser.data.batching import BucketBatchSampler  # noqa: E402
from mmser.models.wav2vec2 import compute_time_mask  # noqa: E402

CROP = 10 * SR  # both stages train on <= 10 s
VFT = {"batch_size": 64, "mask_prob": 0.08, "mask_length": 15, "min_masks": 2}
TAPT = {"budget": 250 * SR, "mask_prob": 0.05, "mask_length": 10, "min_masks": 2}
NUM_BUCKETS = 50
KERNELS, STRIDES = (10, 3, 3, 3, 3, 2, 2), (5, 2, 2, 2, 2, 2, 2)  # wav2vec 2.0 base CNN


def conv_frames(samples: np.ndarray | int) -> np.ndarray:
    """Frames the wav2vec 2.0 base feature encoder outputs for `samples` input samples."""
    n = np.asarray(samples, dtype=np.int64)
    for k, s in zip(KERNELS, STRIDES, strict=True):
        n = (n - k) // s + 1
    return n


# --- the reference (transformers 4.10 sampler, FT-w2v2-ser batches) ---------------------------

def reference_time_mask(shape: tuple[int, int], mask_prob: float, mask_length: int, min_masks: int,
                        gen: torch.Generator) -> torch.Tensor:
    """(B, F) bool span mask with transformers 4.10's semantics (see the module docstring); the
    caller intersects it with the valid frames."""
    batch, frames = shape
    if mask_length > frames:
        raise ValueError(f"span {mask_length} longer than the batch ({frames} frames)")
    n = int(mask_prob * frames / mask_length + torch.rand((), generator=gen).item())
    n = max(n, min_masks)
    if n * mask_length > frames:
        n = frames // mask_length
    # n distinct starts per row, uniform over [0, F - span]: the top n of iid uniform keys.
    keys = torch.rand(batch, frames - mask_length + 1, generator=gen)
    starts = keys.topk(n, dim=1).indices  # (B, n)
    # Union of [start, start + span): +1 at each start, -1 at its end, running sum > 0.
    delta = torch.zeros(batch, frames + 1, dtype=torch.int32)
    ones = torch.ones_like(starts, dtype=torch.int32)
    delta.scatter_add_(1, starts, ones)
    delta.scatter_add_(1, starts + mask_length, -ones)
    return delta.cumsum(1)[:, :frames] > 0


def reference_vft_batches(n: int, rng: np.random.Generator, batch_size: int) -> list[np.ndarray]:
    """Random batches of `batch_size` (DataLoader shuffle=True, drop_last=False)."""
    perm = rng.permutation(n)
    return [perm[i:i + batch_size] for i in range(0, n, batch_size)]


def reference_tapt_batches(lengths: np.ndarray, rng: np.random.Generator, budget: int,
                           num_buckets: int = NUM_BUCKETS) -> list[np.ndarray]:
    """SingleRandomBucketSampler(dynamic_batch=True, drop_last=True), one epoch."""
    order = np.argsort(lengths)
    split = len(order) // num_buckets
    buckets = [order[i * split:(i + 1) * split] for i in range(num_buckets)]
    if num_buckets * split < len(order):
        buckets.append(order[num_buckets * split:])
    idxs = np.concatenate([rng.permutation(b) for b in buckets])  # buckets stay in order
    batches, start, total = [], 0, 0
    for j, i in enumerate(idxs.tolist()):
        total += int(lengths[i])
        if total >= budget:
            batches.append(idxs[start:j + 1])
            start, total = j + 1, 0
    # the partial batch idxs[start:] is dropped (drop_last=True)
    return [batches[k] for k in rng.permutation(len(batches))]


# --- measurement -------------------------------------------------------------------------------

MaskFn = Callable[[torch.Tensor], torch.Tensor]  # (B, F) valid frames -> (B, F) masked


def masked_fraction(batches: Sequence[Sequence[int]], lengths: np.ndarray,
                    mask_fn: MaskFn) -> tuple[float, float]:
    """Over `batches` (index lists into `lengths`, in samples): (masked valid frames / valid frames,
    the mean over utterances of each one's masked fraction)."""
    masked = valid = 0
    per_utt: list[torch.Tensor] = []
    for b in batches:
        frames = torch.from_numpy(conv_frames(lengths[np.asarray(b)]))  # (B,)
        frame_mask = torch.arange(int(frames.max()))[None, :] < frames[:, None]  # (B, F)
        mask = mask_fn(frame_mask) & frame_mask
        masked += int(mask.sum())
        valid += int(frames.sum())
        per_utt.append(mask.sum(1) / frames)
    if not valid:
        return float("nan"), float("nan")
    return masked / valid, float(torch.cat(per_utt).mean())


def measure(n_utterances: int = 5531, epochs: int = 3, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    np.random.seed(seed)  # HF's per_utterance sampler draws from numpy's global RNG
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    durations = iemocap_like_durations(n_utterances, seed=seed)
    lengths = np.minimum((durations * SR).astype(np.int64), CROP)  # first / random <= 10 s

    vft_policy = EncoderConfig().mask_time_policy
    tapt_policy = TaptConfig().mask_time_policy
    v, t = VFT, TAPT

    def ref_fn(cfg: dict) -> MaskFn:
        return lambda fm: reference_time_mask(tuple(fm.shape), cfg["mask_prob"], cfg["mask_length"],
                                              cfg["min_masks"], gen)

    def mmser_fn(cfg: dict, policy: str) -> MaskFn:
        return lambda fm: compute_time_mask(fm, cfg["mask_prob"], cfg["mask_length"], cfg["min_masks"],
                                            policy=policy)

    ref_vft = [reference_vft_batches(n_utterances, rng, v["batch_size"]) for _ in range(epochs)]
    ref_tapt = [reference_tapt_batches(lengths, rng, t["budget"]) for _ in range(epochs)]
    vft_sampler = BucketBatchSampler(lengths, batch_size=v["batch_size"], num_buckets=NUM_BUCKETS,
                                     shuffle=True, seed=seed)
    tapt_sampler = BucketBatchSampler(lengths, max_batch_samples=t["budget"], num_buckets=NUM_BUCKETS,
                                      shuffle=True, seed=seed)
    mm_vft = [vft_sampler.all_batches(e) for e in range(epochs)]
    mm_tapt = [tapt_sampler.all_batches(e) for e in range(epochs)]

    def flat(per_epoch: list[list]) -> list:
        return [b for batches in per_epoch for b in batches]

    def per_epoch(per_epoch_batches: list[list]) -> float:
        return round(float(np.mean([len(b) for b in per_epoch_batches])), 1)

    runs = {
        "reference_vft": (ref_vft, ref_fn(v)),
        "mmser_vft": (mm_vft, mmser_fn(v, vft_policy)),
        "before_vft": (mm_vft, mmser_fn(v, "per_utterance")),
        "reference_tapt": (ref_tapt, ref_fn(t)),
        "mmser_tapt": (mm_tapt, mmser_fn(t, tapt_policy)),
        "before_tapt": (mm_tapt, mmser_fn(t, "per_utterance")),
    }
    figures = {name: masked_fraction(flat(batches), lengths, fn) for name, (batches, fn) in runs.items()}
    return {
        **{name: frame_weighted for name, (frame_weighted, _) in figures.items()},
        # The same masks averaged per utterance (short clips weigh as much as long ones).
        "utterance_mean": {name: round(utt, 4) for name, (_, utt) in figures.items()},
        "mmser_vft_policy": vft_policy,
        "mmser_tapt_policy": tapt_policy,
        "batches_per_epoch": {"reference_vft": per_epoch(ref_vft), "mmser_vft": per_epoch(mm_vft),
                              "reference_tapt": per_epoch(ref_tapt), "mmser_tapt": per_epoch(mm_tapt)},
        "n_utterances": n_utterances,
        "epochs": epochs,
        "seed": seed,
    }


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-utterances", type=int, default=5531, help="IEMOCAP's 4-class count by default")
    ap.add_argument("--out", default=None, help="also write the JSON line to this file")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    result = measure(args.n_utterances, args.epochs, args.seed)
    result = {k: round(x, 4) if isinstance(x, float) else x for k, x in result.items()}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    line = json.dumps(result)
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")
    return result


if __name__ == "__main__":
    main()
