"""The reliability catalogue: bad input, kill-and-resume, concurrent runs and crafted checkpoints,
each through the real CLI (`mmser.cli.main`, in process), with its outcome in one table.

Each case asserts its outcome (a one-line error naming the key or file, or a correct result) and adds
a row to the `case | outcome` table that pytest prints at the end of the session (conftest.py's
terminal summary). The individual defects each have a focused test elsewhere (test_config.py,
test_cli.py, test_reliability_runs.py, test_reliability_data.py); this module runs them as a user
would, one after another, on one tiny corpus.
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import REPO, TINY_CONFIGS, cli_error, cli_last_line, signal_mid_training, write_toy_corpus

from mmser.io import read_jsonl, write_jsonl

C = [x for f in TINY_CONFIGS for x in ("-c", str(f))]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("catalogue")
    return root, write_toy_corpus(root / "toy", per_class=1, durations=(0.3, 0.4))


_cli = cli_last_line
_error = cli_error


@pytest.mark.parametrize("override, key", [
    ("finetune.epochs=-1", "finetune.epochs"),  # was: trained forever
    ("finetune.epochs=0", "finetune.epochs"),  # was: an untrained model's metrics
    ("finetune.lr=0", "finetune.lr"),  # was: trained nothing, reported a result
    ("data.train_crop_s=-0.1", "data.train_crop_s"),  # was: trimmed 0.1 s off every clip
    ("tapt.warmup_steps=20000", "tapt"),  # warm-up + flat past the last step
])
def test_bad_config_values(corpus, tmp_path, capsys, catalogue, override, key):
    _, manifest = corpus
    out = tmp_path / "runs"
    _error(capsys, catalogue, f"train {override}",
           ["train", *C, f"data.manifest={manifest}", f"output_dir={out}", "--session", "1", override], key)
    assert not out.exists()  # nothing written


def test_arguments_in_any_order(corpus, tmp_path, capsys, catalogue):
    _, manifest = corpus
    # an override after --session and a -c after an override are both read (the bad value proves it)
    _error(capsys, catalogue, "override after --session, -c after an override",
           ["train", f"data.manifest={manifest}", "--session", "1", "finetune.epochs=0", *C,
            f"output_dir={tmp_path}"], "finetune.epochs")


def test_bad_corpus_inputs(corpus, tmp_path, capsys, catalogue):
    _, manifest = corpus
    out = tmp_path / "runs"
    common = [*C, f"data.manifest={manifest}", f"output_dir={out}"]
    _error(capsys, catalogue, "cv --sessions 7", ["cv", *common, "--sessions", "7", "--seeds", "1"], "sessions 7")
    assert not (out / "tiny-vft" / "s7-seed0").exists()

    records = read_jsonl(manifest)
    dup = tmp_path / "dup.jsonl"
    write_jsonl(dup, records + [records[0]])
    _error(capsys, catalogue, "duplicate utterance id in the manifest", ["folds", str(dup)], "duplicate utterance id")

    gone = tmp_path / "gone.jsonl"
    test_clip = next(r for r in records if r["session"] == 1 and r["label"])
    write_jsonl(gone, [dict(r, path=str(tmp_path / "deleted.wav")) if r is test_clip else r for r in records])
    _error(capsys, catalogue, "a test wav deleted before training",
           ["train", *C, f"data.manifest={gone}", f"output_dir={out}", "--session", "1"], "deleted.wav")
    assert not list(out.rglob("last.ckpt"))  # failed before training


def test_prepare_reports_every_warning_and_read_only_output(tmp_path, capsys, catalogue, fake_iemocap_factory):
    tree = fake_iemocap_factory(latin1_transcript=True, duplicate_transcript_line=True)
    code, _ = _cli(capsys, "prepare", "iemocap", str(tree), "--out", str(tmp_path / "prep"))
    report = json.loads((tmp_path / "prep" / "prepare_report.json").read_text())
    warnings = report["warnings"]
    assert code == 0 and len(warnings) >= 2, warnings
    catalogue("prepare: non-UTF-8 transcript + duplicate transcript line",
              f"exit 0; prepare_report.json holds {len(warnings)} warnings")
    _error(capsys, catalogue, "prepare into a folder that cannot be written",
           ["prepare", "iemocap", str(tree), "--out", "/sys/mmser-read-only"], "mmser-read-only")


def _crafted_pickle(marker: Path) -> bytes:
    class Payload:
        def __reduce__(self):
            return (Path.write_text, (marker, "code ran"))

    return pickle.dumps({"state_dict": Payload()})


def test_crafted_checkpoint_is_refused_on_resume(corpus, tmp_path, capsys, catalogue):
    _, manifest = corpus
    out = tmp_path / "runs"
    marker = tmp_path / "PWNED"
    ckpt = out / "tiny-vft" / "s1-seed0" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(_crafted_pickle(marker))
    code, line = _cli(capsys, "train", *C, f"data.manifest={manifest}", f"output_dir={out}", "--session", "1")
    assert code != 0 and line.startswith("mmser: error:") and "last.ckpt" in line, (code, line)
    assert not marker.exists()
    catalogue("resume from a crafted checkpoints/last.ckpt", line)


def test_too_short_clip_then_another_corpus_in_the_same_folder(corpus, tmp_path, capsys, catalogue):
    root, manifest = corpus
    import numpy as np
    import soundfile as sf

    records = read_jsonl(manifest)
    base = next(r for r in records if r["session"] == 2 and r["label"])  # a training session of fold 1
    short = dict(base, id=base["id"][:-3] + "900", path=str(tmp_path / "short.wav"), duration=60 / 16000)
    sf.write(short["path"], np.zeros(60, dtype=np.float32), 16000)
    mine = tmp_path / "manifest.jsonl"
    write_jsonl(mine, records + [short])
    out = tmp_path / "runs"
    argv = ["cv", *C, f"data.manifest={mine}", f"output_dir={out}", "finetune.epochs=1", "--sessions", "1",
            "--seeds", "1"]
    code, _ = _cli(capsys, *argv)
    metrics = json.loads((out / "tiny-vft" / "s1-seed0" / "metrics.json").read_text())
    skipped = metrics["counts"]["skipped_too_short"]
    assert code == 0 and skipped["train"] == 1, skipped
    catalogue("a 60-sample clip in the training split", f"run finished; skipped_too_short train={skipped['train']}")

    other = write_toy_corpus(tmp_path / "other", per_class=1, seed=7, durations=(0.3, 0.4))
    write_jsonl(mine, read_jsonl(other))  # `prepare` again into the same folder from another tree
    _error(capsys, catalogue, "cv again after the manifest was re-prepared from another corpus", argv, "manifest")


_HOLD = textwrap.dedent("""
    import sys, time
    from mmser.io import hold_folder
    with hold_folder(sys.argv[1]):
        print("held", flush=True)
        time.sleep(120)
""")


def test_a_run_another_process_holds_is_skipped(corpus, tmp_path, capsys, catalogue):
    _, manifest = corpus
    out = tmp_path / "runs"
    run_dir = out / "tiny-vft" / "s1-seed0"
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "held"
        code, line = _cli(capsys, "train", *C, f"data.manifest={manifest}", f"output_dir={out}", "--session", "1")
    finally:
        proc.kill()
        proc.wait()
    assert "held by pid" in line and "skipped" in line, (code, line)
    assert not (run_dir / "metrics.json").exists()
    catalogue("a second process on a run folder another live process holds", f"exit {code}; {line}")


def test_a_killed_run_resumes_through_the_cli(corpus, tmp_path, capsys, catalogue):
    """Killed in epoch 2 (an exception from a callback, after its last.ckpt of epoch 1), then the same
    `mmser train` again: it resumes, finishes, and its log holds every epoch once."""
    import csv

    import pytorch_lightning as pl

    from mmser.config import load_config
    from mmser.training.run import run_one

    class Kill(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 1:
                raise RuntimeError("simulated kill")

    _, manifest = corpus
    out = tmp_path / "runs"
    args = [f"data.manifest={manifest}", f"output_dir={out}", "finetune.epochs=3", "data.batch_size=4"]
    run_dir = out / "tiny-vft" / "s1-seed0"
    with pytest.raises(RuntimeError, match="simulated kill"):
        run_one(load_config(*TINY_CONFIGS, overrides=args), test_session=1, seed=0, run_dir=run_dir,
                callbacks=[Kill()])
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and not (run_dir / "metrics.json").exists()
    code, _ = _cli(capsys, "train", *C, *args, "--session", "1")
    with (run_dir / "csv" / "metrics.csv").open() as f:
        epochs = [r["epoch"] for r in csv.DictReader(f) if r.get("train/loss_epoch")]
    assert code == 0 and (run_dir / "metrics.json").is_file() and epochs == ["0", "1", "2"], (code, epochs)
    catalogue("killed in epoch 2, then the same `mmser train` again",
              f"exit 0; resumed from last.ckpt; csv/metrics.csv epochs {', '.join(epochs)} (each once)")


def test_sigterm_stops_a_run_with_exit_143_and_the_same_command_resumes(corpus, tmp_path, capsys, catalogue):
    """A scheduler's SIGTERM (`kill PID`, SLURM's time limit) while `mmser train` runs in its own
    process: Lightning stops at the end of the batch; mmser exits 143 with one line (before, Lightning's
    SIGTERMException, a SystemExit without a code, made it exit 0 as if finished), and the same command
    again resumes and finishes."""
    import signal

    _, manifest = corpus
    out = tmp_path / "runs"
    args = ["train", *C, f"data.manifest={manifest}", f"output_dir={out}", "finetune.epochs=200",
            "data.batch_size=4", "tracking.wandb=disabled", "--session", "1"]
    code, err = signal_mid_training(args, signal.SIGTERM)  # sent once an epoch line shows (after last.ckpt)
    last = [x for x in err.splitlines() if x.strip()][-1]
    run_dir = out / "tiny-vft" / "s1-seed0"
    assert code == 143 and last.startswith("mmser: terminated (SIGTERM)"), (code, err[-2000:])
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and not (run_dir / "metrics.json").exists()
    args[args.index("finetune.epochs=200")] = "finetune.epochs=3"
    code2, _ = _cli(capsys, *args)
    assert code2 == 0 and (run_dir / "metrics.json").is_file()
    catalogue("SIGTERM during `mmser train`, then the same command (fewer epochs)",
              f"exit {code}; {last}; then exit {code2}, finished")
