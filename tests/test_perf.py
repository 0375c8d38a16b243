"""mmser.perf: FLOPs from the config (cross-checked with torch's FLOP counter), MFU per epoch in
metrics.json, the attention kernel actually taken, torch.compile in place, bf16 autocast on CPU."""

from __future__ import annotations

import pytest
import torch
from helpers import make_batch, single_torch_thread, tiny_config, tiny_encoder_config, write_toy_corpus  # noqa: F401
from torch.utils.flop_counter import FlopCounterMode
from transformers import Wav2Vec2Config, Wav2Vec2Model

from mmser.models.wav2vec2 import AudioEncoder, build_encoder
from mmser.perf import (
    PEAK_TFLOPS,
    compile_transformer_layers,
    encoder_forward_flops,
    flops_per_audio_second,
    peak_flops,
    precision_family,
    set_attention_implementation,
    training_flops,
)


def _small_config(**kw) -> Wav2Vec2Config:
    return Wav2Vec2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                          conv_dim=[32, 32, 32], conv_kernel=[10, 4, 4], conv_stride=[5, 4, 4],
                          num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, feat_extract_norm="layer",
                          **kw)


@pytest.mark.parametrize("n_samples", [4000, 16000])
def test_forward_flops_match_torch_flop_counter(n_samples):
    """The closed form (convs, linears, attention) against torch's own count of the eager forward."""
    cfg = _small_config()
    model = Wav2Vec2Model(cfg).eval()
    model.set_attn_implementation("eager")  # matmuls the counter sees (CPU SDPA is one fused op)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, n_samples))
    f = encoder_forward_flops(cfg, [n_samples])
    ours = sum(v for k, v in f.items() if k != "frames")
    assert ours == pytest.approx(counter.get_total_flops(), rel=0.01)
    # one utterance of n == two of n/2 only for the linear parts: attention grows with F^2
    assert f["frames"] == int(model._get_feat_extract_output_lengths(n_samples))


def test_wav2vec2_base_costs_about_14_gflops_per_audio_second_with_a_third_in_the_cnn():
    per_s = flops_per_audio_second(Wav2Vec2Config())
    assert 13e9 < per_s["forward"] < 16e9
    assert 0.30 < per_s["cnn_share"] < 0.37
    # V-FT: frozen CNN and projection count forward only; the rest forward + 2 x backward
    f = encoder_forward_flops(Wav2Vec2Config(), [160000])
    expected = f["cnn"] + f["projection"] + 3 * (f["pos_conv"] + f["transformer"])
    assert training_flops(Wav2Vec2Config(), [160000]) == pytest.approx(expected)
    everything = training_flops(Wav2Vec2Config(), [160000], cnn_trainable=True, projection_trainable=True)
    assert everything == pytest.approx(3 * sum(v for k, v in f.items() if k != "frames"))
    frozen = training_flops(Wav2Vec2Config(), [160000], transformer_trainable=False)  # fusion, frozen audio
    assert frozen == pytest.approx(sum(v for k, v in f.items() if k != "frames"))


def test_trainable_parts_follow_requires_grad():
    from mmser.perf import trainable_parts

    model = build_encoder(tiny_encoder_config())  # V-FT freezing
    assert trainable_parts(model) == {"cnn_trainable": False, "projection_trainable": False,
                                      "transformer_trainable": True}
    for p in model.parameters():
        p.requires_grad = False
    assert trainable_parts(model)["transformer_trainable"] is False


def test_peak_flops_table_override_and_cpu():
    assert peak_flops("bf16-mixed", "cpu") is None  # no MFU on a CPU unless told the peak
    assert peak_flops("bf16-mixed", "cpu", override_tflops=2.5) == 2.5e12
    assert precision_family("bf16-mixed") == "bf16" and precision_family("16-mixed") == "fp16"
    assert len({name for name, _ in PEAK_TFLOPS}) == len(PEAK_TFLOPS)


@pytest.mark.parametrize("device_name, entry, fp16", [
    # torch.cuda.get_device_name strings as the drivers report them; dense fp16 peaks from the datasheets
    ("NVIDIA H100 80GB HBM3", "H100", 989.4), ("NVIDIA H100 PCIe", "H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", "H100 NVL", 835.5), ("NVIDIA H200", "H200", 989.4), ("NVIDIA H200 NVL", "H200 NVL", 835.5),
    ("NVIDIA GH200 480GB", "GH200", 989.4), ("NVIDIA A100-SXM4-80GB", "A100", 312.0),
    ("NVIDIA A100 80GB PCIe", "A100", 312.0), ("NVIDIA A100-PCIE-40GB", "A100", 312.0),
    ("NVIDIA L40", "L40", 181.05), ("NVIDIA L40S", "L40S", 362.05), ("NVIDIA L4", "L4", 121.0),
    ("NVIDIA A10G", "A10G", 70.0), ("NVIDIA A10", "A10", 125.0), ("NVIDIA A40", "A40", 149.7),
    ("NVIDIA A30", "A30", 165.0), ("Tesla V100-SXM2-16GB", "V100", 125.0), ("Tesla V100-PCIE-32GB", "V100 PCIe", 112.0),
    ("Tesla V100S-PCIE-32GB", "V100S", 130.0), ("Tesla T4", "T4", 65.0),
    ("NVIDIA GeForce RTX 4090", None, None), ("NVIDIA RTX A6000", None, None), ("NVIDIA H800", None, None),
])
def test_peak_table_matches_whole_model_names(device_name, entry, fp16, monkeypatch):
    """issue 23 item 12: matched by substring, "NVIDIA L40" took the L4's peak and "H100 NVL" the SXM's."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: device_name)
    assert peak_flops("16-mixed", "cuda") == (pytest.approx(fp16 * 1e12) if fp16 else None)
    from mmser.perf import peak_entry

    assert peak_entry(device_name) == entry


class _Ranked:
    """What ThroughputMonitor.on_train_epoch_end reads of a trainer and a module, with the logged calls."""

    def __init__(self, world_size: int):
        self.world_size, self.current_epoch, self.device, self.calls = world_size, 0, torch.device("cpu"), []

    def log(self, key, value, **kwargs):
        self.calls.append((key, kwargs))

    def modules(self):  # no encoder found by on_train_epoch_start: the test sets one
        return iter(())


def test_every_rank_logs_the_same_epoch_keys_whether_or_not_it_knows_its_peak():
    """issue 23 item 12: `train/mfu` is logged with sync_dist (a collective); a rank without a known
    peak (a node of another GPU model) skipped it on main, leaving the others waiting in it."""
    from mmser.perf import ThroughputMonitor, trainable_parts

    hf = build_encoder(tiny_encoder_config())
    logged = []
    for peak in (100.0, None):  # a rank whose GPU is in the table, and one whose GPU is not
        mon = ThroughputMonitor("32-true", peak_tflops=peak)
        ranked = _Ranked(world_size=2)
        mon.on_train_epoch_start(ranked, ranked)
        mon._hf, mon._parts = hf, trainable_parts(hf)
        mon.on_train_batch_end(ranked, ranked, None, make_batch([1600, 800]), 0)
        mon.on_train_epoch_end(ranked, ranked)
        logged.append(ranked.calls)
    assert logged[0] == logged[1] == [("train/tflops_per_s", {"sync_dist": True}), ("train/mfu", {"sync_dist": True})]


def test_sdpa_is_the_kernel_taken_by_default_and_eager_on_request(monkeypatch):
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    batch = make_batch([800, 1200])
    enc_cfg = tiny_encoder_config()
    assert enc_cfg.attn_implementation == "auto"
    encoder = AudioEncoder.from_config(enc_cfg).eval()
    assert encoder.model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        out_sdpa, _ = encoder.encode(batch["audio"], batch["audio_mask"])
    assert len(calls) == enc_cfg.num_hidden_layers  # one fused call per transformer layer
    calls.clear()
    set_attention_implementation(encoder.model, "eager")
    with torch.no_grad():
        out_eager, _ = encoder.encode(batch["audio"], batch["audio_mask"])
    assert calls == []
    assert torch.allclose(out_sdpa, out_eager, atol=1e-5)  # the same function, padding mask included


def test_sdpa_on_an_encoder_without_it_is_an_error_and_auto_falls_back():
    with pytest.raises(RuntimeError, match="asked for attention 'sdpa', got 'eager'"):
        build_encoder(tiny_encoder_config(kind="wavlm", attn_implementation="sdpa"))
    assert build_encoder(tiny_encoder_config(kind="wavlm")).config._attn_implementation == "eager"


def test_compile_in_place_keeps_state_dict_keys_and_outputs():
    torch.manual_seed(0)
    model = build_encoder(tiny_encoder_config()).eval()
    keys = list(model.state_dict())
    x = torch.randn(2, 1600)
    with torch.no_grad():
        before = model(x).last_hidden_state
    # backend "eager": the wiring (Dynamo traces each layer) without a C++ compiler; inductor on GPU
    assert compile_transformer_layers(model, backend="eager") == 2
    with torch.no_grad():
        after = model(x).last_hidden_state
    assert list(model.state_dict()) == keys
    assert torch.allclose(before, after, atol=1e-6)


def test_metrics_json_has_per_epoch_throughput_and_mfu(tmp_path):
    from mmser.training.run import run_one

    manifest = write_toy_corpus(tmp_path / "toy", per_class=1)
    cfg = tiny_config(tmp_path, manifest, ["finetune.epochs=2", "trainer.peak_tflops=0.5"])
    m = run_one(cfg, test_session=1, seed=0, run_dir=tmp_path / "run")
    perf = m["perf"]
    assert perf["attention"] == "sdpa" and perf["compiled_layers"] == 0
    assert [e["epoch"] for e in perf["epochs"]] == [0, 1]
    for e in perf["epochs"]:
        assert e["steps"] == 4 and 0 < e["padding_efficiency"] <= 1  # 32 training clips, batch 8
        assert e["train_tflops"] <= e["train_tflops_padded"]
        assert e["mfu"] == pytest.approx(e["train_tflops"] / e["seconds"] / 0.5)
        assert e["peak_memory_gb"] is None  # CPU
    assert perf["mfu"] == pytest.approx(sum(e["mfu"] for e in perf["epochs"]) / 2)
    # the training audio of an epoch = the clips' real samples (first train_crop_s seconds)
    n_audio = sum(min(r["duration"], 10.0) for r in _train_records(manifest))
    assert perf["epochs"][0]["audio_seconds"] == pytest.approx(n_audio, rel=1e-3)


def test_bf16_autocast_trains_on_cpu(tmp_path):
    """bf16-mixed (trainer.precision=auto-bf16 on a GPU with native bf16) through the real run on CPU:
    finite, complete, recorded."""
    from mmser.training.run import run_one

    manifest = write_toy_corpus(tmp_path / "toy", per_class=1)
    cfg = tiny_config(tmp_path, manifest, ["finetune.epochs=1", "trainer.precision=bf16-mixed"])
    m = run_one(cfg, test_session=1, seed=0, run_dir=tmp_path / "run")
    assert m["precision"] == "bf16-mixed" and m["perf"]["precision"] == "bf16-mixed"
    assert m["test"]["n"] == 8 and m["perf"]["mfu"] is None  # no peak known for a CPU


def _train_records(manifest):
    from mmser.data.manifest import load_manifest

    return [r for r in load_manifest(manifest) if r["label"] is not None and r["session"] != 1]


def _on_meta(batch: dict) -> dict:
    """`batch` as after a transfer to a device whose data cannot be read here: tensors on the meta
    device (shapes only; any read of a value raises), everything else as it was."""
    return {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def test_per_step_counts_read_no_device_tensor():
    """issue 23 item 10: the per-step statistics (ClassifierModule's samples, ThroughputMonitor's audio
    and FLOPs) come from the CPU batch, read before the transfer. A batch on the meta device (any read
    of a value raises, as a GPU read would sync) gives the same numbers as the same batch on the CPU."""
    from torch import nn

    from mmser.perf import ThroughputMonitor, trainable_parts
    from mmser.training.finetune import ClassifierModule

    lengths = [1600, 1200, 800]
    hf = build_encoder(tiny_encoder_config())

    def count(batch: dict) -> dict:
        mon = ThroughputMonitor("32-true")
        mon._hf, mon._parts = hf, trainable_parts(hf)  # what on_train_epoch_start finds
        mon.on_train_batch_end(None, None, None, batch, 0)
        return {"real": mon._real, "padded": mon._padded, "flops": mon._flops, "padded_flops": mon._padded_flops}

    on_cpu = count(make_batch(lengths))  # lengths read from the mask (a CPU tensor: no sync)
    moved = {**_on_meta(make_batch(lengths)), "audio_lengths": lengths}  # Python ints, read on the CPU
    assert count(moved) == on_cpu and on_cpu["real"] == sum(lengths) and on_cpu["padded"] == 3 * 1600

    class Constant(nn.Module):  # logits from a parameter: the step needs no audio values
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(4))

        def forward(self, batch):
            return self.w.expand(len(batch["ids"]), 4)  # (B, C)

    module = ClassifierModule(Constant())
    module.log = lambda *a, **k: None  # no trainer here
    batch = module.on_before_batch_transfer(make_batch(lengths), 0)
    batch = {**_on_meta(batch), "labels": batch["labels"]}  # loss on the CPU, audio and mask "on the device"
    module.training_step(batch, 0)
    assert module.stats["real_samples"] == sum(lengths) and module.stats["padded_samples"] == 3 * 1600
    assert module._epoch_audio == pytest.approx(sum(lengths) / 16000)
    from mmser.perf import add_audio_lengths

    assert add_audio_lengths(make_batch(lengths))["audio_lengths"] == lengths
