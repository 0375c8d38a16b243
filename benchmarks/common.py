"""What the benchmark scripts share: the machine they ran on, a synthetic corpus with IEMOCAP's
duration distribution (random noise: throughput does not depend on content), model shapes, the
printed table and the JSON file."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for benchmarks/
from benchmarks.durations import SR, iemocap_like_durations  # noqa: E402

# Encoder shapes. "base": wav2vec2-base (95 M parameters). "small": the same CNN strides/kernels (20 ms
# frames, the real frame counts) with 64 CNN channels and a 4-layer 256-wide transformer, for CPUs.
# "tiny": smoke tests only.
SHAPES: dict[str, dict] = {
    "base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
             "conv_dim": [512] * 7, "conv_kernel": [10, 3, 3, 3, 3, 2, 2], "conv_stride": [5, 2, 2, 2, 2, 2, 2],
             "num_conv_pos_embeddings": 128, "num_conv_pos_embedding_groups": 16},
    "small": {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 1024,
              "conv_dim": [64] * 7, "conv_kernel": [10, 3, 3, 3, 3, 2, 2], "conv_stride": [5, 2, 2, 2, 2, 2, 2],
              "num_conv_pos_embeddings": 64, "num_conv_pos_embedding_groups": 16},
    "tiny": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
             "conv_dim": [32, 32, 32], "conv_kernel": [10, 4, 4], "conv_stride": [5, 4, 4],
             "num_conv_pos_embeddings": 16, "num_conv_pos_embedding_groups": 2},
}
TINY_QUANTIZER = {"codevector_dim": 16, "num_codevector_groups": 2, "num_codevectors_per_group": 8,
                  "proj_codevector_dim": 16}


def shape_overrides(shape: str) -> list[str]:
    """`encoder.*` overrides that build a random encoder of `shape` (mmser config syntax)."""
    out = ["encoder.name=random"]
    for k, v in SHAPES[shape].items():
        out.append(f"encoder.{k}={json.dumps(v)}")
    if shape == "tiny":
        out += [f"encoder.{k}={v}" for k, v in TINY_QUANTIZER.items()] + ["encoder.mask_feature_length=8"]
    return out


def machine() -> dict:
    """Where and when a figure was measured."""
    info = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "cpu_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "gpu": None,
            # other work on the machine while it ran (a shared CPU makes wall-clock figures noisy)
            "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu"] = names[0]
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


def write_corpus(root: Path, n_train: int, n_test: int = 8, seed: int = 0, test_max_s: float | None = 2.0,
                 scale: float = 1.0, min_s: float = 0.6) -> Path:
    """Random-noise wavs + an mmser manifest: `n_train` utterances with IEMOCAP-like durations (x `scale`,
    at least `min_s`) spread over sessions 2-5 (the training sessions of fold 1) and `n_test` in session 1
    (uniform in [min_s, test_max_s], or IEMOCAP-like when test_max_s is None). Returns the manifest
    path. Idempotent (an existing manifest of the same shape is reused)."""
    from mmser.io import write_jsonl
    from mmser.labels import CLASSES

    root = Path(root)
    manifest = root / f"manifest-{n_train}-{n_test}-{seed}-{test_max_s}-{scale}-{min_s}.jsonl"
    if manifest.is_file():
        return manifest
    rng = np.random.default_rng(seed)
    durations = np.maximum(iemocap_like_durations(n_train + n_test, seed=seed) * scale, min_s)
    records = []
    for i in range(n_train + n_test):
        test = i >= n_train
        session = 1 if test else 2 + i % 4
        dur = float(rng.uniform(min_s, test_max_s)) if (test and test_max_s) else float(durations[i])
        gender = "FM"[i % 2]
        dialog = f"Ses{session:02d}{gender}_impro01"
        uid = f"{dialog}_{gender}{i:04d}"
        label = CLASSES[i % len(CLASSES)]
        path = root / "wav" / f"{uid}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        wav = (0.1 * rng.standard_normal(int(dur * SR))).astype(np.float32)
        sf.write(str(path), wav, SR, subtype="PCM_16")
        records.append({"id": uid, "path": str(path.resolve()), "session": session,
                        "speaker": f"Ses{session:02d}{gender}", "gender": gender, "dialog": dialog,
                        "scripted": False, "emotion_code": label[:3], "label": label,
                        "transcript": "synthetic", "duration": len(wav) / SR})
    write_jsonl(manifest, records)
    return manifest


def table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A Markdown table; floats with 3 significant decimals."""
    def fmt(x):
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
        return "-" if x is None else str(x)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def save(result: dict, out: str | Path | None) -> None:
    """Write `result` as JSON (atomically) when `out` is given."""
    if out is None:
        return
    from mmser.io import atomic_write_json

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
