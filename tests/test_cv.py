"""The cross-validation runner: skips finished runs, survives a failed run, writes Table 11."""

import json
from pathlib import Path

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


# -- several processes (issue 23 item 8) --------------------------------------------------------------


def _cv_rank(rank: int, world: int, init_file: str, manifest: str, out: str, fail_rank: int | None,
             report: str) -> None:
    """One rank of a 2-process `run_cv` over gloo. Each fake run does a collective, as a real run's DDP
    gradient all-reduce does; on `fail_rank` the first run raises before it (an out-of-memory on the
    rank with the longest bucket). Writes what it attempted and how it ended to `report`."""
    import datetime
    import traceback

    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    attempted: list = []

    def run_fn(cfg, test_session, seed, run_dir):
        attempted.append([test_session, seed])
        if rank == fail_rank and len(attempted) == 1:
            raise RuntimeError(f"injected failure on rank {rank}")
        total = torch.ones(1)
        dist.all_reduce(total)  # the run's collectives
        if rank == 0:  # rank 0 writes the run's outputs, as run_one does
            atomic_write_json(run_dir / "metrics.json", {"test_session": test_session, "seed": seed,
                                                         "test": {"ua": float(total)}})
        return {}

    outcome = "returned"
    try:
        cfg = load_config(overrides=["experiment=ddp", f"data.manifest={manifest}", "tracking.wandb=disabled"])
        cvmod.run_cv(cfg, sessions=[1, 2], seeds=[0], out_dir=Path(out) / f"rank{rank}", run_fn=run_fn)
    except Exception as e:  # noqa: BLE001 - the outcome is what the test checks
        outcome = f"{type(e).__name__}: {e}"
        traceback.print_exc()
    Path(report).write_text(json.dumps({"attempted": attempted, "outcome": outcome}))
    # exits without a barrier: a failed rank's process ends, as a real one does after re-raising


def _run_ranks(tmp_path, manifest, fail_rank):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    reports = [tmp_path / f"report{r}.json" for r in range(2)]
    procs = [ctx.Process(target=_cv_rank, args=(r, 2, str(tmp_path / "pg"), str(manifest), str(tmp_path / "out"),
                                                 fail_rank, str(reports[r]))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=150)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, f"rank(s) {hung} still running after 150 s: the ranks desynchronised"
    return [json.loads(r.read_text()) for r in reports]


def test_a_failed_run_on_one_rank_stops_every_rank_of_a_multi_process_cv(tmp_path, manifest):
    """Rank 1 fails its first run while rank 0 waits in that run's collective: on main rank 1 went on to
    the next run, whose collective rank 0 took for the first run's (the ranks trained different runs
    together). Now the failed rank re-raises, rank 0's collective fails with it, and both stop at the
    failed run."""
    r0, r1 = _run_ranks(tmp_path, manifest, fail_rank=1)
    assert r1["attempted"] == [[1, 0]] and r1["outcome"] == "RuntimeError: injected failure on rank 1"
    assert r0["attempted"] == [[1, 0]] and r0["outcome"] != "returned", r0
    assert not (tmp_path / "out" / "rank0" / "s1-seed0" / "metrics.json").exists()
    assert "injected failure" in (tmp_path / "out" / "rank1" / "s1-seed0" / "error.txt").read_text()


def test_a_multi_process_cv_without_failures_runs_every_run_on_every_rank(tmp_path, manifest):
    """The agreement after each run (an all-reduce of a failure flag) lets every run through when none failed."""
    r0, r1 = _run_ranks(tmp_path, manifest, fail_rank=None)
    assert r0 == r1 == {"attempted": [[1, 0], [2, 0]], "outcome": "returned"}
    assert json.loads((tmp_path / "out" / "rank0" / "s2-seed0" / "metrics.json").read_text())["test"]["ua"] == 2.0


def test_failed_on_any_rank_is_the_local_flag_without_a_process_group():
    assert cvmod.failed_on_any_rank(True) is True and cvmod.failed_on_any_rank(False) is False
