"""Batching: collate to the batch contract, a length-bucketed batch sampler, padding efficiency.

Batch contract (shared by data, models and training):
    "ids" list[str]; "audio" (B, T) float zero-padded 16 kHz; "audio_mask" (B, T) bool, True = real
    sample; "labels" (B,) long; optional "text" (B, L, D), "text_mask" (B, L) bool, "text_pooled" (B, D).

`BucketBatchSampler` is hand-written because torch has no length-bucketed, budget-aware,
DDP-sharded batch sampler (DistributedSampler shards items, not variable-size batches). It groups
utterances of similar length (less zero padding: faster, and exact for group-norm encoders more
often), with either a fixed batch size or a budget of padded audio per batch (dynamic batches:
TAPT's ~250 s). Each epoch's batches are a pure function of (seed, epoch); with several processes
each rank takes a disjoint, equally long share of the batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler


def _pad(seqs: list[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad variable-length sequences (L_i, ...) with zeros -> (B, L, ...) and a (B, L) bool
    mask, True = real position."""
    lengths = [int(x.shape[0]) for x in seqs]
    out = torch.zeros(len(seqs), max(lengths), *seqs[0].shape[1:], dtype=dtype)
    mask = torch.zeros(len(seqs), max(lengths), dtype=torch.bool)
    for i, (x, n) in enumerate(zip(seqs, lengths, strict=True)):
        out[i, :n] = x
        mask[i, :n] = True
    return out, mask


def collate_batch(items: list[dict]) -> dict:
    """List of dataset items -> one batch dict (the batch contract), zero-padded on the right."""
    if not items:
        raise ValueError("collate_batch: empty batch")
    audio, audio_mask = _pad([it["audio"] for it in items], torch.float32)  # (B, T), (B, T)
    batch = {
        "ids": [it["id"] for it in items],
        "audio": audio,
        "audio_mask": audio_mask,
        "labels": torch.tensor([int(it["label"]) for it in items], dtype=torch.long),  # (B,)
    }
    has_text = ["text" in it for it in items]
    if any(has_text):
        if not all(has_text):
            raise ValueError("collate_batch: some items have text features and others do not")
        batch["text"], batch["text_mask"] = _pad([it["text"] for it in items], torch.float32)  # (B, L, D)
        batch["text_pooled"] = torch.stack([it["text_pooled"] for it in items]).float()  # (B, D)
    if "whisper_frames" in items[0]:  # cached frozen Whisper frames (F, H) (mmser.models.whisper)
        batch["whisper_frames"], batch["whisper_frames_mask"] = _pad([it["whisper_frames"] for it in items],
                                                                     torch.float32)  # (B, F, H), (B, F)
    if "text_ids" in items[0]:  # token ids for a fine-tuned text encoder (padded with 0)
        batch["text_ids"], batch["text_ids_mask"] = _pad([it["text_ids"] for it in items], torch.long)
    return batch


def padding_efficiency(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """Real samples / padded samples over `batches` (lists of indices into `lengths`)."""
    real = padded = 0
    for b in batches:
        ls = [int(lengths[i]) for i in b]
        if not ls:
            continue
        real += sum(ls)
        padded += len(ls) * max(ls)
    if padded == 0:
        raise ValueError("padding_efficiency: no items")
    return real / padded


def micro_batch_samples(max_batch_seconds: float, accumulate: int, sample_rate: int) -> int:
    """Padded samples per micro-batch when `max_batch_seconds` of audio make one optimizer step in
    `accumulate` micro-batches (TAPT's and P-TAPT step (c)'s dynamic batches with gradient accumulation)."""
    if accumulate < 1:
        raise ValueError(f"accumulate_grad_batches must be >= 1, got {accumulate}")
    return int(max_batch_seconds * sample_rate / accumulate)


def _dist_info(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    if num_replicas is None or rank is None:
        if dist.is_available() and dist.is_initialized():
            num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
            rank = dist.get_rank() if rank is None else rank
        else:
            num_replicas = 1 if num_replicas is None else num_replicas
            rank = 0 if rank is None else rank
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
    return num_replicas, rank


class BucketBatchSampler(Sampler[list[int]]):
    """Length-bucketed batches of indices.

    Per epoch (shuffle=True): items are sorted by length and cut into `num_buckets` equal-count
    buckets; each bucket is shuffled; the buckets are laid end to end and cut into batches (so a
    batch holds neighbours in length); the batch order is shuffled. With shuffle=False the batches
    follow ascending length (evaluation). Batches hold `batch_size` items, or, with
    `max_batch_samples`, as many as fit with padded size (items x longest) <= the budget (an item
    longer than the budget gets a batch of its own).

    Distributed: `num_replicas`/`rank` default to torch.distributed's when it is initialised.
    The batch list is cut (drop_last) or wrapped around (else, repeating a few batches, as
    DistributedSampler does) to a multiple of the world size; rank r takes batches r, r+W, ...
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int | None = None,
        max_batch_samples: int | None = None,
        num_buckets: int = 50,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        if (batch_size is None) == (max_batch_samples is None):
            raise ValueError("BucketBatchSampler: give exactly one of batch_size or max_batch_samples")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_batch_samples is not None and max_batch_samples < 1:
            raise ValueError(f"max_batch_samples must be >= 1, got {max_batch_samples}")
        if num_buckets < 1:
            raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
        if len(lengths) == 0:
            raise ValueError("BucketBatchSampler: no items")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.max_batch_samples = max_batch_samples
        self.num_buckets = min(num_buckets, len(lengths))
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        # Resolved when batches are drawn, not now: samplers are often built before Lightning
        # starts the process group (TAPT / P-TAPT build theirs before the Trainer).
        self._replicas_arg, self._rank_arg = num_replicas, rank
        _dist_info(num_replicas, rank)  # validate explicit values early
        self.epoch = 0
        self._cache: tuple[tuple[int, int, int], list[list[int]]] | None = None
        # Stable sort: ties keep index order, so the result does not depend on the platform.
        self._sorted = np.argsort(self.lengths, kind="stable")

    # Lightning calls set_epoch on `dataloader.batch_sampler.sampler` (lightning_fabric
    # _set_sampler_epoch), not on the batch sampler itself: point that attribute here.
    @property
    def num_replicas(self) -> int:
        return _dist_info(self._replicas_arg, self._rank_arg)[0]

    @property
    def rank(self) -> int:
        return _dist_info(self._replicas_arg, self._rank_arg)[1]

    @property
    def sampler(self) -> BucketBatchSampler:
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _chunk(self, order: np.ndarray) -> list[list[int]]:
        if self.batch_size is not None:
            bs = self.batch_size
            batches = [order[i:i + bs].tolist() for i in range(0, len(order), bs)]
            if self.drop_last and len(batches[-1]) < bs:
                batches.pop()
            return batches
        batches, cur, cur_max = [], [], 0
        for i in order.tolist():
            n = int(self.lengths[i])
            new_max = max(cur_max, n)
            if cur and new_max * (len(cur) + 1) > self.max_batch_samples:
                batches.append(cur)
                cur, new_max = [], n
            cur.append(i)
            cur_max = new_max
        if cur:
            batches.append(cur)
        return batches

    def all_batches(self, epoch: int | None = None) -> list[list[int]]:
        """Every batch of the epoch, before sharding across ranks."""
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return self._chunk(self._sorted)
        rng = np.random.default_rng([self.seed, epoch])
        buckets = np.array_split(self._sorted, self.num_buckets)
        order = np.concatenate([rng.permutation(b) for b in buckets])
        batches = self._chunk(order)
        perm = rng.permutation(len(batches))
        return [batches[j] for j in perm]

    def rank_batches(self, epoch: int | None = None) -> list[list[int]]:
        """This rank's batches for the epoch (the same count on every rank)."""
        epoch = self.epoch if epoch is None else epoch
        w, rank = _dist_info(self._replicas_arg, self._rank_arg)
        if self._cache is not None and self._cache[0] == (epoch, w, rank):
            return self._cache[1]
        batches = self.all_batches(epoch)
        if w > 1 and len(batches) % w:
            if self.drop_last and len(batches) >= w:
                batches = batches[: len(batches) - len(batches) % w]
            else:
                need = w * math.ceil(len(batches) / w) - len(batches)
                batches = batches + [batches[i % len(batches)] for i in range(need)]
        mine = batches[rank::w]
        self._cache = ((epoch, w, rank), mine)
        return mine

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.rank_batches()

    def __len__(self) -> int:
        return len(self.rank_batches())
