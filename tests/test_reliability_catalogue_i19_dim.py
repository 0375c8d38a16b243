"""Reliability catalogue, dimensional emotion (issue 19): bad dimensional input is one line naming
the file or key and the problem, through the real CLI, before anything is trained."""

from __future__ import annotations

import csv

import numpy as np
import soundfile as sf
from helpers import SAMPLE_RATE, TINY_CONFIGS, cli_error, tone, write_toy_corpus

from mmser.data.manifest import load_manifest
from mmser.io import write_jsonl

C = [x for f in TINY_CONFIGS for x in ("-c", str(f))]


def _table(root, act_values):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "t.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "speaker", "arousal"])
        for i, a in enumerate(act_values):
            sf.write(str(root / f"u{i}.wav"), tone(440.0, 0.3, rng), SAMPLE_RATE, subtype="PCM_16")
            w.writerow([f"u{i}.wav", ["ang", "hap"][i % 2], f"s{i % 3}", a])
    return root / "t.csv"


def test_csv_dimension_not_a_number(tmp_path, capsys, catalogue):
    table = _table(tmp_path / "c", ["1", "2", "high", "3", "4", "5"])
    cli_error(capsys, catalogue, "prepare csv: arousal 'high'",
              ["prepare", "csv", str(table), "--out", str(tmp_path / "o"), "--folds", "kfold:3"],
              f"{table}:4: arousal 'high' is not a number")


def test_csv_dimension_outside_the_given_scale(tmp_path, capsys, catalogue):
    table = _table(tmp_path / "c", ["1", "2", "9", "3", "4", "5"])
    cli_error(capsys, catalogue, "prepare csv --scale 1,7: arousal 9",
              ["prepare", "csv", str(table), "--out", str(tmp_path / "o"), "--folds", "kfold:3", "--scale", "1,7"],
              "arousal '9' is outside the scale [1.0, 7.0]")


def test_csv_bad_scale_option(tmp_path, capsys, catalogue):
    table = _table(tmp_path / "c", ["1", "2", "3", "3", "4", "5"])
    cli_error(capsys, catalogue, "prepare csv --scale 7,1",
              ["prepare", "csv", str(table), "--out", str(tmp_path / "o"), "--folds", "kfold:3", "--scale", "7,1"],
              "LOW must be below HIGH")


def test_dimensional_run_on_a_manifest_without_values(tmp_path, capsys, catalogue):
    manifest = write_toy_corpus(tmp_path / "toy", per_class=1, sessions=(1, 2))
    out = tmp_path / "runs"
    cli_error(capsys, catalogue, "train -c dimensional, no arousal values",
              ["train", *C, "-c", "dimensional", f"data.manifest={manifest}", f"output_dir={out}", "--session", "1"],
              "no utterance has a value of arousal")
    assert not out.exists()


def test_ptapt_on_a_corpus_without_classes(tmp_path, capsys, catalogue):
    manifest = write_toy_corpus(tmp_path / "toy", per_class=1, sessions=(1, 2))
    recs = load_manifest(manifest)
    for r in recs:
        r.update({"label": None, "arousal": 3.0, "valence": 2.0, "dominance": 4.0,
                  "dim_scales": {d: [1.0, 5.0] for d in ("arousal", "valence", "dominance")}})
    write_jsonl(manifest, recs)
    out = tmp_path / "runs"
    cli_error(capsys, catalogue, "train pretrain=ptapt, dimensional corpus without classes",
              ["train", *C, "-c", "ptapt", "-c", "dimensional", f"data.manifest={manifest}", f"output_dir={out}",
               "--session", "1"], "P-TAPT's step (a) trains a frame-level emotion classifier")
