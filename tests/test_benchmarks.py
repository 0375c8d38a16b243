"""Smoke test of benchmarks/masking.py (a figure, not a test of its numbers)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for benchmarks/

from benchmarks.masking import main  # noqa: E402


def test_masking_benchmark_smoke(tmp_path: Path, capsys) -> None:
    out = tmp_path / "masking.json"
    result = main(["--n-utterances", "300", "--epochs", "1", "--seed", "1", "--out", str(out)])
    printed = json.loads(capsys.readouterr().out.strip())
    assert printed == result == json.loads(out.read_text())
    for key in ("reference_vft", "mmser_vft", "reference_tapt", "mmser_tapt"):
        assert 0.0 < result[key] < 1.0, (key, result[key])
