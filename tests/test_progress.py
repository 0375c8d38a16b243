"""Progress of long stages (issue 12 item 4): a tqdm bar on a terminal, otherwise one log line per ~10%."""

from __future__ import annotations

import logging

import pytest
import torch

from mmser.progress import Progress, progress_mode, track


def _lines(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "mmser.progress"]


def test_log_mode_writes_one_line_per_tenth_and_the_last(caplog):
    caplog.set_level(logging.INFO, logger="mmser.progress")
    assert list(track(range(25), desc="work", unit="utt", mode="log")) == list(range(25))
    lines = _lines(caplog)
    # 25 items, a line every round(2.5) = 2 items... at 2, 4, ..., 24 and at 25 (the end)
    assert [int(x.split(": ")[1].split("/")[0]) for x in lines] == [*range(2, 25, 2), 25]
    assert lines[-1].startswith("work: 25/25 utt (100%), ") and "elapsed" in lines[-1]
    assert "left" in lines[0] and "left" not in lines[-1]


def test_bulk_updates_log_once_per_threshold_crossed(caplog):
    caplog.set_level(logging.INFO, logger="mmser.progress")
    with Progress(100, "batches", mode="log") as p:
        for _ in range(4):
            p.update(25)
    assert [x.split(": ")[1].split(" ")[0] for x in _lines(caplog)] == ["25/100", "50/100", "75/100", "100/100"]


def test_off_and_bar_modes_log_nothing(caplog, capsys):
    caplog.set_level(logging.INFO, logger="mmser.progress")
    list(track(range(10), desc="quiet", mode="off"))
    list(track(range(10), desc="bar", mode="bar"))  # tqdm draws on stderr instead
    assert _lines(caplog) == []
    assert "bar" in capsys.readouterr().err


def test_mode_follows_the_terminal_and_the_environment(monkeypatch):
    monkeypatch.delenv("MMSER_PROGRESS", raising=False)
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    assert progress_mode() == "bar"
    monkeypatch.setattr("sys.stderr.isatty", lambda: False, raising=False)
    assert progress_mode() == "log"
    monkeypatch.setenv("MMSER_PROGRESS", "off")
    assert progress_mode() == "off"


def test_kmeans_reports_its_iterations(caplog, monkeypatch):
    from mmser.training.ptapt.clustering import kmeans

    monkeypatch.setenv("MMSER_PROGRESS", "log")
    caplog.set_level(logging.INFO, logger="mmser.progress")
    kmeans(torch.randn(200, 4), 5, iters=10, seed=0, desc="k-means K=5")
    lines = _lines(caplog)
    assert len(lines) == 10 and lines[-1].startswith("k-means K=5: 10/10 iter (100%)")
    caplog.clear()
    kmeans(torch.randn(200, 4), 5, iters=10, seed=0)  # no desc: silent (inner use, tests)
    assert _lines(caplog) == []


@pytest.mark.parametrize("flag, tty, expected", [(None, True, True), (None, False, False), (False, True, False),
                                                  (True, False, True)])
def test_training_progress_bar_follows_the_terminal_unless_set(monkeypatch, flag, tty, expected):
    from mmser.config import load_config
    from mmser.training.run import trainer_kwargs

    monkeypatch.setattr("sys.stderr.isatty", lambda: tty, raising=False)
    cfg = load_config("vft", overrides=[f"trainer.enable_progress_bar={'null' if flag is None else flag}"])
    assert trainer_kwargs(cfg)["enable_progress_bar"] is expected
