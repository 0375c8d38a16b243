"""V-FT training throughput: mmser's real training run against a plain transformers baseline.

    .venv/bin/python benchmarks/vft_throughput.py [--n 4446 --steps 6 --shape small --batch-size 64
        --precision 32-true --epochs 1 --repeats 1 --out runs/bench/vft_throughput.json]

Both train the same randomly initialised wav2vec 2.0-style encoder (`--shape`, benchmarks/common.py:
"small" on a CPU, "base" = wav2vec2-base on a GPU) for `--epochs` epochs over the same `--n` wav files
with IEMOCAP's duration distribution (benchmarks/durations.py), cropped to 10 s, at the same batch size
and precision, the CNN (and feature projection) frozen, SpecAugment p=0.08/0.05, Adam 1e-4:
- **mmser**: `mmser.training.run.run_one` with configs/base.yaml + vft.yaml (length-bucketed batches,
  its masking, Lightning, everything the real command does); seconds and audio seconds from the
  per-epoch `perf` block of its metrics.json (training epochs only: not the test, not saving).
- **baseline**: what one writes with transformers alone: `Wav2Vec2ForSequenceClassification`,
  `freeze_feature_encoder()`, a DataLoader of random batches (shuffle=True) padded to the longest
  item with an attention mask, autocast at the same precision, a plain PyTorch loop.
Figures: audio seconds per wall second (training epochs), padding efficiency, achieved TFLOP/s (model
FLOPs of the real frames, mmser.perf), and the ratio mmser / baseline. The last epoch counts (with
--epochs 1, both include their first-step warm-up). `--steps S` times only the first S batches of
each epoch (mmser: finetune.max_steps): both batch orders are shuffled, so those are a random sample of
the full epoch's batches (padding efficiency included) at a fraction of the time; the default corpus
is fold 1's training-set size (4,446). A figure, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for benchmarks/
from benchmarks.common import SHAPES, machine, save, shape_overrides, table, write_corpus  # noqa: E402


def _autocast(precision: str, device: torch.device):
    if precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision.startswith("16"):
        return torch.autocast(device.type, dtype=torch.float16)
    return torch.autocast(device.type, enabled=False)


def run_baseline(records: list[dict], shape: str, batch_size: int, precision: str, epochs: int,
                 num_workers: int, seed: int = 0, steps: int | None = None) -> dict:
    """The plain transformers V-FT loop; per-epoch seconds, audio seconds, padding efficiency, FLOPs."""
    from torch.utils.data import DataLoader, Dataset
    from transformers import Wav2Vec2Config, Wav2Vec2ForSequenceClassification

    from mmser.data.dataset import read_audio
    from mmser.labels import CLASS_TO_INDEX
    from mmser.perf import training_flops

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    hidden = SHAPES[shape]["hidden_size"]
    cfg = Wav2Vec2Config(**SHAPES[shape], num_labels=4, mask_time_prob=0.08, mask_time_length=15,
                         mask_time_min_masks=2, mask_feature_prob=0.05, mask_feature_length=min(64, hidden),
                         mask_feature_min_masks=1)
    model = Wav2Vec2ForSequenceClassification(cfg).to(device)
    model.freeze_feature_encoder()
    for p in model.wav2vec2.feature_projection.parameters():  # as mmser (and the reference)
        p.requires_grad = False
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    crop = 10 * 16000

    class Clips(Dataset):
        def __len__(self):
            return len(records)

        def __getitem__(self, i):
            r = records[i]
            return torch.from_numpy(read_audio(r["path"], 16000)[:crop]), CLASS_TO_INDEX[r["label"]]

    def collate(items):
        n = max(len(a) for a, _ in items)
        x = torch.zeros(len(items), n)
        m = torch.zeros(len(items), n, dtype=torch.long)
        for i, (a, _) in enumerate(items):
            x[i, :len(a)] = a
            m[i, :len(a)] = 1
        return x, m, torch.tensor([y for _, y in items])

    loader = DataLoader(Clips(), batch_size=batch_size, shuffle=True, collate_fn=collate, num_workers=num_workers,
                        pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(seed))
    rows = []
    for epoch in range(epochs):
        model.train()
        real = padded = n_steps = 0
        flops = 0.0
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0, cpu0 = time.perf_counter(), time.process_time()
        for x, m, y in loader:
            x, m, y = x.to(device, non_blocking=True), m.to(device, non_blocking=True), y.to(device)
            with _autocast(precision, device):
                loss = model(x, attention_mask=m, labels=y).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            lengths = m.sum(-1).cpu()
            real += int(lengths.sum())
            padded += m.numel()
            n_steps += 1
            flops += training_flops(cfg, lengths)
            if steps is not None and n_steps >= steps:  # as finetune.max_steps
                break
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        rows.append({"epoch": epoch, "seconds": seconds, "cpu_seconds": time.process_time() - cpu0,
                     "steps": n_steps, "audio_seconds": real / 16000,
                     "audio_s_per_s": real / 16000 / seconds, "padding_efficiency": real / padded,
                     "achieved_tflops_per_s": flops / seconds / 1e12,
                     "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None})
    return rows[-1]


def run_mmser(manifest: Path, shape: str, batch_size: int, precision: str, epochs: int, num_workers: int,
              out_dir: Path, extra: list[str], steps: int | None = None) -> dict:
    """`run_one` (configs/base.yaml + vft.yaml) on fold 1 of `manifest`; its last training epoch."""
    from mmser.config import load_config
    from mmser.training.run import run_one

    accel = "gpu" if torch.cuda.is_available() else "cpu"
    overrides = [f"output_dir={out_dir}", f"data.manifest={manifest}", f"data.batch_size={batch_size}",
                 f"data.num_workers={num_workers}", f"finetune.epochs={epochs}", f"trainer.precision={precision}",
                 f"trainer.accelerator={accel}", 'trainer.devices="1"', "tracking.wandb=disabled",
                 *shape_overrides(shape), *([f"finetune.max_steps={steps}"] if steps else []), *extra]
    cfg = load_config("base", "vft", overrides=overrides)
    m = run_one(cfg, test_session=1, seed=0, run_dir=out_dir / "run")
    return m["perf"]["epochs"][-1]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4446, help="training utterances (IEMOCAP-like durations)")
    ap.add_argument("--steps", type=int, default=None, help="time the first STEPS batches of each epoch only")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: base on GPU, small on CPU")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--precision", default=None, help="default: bf16-mixed on GPU, 32-true on CPU")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="alternate baseline / mmser this many times; median")
    ap.add_argument("--num-workers", type=int, default=None, help="loader workers (default 0 on CPU, 4 on GPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--workdir", default=None, help="where the synthetic corpus and runs go (default: a temp dir)")
    ap.add_argument("--mmser-override", action="append", default=[], help="extra key=value for the mmser run")
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args(argv)
    if args.steps is not None and args.epochs != 1:
        ap.error("--steps times part of one epoch: use it with --epochs 1")
    gpu = torch.cuda.is_available()
    shape = args.shape or ("base" if gpu else "small")
    precision = args.precision or ("bf16-mixed" if gpu else "32-true")
    workers = args.num_workers if args.num_workers is not None else (4 if gpu else 0)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging_quiet()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        manifest = write_corpus(work / "corpus", args.n)
        from mmser.data.manifest import load_manifest

        train = [r for r in load_manifest(manifest) if r["session"] != 1]
        runs = {"baseline": [], "mmser": []}
        for rep in range(args.repeats):
            runs["baseline"].append(run_baseline(train, shape, args.batch_size, precision, args.epochs, workers,
                                                 steps=args.steps))
            runs["mmser"].append(run_mmser(manifest, shape, args.batch_size, precision, args.epochs, workers,
                                           work / f"mmser-{rep}-{time.time_ns()}", args.mmser_override,
                                           steps=args.steps))

    def med(name, key):
        vals = [r[key] for r in runs[name] if r.get(key) is not None]
        return float(np.median(vals)) if vals else None

    for rows in runs.values():
        for r in rows:
            r["audio_s_per_cpu_s"] = r["audio_seconds"] / r["cpu_seconds"] if r.get("cpu_seconds") else None
    summary = {name: {k: med(name, k) for k in ("seconds", "cpu_seconds", "audio_s_per_s", "audio_s_per_cpu_s",
                                                "padding_efficiency", "achieved_tflops_per_s", "peak_memory_gb")}
               for name in runs}
    ratio = summary["mmser"]["audio_s_per_s"] / summary["baseline"]["audio_s_per_s"]
    cpu_ratio = (summary["mmser"]["audio_s_per_cpu_s"] / summary["baseline"]["audio_s_per_cpu_s"]
                 if summary["baseline"]["audio_s_per_cpu_s"] else None)
    result = {"benchmark": "vft_throughput", "machine": machine(),
              "setup": {"n_train": len(train), "audio_seconds": sum(min(r["duration"], 10.0) for r in train),
                        "shape": shape, "encoder": SHAPES[shape], "batch_size": args.batch_size,
                        "precision": precision, "epochs": args.epochs, "steps_per_epoch": args.steps,
                        "repeats": args.repeats,
                        "num_workers": workers, "mmser_overrides": args.mmser_override},
              "baseline": summary["baseline"], "mmser": summary["mmser"], "runs": runs,
              "ratio_audio_s_per_s": ratio, "ratio_audio_s_per_cpu_s": cpu_ratio}
    print(table(["", "audio s/s (wall)", "audio s/CPU s", "padding eff.", "TFLOP/s", "epoch s", "peak GB"],
                [[name, s["audio_s_per_s"], s["audio_s_per_cpu_s"], s["padding_efficiency"],
                  s["achieved_tflops_per_s"], s["seconds"], s["peak_memory_gb"]] for name, s in summary.items()]
                + [["mmser / baseline", ratio, cpu_ratio, None, None, None, None]]))
    print(json.dumps(result["setup"]))
    save(result, args.out)
    return result


def logging_quiet() -> None:
    import logging
    import warnings

    for name in ("pytorch_lightning", "lightning", "lightning_fabric", "mmser"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")


if __name__ == "__main__":
    main()
