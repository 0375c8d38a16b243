"""The random draws of one pre-training micro-batch (TAPT / P-TAPT masks and negatives), per rank.

`seed_everything(seed)` seeds torch's and numpy's global RNGs identically on every process, so
under DDP every rank drew the same time masks and negatives from them (the masks are drawn on the
CPU): W ranks trained on W batches masked at the same positions. Here each draw takes its own
stream, seeded from (stage seed, global rank, micro-batch number): different on every rank,
independent of anything else that uses the global RNGs (dropout, data order), and the same after a
resume (the micro-batch number is Lightning's fetched-batch count, restored from the checkpoint).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def step_rng(seed: int, rank: int, draw: int) -> Iterator[None]:
    """Inside the block torch's CPU generator and numpy's global RNG are seeded from (seed, rank,
    draw); both are restored afterwards (CUDA generators are not touched)."""
    torch_seed, np_seed = np.random.SeedSequence([int(seed), int(rank), int(draw)]).generate_state(2)
    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(int(torch_seed))
        np.random.seed(int(np_seed))
        try:
            yield
        finally:
            np.random.set_state(np_state)


def micro_batch_number(module) -> int:
    """Micro-batches fetched so far in this fit (Lightning's count, restored on resume), for `step_rng`
    in `on_before_batch_transfer` (called just before the count is incremented)."""
    return int(module.trainer.fit_loop.epoch_loop.batch_progress.total.ready)
