"""Smoke test of benchmarks/kmeans_empty.py (a figure, not a test of its numbers), tiny sizes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for benchmarks/

from benchmarks.kmeans_empty import main, synthetic_frames  # noqa: E402


def test_kmeans_empty_benchmark_smoke(tmp_path: Path) -> None:
    x = synthetic_frames(1000, 8, seed=0)
    assert x.shape == (1000, 8) and (x >= -0.5).all() and (x == x).all()
    out = tmp_path / "k.json"
    result = main(["--frames", "1500", "--dim", "8", "--k", "64", "--iters", "3", "--duplicates", "0.2",
                   "--runs", "random:split,random:reseed", "--out", str(out)])
    assert json.loads(out.read_text())["runs"] == result["runs"]
    for run in result["runs"]:
        assert len(run["per_iter"]) == 3 and run["empty_clusters"] == sum(run["per_iter"])
    # 300 identical frames: random starts put several centroids on them, all but one empty at once
    assert result["runs"][0]["per_iter"][0] > 0
