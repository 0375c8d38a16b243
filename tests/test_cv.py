"""The cross-validation runner: skips finished runs, survives a failed run, writes Table 11."""

import json

import pytest
from helpers import write_toy_corpus

from mmser.card import CV_HEADING, model_card
from mmser.config import Config, ConfigError, load_config
from mmser.io import atomic_write_json
from mmser.training import cv as cvmod


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """run_cv checks the sessions and folds against a manifest before anything else."""
    return write_toy_corpus(tmp_path_factory.mktemp("toy"), per_class=1, with_unlabelled=False)


def _fake_run_one(calls, fail=()):
    """A stand-in for run_one that writes a metrics.json whose UA depends on (session, seed)."""

    def run_one(cfg, test_session, seed, run_dir):
        calls.append((test_session, seed))
        if (test_session, seed) in fail:
            raise RuntimeError("boom")
        value = 0.5 + 0.1 * test_session + 0.01 * seed
        m = {"test_session": test_session, "seed": seed,
             "test": {"ua": value, "wa": value - 0.05, "macro_f1": value - 0.1},
             "test_improvised": {"ua": value - 0.2}}
        atomic_write_json(run_dir / "metrics.json", m)
        (run_dir / "model").mkdir(parents=True, exist_ok=True)
        (run_dir / "model" / "README.md").write_text(model_card({"task": "audio", "classes": ["neu"]}, m))
        return m

    return run_one


def test_runs_all_then_skips_finished_and_reports_failures(tmp_path, manifest):
    calls = []
    cfg = load_config(overrides=["experiment=toy", f"data.manifest={manifest}"])
    out = tmp_path / "toy"
    s = cvmod.run_cv(cfg, sessions=[1, 2], seeds=[0, 1], out_dir=out, command="mmser cv toy",
                     run_fn=_fake_run_one(calls, fail={(2, 1)}))
    assert sorted(calls) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert sorted(s.completed) == [(1, 0), (1, 1), (2, 0)]
    assert [(f["session"], f["seed"]) for f in s.failed] == [(2, 1)]
    assert "RuntimeError: boom" in (out / "s2-seed1" / "error.txt").read_text()
    assert json.loads((out / "failures.json").read_text())[0]["error"] == "RuntimeError: boom"
    # Table 11: S1 = mean(0.6, 0.61) = 60.5±0.5; S2 has one run = 70.0±0.0; avg = 65.25 -> 65.2
    md = (out / "summary.md").read_text()
    assert "mmser cv toy" in md
    assert "| toy | 60.5±0.5 (n=2) | 70.0±0.0 (n=1) | 65.2 | 3 |" in md
    assert "1 run(s) failed" in md
    csv_text = (out / "summary.csv").read_text()
    assert "toy,UA,1,0.605" in csv_text and "toy,UA (improvised only),avg," in csv_text
    assert (out / "summary_ua.png").stat().st_size > 0

    # Second invocation: only the failed run is attempted again.
    calls.clear()
    s2 = cvmod.run_cv(cfg, sessions=[1, 2], seeds=[0, 1], out_dir=out, run_fn=_fake_run_one(calls))
    assert calls == [(2, 1)]
    assert sorted(s2.skipped) == [(1, 0), (1, 1), (2, 0)] and not s2.failed
    assert not (out / "failures.json").exists()
    assert "| toy | 60.5±0.5 (n=2) | 70.5±0.5 (n=2) | 65.5 | 4 |" in s2.markdown

    # Every fold's model card carries the whole cross-validation (UA and WA), once, up to date.
    cards = sorted(out.glob("s*-seed*/model/README.md"))
    assert len(cards) == 4
    for card in cards:
        text = card.read_text()
        assert text.count(CV_HEADING) == 1 and text.index(CV_HEADING) < text.index("## Use")
        assert "| toy | 60.5±0.5 (n=2) | 70.5±0.5 (n=2) | 65.5 | 4 |" in text  # UA, after the resume
        assert "| toy | 55.5±0.5 (n=2) | 65.5±0.5 (n=2) | 60.5 | 4 |" in text  # WA = UA - 5 points
        assert "70.0±0.0 (n=1)" not in text  # the first pass's table was replaced


def test_refuses_to_mix_configs_in_one_folder(tmp_path, manifest):
    out, fake, data = tmp_path / "exp", _fake_run_one([]), f"data.manifest={manifest}"
    cvmod.run_cv(load_config(overrides=["experiment=exp", data]), sessions=[1], seeds=[0], out_dir=out,
                 run_fn=fake)
    with pytest.raises(ConfigError, match="finetune.lr"):
        cvmod.run_cv(load_config(overrides=["experiment=exp", data, "finetune.lr=0.5"]),
                     sessions=[1], seeds=[0], out_dir=out, run_fn=fake)
    # A volatile field (W&B mode) does not count as another config.
    cvmod.run_cv(load_config(overrides=["experiment=exp", data, "tracking.wandb=disabled"]),
                 sessions=[1], seeds=[0], out_dir=out, run_fn=fake)


def test_parse_ranges():
    from mmser.cli import parse_range, parse_seeds

    assert parse_range("1-5") == [1, 2, 3, 4, 5]
    assert parse_range("1,3") == [1, 3]
    assert parse_seeds("3") == [0, 1, 2]
    assert parse_seeds("3-4") == [3, 4]
    assert isinstance(Config(), Config)


def test_compare_command_writes_one_row_per_experiment(tmp_path, capsys):
    from mmser.cli import main

    for name, base in (("a", 0.5), ("b", 0.6)):
        for s in (1, 2):
            atomic_write_json(tmp_path / name / f"s{s}-seed0" / "metrics.json",
                              {"test_session": s, "seed": 0, "test": {"ua": base + s / 100}})
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")]) == 0
    md = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| a | 51.0±0.0 (n=1) | 52.0±0.0 (n=1) | 51.5 | 2 |" in md
    assert "| b | 61.0±0.0 (n=1) | 62.0±0.0 (n=1) | 61.5 | 2 |" in md
    assert (tmp_path / "cmp" / "comparison_ua.png").exists()
    assert main(["compare", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "no such experiment folder" in capsys.readouterr().err
