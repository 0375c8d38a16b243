"""The demo's plan (issue 12 item 6): a start-up estimate for every experiment of its grid, and cv
commands that a user can paste (packaged config names, resolvable from an installed wheel)."""

from __future__ import annotations

import shlex
from pathlib import Path

from mmser.config import load_config, to_dict
from mmser.demo import CONFIGS, MEASURED_S, estimate_seconds, experiments


def test_every_experiment_of_the_grid_has_a_measured_time():
    names = [e.name for e in experiments(Path("asr.jsonl"), Path("runs/vft"))]
    assert set(names) <= set(MEASURED_S), sorted(set(names) - set(MEASURED_S))


def test_estimate_scales_training_with_seeds_and_everything_with_corpus_size():
    one = estimate_seconds(["vft", "fusion-concat-asr"], seeds=1, per_class=4)
    two = estimate_seconds(["vft", "fusion-concat-asr"], seeds=2, per_class=4)
    assert two["vft"] == 2 * one["vft"] and two["asr"] == one["asr"]
    small = estimate_seconds(["vft"], seeds=1, per_class=2)
    assert small["vft"] == one["vft"] / 2 and small["asr"] == one["asr"] / 2
    assert set(one) == {"synthesize", "prepare", "asr", "vft", "fusion-concat-asr", "predict"}


def test_the_printed_config_names_resolve_to_packaged_configs():
    for exp in experiments(Path("asr.jsonl"), Path("runs/vft")):
        names = [f.removesuffix(".yaml") for f in exp.files]
        overrides = ["data.manifest=m.jsonl", *exp.overrides]
        by_name = to_dict(load_config(*names, overrides=overrides))
        assert by_name == to_dict(load_config(*(CONFIGS / f for f in exp.files), overrides=overrides)), exp.name
        assert all(shlex.quote(n) == n for n in names)


def test_only_the_asr_experiments_need_the_transcription():
    from mmser.demo import needs_asr

    grid = {e.name: needs_asr(e) for e in experiments(Path("asr.jsonl"), Path("runs/vft"))}
    assert {n for n, v in grid.items() if v} == {n for n in grid if n.endswith("-asr")}
    assert {"text-asr", "fusion-concat-asr", "whisper-concat-asr"} <= set(grid) and not grid["vft"]
