"""Speed accounting: model FLOPs of a wav2vec 2.0-style encoder from its config and real frame counts,
peak FLOPs of known GPUs, model FLOP utilisation (MFU) per epoch, and the GPU-path switches that
change speed but not the objective (SDPA attention, torch.compile).

FLOPs (multiply-add = 2 FLOPs), per utterance of S valid samples, counted from the HF config:
- CNN layer i: 2 * C_in * C_out * k_i * F_i (F_i = that layer's output frames; C_in = 1 first);
- feature projection: 2 * C_last * H * F (+ LayerNorm, negligible);
- positional conv: 2 * (H / groups) * H * K * F;
- per transformer layer: 8 H^2 F (Q, K, V, O) + 4 F^2 H (scores and weighted sum) + 4 H I F (FFN);
- the classifier head and norms are left out (< 0.1%).
Training FLOPs = forward of every part + 2 x forward of the parts with trainable parameters (backward
~ 2 x forward); V-FT freezes the CNN and the feature projection (forward only). wav2vec2-base:
~14 GFLOPs forward per second of audio, ~35% of it in the CNN. The MFU numerator counts REAL frames
only (padding is waste, and MFU should show it); `padded` figures count the padded batch shape.

MFU = training FLOPs done / (seconds x peak FLOPs/s of the device at the run's precision). The peak
comes from `PEAK_TFLOPS` (dense, no sparsity, vendor datasheets) by GPU name, or from
`trainer.peak_tflops`; on a CPU, or a GPU not in the table, it is None and so is the MFU.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Sequence

import torch
from pytorch_lightning.callbacks import Callback
from torch import nn

log = logging.getLogger(__name__)

# Dense peak TFLOP/s by GPU model, per precision family: "bf16" (bf16-mixed), "fp16" (16-mixed),
# "tf32" (32-true with TF32 matmuls), "fp32". Vendor datasheets, without structured sparsity (the
# sheets' starred figures halved). None = not supported. A key is the whole-word tokens a
# `torch.cuda.get_device_name` must contain ("H100 NVL" = tokens H100 and NVL); the key with the most
# tokens wins (`peak_entry`), so "NVIDIA L40" is an L40, never an L4, and "NVIDIA H100 NVL" is not SXM.
# Sources: NVIDIA H100 Tensor Core GPU datasheet (SXM, PCIe, NVL per GPU); H200 datasheet (SXM, NVL);
# GH200 Grace Hopper datasheet; A100 datasheet (SXM and PCIe: the same peaks); A30, A40, A10, L40,
# L40S, L4 datasheets; V100 datasheet (SXM2, PCIe, V100S PCIe); T4 datasheet. A10G (AWS) has no NVIDIA
# datasheet: the commonly quoted figure.
PEAK_TFLOPS: list[tuple[str, dict[str, float | None]]] = [
    ("GH200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM
    ("H200 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM ("H100 80GB HBM3")
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    ("A40", {"bf16": 149.7, "fp16": 149.7, "tf32": 74.8, "fp32": 37.4}),
    ("A30", {"bf16": 165.0, "fp16": 165.0, "tf32": 82.0, "fp32": 10.3}),
    ("L40S", {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    ("L40", {"bf16": 181.05, "fp16": 181.05, "tf32": 90.5, "fp32": 90.5}),
    ("L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    ("A10G", {"bf16": 70.0, "fp16": 70.0, "tf32": 35.0, "fp32": 31.2}),
    ("A10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    ("V100", {"bf16": None, "fp16": 125.0, "tf32": None, "fp32": 15.7}),  # SXM2
    ("V100 PCIe", {"bf16": None, "fp16": 112.0, "tf32": None, "fp32": 14.0}),
    ("V100S", {"bf16": None, "fp16": 130.0, "tf32": None, "fp32": 16.4}),
    ("T4", {"bf16": None, "fp16": 65.0, "tf32": None, "fp32": 8.1}),
]


def _tokens(text: str) -> set[str]:
    return {t for t in re.split(r"[\s\-_/()]+", text.upper()) if t}


def peak_entry(device_name: str) -> str | None:
    """The PEAK_TFLOPS key for a CUDA device name: the key whose tokens are all whole tokens of the
    name, the one with the most tokens when several are ("NVIDIA H100 NVL" -> "H100 NVL"); None when
    none is (an unknown GPU: no MFU rather than a wrong one)."""
    name = _tokens(device_name)
    best: tuple[int, str] | None = None
    for key, _ in PEAK_TFLOPS:
        tokens = _tokens(key)
        if tokens <= name and (best is None or len(tokens) > best[0]):
            best = (len(tokens), key)
    return best[1] if best else None


def precision_family(precision: str) -> str:
    """Lightning precision string -> the PEAK_TFLOPS column it runs at."""
    p = str(precision)
    if p.startswith("bf16"):
        return "bf16"
    if p.startswith("16"):
        return "fp16"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


def peak_flops(precision: str, device: torch.device | str | None = None, override_tflops: float | None = None
               ) -> float | None:
    """Peak FLOP/s of `device` at `precision`: `override_tflops` x 1e12 when given, else the table's
    entry for the CUDA device's name, else None (CPU, unknown GPU)."""
    if override_tflops is not None:
        return float(override_tflops) * 1e12
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return None
    key = peak_entry(torch.cuda.get_device_name(device))
    if key is None:
        return None
    value = dict(PEAK_TFLOPS)[key].get(precision_family(precision))
    return value * 1e12 if value is not None else None


def native_bf16(device: torch.device | int | None = None) -> bool:
    """Whether the CUDA device computes in bf16 natively: compute capability >= 8.0 (Ampere and later)
    and `torch.cuda.is_bf16_supported(including_emulation=False)` where torch has that argument.
    `is_bf16_supported()` alone counts emulation, so it is True on V100 / T4 (7.x), where bf16 has no
    cuDNN convolution engines and no memory-efficient SDPA kernel (the math kernel keeps full attention
    matrices: batch 64 x 10 s goes out of memory). The one bf16 check of mmser (trainer.precision=auto-bf16)."""
    if not torch.cuda.is_available():
        return False
    major, _minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch < 2.3: no such argument, and capability >= 8.0 is native
        return bool(torch.cuda.is_bf16_supported())


# -- FLOPs ----------------------------------------------------------------------------------------


def _conv_out(n: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    return torch.div(n - kernel, stride, rounding_mode="floor").add(1).clamp_min(0)


def encoder_forward_flops(config, lengths: Sequence[int] | torch.Tensor) -> dict[str, float]:
    """Forward FLOPs of a wav2vec 2.0-style encoder (HF config: conv_dim / conv_kernel / conv_stride,
    hidden_size, num_hidden_layers, intermediate_size, num_conv_pos_embeddings, ...) on utterances of
    `lengths` samples each, split into "cnn", "projection", "pos_conv", "transformer"; "frames" = the
    encoder frames."""
    n = torch.as_tensor(lengths, dtype=torch.float64).reshape(-1)  # (B,)
    cnn = torch.zeros((), dtype=torch.float64)
    c_in = 1
    for c_out, k, s in zip(config.conv_dim, config.conv_kernel, config.conv_stride, strict=True):
        n = _conv_out(n, k, s)
        cnn = cnn + 2.0 * c_in * c_out * k * n.sum()
        c_in = c_out
    frames = n  # (B,)
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    f_sum, f_sq = float(frames.sum()), float((frames * frames).sum())
    groups = getattr(config, "num_conv_pos_embedding_groups", 16)
    pos_k = getattr(config, "num_conv_pos_embeddings", 128)
    return {
        "cnn": float(cnn),
        "projection": 2.0 * c_in * h * f_sum,
        "pos_conv": 2.0 * (h / groups) * h * pos_k * f_sum,
        "transformer": layers * ((8.0 * h * h + 4.0 * h * i) * f_sum + 4.0 * h * f_sq),
        "frames": f_sum,
    }


def training_flops(config, lengths: Sequence[int] | torch.Tensor, *, cnn_trainable: bool = False,
                   projection_trainable: bool = False, transformer_trainable: bool = True) -> float:
    """Forward + backward FLOPs of one training step over utterances of `lengths` samples: backward =
    2 x forward for the trainable parts (V-FT: positional conv + transformer; TAPT: everything; fusion
    with a frozen audio encoder: nothing). Only the audio encoder counts (heads, quantizer and text
    encoders are left out)."""
    f = encoder_forward_flops(config, lengths)
    total = 0.0
    for part, trainable in (("cnn", cnn_trainable), ("projection", projection_trainable),
                            ("pos_conv", transformer_trainable), ("transformer", transformer_trainable)):
        total += f[part] * (3.0 if trainable else 1.0)
    return total


def flops_per_audio_second(config, sample_rate: int = 16000) -> dict[str, float]:
    """Forward FLOPs per second of audio (one 10 s utterance / 10), and the CNN's share."""
    f = encoder_forward_flops(config, [10 * sample_rate])
    total = sum(v for k, v in f.items() if k != "frames")
    return {"forward": total / 10.0, "cnn_share": f["cnn"] / total}


def find_hf_encoder(module: nn.Module):
    """The first Hugging Face wav2vec 2.0-style model inside `module` (has config.conv_dim), or None."""
    from transformers import PreTrainedModel

    for m in module.modules():
        if isinstance(m, PreTrainedModel) and hasattr(m.config, "conv_dim"):
            return m
    return None


def trainable_parts(hf_model) -> dict[str, bool]:
    """Whether the CNN, the feature projection and the transformer of an HF wav2vec 2.0-style model train."""
    base = getattr(hf_model, "wav2vec2", hf_model)  # Wav2Vec2ForPreTraining wraps the bare model

    def trains(module) -> bool:
        return any(p.requires_grad for p in module.parameters())

    return {"cnn_trainable": trains(base.feature_extractor), "projection_trainable": trains(base.feature_projection),
            "transformer_trainable": trains(base.encoder)}


# -- per-epoch measurement ------------------------------------------------------------------------


AUDIO_LENGTHS = "audio_lengths"  # batch key: valid samples per item, Python ints (never moved to the device)


def add_audio_lengths(batch: dict) -> dict:
    """Put each item's valid sample count into `batch` as Python ints while it is still on the CPU
    (a LightningModule's `on_before_batch_transfer`), so that per-step statistics never read a device
    tensor back: `int(mask.sum())` on a CUDA mask waits for the GPU, every step."""
    mask = batch.get("audio_mask") if isinstance(batch, dict) else None
    if mask is not None and AUDIO_LENGTHS not in batch and mask.device.type == "cpu":
        batch[AUDIO_LENGTHS] = mask.sum(-1).tolist()  # (B,) on the CPU: no device sync
    return batch


def audio_lengths(batch: dict) -> list[int] | None:
    """Valid samples per item: the CPU-side `AUDIO_LENGTHS` when `add_audio_lengths` put them there,
    else read from the mask (a host-device sync when the mask is on a GPU); None without a mask."""
    if AUDIO_LENGTHS in batch:
        return list(batch[AUDIO_LENGTHS])
    mask = batch.get("audio_mask")
    return mask.sum(-1).tolist() if mask is not None else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class ThroughputMonitor(Callback):
    """Per training epoch: seconds, audio seconds per second, padding efficiency, training FLOPs of the
    real frames (and of the padded batch), MFU (None without a known peak) and the peak accelerator
    memory. Counts this process's batches; DDP ranks each report their own share (`world_size` lets
    readers scale). Logs train/mfu and train/tflops_per_s; `epochs` holds one dict per epoch.

    Batches must follow the batch contract ("audio_mask" (B, T) bool). The valid lengths come from the
    CPU batch (`add_audio_lengths`, in the module's `on_before_batch_transfer`) where the module puts
    them there, so that counting reads no device tensor; else from the mask."""

    def __init__(self, precision: str, sample_rate: int = 16000, peak_tflops: float | None = None):
        self.precision = precision
        self.sample_rate = sample_rate
        self.peak_tflops = peak_tflops
        self.epochs: list[dict] = []
        self._reset()

    def _reset(self) -> None:
        self._t0: float | None = None
        self._real = self._padded = 0
        self._flops = self._padded_flops = 0.0
        self._steps = 0
        self._counted = False  # whether a wav2vec 2.0-style encoder was found to count FLOPs of
        self._hf = None
        self._parts: dict[str, bool] = {}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._reset()
        self._hf = find_hf_encoder(pl_module)
        self._parts = trainable_parts(self._hf) if self._hf is not None else {}
        device = pl_module.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        self._t0 = time.perf_counter()
        self._cpu0 = time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        mask = batch.get("audio_mask") if isinstance(batch, dict) else None
        if mask is None:
            return
        hf = self._hf
        lengths = audio_lengths(batch)  # Python ints from the CPU batch (no device sync)
        b, t = mask.shape  # (B, T): shapes only, no data read
        self._real += sum(lengths)
        self._padded += b * t
        self._steps += 1
        if hf is not None:
            self._counted = True
            self._flops += training_flops(hf.config, lengths, **self._parts)
            self._padded_flops += training_flops(hf.config, [t] * b, **self._parts)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._t0 is None or self._steps == 0:
            return
        device = pl_module.device
        _sync(device)
        seconds = time.perf_counter() - self._t0
        peak = peak_flops(self.precision, device, self.peak_tflops)
        achieved = self._flops / seconds if (seconds > 0 and self._counted) else None
        row = {
            "epoch": int(trainer.current_epoch),
            "seconds": seconds,
            # CPU time of this process (all its threads): on a shared CPU, a steadier measure than wall time
            "cpu_seconds": time.process_time() - self._cpu0,
            "steps": self._steps,
            "audio_seconds": self._real / self.sample_rate,
            "audio_s_per_s": self._real / self.sample_rate / seconds if seconds > 0 else None,
            "padding_efficiency": self._real / self._padded if self._padded else None,
            "train_tflops": self._flops / 1e12 if self._counted else None,
            "train_tflops_padded": self._padded_flops / 1e12 if self._counted else None,
            "achieved_tflops_per_s": achieved / 1e12 if achieved is not None else None,
            "peak_tflops_per_s": peak / 1e12 if peak is not None else None,
            "mfu": achieved / peak if (achieved is not None and peak) else None,
            "peak_memory_gb": (torch.cuda.max_memory_allocated(device) / 2**30) if device.type == "cuda" else None,
        }
        self.epochs.append(row)
        # sync_dist (the mean over ranks) is a collective: every rank must log the same keys, or the
        # ranks that log wait for the others forever. Whether to log depends on nothing a rank alone
        # knows (the model, the world size); the value is NaN on a rank without a known peak (a
        # node of another GPU model). One process logs only what it has.
        if not self._counted:
            return
        several = trainer.world_size > 1
        for key, value in (("train/tflops_per_s", row["achieved_tflops_per_s"]), ("train/mfu", row["mfu"])):
            if value is not None or several:
                pl_module.log(key, math.nan if value is None else value, sync_dist=True)

    def summary(self) -> dict:
        """{"precision", "peak_tflops_per_s", "epochs": [...], "mfu": mean over epochs (None without a peak)}."""
        mfus = [e["mfu"] for e in self.epochs if e["mfu"] is not None]
        return {"precision": self.precision,
                "peak_tflops_per_s": self.epochs[-1]["peak_tflops_per_s"] if self.epochs else None,
                "mfu": sum(mfus) / len(mfus) if mfus else None,
                "epochs": list(self.epochs)}

    def state_dict(self) -> dict:  # resumed runs keep the epochs measured before the interruption
        return {"epochs": list(self.epochs)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.epochs = list(state_dict.get("epochs", []))


# -- GPU-path switches ----------------------------------------------------------------------------


def attention_implementation(hf_model) -> str:
    """The attention kernel an HF model dispatches to ("sdpa", "eager", "flash_attention_2", ...)."""
    return str(hf_model.config._attn_implementation)


def set_attention_implementation(hf_model, implementation: str) -> None:
    """Switch an HF model's attention kernel (transformers' `set_attn_implementation`); "auto" = "sdpa"
    where the model class supports it, else "eager". Raise when the model does not take it (checked by
    reading it back)."""
    if implementation == "auto":
        implementation = "sdpa" if getattr(hf_model, "_supports_sdpa", False) else "eager"
    if attention_implementation(hf_model) != implementation:
        hf_model.set_attn_implementation(implementation)
    got = attention_implementation(hf_model)
    if got != implementation:
        raise RuntimeError(f"{type(hf_model).__name__}: asked for attention {implementation!r}, got {got!r}")


def compile_transformer_layers(hf_model, backend: str = "inductor", dynamic: bool = True) -> int:
    """`torch.compile` each transformer layer of an HF wav2vec 2.0-style model in place
    (`nn.Module.compile`: state-dict keys unchanged, so checkpoints and saved models are the same).
    Per layer rather than the whole model: LayerDrop's Python coin flip between layers would break the
    graph, and the CNN's variable lengths would recompile. dynamic=True: one graph for every bucket
    length. Returns the number of layers compiled."""
    base = getattr(hf_model, "wav2vec2", hf_model)
    layers = base.encoder.layers
    for layer in layers:
        layer.compile(backend=backend, dynamic=dynamic)
    return len(layers)
