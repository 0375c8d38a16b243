"""The reliability catalogue, round 3: the command line, config files, `mmser compare` and W&B.

Each case runs the real CLI (`mmser.cli.main`, in process, or `python -m mmser` where a signal or the
process environment matters), asserts its outcome and adds a row to the `case | outcome` table
(conftest.py's `catalogue`). Issue 22 part B lists the defects these cases were written against.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, TINY_CONFIGS, cli_error, cli_last_line, signal_mid_training, write_toy_corpus

C = [x for f in TINY_CONFIGS for x in ("-c", str(f))]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("catalogue_cli3")
    return root, write_toy_corpus(root / "toy", per_class=1, durations=(0.3, 0.4))


# ---------------------------------------------------------------------------------------------
# 1. Config files: one line naming the file, quoting none of it
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case, content, expect", [
    ("deeply nested YAML -c file", "a: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),  # was RecursionError
    ("deeply nested JSON -c file", '{"a": ' * 3000 + "1" + "}" * 3000, "nested too deeply"),
    ("binary -c file", bytes(range(256)) * 4, "binary data"),  # was: 'utf-8' codec can't decode ...
    ("latin-1 -c file", "experiment: caf\xe9\n".encode("latin-1"), "not UTF-8 text (byte 0xe9"),
    ("control characters in a -c file", "experiment: a\x07b\n", "not valid YAML"),  # a guard: refused before too
    ("duplicate YAML key", "experiment: a\nfinetune:\n  epochs: 2\n  lr: 0.1\n  epochs: 3\n",
     "line 5: duplicate key 'epochs' (first on line 3"),  # was: last wins silently (epochs=3)
    ("duplicate top-level key", "experiment: a\nexperiment: b\n", "line 2: duplicate key 'experiment'"),
])
def test_bad_config_files(tmp_path, capsys, catalogue, case, content, expect):
    path = tmp_path / "my.yaml"
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    line = cli_error(capsys, catalogue, case, ["config", "show", "-c", str(path)], expect)
    assert str(path) in line and len(line) < 300, line


def test_a_yaml_merge_key_may_still_be_overridden():
    """`<<: *base` then the same key again is YAML's override, not a duplicate."""
    from mmser.config import parse_yaml

    assert parse_yaml("a: &b {x: 1, y: 2}\nc:\n  <<: *b\n  x: 3\n", "t")["c"] == {"x": 3, "y": 2}


def test_a_system_file_as_config_is_not_quoted(tmp_path, capsys, catalogue):
    """`-c /etc/passwd` (valid YAML: one long string) was refused with the whole file in the message."""
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n")
    line = cli_error(capsys, catalogue, "-c /etc/passwd (a file that is one YAML string)",
                     ["config", "show", "-c", str(secret)], "not a config file")
    assert "root:x" not in line and "daemon" not in line, line
    if Path("/etc/passwd").is_file():
        line = cli_error(capsys, catalogue, "-c /etc/passwd", ["config", "show", "-c", "/etc/passwd"], "/etc/passwd")
        assert "root:" not in line and "/bin/" not in line, line
    # a long value in an ordinary config is cut in the message, not copied whole
    long = tmp_path / "long.yaml"
    long.write_text("finetune:\n  epochs: " + "x" * 5000 + "\n")
    line = cli_error(capsys, catalogue, "a 5,000-character value", ["config", "show", "-c", str(long)],
                     "finetune.epochs: expected an integer")
    assert len(line) < 300, line


def test_deeply_nested_json_inputs_name_the_file(tmp_path, capsys, catalogue):
    """A RecursionError from any parser was "unexpected RecursionError ... (run with --debug)", exit 1:
    now exit 2 with the file (found in the failing call's arguments) for every reader."""
    deep = "[" * 100000 + "]" * 100000
    manifest = tmp_path / "deep.jsonl"
    manifest.write_text('{"id": ' + deep + "}\n")
    line = cli_error(capsys, catalogue, "deeply nested JSON line in a manifest (mmser folds)",
                     ["folds", str(manifest)], "nested too deeply")
    assert str(manifest) in line, line
    run = tmp_path / "exp" / "s1-seed0"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(deep)
    cli_error(capsys, catalogue, "deeply nested metrics.json (mmser compare)",
              ["compare", str(tmp_path / "exp"), "--out", str(tmp_path / "cmp")], "metrics.json: not a valid")
    cli_error(capsys, catalogue, "-c a folder", ["config", "show", "-c", str(tmp_path)], "a folder, not a config")


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/abs", "a/b", "a\\b", "..", ".", ""])
def test_experiment_must_be_a_plain_name(corpus, tmp_path, capsys, catalogue, name):
    """`experiment=../../escaped` put the run folder outside output_dir; now refused by validation,
    before anything is written."""
    _, manifest = corpus
    out = tmp_path / "runs"
    cli_error(capsys, catalogue, f"experiment={name!r}",
              ["train", *C, f"data.manifest={manifest}", f"output_dir={out}", "--session", "1",
               f"experiment={name}"], "experiment: must be a plain name")
    assert not out.exists() and not (tmp_path / "escaped").exists() and not (tmp_path.parent / "escaped").exists()


def test_experiment_in_a_config_file_names_the_file(tmp_path, capsys, catalogue):
    path = tmp_path / "exp.yaml"
    path.write_text("experiment: ../up\n")
    line = cli_error(capsys, catalogue, "experiment: ../up in a -c file", ["config", "show", "-c", str(path)],
                     "experiment: must be a plain name")
    assert str(path) in line, line


# ---------------------------------------------------------------------------------------------
# 2. Ctrl-C during train / cv: exit 130, "mmser: interrupted"
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["train", "cv"])
def test_ctrl_c_during_training_exits_130(corpus, tmp_path, catalogue, command):
    """SIGINT (Ctrl-C) while Lightning trains: Lightning catches the KeyboardInterrupt itself and calls
    sys.exit(1), so `mmser train` exited 1 with no line; now 130 and "mmser: interrupted" (README)."""
    import signal

    _, manifest = corpus
    out = tmp_path / "runs"
    fold = ["--session", "1"] if command == "train" else ["--sessions", "1", "--seeds", "1"]
    args = [command, *C, f"data.manifest={manifest}", f"output_dir={out}", "finetune.epochs=200",
            "data.batch_size=4", "tracking.wandb=disabled", *fold]
    code, err = signal_mid_training(args, signal.SIGINT)  # sent once Lightning trains (an epoch line)
    last = ([x for x in err.splitlines() if x.strip()] or [""])[-1]
    assert code == 130 and last == "mmser: interrupted", (code, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    catalogue(f"Ctrl-C (SIGINT) during `mmser {command}`", f"exit {code}; {last}")


# ---------------------------------------------------------------------------------------------
# 3. Seeds and verbosity options
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case, argv, expect", [
    ("cv --seeds 0", ["cv", "--sessions", "1", "--seeds", "0"], "at least 1 seed"),  # was: exit 0, nothing run
    ("train --seed -5", ["train", "--session", "1", "--seed", "-5"], "-5 is outside 0 .. 4294967295"),
    ("train --seed 2**32", ["train", "--session", "1", "--seed", str(2**32)], "is outside 0 .. 4294967295"),
])
def test_bad_seeds_are_refused_before_anything_is_written(corpus, tmp_path, capsys, catalogue, case, argv, expect):
    """`--seed -5` failed inside Lightning after the run folder was made; `--seeds 0` ran nothing, exit 0."""
    from mmser.cli import main

    _, manifest = corpus
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as e:
        main([*argv, *C, f"data.manifest={manifest}", f"output_dir={out}", "tracking.wandb=disabled"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and expect in err, (e.value.code, err)
    assert not out.exists()
    catalogue(case, f"exit 2; {err}")


def test_verbosity_options_after_the_subcommand(fake_iemocap, tmp_path, catalogue):
    """`mmser prepare iemocap ... -q` was refused (unrecognized arguments: -q); now -q / -v / --debug work
    anywhere, and one given before the subcommand is not reset by the subcommand's default."""
    from mmser.cli import parse_args

    assert parse_args(["-q", "config", "show"]).quiet and parse_args(["config", "show", "-q"]).quiet
    assert not parse_args(["config", "show"]).quiet and not parse_args(["config", "show"]).verbose
    v = parse_args(["prepare", "csv", "t.csv", "--out", "o", "-v"])
    assert v.verbose and v.debug and not v.quiet

    def prepare(root, *extra):
        proc = subprocess.run([sys.executable, "-m", "mmser", "prepare", "iemocap", str(root), "--out",
                               str(tmp_path / "prep"), "--force", *extra], capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
        return proc.returncode, proc.stderr

    code_default, err_default = prepare(fake_iemocap)
    code_q, err_q = prepare(fake_iemocap, "-q")
    assert code_default == code_q == 0, err_q
    assert " INFO " in err_default and err_q == "", (err_default, err_q)
    missing = tmp_path / "no-such-tree"
    code_plain, err_plain = prepare(missing)
    code_v, err_v = prepare(missing, "-v")  # -v: the traceback of an error
    code_d, err_d = prepare(missing, "--debug")
    assert code_plain == code_v == code_d == 2 and "Traceback" not in err_plain, err_plain
    assert "Traceback" in err_v and "Traceback" in err_d, (err_v[-500:], err_d[-500:])
    catalogue("`prepare iemocap ... -q` / `-v` / `--debug` after the subcommand",
              f"exit 0; stderr {len(err_default.splitlines())} line(s) by default, {len(err_q.splitlines())} "
              "with -q; an error's traceback with -v and --debug only")


# ---------------------------------------------------------------------------------------------
# 4. mmser compare: one task on one data set; empty and half-finished experiments said so
# ---------------------------------------------------------------------------------------------


def _experiment(folder: Path, classes=("angry", "sad"), corpus=None, sha="a" * 64, runs=((1, 0), (2, 0)),
                unfinished=()):
    """An experiment folder of finished runs (metrics.json + inputs.json) and unfinished run folders."""
    from mmser.io import atomic_write_json

    for k, (session, seed) in enumerate(runs):
        run = folder / f"s{session}-seed{seed}"
        ua = 0.5 + 0.01 * k
        atomic_write_json(run / "metrics.json", {
            "test_session": session, "seed": seed, "classes": list(classes), "corpus": corpus,
            "test": {"ua": ua, "wa": ua, "macro_f1": ua, "classes": list(classes),
                     "confusion": [[2 if i == j else 1 for j in classes] for i in classes]}})
        atomic_write_json(run / "inputs.json", {"manifest": {"path": "/data/manifest.jsonl", "sha256": sha}})
    for name in unfinished:
        (folder / name / "checkpoints").mkdir(parents=True)
    return folder


@pytest.mark.parametrize("case, b_fields, expect", [
    ("compare: runs of different class sets", {"classes": ("angry", "happy", "sad")}, "classes"),
    ("compare: runs of different corpora", {"corpus": "msp-podcast"}, "corpus"),
    ("compare: runs of different manifests", {"sha": "b" * 64}, "manifest sha256 aaaaaaaaaaaa vs bbbbbbbbbbbb"),
])
def test_compare_refuses_experiments_of_different_data(tmp_path, capsys, catalogue, case, b_fields, expect):
    """Before: any two experiments were paired by (session, seed), whatever their classes or corpus."""
    a = _experiment(tmp_path / "A")
    b = _experiment(tmp_path / "B", **b_fields)
    line = cli_error(capsys, catalogue, case, ["compare", str(a), str(b), "--out", str(tmp_path / "cmp")],
                     "are not comparable")
    assert "A (" in line and "B (" in line and expect in line, line
    assert not (tmp_path / "cmp" / "comparison.md").exists()


def test_compare_of_one_data_set_still_works(tmp_path, capsys):
    a, b = _experiment(tmp_path / "A"), _experiment(tmp_path / "B", classes=("sad", "angry"))  # order aside
    code, _ = cli_last_line(capsys, "compare", str(a), str(b), "--out", str(tmp_path / "cmp"))
    assert code == 0 and (tmp_path / "cmp" / "comparison.md").is_file()


def test_compare_says_which_experiments_are_empty_or_half_finished(tmp_path, capsys, catalogue):
    """Before: an empty folder and one without a finished run were rows of 0 runs, with exit 0 and no word."""
    from mmser.cli import main

    done = _experiment(tmp_path / "done")
    half = _experiment(tmp_path / "half", runs=((1, 0),), unfinished=("s2-seed0", "s3-seed0"))
    empty = tmp_path / "empty"
    empty.mkdir()
    started = _experiment(tmp_path / "started", runs=(), unfinished=("s1-seed0",))
    out = tmp_path / "cmp"
    capsys.readouterr()
    assert main(["compare", str(done), str(half), str(empty), str(started), "--out", str(out)]) == 0
    warnings = [x for x in capsys.readouterr().err.splitlines() if x.startswith("mmser: warning:")]
    assert len(warnings) == 3, warnings
    assert f"{half}: 2 of 3 run folders unfinished" in warnings[2] and "s2-seed0, s3-seed0" in warnings[2]
    assert str(empty) in warnings[0] and "no finished run" in warnings[0]
    assert str(started) in warnings[1] and "1 run folder(s), none finished" in warnings[1]
    md = (out / "comparison.md").read_text()
    table = [x for x in md.splitlines() if x.startswith("| ")]
    assert not any(x.startswith(("| empty ", "| started ")) for x in table), md  # no rows of 0 runs
    assert "Incomplete:" in md and "Not read:" in md
    catalogue("compare: an empty, a started and a half-finished experiment beside a finished one",
              f"exit 0; {len(warnings)} warning lines, e.g. {warnings[2]}")
    cli_error(capsys, catalogue, "compare: no experiment has a finished run",
              ["compare", str(empty), str(started), "--out", str(tmp_path / "cmp2")],
              "no experiment has a finished run")


# ---------------------------------------------------------------------------------------------
# 5. W&B with a home folder that cannot be written; the "anonymous" warning of every run
# ---------------------------------------------------------------------------------------------


def _without_wandb_dirs(env: dict) -> dict:
    return {k: v for k, v in env.items() if k not in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR",
                                                       "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR", "WANDB_MODE",
                                                       "XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME")}


def test_wandb_keeps_its_final_metrics_when_home_cannot_be_written(corpus, tmp_path, catalogue):
    """HOME under a regular file: nothing can be created there, even by root (permission bits would
    not stop root). Before: W&B lost the final metrics ("could not log final metrics (PermissionError:
    Unable to write staging files to ~/.local/share/wandb ...") and wandb-core wrote 17 log lines."""
    from wandb_offline import offline_runs

    _, manifest = corpus
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    out = tmp_path / "runs"
    env = {**_without_wandb_dirs(os.environ), "HOME": str(blocker / "home"), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "mmser", "train", *C, f"data.manifest={manifest}",
                           f"output_dir={out}", "finetune.epochs=1", "tracking.wandb=offline", "--session", "1"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = out / "tiny-vft" / "s1-seed0"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    (run,) = offline_runs(run_dir)
    assert run.summary["test/ua"] == pytest.approx(metrics["test"]["ua"])
    assert run.summary["test/confusion"] == metrics["test"]["confusion"]
    assert any(k.startswith("test/confusion_matrix_table/") for row in run.history for k in row)  # the plot
    assert {"predictions", "model"} <= {a["type"] for a in run.artifacts}, run.artifacts
    # wandb's own lines ("wandb: ..."), wandb-core's (Go's log format: "2026/12/04 19:58:17 INFO server: ..."),
    # mmser's about W&B
    wandb_lines = [x for x in proc.stderr.splitlines()
                   if x.startswith("wandb:") or re.match(r"\d{4}/\d\d/\d\d \d\d:", x) or "W&B" in x]
    assert all("mmser.tracking: W&B:" in x and "not writable" in x for x in wandb_lines), wandb_lines
    assert len(wandb_lines) == 1, wandb_lines  # mmser's one INFO line saying where W&B's folders went
    assert "anonymous setting" not in proc.stderr
    assert (run_dir / "wandb" / "data").is_dir() and not (blocker.parent / "home").exists()
    catalogue("W&B offline with HOME not writable (HOME under a file)",
              f"exit 0; final metrics, confusion matrix, predictions and model artifacts in the W&B run; W&B's "
              f"folders under RUN/wandb; {len(wandb_lines)} stderr line about it")


def test_no_anonymous_setting_warning(tmp_path, capfd, catalogue, monkeypatch):
    """Lightning's WandbLogger passes anonymous=None, which wandb 0.31 answers on every run with "The
    anonymous setting has no effect and will be removed in a future version"."""
    from helpers import tiny_config

    from mmser import tracking

    for var in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = tiny_config(tmp_path, overrides=["tracking.wandb=offline"])
    capfd.readouterr()
    loggers = tracking.make_loggers(cfg, tmp_path / "run", name="t", group="g", job_type="finetune")
    try:
        assert len(loggers) == 2  # CSV + W&B: W&B started
    finally:
        tracking.finish(loggers)
    err = capfd.readouterr().err
    assert "anonymous" not in err, err
    catalogue("any W&B run: wandb's 'anonymous setting has no effect' warning", "not printed")


# ---------------------------------------------------------------------------------------------
# 6. The default text-feature cache beside the runs, not in the working directory
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc (a folder nobody can write)")
def test_text_cache_default_is_under_output_dir(corpus, tmp_path, capsys, catalogue, monkeypatch):
    """text.cache_dir defaulted to runs/cache/text in the working directory: started from a folder that
    cannot be written (here /proc, where even root cannot make a folder), a text run failed with
    "runs: No such file or directory"; the default is now {output_dir}/cache/text."""
    _, manifest = corpus
    out = tmp_path / "runs"
    monkeypatch.chdir("/proc")
    code, line = cli_last_line(capsys, "train", *C, "-c", str(REPO / "configs" / "text.yaml"),
                               f"data.manifest={manifest}", f"output_dir={out}", "finetune.epochs=1",
                               "tracking.wandb=disabled", "--session", "1")
    assert code == 0, line
    assert list((out / "cache" / "text").glob("*.safetensors")), list(out.rglob("*"))
    from mmser.config import load_config, text_cache_dir

    cfg = load_config("text", overrides=[f"output_dir={out}"])
    assert text_cache_dir(cfg) == out / "cache" / "text"
    assert text_cache_dir(load_config(overrides=["text.cache_dir=/x/y"])) == Path("/x/y")  # given: kept
    catalogue("a text run started in a folder that cannot be written (cwd /proc)",
              "exit 0; features cached under OUTPUT_DIR/cache/text")
