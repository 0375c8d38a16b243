"""Reliability catalogue, the protocol switches of round 3 (P-TAPT validation batches, per-stage
bucketing, k-means' empty-cluster rule, gradient accumulation): a bad value is one line naming the
key, through the real CLI, before anything is trained or written."""

from __future__ import annotations

import pytest
from helpers import TINY_CONFIGS, cli_error, write_toy_corpus

C = [x for f in TINY_CONFIGS for x in ("-c", str(f))]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_toy_corpus(tmp_path_factory.mktemp("r3p") / "toy", per_class=1, durations=(0.3, 0.4))


@pytest.mark.parametrize("override, key", [  # the key and its allowed values (not "unknown key")
    ("tapt.accumulate_grad_batches=0", "tapt.accumulate_grad_batches: must be >= 1"),
    ("ptapt.accumulate_grad_batches=-2", "ptapt.accumulate_grad_batches: must be >= 1"),
    ("tapt.num_buckets=0", "tapt.num_buckets: must be >= 1"),
    ("ptapt.num_buckets=0", "ptapt.num_buckets: must be >= 1"),
    ("ptapt.frame_val_batches=random", "ptapt.frame_val_batches: expected one of ['reference', 'reference-redrawn'"),
    ("ptapt.kmeans_empty=drop", "ptapt.kmeans_empty: expected one of ['split', 'reseed']"),
])
def test_bad_protocol_switches(manifest, tmp_path, capsys, catalogue, override, key):
    out = tmp_path / "runs"
    cli_error(capsys, catalogue, f"cv -c ptapt {override}",
              ["cv", *C, "-c", "ptapt", f"data.manifest={manifest}", f"output_dir={out}", override], key)
    assert not out.exists()  # nothing written
