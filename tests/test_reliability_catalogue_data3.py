"""Reliability catalogue, round 3, data side (issue 22 part B): outputs stay inside their folder,
a stage never overwrites its inputs, no silent wrong results in prepare, kill -9 during a
checkpoint write, output modes and one-line write errors. Each case runs as a user would (the CLI
in process where there is one) and records its outcome through the shared `catalogue` fixture."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from helpers import cli_error, tiny_config

from mmser.cli import main

SR = 16000


def _tone(freq: float, seconds: float = 0.2, sr: int = SR, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    return (0.4 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def write_table(root: Path, rows: list[dict], name: str = "table.csv", sr: int = SR) -> Path:
    """Write one tone per row (row["file"], relative to root; a row's own "wav" array if given) and
    the CSV table of the rows (without "wav")."""
    for i, r in enumerate(rows):
        p = root / r["file"]
        p.parent.mkdir(parents=True, exist_ok=True)
        if not p.exists():
            wav = r.pop("wav", None)
            if wav is None:
                wav = _tone(220.0 * (1 + i), sr=sr, seed=i)
            sf.write(str(p), wav, sr, subtype="FLOAT" if wav.dtype == np.float32 and not np.isfinite(wav).all()
                     else "PCM_16")
        r.pop("wav", None)
    table = root / name
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return table


def four_rows(**extra) -> list[dict]:
    """2 speakers x 2 classes: the smallest corpus with two leave-one-speaker-out folds."""
    rows = []
    for spk in ("s1", "s2"):
        for label in ("ang", "neu"):
            rows.append({"file": f"wavs/{spk}_{label}.wav", "label": label, "speaker": spk, **extra})
    return rows


def prepare_argv(table: Path, out: Path, *more: str) -> list[str]:
    return ["prepare", "csv", str(table), "--out", str(out), "--column", "path=file", "--folds", "logo:speaker", *more]


# -- 1. outputs stay where they belong ---------------------------------------------------------------


@pytest.mark.parametrize("bad_id", ["../../escaped", "ABSOLUTE"])
def test_an_id_cannot_write_a_resampled_copy_outside_out(tmp_path, capsys, catalogue, bad_id):
    root = tmp_path / "corpus"
    rows = four_rows()
    target = tmp_path / "escaped"
    bad_id = str(target) if bad_id == "ABSOLUTE" else bad_id
    for i, r in enumerate(rows):
        r["id"] = bad_id if i == 0 else f"u{i}"
    table = write_table(root, rows, sr=8000)  # not 16 kHz: --resample writes copies named by id
    out = tmp_path / "a" / "b" / "out"
    line = cli_error(capsys, catalogue, f"prepare csv --resample, id {bad_id!r}",
                     prepare_argv(table, out, "--resample"), f"utterance id {bad_id!r}")
    assert f"{table}:2" in line  # the table and line of the row
    assert not list(tmp_path.rglob("escaped*"))  # nothing written outside --out (was: OUT/audio/../../escaped.wav)
    assert not (out / "manifest.jsonl").exists()


def test_run_folders_made_from_names_stay_inside_output_dir(tmp_path, monkeypatch, catalogue):
    from mmser.io import UnsafePathError
    from mmser.training.run import default_run_dir

    cfg = tiny_config(tmp_path)
    cfg.experiment = "../../escaped"  # set after loading: the join itself must refuse it
    with pytest.raises(UnsafePathError, match=r"experiment / run name '\.\./\.\./escaped' has a '\.\.' component"):
        default_run_dir(cfg, 1, 0)
    cfg.experiment = "ok"
    assert default_run_dir(cfg, 1, 0) == Path(cfg.output_dir) / "ok" / "s1-seed0"
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc")
    monkeypatch.setenv("WANDB_RUN_ID", "../../../x")  # a sweep trial's run id from the environment
    with pytest.raises(UnsafePathError, match="sweep run"):
        default_run_dir(cfg, 1, 0)
    catalogue("run folder from experiment=../../escaped or a sweep run id ../../../x",
              "refused by mmser.io.safe_join (the one checked join)")


def test_cv_experiment_folder_stays_inside_output_dir(tmp_path, capsys, catalogue):
    from helpers import TINY_CONFIGS, write_toy_corpus

    manifest = write_toy_corpus(tmp_path / "toy", per_class=1, sessions=(1, 2), durations=(0.2, 0.25))
    out = tmp_path / "a" / "runs"
    argv = ["cv", *[x for f in TINY_CONFIGS for x in ("-c", str(f))], f"data.manifest={manifest}",
            f"output_dir={out}", "experiment=../../escaped", "--seeds", "1"]
    cli_error(capsys, catalogue, "cv experiment=../../escaped", argv, "experiment")
    assert not (tmp_path / "escaped").exists() and not out.exists()


def test_safe_join_allows_subfolders_and_refuses_escapes(tmp_path):
    from mmser.io import UnsafePathError, safe_join

    assert safe_join(tmp_path, "spk1/utt3.wav") == tmp_path / "spk1" / "utt3.wav"
    for bad in ("a/../../b", "/etc/passwd", "", "a\x00b", "..", "./."):
        with pytest.raises(UnsafePathError, match=r"^t\.csv:3: id "):
            safe_join(tmp_path, bad, what="id", where="t.csv:3")


# -- 2. a stage never overwrites its own inputs -------------------------------------------------------


def test_out_equal_to_the_audio_root_never_overwrites_the_sources(tmp_path, capsys, catalogue):
    root = tmp_path / "corpus"
    rows = [{"file": f"audio/{r['speaker']}_{r['label']}.wav", "id": f"{r['speaker']}_{r['label']}",
             "label": r["label"], "speaker": r["speaker"]} for r in four_rows()]
    table = write_table(root, rows, sr=44100)
    before = {p: p.read_bytes() for p in (root / "audio").iterdir()}
    cli_error(capsys, catalogue, "prepare csv --resample --out = the audio root (copies named like the sources)",
              prepare_argv(table, root, "--resample"), "would overwrite the input")
    assert {p: p.read_bytes() for p in (root / "audio").iterdir()} == before  # 44.1 kHz sources intact


def test_an_input_table_named_like_the_manifest_is_not_overwritten(tmp_path, capsys, catalogue):
    out = tmp_path / "out"
    table = out / "manifest.jsonl"
    rows = four_rows()
    write_table(out, rows)
    table.write_text("".join(json.dumps({k: v for k, v in r.items()}) + "\n" for r in rows))
    before = table.read_bytes()
    line = cli_error(capsys, catalogue, "prepare csv OUT/manifest.jsonl --out OUT",
                     prepare_argv(table, out), "would overwrite the input")
    assert str(table) in line
    assert table.read_bytes() == before and not (out / "prepare_report.json").exists()


def test_check_not_inputs_sees_symlinks_and_hard_links(tmp_path):
    from mmser.io import check_not_inputs

    src = tmp_path / "a.wav"
    src.write_bytes(b"x")
    (tmp_path / "link.wav").symlink_to(src)
    os.link(src, tmp_path / "hard.wav")
    for out in ("link.wav", "hard.wav", "a.wav"):
        with pytest.raises(ValueError, match="would overwrite the input"):
            check_not_inputs([tmp_path / out], [src])
    check_not_inputs([tmp_path / "new.wav"], [src])  # a new file is fine


# -- 3. no silent wrong results in prepare (and training) ---------------------------------------------


def _nan_wav() -> np.ndarray:
    wav = _tone(330.0)
    wav[100] = np.nan
    wav[200] = np.inf
    return wav


def test_nan_audio_is_a_reported_bad_row(tmp_path, capsys, catalogue):
    root = tmp_path / "corpus"
    rows = four_rows()
    rows[1]["wav"] = _nan_wav()
    rows.append({"file": "wavs/s1_extra.wav", "label": "neu", "speaker": "s1"})  # s1 keeps a neu clip
    table = write_table(root, rows)
    bad = root / rows[1]["file"]
    line = cli_error(capsys, catalogue, "prepare csv: a float WAV holding NaN / Inf samples",
                     prepare_argv(table, tmp_path / "out"), "2 NaN/Inf sample(s)")
    assert f"{table}:3" in line and str(bad) in line
    assert main(prepare_argv(table, tmp_path / "out", "--skip-bad-audio")) == 0
    report = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    assert [(x["path"], "NaN/Inf" in x["reason"]) for x in report["skipped"]] == [(str(bad), True)]
    ids = [json.loads(x)["id"] for x in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert "wavs/s1_neu" not in ids and len(ids) == 4


def test_nan_audio_reaching_the_dataset_is_one_line_naming_the_file(tmp_path, catalogue):
    from mmser.data.dataset import UtteranceDataset

    path = tmp_path / "nan.wav"
    sf.write(str(path), _nan_wav(), SR, subtype="FLOAT")
    ds = UtteranceDataset([{"id": "u", "path": str(path), "label": "angry", "duration": 0.2}])
    with pytest.raises(ValueError) as e:
        ds[0]
    message = str(e.value)
    assert message == f"{path}: 2 NaN/Inf sample(s), the first at 0.006 s", message
    catalogue("training: a NaN/Inf sample reaches the dataset", message)
    # read in a DataLoader worker (configs/base.yaml: num_workers 2), torch re-raises it by its type
    from torch.utils.data import DataLoader

    with pytest.raises(ValueError) as e:
        next(iter(DataLoader(ds, batch_size=None, num_workers=1)))
    assert str(e.value) == message


def test_an_unterminated_quote_is_named_not_swallowed(tmp_path, capsys, catalogue):
    root = tmp_path / "corpus"
    rows = four_rows(transcript="fine")
    table = write_table(root, rows)
    lines = table.read_text().splitlines(keepends=True)
    lines[2] = lines[2].replace(",fine", ',"fine')  # row 2 (line 3) opens a quote it never closes
    table.write_text("".join(lines))
    cli_error(capsys, catalogue, "prepare csv: an unterminated quote (rows swallowed into one transcript)",
              prepare_argv(table, tmp_path / "out"), f"{table}:3: a quoted field runs on to line 5")
    # a legitimately quoted multi-line transcript is still read
    table.write_text("".join(lines[:2]) + lines[2].replace('"fine', '"fine\nand more"') + "".join(lines[3:]))
    assert main(prepare_argv(table, tmp_path / "out2")) == 0
    texts = [json.loads(x)["transcript"] for x in (tmp_path / "out2" / "manifest.jsonl").read_text().splitlines()]
    assert "fine\nand more" in texts


def test_the_same_audio_under_two_ids_in_two_folds_is_refused(tmp_path, capsys, catalogue):
    root = tmp_path / "corpus"
    rows = four_rows()
    table = write_table(root, rows)
    s2 = root / rows[2]["file"]  # s2's ang clip: copied as s1's extra clip (another name, same bytes)
    (root / "wavs" / "copy.wav").write_bytes(s2.read_bytes())
    rows = four_rows() + [{"file": "wavs/copy.wav", "label": "ang", "speaker": "s1"}]
    table = write_table(root, rows)
    cli_error(capsys, catalogue, "prepare csv: one audio file under two ids, in two folds",
              prepare_argv(table, tmp_path / "out"), "ids wavs/copy (")
    assert not (tmp_path / "out").exists()
    # within one fold: kept, with a warning in the report
    rows[-1]["speaker"] = "s2"
    table = write_table(root, rows)
    assert main(prepare_argv(table, tmp_path / "out3")) == 0
    report = json.loads((tmp_path / "out3" / "prepare_report.json").read_text())
    assert any("wavs/copy" in w and "wavs/s2_ang" in w and "within one fold" in w for w in report["warnings"])


def test_the_same_audio_error_names_both_ids_and_lines(tmp_path, capsys):
    root = tmp_path / "corpus"
    rows = four_rows()
    write_table(root, rows)
    os.symlink(root / rows[0]["file"], root / "wavs" / "link.wav")  # one file, two names
    rows = four_rows() + [{"file": "wavs/link.wav", "label": "ang", "speaker": "s2"}]
    table = write_table(root, rows)
    code = main(prepare_argv(table, tmp_path / "out"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "ids wavs/link" in err[0] and "wavs/s1_ang" in err[0] and f"{table}:2" in err[0] and f"{table}:6" in err[0]


def test_labels_differing_in_case_or_spaces_are_one_class(tmp_path, catalogue):
    root = tmp_path / "corpus"
    rows = four_rows()
    rows[0]["label"], rows[2]["label"] = "ANG", " Ang "
    rows.append({"file": "wavs/s2_more.wav", "label": "Neu", "speaker": "s2"})  # no collision: "neu" too
    table = write_table(root, rows)
    assert main(prepare_argv(table, tmp_path / "out")) == 0
    report = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    assert report["counts"]["classes"] == ["ang", "neu"]
    assert report["counts"]["per_class"] == {"ang": 2, "neu": 3}
    assert report["label_case_merged"] == {"ANG": "ang", "Ang": "ang", "Neu": "neu"}
    catalogue("prepare csv: labels 'ang', 'ANG', ' Ang '", "one class 'ang'; report label_case_merged "
              + json.dumps(report["label_case_merged"]))


# -- 4. kill -9 during a checkpoint write loses nothing ---------------------------------------------


_KILLED_SAVE = """
import io, os, shutil, sys, torch
from mmser.config import load_config
from mmser.training.run import make_trainer

def die_half_way(data, f):  # the kill lands half-way through writing the new checkpoint's bytes
    f.write(data[: len(data) // 2])
    f.flush()
    os._exit(9)

real_save = torch.save
def save(obj, f, *a, **k):
    if isinstance(f, io.BytesIO):  # Lightning's own writer serialises in memory first
        return real_save(obj, f, *a, **k)
    buf = io.BytesIO()
    real_save(obj, buf)
    die_half_way(buf.getvalue(), f)
torch.save = save
shutil._fastcopy_sendfile = lambda src, dst: die_half_way(src.read(), dst)  # a copy out of TMPDIR
shutil.copyfileobj = lambda src, dst, length=0: die_half_way(src.read(), dst)
configs = sys.argv[2:]
trainer = make_trainer(load_config(*configs), logger=False, default_root_dir=os.path.dirname(sys.argv[1]))
trainer.strategy.checkpoint_io.save_checkpoint({"epoch": 2, "w": torch.zeros(50000)}, sys.argv[1])
"""


def test_a_kill_during_the_checkpoint_write_keeps_the_previous_one(tmp_path, catalogue):
    import shutil
    import subprocess
    import sys

    import torch
    from helpers import TINY_CONFIGS

    from mmser.training.checkpoint_io import AtomicCheckpointIO

    ckpt_dir = tmp_path / "run" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    # TMPDIR on another file system than the run folder where this machine has one (/dev/shm)
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != tmp_path.stat().st_dev:
        other_tmp = Path(__import__("tempfile").mkdtemp(dir=shm))
    else:
        other_tmp = tmp_path / "tmpdir"
        other_tmp.mkdir()
    try:
        last = ckpt_dir / "last.ckpt"
        torch.save({"epoch": 1, "w": torch.ones(50000)}, last)
        before = last.read_bytes()
        env = {**os.environ, "TMPDIR": str(other_tmp), "PYTHONPATH": os.pathsep.join(sys.path)}
        proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(last), *map(str, TINY_CONFIGS)], env=env,
                              capture_output=True, timeout=300)
        assert proc.returncode == 9, proc.stderr.decode()[-2000:]
        # was (Lightning's writer, TMPDIR on /dev/shm): last.ckpt cut from 401,577 to 200,000 bytes in place
        assert last.read_bytes() == before
        left = [p.name for p in ckpt_dir.iterdir() if p.name != "last.ckpt"]
        assert len(left) == 1 and left[0].startswith(".last.ckpt.tmp-") and not list(other_tmp.iterdir())
        # the next start (the resume loads last.ckpt) removes the dead writer's temp file
        assert AtomicCheckpointIO().load_checkpoint(last, weights_only=True)["epoch"] == 1
        assert [p.name for p in ckpt_dir.iterdir()] == ["last.ckpt"]
    finally:
        shutil.rmtree(other_tmp, ignore_errors=True)
    catalogue("kill -9 during the last.ckpt write, TMPDIR on another file system",
              "previous last.ckpt intact; the temp file beside it is removed at the next start")


def test_checkpoint_temp_files_are_made_beside_the_checkpoint_not_in_tmpdir(tmp_path, monkeypatch):
    import tempfile

    import torch

    from mmser.training.checkpoint_io import AtomicCheckpointIO

    other_tmp = tmp_path / "tmpdir"
    other_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(other_tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(other_tmp))
    ckpt_dir = tmp_path / "checkpoints"
    seen = {}
    real = torch.save

    def watching(obj, f, *a, **k):
        seen["dest"] = sorted(p.name for p in ckpt_dir.iterdir())
        seen["tmpdir"] = sorted(p.name for p in other_tmp.iterdir())
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", watching)
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(2)}, ckpt_dir / "last.ckpt")
    assert len(seen["dest"]) == 1 and seen["dest"][0].startswith(f".last.ckpt.tmp-{os.getpid()}.")
    assert seen["tmpdir"] == []
    assert [p.name for p in ckpt_dir.iterdir()] == ["last.ckpt"]

    def half_then_raise(obj, f, *a, **k):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_raise)
    with pytest.raises(OSError) as e:
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(2)}, ckpt_dir / "last.ckpt")
    assert (e.value.filename, e.value.strerror) == (str(ckpt_dir / "last.ckpt"), "No space left on device")
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["w"].tolist() == [1.0, 1.0]
    assert [p.name for p in ckpt_dir.iterdir()] == ["last.ckpt"]


def test_every_stage_trainer_saves_through_the_atomic_checkpoint_io(tmp_path):
    from mmser.training.checkpoint_io import AtomicCheckpointIO
    from mmser.training.run import make_trainer

    trainer = make_trainer(tiny_config(tmp_path), logger=False, default_root_dir=str(tmp_path))
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


# -- 5. outputs keep the umask's mode ------------------------------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_get_the_mode_of_the_umask(tmp_path, catalogue, umask, mode):
    import torch

    from mmser.io import atomic_write_json
    from mmser.training.checkpoint_io import AtomicCheckpointIO

    old = os.umask(umask)
    try:
        atomic_write_json(tmp_path / "a.json", {"x": 1})
        AtomicCheckpointIO().save_checkpoint({"w": torch.ones(1)}, tmp_path / "last.ckpt")
        table = write_table(tmp_path / "corpus", four_rows(), sr=8000)
        assert main(prepare_argv(table, tmp_path / "out", "--resample")) == 0
    finally:
        os.umask(old)
    out = tmp_path / "out"
    files = [tmp_path / "a.json", tmp_path / "last.ckpt", out / "manifest.jsonl", out / "prepare_report.json",
             *(out / "folds").iterdir(), *(out / "audio").rglob("*.wav")]
    got = {p.name: oct(p.stat().st_mode & 0o777) for p in files}
    assert set(got.values()) == {oct(mode)}, got  # was: 0o600 whatever the umask (mkstemp's mode)
    if umask == 0o022:
        catalogue("outputs under umask 022 (manifest, report, folds, copies, checkpoints)", f"mode {oct(mode)}")


# -- 6. write errors: one line naming the destination ---------------------------------------------------


def _small_corpus(tmp_path: Path) -> Path:
    return write_table(tmp_path / "corpus", four_rows())


def test_a_full_disk_names_the_file_being_written(tmp_path, capsys, catalogue, monkeypatch):
    import errno

    import mmser.io

    table = _small_corpus(tmp_path)
    out = tmp_path / "out"
    real = os.fsync

    def full(fd):
        if os.path.isfile(f"/proc/self/fd/{fd}"):  # a file being written (not the folder's fsync)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(mmser.io.os, "fsync", full)
    line = cli_error(capsys, catalogue, "prepare csv on a full disk", prepare_argv(table, out),
                     "No space left on device")
    assert line.startswith(f"mmser: error: {out / 'folds'}") and ".tmp" not in line, line
    assert not [p for p in out.rglob("*") if p.is_file()]  # no temp file left behind


def test_an_output_path_that_is_a_folder(tmp_path, capsys, catalogue):
    table = _small_corpus(tmp_path)
    out = tmp_path / "out"
    (out / "manifest.jsonl").mkdir(parents=True)
    line = cli_error(capsys, catalogue, "prepare csv: OUT/manifest.jsonl is a folder", prepare_argv(table, out),
                     f"{out / 'manifest.jsonl'}: is a folder; expected a file there")
    assert ".tmp" not in line  # was: the temp file's name (.manifest.jsonl.XXXX.tmp -> manifest.jsonl)


def test_out_under_a_file(tmp_path, capsys, catalogue):
    table = _small_corpus(tmp_path)
    blocker = tmp_path / "data.txt"
    blocker.write_text("a file, not a folder")
    cli_error(capsys, catalogue, "prepare csv --out under a file", prepare_argv(table, blocker / "out"),
                     f"cannot create its folder: {blocker} is a file, not a folder")
    assert blocker.read_text() == "a file, not a folder"
    cli_error(capsys, catalogue, "prepare csv --out is a file", prepare_argv(table, blocker),
                     f"cannot create its folder: {blocker} is a file, not a folder")


def test_a_full_disk_while_writing_resampled_copies_names_the_copy(tmp_path, capsys, monkeypatch):
    import errno

    import mmser.io

    table = write_table(tmp_path / "corpus", four_rows(), sr=8000)
    out = tmp_path / "out"
    real = os.fsync

    def full(fd):  # the disk fills up while the copies under OUT/audio are written
        if f"{out / 'audio'}/" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(mmser.io.os, "fsync", full)
    assert main(prepare_argv(table, out, "--resample")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"mmser: error: {out / 'audio'}") and err[0].endswith(
        ".wav: No space left on device"), err


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_saved_models_and_plots_get_the_mode_of_the_umask(tmp_path, catalogue, umask, mode):
    """The writers that hand a temp file name to a library (safetensors, matplotlib) publish it through
    mmser.io.publish_temp: the umask's mode (was: 0600 plots from mkstemp), fsynced, no temp left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from helpers import tiny_audio_classifier

    from mmser.labels import CLASSES
    from mmser.models.pretrained import save_pretrained
    from mmser.report import _save_figure

    old = os.umask(umask)
    try:
        save_pretrained(tiny_audio_classifier(), tmp_path / "m",
                        {"task": "audio", "classes": list(CLASSES), "sample_rate": 16000})
        fig, ax = plt.subplots()
        ax.plot([0, 1])
        _save_figure(fig, tmp_path / "plot.png")
    finally:
        os.umask(old)
    files = [tmp_path / "m" / "model.safetensors", tmp_path / "m" / "config.json", tmp_path / "plot.png"]
    got = {p.name: oct(p.stat().st_mode & 0o777) for p in files}
    assert set(got.values()) == {oct(mode)}, got
    assert sorted(p.name for p in (tmp_path / "m").iterdir() if p.name.startswith(".")) == []
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    if umask == 0o022:
        catalogue("saved model weights and comparison plots under umask 022", f"mode {oct(mode)}")
