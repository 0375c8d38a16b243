"""TAPT and P-TAPT step throughput and k-means time, at a scale given on the command line.

    .venv/bin/python benchmarks/pretraining.py [--n 64 --shape small --tapt-steps 4 --frame-steps 4
        --ptapt-steps 4 --kmeans-n 20000 --kmeans-dim 512 --kmeans-k 64 512 4096 --kmeans-iters 20
        --out runs/bench/pretraining.json]

The paper's scale is `--n 4446 --shape base --tapt-steps 20000 ...` and k-means on ~1M x 512 frames
(`--kmeans-n 1000000`): minutes on a GPU, hours on a CPU, so the CPU defaults are scaled down and the
JSON records the shapes used. Each stage is the real one (`run_tapt`, `run_ptapt` with
frame_model=wav2vec2, `kmeans`) on synthetic noise with IEMOCAP's duration distribution
(benchmarks/common.py); figures: seconds per step, audio seconds per second of training, k-means
seconds per K. A figure, not a test.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for benchmarks/
from benchmarks.common import SHAPES, machine, save, table, write_corpus  # noqa: E402
from benchmarks.gpu_smoke import (  # noqa: E402
    kmeans_frames,
    run_ptapt_stage,
    run_tapt_stage,
    stage_config,
    time_kmeans,
)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=64, help="training utterances (IEMOCAP-like durations)")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: base on GPU, small on CPU")
    ap.add_argument("--tapt-steps", type=int, default=4)
    ap.add_argument("--frame-steps", type=int, default=4, help="P-TAPT step (a) steps")
    ap.add_argument("--ptapt-steps", type=int, default=4, help="P-TAPT step (c) steps")
    ap.add_argument("--clusters", type=int, nargs="+", default=[64, 512], help="P-TAPT step (b) K values")
    ap.add_argument("--kmeans-n", type=int, default=20000)
    ap.add_argument("--kmeans-dim", type=int, default=512)
    ap.add_argument("--kmeans-k", type=int, nargs="+", default=[64, 512, 4096])
    ap.add_argument("--kmeans-iters", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args(argv)
    from benchmarks.vft_throughput import logging_quiet

    logging_quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = args.shape or ("base" if torch.cuda.is_available() else "small")
    sc = {"n_train": args.n, "n_test": 8, "shape": shape, "tapt_steps": args.tapt_steps,
          "frame_steps": args.frame_steps, "ptapt_steps": args.ptapt_steps, "clusters": args.clusters,
          "workers": 0 if not torch.cuda.is_available() else 4}
    result = {"benchmark": "pretraining", "machine": machine(), "setup": {**sc, "encoder": SHAPES[shape]}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        manifest = write_corpus(work / "corpus", args.n, 8)
        result["tapt"] = run_tapt_stage(stage_config(sc, work, manifest, []), work)
        result["ptapt"] = run_ptapt_stage(stage_config(sc, work, manifest, []), work)
    x = kmeans_frames(args.kmeans_n, args.kmeans_dim, clusters=max(args.kmeans_k))
    result["kmeans"] = [time_kmeans(x, k, args.kmeans_iters) for k in args.kmeans_k]
    t, p = result["tapt"], result["ptapt"]
    rows = [["TAPT", t["steps"], t["seconds_per_step"], t["audio_s_per_s"],
             f"{t['audio_s_per_cpu_s']:.3g} audio s per CPU s" if t.get("audio_s_per_cpu_s") else None],
            ["P-TAPT (a) frame model", p["a_steps"], p["a_seconds"] / max(p["a_steps"] or 1, 1), None, None],
            ["P-TAPT (b) features", p["b_frames"], p["b_feature_seconds"], None, "frames, seconds"],
            ["P-TAPT (c)", p["c_steps"], p["c_seconds_per_step"], p["c_audio_s_per_s"],
             f"{p['c_audio_s_per_cpu_s']:.3g} audio s per CPU s" if p.get("c_audio_s_per_cpu_s") else None]]
    rows += [[f"k-means K={k['k']}", k["n"], k["seconds"], None, f"{k['n']} x {k['dim']}, {k['iters']} it."]
             for k in result["kmeans"]]
    print(table(["stage", "steps / frames", "s per step (k-means: s)", "audio s/s", "note"], rows))
    save(result, args.out)
    return result


if __name__ == "__main__":
    main()
