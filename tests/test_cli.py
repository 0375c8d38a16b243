"""The command line: options and key=value overrides in any order, --version, and every failure as
one line `mmser: error: ...` (traceback only with --debug / MMSER_DEBUG=1) with its exit code.

Stage functions are replaced by fakes that raise the errors seen in the wild (a read-only output
folder, a refused or damaged checkpoint, ...): what is under test is the CLI's handling, in-process.
The training modules are faked in sys.modules, so these tests never import
Lightning or transformers (16 s on the 2-core dev machine). One subprocess test checks the real entry point.
"""

from __future__ import annotations

import pickle
import shlex
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest

from mmser import __version__
from mmser.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TINY = ["-c", str(CONFIGS / "base.yaml"), "-c", str(CONFIGS / "vft.yaml"), "-c", str(CONFIGS / "tiny.yaml")]


def _manifest(path: Path) -> Path:
    """A valid manifest (2 actors x 4 classes per session; no audio: these commands never read it)."""
    import json

    lines = []
    for s in range(1, 6):
        for g in "FM":
            for k, (code, label) in enumerate([("ang", "angry"), ("hap", "happy"), ("neu", "neutral"), ("sad", "sad")]):
                uid = f"Ses{s:02d}{g}_impro01_{g}{k:03d}"
                lines.append(json.dumps({
                    "id": uid, "path": f"/nonexistent/{uid}.wav", "session": s, "speaker": f"Ses{s:02d}{g}",
                    "gender": g, "dialog": f"Ses{s:02d}{g}_impro01", "scripted": False, "emotion_code": code,
                    "label": label, "transcript": "words", "duration": 1.0}))
    path.write_text("\n".join(lines) + "\n")
    return path


def _one_error_line(err: str) -> str:
    """The single stderr line, checked to be `mmser: error: ...` with no traceback."""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("mmser: error: ") and "Traceback" not in err, err
    return lines[0][len("mmser: error: "):]


def _fake_module(monkeypatch, name: str, **attrs) -> None:
    """Install a stand-in module `name` (restored after the test)."""
    monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**attrs))


@pytest.fixture
def fake_train(monkeypatch):
    """`mmser train` with run_task faked: records the config; `.error` (an exception, or a function
    that raises) makes it fail."""
    calls = SimpleNamespace(cfgs=[], error=None)

    def run_task(cfg, test_session, seed, run_dir):
        calls.cfgs.append(cfg)
        if isinstance(calls.error, (BaseException, type)):
            raise calls.error
        if calls.error is not None:
            calls.error()
        return {"test": {"ua": 0.5, "wa": 0.5}}

    _fake_module(monkeypatch, "mmser.training.multimodal", run_task=run_task)
    _fake_module(monkeypatch, "mmser.training.run",
                 default_run_dir=lambda cfg, session, seed: Path(cfg.output_dir) / f"s{session}-seed{seed}")
    return calls


@pytest.fixture
def fake_cv(monkeypatch):
    """`mmser cv` with run_cv faked: records its arguments; `.error` makes it raise that."""
    calls = SimpleNamespace(seen={}, error=None)

    def run_cv(cfg, sessions, seeds, out_dir, command):
        calls.seen.update(cfg=cfg, sessions=sessions, seeds=seeds, out_dir=out_dir)
        if calls.error is not None:
            raise calls.error
        return SimpleNamespace(markdown="table", failed=[])

    _fake_module(monkeypatch, "mmser.training.cv", run_cv=run_cv)
    return calls


# --------------------------------------------------------------------------------------------
# Argument order, --version
# --------------------------------------------------------------------------------------------


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"mmser {__version__}"


def test_train_takes_options_and_overrides_in_any_order(fake_train, tmp_path):
    argv = ["train", "-c", str(CONFIGS / "base.yaml"), "finetune.epochs=3", "--session", "2",
            "data.batch_size=4", "-c", str(CONFIGS / "vft.yaml"), "--seed", "1", f"output_dir={tmp_path}",
            "-c", str(CONFIGS / "tiny.yaml"), "finetune.lr=0.01"]
    assert main(argv) == 0
    (cfg,) = fake_train.cfgs
    assert (cfg.finetune.epochs, cfg.data.batch_size, cfg.finetune.lr) == (3, 4, 0.01)
    assert cfg.encoder.name == "random"  # tiny.yaml, given after the overrides, was loaded
    assert cfg.data.eval_batch_size == 16 and cfg.output_dir == str(tmp_path)
    # the model card of this run quotes the command line it was trained with
    from mmser.provenance import command

    assert command() == shlex.join(["mmser", *argv])


def test_cv_and_folds_take_overrides_anywhere(fake_cv, tmp_path, capsys):
    assert main(["cv", "finetune.epochs=2", "--sessions", "1-2", *TINY, "experiment=x", "--seeds", "1",
                 f"output_dir={tmp_path}"]) == 0
    seen = fake_cv.seen
    assert seen["cfg"].finetune.epochs == 2 and seen["cfg"].experiment == "x"
    assert seen["cfg"].encoder.name == "random"  # -c files after an override still load
    assert seen["sessions"] == [1, 2] and seen["seeds"] == [0] and seen["out_dir"] == tmp_path / "x"

    manifest = _manifest(tmp_path / "manifest.jsonl")
    capsys.readouterr()
    # an override before the positional manifest, a -c after it
    assert main(["folds", "data.validation=speaker", str(manifest), "-c", str(CONFIGS / "base.yaml")]) == 0
    assert "| 1 | val (Ses02F) |" in capsys.readouterr().out


def test_a_token_that_is_no_override_is_an_argparse_error(fake_train, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--session", "1", "finetune.epochs=2", "stray"])
    assert e.value.code == 2
    assert "mmser train: error: unrecognized arguments: stray" in capsys.readouterr().err
    assert not fake_train.cfgs


def test_an_option_value_shaped_like_an_override_stays_the_options(fake_train, tmp_path):
    odd = tmp_path / "a=b.yaml"  # -c's value, not an override
    odd.write_text("finetune:\n  epochs: 4\n")
    assert main(["train", "--session", "1", "-c", str(odd), f"output_dir={tmp_path}"]) == 0
    assert fake_train.cfgs[0].finetune.epochs == 4


# --------------------------------------------------------------------------------------------
# Config errors: one line, before anything is written
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, message", [
    ("finetune.epochs=0", "override 'finetune.epochs=0': finetune.epochs: must be >= 1, got 0"),
    ("finetune.lr=0", "override 'finetune.lr=0': finetune.lr: must be > 0, got 0.0"),
    ("data.train_crop_s=-0.1", "override 'data.train_crop_s=-0.1': data.train_crop_s: must be > 0, got -0.1"),
])
def test_a_bad_config_is_one_line_and_nothing_is_written(tmp_path, capsys, override, message):
    manifest = _manifest(tmp_path / "manifest.jsonl")
    out = tmp_path / "runs"
    rc = main(["train", *TINY, f"data.manifest={manifest}", f"output_dir={out}", override, "--session", "1"])
    assert rc == 2
    assert _one_error_line(capsys.readouterr().err) == message
    assert not out.exists()  # no config.yaml (or anything else) saved before the check


def test_a_bad_pretraining_schedule_fails_before_the_pretraining_stage(tmp_path, capsys):
    out = tmp_path / "runs"
    rc = main(["train", *TINY, "-c", str(CONFIGS / "tapt.yaml"), "--session", "1", f"output_dir={out}",
               "tapt.total_steps=50"])
    assert rc == 2
    assert "tapt.warmup_steps + tapt.hold_steps must be <= tapt.total_steps" in _one_error_line(capsys.readouterr().err)
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# Other failures: one line naming the file, exit codes
# --------------------------------------------------------------------------------------------


def test_read_only_output_folders_are_one_line(monkeypatch, fake_cv, tmp_path, capsys):
    import mmser.data.iemocap as iemocap
    import mmser.text.transcribe as transcribe

    def denied(path):
        def fail(*a, **k):
            raise PermissionError(13, "Permission denied", str(path))
        return fail

    monkeypatch.setattr(iemocap, "prepare_iemocap", denied(tmp_path / "ro" / "manifest.jsonl"))
    assert main(["prepare", "iemocap", str(tmp_path), "--out", str(tmp_path / "ro")]) == 2
    assert _one_error_line(capsys.readouterr().err) == f"{tmp_path / 'ro' / 'manifest.jsonl'}: Permission denied"

    monkeypatch.setattr(transcribe, "transcribe_manifest", denied(tmp_path / "ro" / "asr.jsonl"))
    assert main(["transcribe", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "ro" / "asr.jsonl")]) == 2
    assert _one_error_line(capsys.readouterr().err) == f"{tmp_path / 'ro' / 'asr.jsonl'}: Permission denied"

    fake_cv.error = OSError(30, "Read-only file system", str(tmp_path / "ro" / "exp"))
    assert main(["cv", "--sessions", "1", f"output_dir={tmp_path / 'ro'}"]) == 2
    assert _one_error_line(capsys.readouterr().err) == f"{tmp_path / 'ro' / 'exp'}: Read-only file system"


class _RefusedGlobalError(pickle.UnpicklingError):
    """Stands in for mmser.models.safe_unpickle.RefusedGlobalError (same base, same message form;
    importing the real one imports torch)."""


def _unpickle(path):
    """A loader like torch.load: the failing call has the file as an argument, its message does not."""
    with open(path, "rb") as f:
        return pickle.load(f)


def test_refused_and_damaged_checkpoints_are_one_line_naming_the_file(fake_train, tmp_path, capsys):
    from safetensors.numpy import load_file

    argv = ["train", "--session", "1", f"output_dir={tmp_path}"]
    evil = tmp_path / "evil.pt"
    fake_train.error = _RefusedGlobalError(f"{evil}: refused to unpickle 'os.system': it is not on the\n"
                                           "allow-list of mmser.models.safe_unpickle")
    assert main(argv) == 2
    assert _one_error_line(capsys.readouterr().err) == \
        f"{evil}: refused to unpickle 'os.system': it is not on the allow-list of mmser.models.safe_unpickle"

    damaged = tmp_path / "last.ckpt"
    damaged.write_bytes(b"\x80\x04not a pickle")
    fake_train.error = lambda: _unpickle(damaged)
    with pytest.raises(pickle.UnpicklingError):
        fake_train.error()
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"{damaged}: not a readable checkpoint (UnpicklingError: "), line

    damaged = tmp_path / "model.safetensors"
    damaged.write_bytes(b"\xff" * 64)
    fake_train.error = lambda: load_file(str(damaged))
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"{damaged}: not a readable safetensors file (SafetensorError: "), line


@pytest.mark.slow
def test_real_refused_and_weights_only_checkpoints(fake_train, tmp_path, capsys):
    """The same with mmser's safe_torch_load and torch.load(weights_only=True) (imports torch)."""
    import torch

    from mmser.models.safe_unpickle import safe_torch_load

    crafted = tmp_path / "crafted.pt"
    torch.save({"x": SimpleNamespace(a=1)}, crafted)  # a global outside both allow-lists
    argv = ["train", "--session", "1", f"output_dir={tmp_path}"]
    fake_train.error = lambda: safe_torch_load(crafted)
    assert main(argv) == 2
    assert _one_error_line(capsys.readouterr().err).startswith(
        f"{crafted}: refused to unpickle 'types.SimpleNamespace'")
    fake_train.error = lambda: torch.load(crafted, weights_only=True)  # a multi-line message
    assert main(argv) == 2
    assert _one_error_line(capsys.readouterr().err).startswith(
        f"{crafted}: not a readable checkpoint (UnpicklingError: ")


def test_a_duplicate_utterance_id_is_one_line(tmp_path, capsys):
    manifest = _manifest(tmp_path / "manifest.jsonl")
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines + [lines[0]]) + "\n")
    rc = main(["folds", str(manifest)])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and str(manifest) in line


@pytest.mark.parametrize("error, code, message", [
    (ValueError("fold 1: an utterance is in two splits"), 2, "fold 1: an utterance is in two splits"),
    (FileNotFoundError("runs/x/metrics.json: no such file"), 2, "runs/x/metrics.json: no such file"),
    (ZeroDivisionError("division by zero"), 1,
     "unexpected ZeroDivisionError: division by zero (run with --debug for the traceback)"),
    (AssertionError("fold 1: an utterance\nis in two splits"), 1,
     "unexpected AssertionError: fold 1: an utterance is in two splits (run with --debug for the traceback)"),
])
def test_errors_are_one_line_with_their_exit_code(fake_train, tmp_path, capsys, error, code, message):
    fake_train.error = error
    assert main(["train", "--session", "1", f"output_dir={tmp_path}"]) == code
    assert _one_error_line(capsys.readouterr().err) == message


def test_keyboard_interrupt_exits_130(fake_train, tmp_path, capsys):
    fake_train.error = KeyboardInterrupt
    assert main(["train", "--session", "1", f"output_dir={tmp_path}"]) == 130
    assert capsys.readouterr().err == "mmser: interrupted\n"


@pytest.mark.parametrize("how", ["flag-last", "flag-first", "env"])
def test_debug_shows_the_traceback(fake_train, tmp_path, capsys, monkeypatch, how):
    fake_train.error = ZeroDivisionError("division by zero")
    argv = ["train", "--session", "1", f"output_dir={tmp_path}"]
    if how == "env":
        monkeypatch.setenv("MMSER_DEBUG", "1")
    argv = {"flag-last": argv + ["--debug"], "flag-first": ["--debug"] + argv, "env": argv}[how]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "ZeroDivisionError" in err
    assert err.splitlines()[-1] == "mmser: error: unexpected ZeroDivisionError: division by zero"


def test_end_to_end_one_line_error_exit_code_and_debug_traceback(tmp_path):
    """The installed entry point (python -m mmser): one line and exit 2; --debug adds the traceback."""
    cmd = [sys.executable, "-m", "mmser", "train", "--session", "1", "finetune.epochs=-1",
           f"output_dir={tmp_path / 'runs'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == "mmser: error: override 'finetune.epochs=-1': finetune.epochs: must be >= 1, got -1\n"
    proc = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("Traceback (most recent call last):") and "ConfigError" in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("mmser: error: override 'finetune.epochs=-1'")
    assert not (tmp_path / "runs").exists()
