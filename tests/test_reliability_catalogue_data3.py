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


def test_safe_join_allows_subfolders_and_refuses_escapes(tmp_path):
    from mmser.io import UnsafePathError, safe_join

    assert safe_join(tmp_path, "spk1/utt3.wav") == tmp_path / "spk1" / "utt3.wav"
    for bad in ("a/../../b", "/etc/passwd", "", "a\x00b", "..", "./."):
        with pytest.raises(UnsafePathError, match=r"^t\.csv:3: id "):
            safe_join(tmp_path, bad, what="id", where="t.csv:3")


# -- 2. a stage never overwrites its own inputs -------------------------------------------------------


def test_out_equal_to_the_audio_root_never_overwrites_the_sources(tmp_path, capsys, catalogue):
    root = tmp_path / "corpus"
    rows = [{"file": f"audio/{r['speaker']}_{r['label']}.wav", "id": f"{r['speaker']}_{r['label']}", "label": r["label"],
             "speaker": r["speaker"]} for r in four_rows()]
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
