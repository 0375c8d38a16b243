"""The GPU path on a real GPU (opt-in: `pytest -m gpu`; skipped without CUDA). Written and run on CPU
counterparts here; not yet run on a GPU (see the README's "Performance and scaling")."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_config, write_toy_corpus

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("precision", ["auto", "auto-bf16"])
def test_tiny_run_on_the_gpu_uses_mixed_precision_sdpa_and_reports_memory(tmp_path, precision):
    from mmser.perf import native_bf16
    from mmser.training.run import run_one

    manifest = write_toy_corpus(tmp_path / "toy", per_class=1)
    cfg = tiny_config(tmp_path, manifest, ["finetune.epochs=1", "trainer.accelerator=gpu",
                                           f"trainer.precision={precision}", "trainer.peak_tflops=100"])
    m = run_one(cfg, test_session=1, seed=0, run_dir=tmp_path / "run")
    # auto = the reference's fp16 AMP on every GPU; auto-bf16 = bf16 only with native support (>= sm80)
    assert m["precision"] == ("bf16-mixed" if precision == "auto-bf16" and native_bf16() else "16-mixed")
    perf = m["perf"]
    assert perf["attention"] == "sdpa"
    assert perf["epochs"][0]["peak_memory_gb"] > 0 and perf["epochs"][0]["mfu"] > 0
    assert m["test"]["n"] == 8


def test_kmeans_on_the_gpu_matches_the_cpu():
    from mmser.training.ptapt.clustering import kmeans

    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(200, 8, generator=g) + 10 * i for i in range(4)])
    c_cpu, s_cpu = kmeans(x, 4, iters=10, seed=0)
    c_gpu, s_gpu = kmeans(x.cuda(), 4, iters=10, seed=0)
    assert s_gpu["inertia"] == pytest.approx(s_cpu["inertia"], rel=1e-3)
    assert torch.allclose(c_gpu.cpu().sort(0).values, c_cpu.sort(0).values, atol=1e-3)
