"""Fusion training: an epoch with cached text features vs one that recomputes them every step.

    .venv/bin/python benchmarks/fusion.py [--n 128 --shape small --epochs 2 --out runs/bench/fusion.json]

Both run `run_one` with configs/base.yaml + vft.yaml + fusion_concat.yaml (frozen audio encoder of
`--shape`, random; concat head; the real all-MiniLM-L6-v2 text encoder of `text.encoder=minilm-offline`)
on the same synthetic corpus (noise audio with IEMOCAP's durations, varied English transcripts):
- **cached** (mmser's `text.freeze=true`): the text features are computed once per manifest, written to
  the feature cache and read into every batch; the one-off encoding is timed apart (`cache_fill_s`);
- **recomputed**: the same frozen text encoder inside the model, run on every batch's token ids
  (`WithTextEncoder` with its parameters frozen): what a pipeline without the cache pays every epoch.
Figures: seconds per training epoch (the last of `--epochs`), and the ratio. A figure, not a test.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for benchmarks/
from benchmarks.asr import SENTENCES  # noqa: E402
from benchmarks.common import SHAPES, machine, save, shape_overrides, table, write_corpus  # noqa: E402


def with_transcripts(manifest: Path) -> Path:
    """The manifest with varied transcripts (SENTENCES, cycled, numbered) instead of "synthetic"."""
    from mmser.data.manifest import load_manifest
    from mmser.io import write_jsonl

    out = manifest.with_name(manifest.stem + "-text.jsonl")
    if not out.is_file():
        recs = load_manifest(manifest)
        for i, r in enumerate(recs):
            r["transcript"] = f"{SENTENCES[i % len(SENTENCES)]} Number {i}."
        write_jsonl(out, recs)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: base on GPU, small on CPU")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from benchmarks.vft_throughput import logging_quiet
    from mmser.config import load_config
    from mmser.data.manifest import load_manifest, task_records
    from mmser.models.fusion import FusionClassifier, build_fusion_head
    from mmser.models.text_encoder import TextEncoder, WithTextEncoder, tokenize
    from mmser.models.wav2vec2 import AudioEncoder
    from mmser.text.embed import TextEncoderSpec, build_text_model, texts_for
    from mmser.training import multimodal
    from mmser.training.run import run_one

    logging_quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = torch.cuda.is_available()
    shape = args.shape or ("base" if gpu else "small")
    result = {"benchmark": "fusion", "machine": machine(),
              "setup": {"n_train": args.n, "shape": shape, "epochs": args.epochs, "batch_size": args.batch_size,
                        "text_encoder": "minilm-offline (all-MiniLM-L6-v2)", "head": "concat, frozen audio"}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        manifest = with_transcripts(write_corpus(work / "corpus", args.n))

        def config(name: str, extra: list[str]):
            return load_config("base", "vft", "fusion_concat", overrides=[
                f"output_dir={work / name}", f"data.manifest={manifest}", f"data.batch_size={args.batch_size}",
                "data.num_workers=0", f"finetune.epochs={args.epochs}", "tracking.wandb=disabled",
                f"trainer.accelerator={'gpu' if gpu else 'cpu'}", 'trainer.devices="1"',
                f"text.cache_dir={work / name / 'cache'}", *shape_overrides(shape), *extra])

        # cached: fill the cache (timed), then train
        cfg = config("cached", [])
        t0 = time.perf_counter()
        multimodal.text_features_for(cfg)
        cache_fill = time.perf_counter() - t0
        cached = multimodal.run_task(cfg, 1, 0, work / "cached" / "run")["perf"]["epochs"][-1]

        # recomputed: the frozen text encoder inside the model
        cfg = config("recomputed", ["text.freeze=false"])
        spec = TextEncoderSpec.from_config(cfg.text)
        tokenizer, text_model = build_text_model(spec)
        for p in text_model.parameters():
            p.requires_grad = False
        ids = tokenize(texts_for(task_records(load_manifest(manifest)), "gold"), tokenizer, cfg.text.max_length)

        def factory(c, num_classes: int):
            encoder = AudioEncoder.from_config(c.encoder)
            head = build_fusion_head(c.fusion, encoder.hidden_size, int(text_model.config.hidden_size), num_classes)
            inner = FusionClassifier(encoder, head, freeze_audio=True, branch_loss_weight=c.fusion.branch_loss_weight)
            return WithTextEncoder(inner, TextEncoder(text_model, c.text.pooling))

        recomputed = run_one(cfg, 1, 0, work / "recomputed" / "run", model_factory=factory, text_ids=ids,
                             job_type="fusion")["perf"]["epochs"][-1]
    result.update({"cache_fill_s": cache_fill, "cached": cached, "recomputed": recomputed,
                   "ratio_epoch_seconds": recomputed["seconds"] / cached["seconds"],
                   "ratio_epoch_cpu_seconds": recomputed["cpu_seconds"] / cached["cpu_seconds"]})
    print(table(["fusion epoch", "seconds", "CPU seconds", "note"],
                [["cached text features", cached["seconds"], cached["cpu_seconds"],
                  f"+ {cache_fill:.2f} s once to fill the cache"],
                 ["recomputed every step", recomputed["seconds"], recomputed["cpu_seconds"], None],
                 ["recomputed / cached", result["ratio_epoch_seconds"], result["ratio_epoch_cpu_seconds"], None]]))
    save(result, args.out)
    return result


if __name__ == "__main__":
    main()
