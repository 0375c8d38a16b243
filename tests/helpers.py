"""Tiny fixtures shared by the test suite: a synthetic IEMOCAP-shaped manifest of short tone clips,
the tiny config (configs/base.yaml + vft.yaml + tiny.yaml), tiny models and hand-made batches.

The toy corpus needs no espeak-ng: each clip is a sine whose frequency depends on the class (plus
a little noise and a per-speaker detune), so a tiny model can learn it in a few epochs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from mmser.config import Config, EncoderConfig, load_config
from mmser.io import write_jsonl
from mmser.labels import CLASSES

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TINY_CONFIGS = (CONFIGS / "base.yaml", CONFIGS / "vft.yaml", CONFIGS / "tiny.yaml")
SAMPLE_RATE = 16000
# Tone frequency (Hz) of each class, in CLASSES order.
CLASS_FREQS = {"angry": 1760.0, "happy": 880.0, "neutral": 220.0, "sad": 440.0}


@pytest.fixture(autouse=True, scope="module")
def single_torch_thread():
    """Run tiny models on one intra-op thread (import this fixture into a test module to use it).

    Measured on the 2-core dev machine under load from parallel jobs: a tiny-model training step
    took 20 ms with 1 thread and 400 ms with 2 (OpenMP threads fighting over busy cores); tiny
    matrices gain nothing from a second thread anyway. The previous setting is restored after.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tone(freq: float, duration_s: float, rng: np.random.Generator, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A sine with random phase plus 5 % white noise, float32 in [-1, 1]."""
    t = np.arange(int(round(duration_s * sample_rate))) / sample_rate
    x = 0.5 * np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi)) + 0.05 * rng.standard_normal(t.size)
    return np.clip(x, -1, 1).astype(np.float32)


def write_toy_corpus(
    root: str | Path,
    per_class: int = 2,
    seed: int = 0,
    sessions: Sequence[int] = (1, 2, 3, 4, 5),
    durations: tuple[float, float] = (0.2, 0.5),
    with_unlabelled: bool = True,
) -> Path:
    """Write wavs + manifest.jsonl under `root`; return the manifest path.

    Per session: 2 actors (F, M) x 4 classes x `per_class` utterances, alternating an improvised and
    a scripted dialog; plus (with_unlabelled) one "fru" utterance per actor with label None.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    records = []
    for s in sessions:
        for gender in ("F", "M"):
            detune = 1.0 + 0.03 * rng.standard_normal()
            counter = 0
            items = [(c, k) for c in CLASSES for k in range(per_class)]
            if with_unlabelled:
                items.append((None, 0))
            for c, k in items:
                scripted = counter % 2 == 1
                dialog = f"Ses{s:02d}{gender}_script01_1" if scripted else f"Ses{s:02d}{gender}_impro01"
                uid = f"{dialog}_{gender}{counter:03d}"
                counter += 1
                dur = float(rng.uniform(*durations))
                freq = (CLASS_FREQS[c] if c is not None else 3000.0) * detune
                wav = tone(freq, dur, rng)
                path = root / f"Session{s}" / "sentences" / "wav" / dialog / f"{uid}.wav"
                path.parent.mkdir(parents=True, exist_ok=True)
                sf.write(str(path), wav, SAMPLE_RATE, subtype="PCM_16")
                code = {"angry": "ang", "happy": "hap", "neutral": "neu", "sad": "sad", None: "fru"}[c]
                records.append({
                    "id": uid, "path": str(path.resolve()), "session": s, "speaker": f"Ses{s:02d}{gender}",
                    "gender": gender, "dialog": dialog, "scripted": scripted, "emotion_code": code,
                    "label": c, "transcript": f"tone {code} {k}", "duration": len(wav) / SAMPLE_RATE,
                })
    manifest = root / "manifest.jsonl"
    write_jsonl(manifest, records)
    return manifest


def tiny_config(tmp_path: str | Path, manifest: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """configs/base.yaml + vft.yaml + tiny.yaml, writing under tmp_path/runs."""
    ov = [f"output_dir={Path(tmp_path) / 'runs'}"]
    if manifest is not None:
        ov.append(f"data.manifest={manifest}")
    return load_config(*TINY_CONFIGS, overrides=ov + list(overrides))


def tiny_encoder_config(**fields) -> EncoderConfig:
    """The tiny random layer-norm encoder of configs/tiny.yaml, with field overrides."""
    enc = load_config(*TINY_CONFIGS).encoder
    for k, v in fields.items():
        if not hasattr(enc, k):
            raise AttributeError(f"EncoderConfig has no field {k}")
        setattr(enc, k, v)
    return enc


def tiny_audio_classifier(seed: int = 0, **encoder_fields):
    """A tiny AudioClassifier (random weights, seeded)."""
    from mmser.models.heads import AudioClassifier
    from mmser.models.wav2vec2 import AudioEncoder

    torch.manual_seed(seed)
    return AudioClassifier(AudioEncoder.from_config(tiny_encoder_config(**encoder_fields)), num_classes=len(CLASSES))


def make_batch(lengths: Sequence[int], seed: int = 0, labels: Sequence[int] | None = None) -> dict:
    """A batch-contract dict of random waveforms with the given lengths (samples), zero-padded."""
    g = torch.Generator().manual_seed(seed)
    t_max = max(lengths)
    audio = torch.zeros(len(lengths), t_max)
    mask = torch.zeros(len(lengths), t_max, dtype=torch.bool)
    for i, n in enumerate(lengths):
        audio[i, :n] = 0.1 * torch.randn(n, generator=g)
        mask[i, :n] = True
    if labels is None:
        labels = [i % len(CLASSES) for i in range(len(lengths))]
    return {"ids": [f"utt{i}" for i in range(len(lengths))], "audio": audio, "audio_mask": mask,
            "labels": torch.tensor(list(labels), dtype=torch.long)}


# A saved text / fusion model's text side (config.json "text"): the offline MiniLM, gold transcripts.
TEXT_SIDE = {"encoder": "minilm-offline", "pooling": "mean", "max_length": 16, "fine_tuned": False,
             "source": "gold", "asr": None}


# The reliability catalogue (tests/test_reliability_catalogue*.py): each case records its outcome
# through the `catalogue` fixture (conftest.py), printed as one `case | outcome` table at the end.
def cli_last_line(capsys, *argv: str) -> tuple[int, str]:
    """Exit code and the last stderr line of `mmser ARGV` (in process)."""
    from mmser.cli import main

    capsys.readouterr()
    code = main(list(argv))
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, (err[-1] if err else "")


def cli_error(capsys, catalogue, case, argv, expect_in, code=2) -> str:
    """Assert `mmser ARGV` fails with one `mmser: error:` line containing `expect_in`; record it."""
    got, line = cli_last_line(capsys, *argv)
    assert got == code and line.startswith("mmser: error:") and expect_in in line, (got, line)
    catalogue(case, line)
    return line


def random_openai_whisper_state(dims) -> dict:
    """A state dict of openai-whisper's `Whisper(dims)` with every tensor set from torch's seeded RNG.
    The text decoder's positional embedding is `torch.empty` (real checkpoints overwrite it), so a
    freshly built model holds whatever memory it got: NaN now and then, and a flaky test."""
    import torch
    from whisper.model import Whisper

    model = Whisper(dims)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not torch.isfinite(p).all() or name.endswith("positional_embedding"):
                p.normal_(0.0, 0.02)
    return model.state_dict()


def espeak_speech(root: Path, sentences: Sequence[str]) -> list[np.ndarray]:
    """espeak-ng speaking each sentence, resampled to 16 kHz mono float32 with scipy (skips the test
    where espeak-ng is not installed)."""
    import shutil
    import subprocess
    from math import gcd

    from scipy.signal import resample_poly

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    out = []
    for i, text in enumerate(sentences):
        raw = Path(root) / f"raw{i}.wav"
        subprocess.run(["espeak-ng", "-w", str(raw), text], check=True, capture_output=True)
        audio, sr = sf.read(raw, dtype="float32")
        g = gcd(sr, 16000)
        out.append(resample_poly(audio, 16000 // g, sr // g).astype(np.float32))
    return out


def signal_mid_training(args: Sequence[str], sig: int, epoch_line: str = "epoch 2/200") -> tuple[int, str]:
    """Run `python -m mmser ARGS` from the repo, send it `sig` once its stderr shows `epoch_line`
    (training is under way), and return (exit code, the rest of its stderr)."""
    import os
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "mmser", *args], stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        for line in proc.stderr:
            if epoch_line in line:
                break
        proc.send_signal(sig)
        err = proc.stderr.read()
        code = proc.wait(timeout=120)
    finally:
        proc.kill()
    return code, err


def write_csv_table(path: Path, rows: Sequence[dict]) -> Path:
    """`rows` (dicts with the same keys) as a CSV file with a header line."""
    import csv

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path
