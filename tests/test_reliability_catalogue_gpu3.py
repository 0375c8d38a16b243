"""Reliability catalogue, GPU-readiness round (issue 23): trainer settings that would crash or hang
on a multi-GPU machine are refused at load with one line naming the key, before anything is written.
The behaviours behind them have focused tests: tests/test_run.py (strategy and precision resolution,
2 CPU processes with the default strategy and LayerDrop), tests/test_cv.py (failure agreement across
ranks), tests/test_perf.py (peaks by GPU name, the same epoch keys on every rank)."""

from __future__ import annotations

import pytest
from helpers import TINY_CONFIGS, cli_error, write_toy_corpus

C = [x for f in TINY_CONFIGS for x in ("-c", str(f))]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_toy_corpus(tmp_path_factory.mktemp("catalogue_gpu3") / "toy", per_class=1)


@pytest.mark.parametrize("override, expect", [
    # a guard: refused on main too (by resolve_strategy, before anything was written), now at load
    ("trainer.strategy=ddp_spawn", "trainer.strategy"),
    # was: accepted; training ran in forked workers (it hung inside pytest here)
    ("trainer.strategy=ddp_fork", "trainer.strategy"),
    # was: trained until LayerDrop's first skipped layer: "parameters that were not used", exit 1
    ("trainer.strategy=ddp_find_unused_parameters_false", "trainer.strategy"),
    # was: Lightning's "Precision 'bf17-mixed' is invalid", naming no key
    ("trainer.precision=bf17-mixed", "trainer.precision"),
])
def test_trainer_settings_that_cannot_train_are_refused_at_load(manifest, tmp_path, capsys, catalogue,
                                                                override, expect):
    out = tmp_path / "runs"
    cli_error(capsys, catalogue, f"train {override}",
              ["train", *C, f"data.manifest={manifest}", f"output_dir={out}", "--session", "1", override], expect)
    assert not out.exists()  # nothing written
