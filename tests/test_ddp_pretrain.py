"""TAPT and P-TAPT as 2 DDP processes on the CPU (gloo): one distributed training per training step,
P-TAPT's step (b) (frame features + k-means) run once, on rank 0, and every stage folder written once."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from helpers import TINY_CONFIGS, write_toy_corpus

SCRIPT = textwrap.dedent("""
    import logging, sys
    from pathlib import Path

    import torch.distributed as dist

    from mmser.config import load_config
    from mmser.data.manifest import load_manifest, split_fold
    from mmser.training.ptapt import driver
    from mmser.training.ptapt.driver import run_ptapt
    from mmser.training.tapt import run_tapt

    logging.basicConfig(level=logging.WARNING)
    configs, manifest, out = sys.argv[1].split(","), sys.argv[2], Path(sys.argv[3])
    cfg = load_config(*configs, "tiny_pretrain", overrides=[
        f"data.manifest={manifest}", f"output_dir={out}", "trainer.strategy=ddp", 'trainer.devices="2"'])
    fold = split_fold(load_manifest(manifest), 1, cfg.data)
    real = driver.cluster_frames

    def counted(*args, **kwargs):  # one line per call of step (b), naming the process
        rank = dist.get_rank() if dist.is_initialized() else -1
        with open(out / "step_b_calls.txt", "a") as f:
            f.write(f"rank {rank} of {dist.get_world_size() if dist.is_initialized() else 1}\\n")
        return real(*args, **kwargs)

    driver.cluster_frames = counted

    from mmser.training import tapt
    real_hook = tapt.TaptModule.on_before_batch_transfer

    def recorded(self, batch, dataloader_idx):  # each rank's TAPT masks, per micro-batch
        out_batch = real_hook(self, batch, dataloader_idx)
        m = out_batch["mask_time_indices"]
        with open(out / f"tapt_masks_rank{self.global_rank}.txt", "a") as f:
            f.write(f"{m.shape[1]} {m.flatten().nonzero().flatten().tolist()}\\n")
        return out_batch

    tapt.TaptModule.on_before_batch_transfer = recorded
    run_ptapt(cfg, fold, out / "ptapt")
    run_tapt(cfg, fold, out / "tapt")
""")


@pytest.mark.slow
def test_tapt_and_ptapt_on_two_cpu_processes(tmp_path):
    manifest = write_toy_corpus(tmp_path / "toy", per_class=2, durations=(0.3, 0.8))
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "pretrain_ddp.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), ",".join(str(c) for c in TINY_CONFIGS), str(manifest),
                           str(out)], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # step (b) ran once, on global rank 0 of a 2-process group (the other rank waited)
    assert (out / "step_b_calls.txt").read_text().splitlines() == ["rank 0 of 2"]

    def done(path):
        return json.loads((path / "DONE.json").read_text())

    labels = done(out / "ptapt" / "pseudo_labels")
    assert labels["rank"] == 0 and labels["world_size"] == 2
    assert done(out / "ptapt" / "frame_model")["world_size"] == 2  # (a): one DDP training
    enc = done(out / "ptapt" / "encoder")
    assert enc["world_size"] == 2 and enc["steps"] == 12  # (c): tiny_pretrain's total_steps, shared by ranks
    tapt = done(out / "tapt")
    assert tapt["world_size"] == 2 and tapt["steps"] == 12
    assert (out / "tapt" / "encoder" / "config.json").is_file()
    assert (out / "ptapt" / "encoder" / "config.json").is_file()
    # every rank draws its own masks (the global RNGs are seeded alike on both ranks)
    masks = [(out / f"tapt_masks_rank{r}.txt").read_text().splitlines() for r in (0, 1)]
    assert len(masks[0]) == len(masks[1]) >= 12
    assert sum(a != b for a, b in zip(*masks, strict=True)) >= len(masks[0]) - 1  # (a chance match of tiny masks)
