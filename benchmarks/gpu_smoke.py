"""One smoke-and-measure run of every training path (what `benchmarks/gpu.sh` runs).

    bash benchmarks/gpu.sh [--tiny] [--out runs/bench/gpu.json]
    .venv/bin/python benchmarks/gpu_smoke.py [--tiny] [--out FILE] [--workdir DIR]

No downloads: random models of wav2vec2-base's shape and synthetic noise audio with IEMOCAP's
duration distribution (benchmarks/durations.py; 4,446 training utterances in sessions 2-5 as fold 1
of the real corpus, and 200 test utterances). Stages, each timed, each failure recorded and the
next stage run anyway:
1. **vft**: one V-FT epoch through `run_one` (configs/base.yaml + vft.yaml: batch 64, length buckets,
   10 s crops, so several batches of 64 x 10 s; precision "auto" = 16-mixed on a GPU, the reference's),
   with its test and saved model; seconds per epoch, audio s/s, MFU and peak memory from metrics.json.
2. **tapt**: 50 TAPT steps (`run_tapt`, 250 s batches).
3. **ptapt**: P-TAPT steps (a) 20 steps, (b) features + k-means K = 64/512/4,096, (c) 50 steps
   (`run_ptapt`, frame_model=wav2vec2: no wav2vec 1.0 checkpoint here).
4. **kmeans**: k-means, K = 4,096, 20 iterations, on 1M x 512 random frames (`mmser...kmeans`).
4b. **batch64x10s**: three V-FT training steps (the real `ClassifierModule.training_step`, at the
   run's precision) on one batch of 64 utterances padded to 10 s, without gradient checkpointing:
   seconds per step and peak memory (does the paper's batch fit?). The real lengths vary (IEMOCAP's
   durations cropped at 10 s, the longest exactly 10 s), so the padding mask is not all ones and SDPA
   takes the masked kernel that real batches take (an all-ones mask lets it take the flash kernel).
5. **ddp**: with >= 2 GPUs, the V-FT epoch again as 2 DDP processes (`mmser train`, trainer.devices=2).
6. **default_all_gpus**: with >= 2 GPUs, `mmser train -c base -c vft trainer.devices=auto`: the
   DEFAULT strategy and LayerDrop on every visible GPU (plain DDP used to fail there: issue 23 item 1);
   its log line with the batch arithmetic is kept. Tiny mode: 2 CPU processes, LayerDrop 0.5.
7. **precision**: what `trainer.precision=auto` and `auto-bf16` resolve to here, with the device's
   compute capability and whether its bf16 is native (issue 23 item 2).
8. **tapt_accumulation**: peak memory and seconds per optimizer step of a few TAPT steps at 250 s per
   step in one batch vs two accumulated micro-batches of 125 s (issue 23 item 5); skipped when
   `tapt.accumulate_grad_batches` is unknown to this tree.
Multi-process stages run in a process group of their own, killed whole on timeout (Lightning's DDP
launcher starts ranks 1.. as children of rank 0). `--tiny` (the default without a GPU) shrinks every
shape so the whole run takes seconds on a CPU (a default-suite test runs it). Writes one JSON
(machine, setup, one entry per stage, failures) and prints a table; exits 1 when a stage failed.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for benchmarks/
from benchmarks.common import machine, save, shape_overrides, table, write_corpus  # noqa: E402
from benchmarks.durations import iemocap_like_durations  # noqa: E402

# Full: the GPU run. Tiny: the CPU smoke (tiny.yaml / tiny_pretrain.yaml shapes).
SCALES = {
    "full": {"n_train": 4446, "n_test": 200, "scale": 1.0, "min_s": 0.6, "shape": "base",
             "tapt_steps": 50, "frame_steps": 20, "ptapt_steps": 50, "clusters": [64, 512, 4096],
             "kmeans": (1_000_000, 512, 4096), "workers": min(8, os.cpu_count() or 1), "big_batch": (64, 10.0),
             "accumulation_steps": 6},
    "tiny": {"n_train": 24, "n_test": 8, "scale": 0.12, "min_s": 0.3, "shape": "tiny",
             "tapt_steps": 3, "frame_steps": 3, "ptapt_steps": 3, "clusters": [4, 8],
             "kmeans": (2000, 32, 16), "workers": 0, "big_batch": (4, 1.0), "accumulation_steps": 2},
}


def stage_config(sc: dict, work: Path, manifest: Path, extra: list[str]):
    from mmser.config import load_config

    tiny = sc["shape"] == "tiny"
    files = ["base", "vft"] + (["tiny", "tiny_pretrain"] if tiny else [])
    overrides = [f"output_dir={work / 'runs'}", f"data.manifest={manifest}", f"data.num_workers={sc['workers']}",
                 "finetune.epochs=1", "tracking.wandb=disabled", *shape_overrides(sc["shape"]),
                 f"tapt.total_steps={sc['tapt_steps']}", "tapt.warmup_steps=1", "tapt.hold_steps=1",
                 "ptapt.frame_model=wav2vec2", f"ptapt.frame_steps={sc['frame_steps']}",
                 "ptapt.frame_warmup_steps=1", "ptapt.frame_hold_steps=1",
                 f"ptapt.cluster_sizes={json.dumps(sc['clusters'])}",
                 f"ptapt.total_steps={sc['ptapt_steps']}", "ptapt.warmup_steps=1", "ptapt.hold_steps=1"]
    if not tiny:
        overrides += ["trainer.precision=auto", "trainer.devices=\"1\""]
    else:
        overrides += ["trainer.accelerator=cpu"]
    return load_config(*files, overrides=overrides + extra)


def _peak_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def run_vft(cfg, work: Path) -> dict:
    from mmser.training.run import run_one

    m = run_one(cfg, test_session=1, seed=0, run_dir=work / "vft")
    e = m["perf"]["epochs"][-1]
    return {"seconds_per_epoch": e["seconds"], "audio_s_per_s": e["audio_s_per_s"], "steps": e["steps"],
            "padding_efficiency": e["padding_efficiency"], "train_tflops": e["train_tflops"],
            "mfu": e["mfu"], "peak_memory_gb": e["peak_memory_gb"], "precision": m["precision"],
            "attention": m["perf"]["attention"], "test_n": m["test"]["n"]}


def _fold(cfg):
    from mmser.data.manifest import load_manifest, split_fold

    return split_fold(load_manifest(cfg.data.manifest), 1, cfg.data)


def run_tapt_stage(cfg, work: Path) -> dict:
    from mmser.io import read_json
    from mmser.training.tapt import run_tapt

    _reset_peak()
    t0 = time.perf_counter()
    run_tapt(cfg, _fold(cfg), work / "tapt")
    seconds = time.perf_counter() - t0
    done = read_json(work / "tapt" / "DONE.json")
    info = done.get("info", done)
    perf = info.get("perf", {})
    epochs = perf.get("epochs", [])
    audio = sum(e["audio_seconds"] for e in epochs)
    train_s = sum(e["seconds"] for e in epochs)
    cpu_s = sum(e.get("cpu_seconds") or 0.0 for e in epochs)
    return {"steps": info.get("steps"), "stage_seconds": seconds, "train_seconds": train_s,
            "train_cpu_seconds": cpu_s, "audio_s_per_cpu_s": audio / cpu_s if cpu_s else None,
            "seconds_per_step": train_s / info["steps"] if info.get("steps") else None,
            "audio_s_per_s": audio / train_s if train_s else None, "mfu": perf.get("mfu"),
            "peak_memory_gb": _peak_gb(), "final_loss": info.get("final_loss")}


def run_ptapt_stage(cfg, work: Path) -> dict:
    from mmser.io import read_json
    from mmser.training.ptapt.driver import run_ptapt

    _reset_peak()
    t0 = time.perf_counter()
    out = work / "ptapt"
    run_ptapt(cfg, _fold(cfg), out)
    seconds = time.perf_counter() - t0

    def info(path: Path) -> dict:
        d = read_json(path)
        return d.get("info", d)

    a, b, c = info(out / "frame_model" / "DONE.json"), info(out / "pseudo_labels" / "DONE.json"), \
        info(out / "encoder" / "DONE.json")
    meta = read_json(out / "pseudo_labels" / "meta.json")
    perf = c.get("perf", {})
    epochs = perf.get("epochs", [])
    audio = sum(e["audio_seconds"] for e in epochs)
    train_s = sum(e["seconds"] for e in epochs)
    cpu_s = sum(e.get("cpu_seconds") or 0.0 for e in epochs)
    return {"stage_seconds": seconds, "a_seconds": a.get("seconds"), "a_steps": a.get("steps"),
            "c_train_cpu_seconds": cpu_s, "c_audio_s_per_cpu_s": audio / cpu_s if cpu_s else None,
            "b_seconds": b.get("seconds"), "b_feature_seconds": meta.get("feature_seconds"),
            "b_frames": meta.get("n_frames"),
            "b_kmeans_seconds": {k: v["seconds"] for k, v in meta.get("kmeans", {}).items()},
            "c_steps": c.get("steps"), "c_seconds": c.get("seconds"),
            "c_seconds_per_step": train_s / c["steps"] if c.get("steps") else None,
            "c_audio_s_per_s": audio / train_s if train_s else None, "c_mfu": perf.get("mfu"),
            "peak_memory_gb": _peak_gb()}


def kmeans_frames(n: int, d: int, clusters: int = 4096, seed: int = 0) -> torch.Tensor:
    """(n, d) float32 frames around `clusters` random centres, on the GPU when there is one."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, d, generator=g)
    return (centres[torch.randint(0, clusters, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g)).to(device)


def time_kmeans(x: torch.Tensor, k: int, iters: int = 20) -> dict:
    """mmser's k-means (P-TAPT step (b), k-means++ init) on `x`, timed."""
    from mmser.training.ptapt.clustering import kmeans

    _reset_peak()
    if x.is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    _, stats = kmeans(x, k, iters=iters, seed=0)
    if x.is_cuda:
        torch.cuda.synchronize()
    return {"n": int(x.shape[0]), "dim": int(x.shape[1]), "k": k, "iters": iters,
            "seconds": time.perf_counter() - t0, "inertia": stats["inertia"], "device": x.device.type,
            "peak_memory_gb": _peak_gb()}


def run_kmeans(sc: dict) -> dict:
    n, d, k = sc["kmeans"]
    return time_kmeans(kmeans_frames(n, d, clusters=k), k)


def big_batch_lengths(b: int, seconds: float, sample_rate: int, seed: int = 0) -> list[int]:
    """`b` real lengths (samples): IEMOCAP-like durations scaled to a `seconds` crop (x seconds / 10)
    and cropped there, the longest exactly `seconds`: the padded shape is (b, seconds), the mask varies."""
    durations = np.minimum(iemocap_like_durations(b, seed=seed) * seconds / 10.0, seconds)
    durations[0] = seconds
    return [int(d * sample_rate) for d in durations]


def run_big_batch(cfg, sc: dict) -> dict:
    """Three V-FT steps on one (B, T) batch padded to full length, real lengths varied: step seconds,
    peak memory."""
    from mmser.perf import add_audio_lengths
    from mmser.training.finetune import ClassifierModule
    from mmser.training.run import apply_speed_switches, build_audio_model, resolve_precision

    b, seconds = sc["big_batch"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(cfg.trainer)
    dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision.split("-")[0])
    model = build_audio_model(cfg)
    speed = apply_speed_switches(cfg, model)
    module = ClassifierModule(model, None, lr=cfg.finetune.lr).to(device).train()
    opt = module.configure_optimizers()
    lengths = big_batch_lengths(b, seconds, cfg.data.sample_rate)
    n = max(lengths)
    mask = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]  # (B, T): varied, not all ones
    cpu_batch = add_audio_lengths({"ids": [str(i) for i in range(b)], "audio": 0.1 * torch.randn(b, n) * mask,
                                   "audio_mask": mask, "labels": torch.arange(b) % 4})
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in cpu_batch.items()}
    module.log = lambda *a, **k: None  # no trainer here
    _reset_peak()
    times = []
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = module.training_step(batch, 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"batch": b, "seconds_each": seconds, "padding_efficiency": sum(lengths) / (b * n), "precision": precision,
            "gradient_checkpointing": cfg.encoder.gradient_checkpointing, "step_seconds": times,
            "peak_memory_gb": _peak_gb(), **speed}


def run_group(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """`cmd` in a process group of its own, killed whole on timeout or when this script is stopped
    (gpu.sh's `timeout` sends SIGTERM): Lightning's DDP launcher starts ranks 1.. as children of rank 0,
    and killing rank 0 alone (what subprocess.run's timeout does) leaves them running on the GPUs."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        out, err = proc.communicate(timeout=timeout)
    except BaseException:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_ddp(cfg_overrides: list[str], work: Path, manifest: Path, sc: dict) -> dict:
    if torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU(s): DDP needs 2"}
    run_dir = work / "ddp"
    cmd = [sys.executable, "-m", "mmser.cli", "-q", "train", "-c", "base", "-c", "vft", "--session", "1",
           "--seed", "0", "--run-dir", str(run_dir), f"output_dir={work / 'runs'}", f"data.manifest={manifest}",
           "data.batch_size=32", f"data.num_workers={sc['workers']}", "finetune.epochs=1",
           "tracking.wandb=disabled", "trainer.strategy=ddp", 'trainer.devices="2"', *shape_overrides(sc["shape"]),
           *cfg_overrides]
    t0 = time.perf_counter()
    proc = run_group(cmd, timeout=400)
    if proc.returncode != 0:
        raise RuntimeError(f"mmser train (DDP, 2 GPUs) exited {proc.returncode}: {proc.stderr[-1500:]}")
    m = json.loads((run_dir / "metrics.json").read_text())
    e = m["perf"]["epochs"][-1]
    return {"world_size": m["world_size"], "process_seconds": time.perf_counter() - t0,
            "seconds_per_epoch": e["seconds"], "audio_s_per_s_per_rank": e["audio_s_per_s"],
            "mfu_rank0": e["mfu"], "peak_memory_gb_rank0": e["peak_memory_gb"], "test_n": m["test"]["n"]}


def run_default_all_gpus(cfg_overrides: list[str], work: Path, manifest: Path, sc: dict) -> dict:
    """`mmser train -c base -c vft` with the default strategy and LayerDrop on every visible GPU
    (trainer.devices=auto, the opt-in to several); tiny: 2 CPU processes with LayerDrop 0.5."""
    tiny = sc["shape"] == "tiny"
    if not tiny and torch.cuda.device_count() < 2:
        return {"skipped": f"{torch.cuda.device_count()} GPU(s): several devices need 2"}
    run_dir = work / "default_all_gpus"
    configs = ["-c", "base", "-c", "vft"] + (["-c", "tiny"] if tiny else [])
    devices = (["trainer.accelerator=cpu", "trainer.devices=2", "encoder.layerdrop=0.5"] if tiny
               else ["trainer.devices=auto"])
    cmd = [sys.executable, "-m", "mmser.cli", "train", *configs, "--session", "1", "--seed", "0",
           "--run-dir", str(run_dir), f"output_dir={work / 'runs'}", f"data.manifest={manifest}",
           f"data.num_workers={sc['workers']}", "finetune.epochs=1", "tracking.wandb=disabled",
           *shape_overrides(sc["shape"]), *devices, *cfg_overrides]
    t0 = time.perf_counter()
    proc = run_group(cmd, timeout=400)
    if proc.returncode != 0:
        raise RuntimeError(f"mmser train (default config, all devices) exited {proc.returncode}: "
                           f"{proc.stderr[-1500:]}")
    m = json.loads((run_dir / "metrics.json").read_text())
    e = m["perf"]["epochs"][-1]
    batch_line = next((line.split("INFO mmser.training: ", 1)[-1] for line in proc.stderr.splitlines()
                       if "per optimizer step (global batch)" in line), None)
    return {"world_size": m["world_size"], "process_seconds": time.perf_counter() - t0, "batch": batch_line,
            "precision": m["precision"], "seconds_per_epoch": e["seconds"],
            "audio_s_per_s_per_rank": e["audio_s_per_s"], "peak_memory_gb_rank0": e["peak_memory_gb"],
            "test_n": m["test"]["n"]}


def run_precision(cfg) -> dict:
    """What trainer.precision=auto / auto-bf16 resolve to on this machine, with the evidence."""
    from mmser.perf import native_bf16
    from mmser.training.run import resolve_precision

    info: dict = {"cuda": torch.cuda.is_available(), "device": None, "capability": None,
                  "bf16_supported_with_emulation": None, "native_bf16": False}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        info.update(device=torch.cuda.get_device_name(), capability=f"{major}.{minor}",
                    bf16_supported_with_emulation=bool(torch.cuda.is_bf16_supported()), native_bf16=native_bf16())
    for value in ("auto", "auto-bf16"):
        info[value] = resolve_precision(dataclasses.replace(cfg.trainer, precision=value))
    print(f"precision: {info['device'] or 'CPU'} (compute capability {info['capability']}, native bf16 "
          f"{info['native_bf16']}): auto -> {info['auto']}, auto-bf16 -> {info['auto-bf16']}", flush=True)
    return info


def run_tapt_accumulation(cfg, work: Path, sc: dict) -> dict:
    """A few TAPT optimizer steps of tapt.max_batch_seconds each, in one batch and in two accumulated
    micro-batches: peak memory and seconds per step of each."""
    from mmser.config import TaptConfig
    from mmser.training.tapt import run_tapt

    if "accumulate_grad_batches" not in {f.name for f in dataclasses.fields(TaptConfig)}:
        return {"skipped": "tapt.accumulate_grad_batches is unknown to this tree"}
    out: dict = {"max_batch_seconds": cfg.tapt.max_batch_seconds}
    steps = sc["accumulation_steps"]
    for k in (1, 2):
        c = copy.deepcopy(cfg)
        c.tapt.accumulate_grad_batches, c.tapt.total_steps = k, steps
        c.tapt.warmup_steps = c.tapt.hold_steps = 1
        _reset_peak()
        t0 = time.perf_counter()
        run_tapt(c, _fold(c), work / f"tapt_accumulate{k}")
        seconds = time.perf_counter() - t0
        out[f"accumulate{k}"] = {"micro_batch_seconds": cfg.tapt.max_batch_seconds / k, "steps": steps,
                                 "stage_seconds": seconds, "peak_memory_gb": _peak_gb()}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (the default without a GPU)")
    ap.add_argument("--full", action="store_true", help="full shapes even without a GPU (slow on a CPU)")
    ap.add_argument("--out", default="runs/bench/gpu.json", help="the JSON file written")
    ap.add_argument("--workdir", default=None, help="corpus and run folders (default: a temporary folder)")
    ap.add_argument("--only", nargs="+", choices=["vft", "tapt", "ptapt", "kmeans", "batch64x10s", "ddp",
                                                  "default_all_gpus", "precision", "tapt_accumulation"], default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: 1 in tiny mode, where tiny matrices gain nothing from more "
                         "and threads fight on a busy CPU; torch's default otherwise)")
    ap.add_argument("overrides", nargs="*", help="extra mmser key=value overrides (e.g. trainer.compile=true)")
    args = ap.parse_args(argv)
    for name in ("pytorch_lightning", "lightning", "lightning_fabric", "mmser"):
        import logging

        logging.getLogger(name).setLevel(logging.WARNING)
    mode = "tiny" if args.tiny or (not args.full and not torch.cuda.is_available()) else "full"
    sc = SCALES[mode]
    threads = args.threads or (1 if mode == "tiny" else None)
    if threads:
        torch.set_num_threads(threads)
    t_start = time.perf_counter()
    result = {"benchmark": "gpu_smoke", "mode": mode, "machine": machine(), "setup": dict(sc),
              "overrides": args.overrides, "failures": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        t0 = time.perf_counter()
        manifest = write_corpus(work / "corpus", sc["n_train"], sc["n_test"], test_max_s=None,
                                scale=sc["scale"], min_s=sc["min_s"])
        result["corpus_seconds"] = time.perf_counter() - t0
        cfg_for = lambda: stage_config(sc, work, manifest, args.overrides)  # noqa: E731 (fresh per stage)
        stages = {"vft": lambda: run_vft(cfg_for(), work), "tapt": lambda: run_tapt_stage(cfg_for(), work),
                  "ptapt": lambda: run_ptapt_stage(cfg_for(), work), "kmeans": lambda: run_kmeans(sc),
                  "batch64x10s": lambda: run_big_batch(cfg_for(), sc),
                  "ddp": lambda: run_ddp(args.overrides, work, manifest, sc),
                  "default_all_gpus": lambda: run_default_all_gpus(args.overrides, work, manifest, sc),
                  "precision": lambda: run_precision(cfg_for()),
                  "tapt_accumulation": lambda: run_tapt_accumulation(cfg_for(), work, sc)}
        for name, fn in stages.items():
            if args.only and name not in args.only:
                continue
            t0 = time.perf_counter()
            try:
                result[name] = fn()
            except Exception as e:  # noqa: BLE001 - record and go on with the next stage
                result[name] = None
                result["failures"].append({"stage": name, "error": f"{type(e).__name__}: {e}"[:2000],
                                           "traceback": traceback.format_exc()[-3000:]})
            result.setdefault("stage_wall_seconds", {})[name] = time.perf_counter() - t0
            save(result, args.out)  # after every stage: a run cut short by gpu.sh's timeout keeps what it measured
    result["seconds_total"] = time.perf_counter() - t_start
    rows = []
    for name in stages:
        r = result.get(name)
        if r is None:
            rows.append([name, "FAILED" if name in {f["stage"] for f in result["failures"]} else "not run",
                         None, None, None])
            continue
        if "skipped" in r:
            rows.append([name, r["skipped"], None, None, None])
            continue
        secs = (r.get("seconds_per_epoch") or r.get("seconds") or r.get("stage_seconds")
                or (min(r["step_seconds"]) if r.get("step_seconds") else None))
        aps = r.get("audio_s_per_s") or r.get("c_audio_s_per_s") or r.get("audio_s_per_s_per_rank")
        mfu = r.get("mfu") or r.get("c_mfu") or r.get("mfu_rank0")
        rows.append([name, secs, aps, mfu, r.get("peak_memory_gb") or r.get("peak_memory_gb_rank0")])
    print(table(["stage", "seconds (epoch / stage)", "audio s/s", "MFU", "peak GB"], rows))
    for f in result["failures"]:
        print(f"FAILED {f['stage']}: {f['error']}", file=sys.stderr)
    print(f"total {result['seconds_total']:.1f} s ({mode}); JSON: {args.out}")
    save(result, args.out)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
