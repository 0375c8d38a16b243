"""Console output (issue 12 item 4): third-party chatter only with -v, -q keeps results and errors,
and one log line per training epoch where no progress bar shows."""

from __future__ import annotations

import io
import logging
import warnings
from types import SimpleNamespace

import pytest

from mmser import cli
from mmser.logs import DEFAULT, QUIET, VERBOSE, configure_logging
from mmser.training.progress import EpochLog, epoch_line


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    with warnings.catch_warnings():  # pytest's own filters (ignore DeprecationWarning) out of the way
        warnings.resetwarnings()
        warnings.simplefilter("always")
        yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _emit(verbosity: int) -> str:
    out = io.StringIO()
    configure_logging(verbosity, stream=out)
    logging.getLogger("pytorch_lightning.utilities.rank_zero").info("GPU available: False, used: False")
    logging.getLogger("pytorch_lightning.utilities.rank_zero").info("Tip: try installing litlogger")
    logging.getLogger("lightning_fabric.utilities.seed").info("Seed set to 0")
    logging.getLogger("pytorch_lightning.trainer").warning("a real Lightning warning")
    logging.getLogger("mmser.training.run").info("run: test UA 0.5")
    logging.getLogger("mmser.cli").error("a real error")
    with warnings.catch_warnings(record=True) as caught:
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated", DeprecationWarning, stacklevel=1)
        warnings.warn("Found 65 module(s) in eval mode at the start of training. This may lead to unexpected "
                      "behavior during training.", UserWarning, stacklevel=1)
        warnings.warn("something else", UserWarning, stacklevel=1)
    return out.getvalue() + "".join(f"WARNING {w.message}\n" for w in caught)


def test_default_output_drops_library_info_and_the_leafspec_warning(restore_logging):
    text = _emit(DEFAULT)
    assert "GPU available" not in text and "litlogger" not in text and "Seed set" not in text
    assert "LeafSpec" not in text and "in eval mode" not in text
    for kept in ("a real Lightning warning", "run: test UA 0.5", "a real error", "something else"):
        assert kept in text


def test_verbose_brings_everything_back(restore_logging):
    text = _emit(VERBOSE)
    for kept in ("GPU available", "litlogger", "Seed set", "LeafSpec", "in eval mode", "run: test UA 0.5"):
        assert kept in text


def test_quiet_keeps_only_errors(restore_logging):
    text = _emit(QUIET)
    assert "a real error" in text
    for dropped in ("GPU available", "run: test UA 0.5", "a real Lightning warning", "something else", "LeafSpec"):
        assert dropped not in text


@pytest.mark.parametrize("flags, expected", [([], DEFAULT), (["-v"], VERBOSE), (["-q"], QUIET)])
def test_cli_flags_choose_the_verbosity(monkeypatch, capsys, flags, expected):
    seen = []
    monkeypatch.setattr(cli, "configure_logging", lambda v: seen.append(v))
    assert cli.main([*flags, "config", "list"]) == 0
    assert seen == [expected]
    assert "vft" in capsys.readouterr().out  # results still print under -q


def test_epoch_line():
    line = epoch_line(2, 10, {"train/loss_epoch": 1.23456, "train/loss": 9.0, "val/ua": 0.5}, 3.2)
    assert line == "epoch 2/10: loss 1.2346, val UA 0.5000, 3.2 s/epoch, ETA 0m26s"
    assert epoch_line(3, 3, {"train/loss_epoch": 0.5}, 1.0) == "epoch 3/3: loss 0.5000, 1.0 s/epoch"


def test_epoch_log_logs_once_per_epoch_without_a_progress_bar(caplog):
    trainer = SimpleNamespace(is_global_zero=True, progress_bar_callback=None, current_epoch=0, max_epochs=2,
                              callback_metrics={"train/loss_epoch": 0.7})
    cb = EpochLog()
    with caplog.at_level(logging.INFO, logger="mmser.training"):
        cb.on_train_epoch_start(trainer, None)
        cb.on_train_epoch_end(trainer, None)
    (record,) = [r for r in caplog.records if r.name == "mmser.training"]
    assert record.getMessage().startswith("epoch 1/2: loss 0.7000, ")


def test_every_trainer_gets_the_epoch_log(tmp_path):
    from helpers import tiny_config

    from mmser.training.run import make_trainer

    trainer = make_trainer(tiny_config(tmp_path), logger=False, enable_checkpointing=False)
    assert any(isinstance(c, EpochLog) for c in trainer.callbacks)
