"""Every audio encoder kind behind one door: build from `EncoderConfig`, describe as JSON (saved
models), rebuild from that JSON, and encode a batch.

    encoder.kind=wav2vec2 | hubert | wavlm    mmser.models.wav2vec2.AudioEncoder (the paper's)
    encoder.kind=whisper, backend=transformers  mmser.models.whisper.WhisperAudioEncoder
    encoder.kind=whisper, backend=ctranslate2   mmser.models.whisper.Ct2WhisperEncoder (frozen, cached)
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mmser.config import EncoderConfig
from mmser.models.wav2vec2 import ENCODER_CLASSES, AudioEncoder
from mmser.models.whisper import WINDOWS, Ct2Spec, Ct2WhisperEncoder, WhisperAudioEncoder, load_whisper_encoder

AUDIO_KINDS = (*ENCODER_CLASSES, "whisper", "whisper-ct2", "paired")  # "encoder_kind" values of saved models


class PairedAudioEncoder(nn.Module):
    """Two audio encoders as one (e.g. wav2vec 2.0 + frozen Whisper, `fusion.whisper_audio`): each
    valid frame of the first is joined, feature-wise, with the second's frame at the same relative
    time of the utterance (frame floor(j * n2 / n1) of n2 valid ones), so every fusion head takes
    the pair unchanged: frames (B, F1, H1 + H2), the first's frame_mask. Padding stays out: only
    valid frames of either side are read, and rows are zero past the first's valid frames."""

    attention_mask_policy = "none"

    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__()
        self.first, self.second = first, second

    @property
    def hidden_size(self) -> int:
        return int(self.first.hidden_size) + int(self.second.hidden_size)

    def encode_batch(self, batch: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        a, mask = encode_audio(self.first, batch)  # (B, F1, H1), (B, F1)
        b, mask_b = encode_audio(self.second, batch)  # (B, F2, H2), (B, F2)
        n1, n2 = mask.sum(-1), mask_b.sum(-1)  # (B,)
        j = torch.arange(a.shape[1], device=a.device)[None, :]  # (1, F1)
        idx = (j * n2[:, None].to(a.device) // n1.clamp(min=1)[:, None]).clamp(max=max(b.shape[1] - 1, 0))  # (B, F1)
        paired = torch.gather(b.to(a.device, a.dtype), 1, idx[..., None].expand(-1, -1, b.shape[2]))  # (B, F1, H2)
        paired = paired.masked_fill(~(mask & (n2[:, None].to(a.device) > 0))[..., None], 0.0)
        return torch.cat([a, paired], dim=-1), mask  # (B, F1, H1 + H2), (B, F1)

    def encode(self, audio: torch.Tensor, audio_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_batch({"audio": audio, "audio_mask": audio_mask})

    def config_dict(self) -> dict:
        return {"encoder_kind": "paired", "first": audio_encoder_dict(self.first),
                "second": audio_encoder_dict(self.second)}


def build_audio_encoder(enc_cfg: EncoderConfig) -> nn.Module:
    """The audio encoder `enc_cfg` describes (see the module docstring)."""
    if enc_cfg.kind != "whisper":
        return AudioEncoder.from_config(enc_cfg)
    if enc_cfg.backend == "ctranslate2":
        return Ct2WhisperEncoder(ct2_spec(enc_cfg))
    return WhisperAudioEncoder(load_whisper_encoder(enc_cfg), freeze=enc_cfg.freeze, window=enc_cfg.whisper_window)


def ct2_spec(enc_cfg: EncoderConfig) -> Ct2Spec:
    return Ct2Spec(name=enc_cfg.name, compute_type=enc_cfg.compute_type)


def uses_cached_whisper(enc_cfg: EncoderConfig) -> bool:
    """Whether runs of this encoder read cached frozen Whisper frames (mmser.models.whisper)."""
    return enc_cfg.kind == "whisper" and enc_cfg.backend == "ctranslate2"


def cached_whisper_spec(cfg) -> Ct2Spec | None:
    """The CTranslate2 Whisper whose cached frames a run of `cfg` (a Config) reads, if any: the audio
    encoder itself (encoder.backend=ctranslate2) or fusion's second audio branch (fusion.whisper_audio)."""
    if cfg.task not in ("audio", "fusion"):
        return None
    if uses_cached_whisper(cfg.encoder):
        return ct2_spec(cfg.encoder)
    if cfg.task == "fusion" and cfg.fusion.whisper_audio:
        return Ct2Spec(name=cfg.fusion.whisper_audio, compute_type=cfg.encoder.compute_type)
    return None


def audio_encoder_dict(encoder: nn.Module) -> dict:
    """JSON description of an audio encoder's architecture (`audio_encoder_from_dict` rebuilds it)."""
    if isinstance(encoder, (WhisperAudioEncoder, Ct2WhisperEncoder, PairedAudioEncoder)):
        return encoder.config_dict()
    if isinstance(encoder, AudioEncoder):
        kind = next((k for k, (_, cls) in ENCODER_CLASSES.items() if isinstance(encoder.model, cls)), None)
        if kind is not None:
            return {"encoder_kind": kind, "encoder_attention_mask": encoder.attention_mask_policy,
                    "encoder_config": encoder.model.config.to_dict()}
        encoder = encoder.model
    raise ValueError(f"cannot save audio encoder {type(encoder).__name__} (savable kinds: {list(AUDIO_KINDS)})")


def audio_encoder_from_dict(d: Mapping, where: str = "config.json") -> nn.Module:
    """A randomly initialised encoder of the architecture `audio_encoder_dict` described (ValueError
    naming `where` on anything else). Nothing is imported by name: the kinds are a closed table."""
    kind = d.get("encoder_kind")
    if kind == "paired":
        if not isinstance(d.get("first"), dict) or not isinstance(d.get("second"), dict):
            raise ValueError(f"{where}: a paired encoder needs first and second (JSON objects)")
        return PairedAudioEncoder(audio_encoder_from_dict(d["first"], where),
                                  audio_encoder_from_dict(d["second"], where))
    if kind == "whisper-ct2":
        if not isinstance(d.get("encoder_model"), str):
            raise ValueError(f"{where}: a whisper-ct2 encoder needs encoder_model (a name or folder)")
        return Ct2WhisperEncoder.from_saved(d["encoder_model"], str(d.get("compute_type") or "auto"),
                                            hidden_size=int(d["hidden_size"]) if d.get("hidden_size") else None)
    if kind not in ENCODER_CLASSES and kind != "whisper":
        raise ValueError(f"{where}: unknown encoder kind {kind!r} (known: {list(AUDIO_KINDS)})")
    if not isinstance(d.get("encoder_config"), dict):
        raise ValueError(f"{where}: encoder_config must be a JSON object")
    if kind == "whisper":
        from transformers import WhisperConfig
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        window = d.get("encoder_window", "30s")  # models saved before the switch ran 30 s windows
        if window not in WINDOWS:
            raise ValueError(f"{where}: encoder_window must be one of {list(WINDOWS)}, got {window!r}")
        return WhisperAudioEncoder(WhisperEncoder(WhisperConfig.from_dict(d["encoder_config"])),
                                   freeze=bool(d.get("encoder_freeze", False)), window=window)
    config_cls, model_cls = ENCODER_CLASSES[kind]
    return AudioEncoder(model_cls(config_cls.from_dict(d["encoder_config"])),
                        attention_mask=d.get("encoder_attention_mask", "auto"))


def encode_audio(encoder: nn.Module, batch: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
    """(frames (B, F, H), frame_mask (B, F)) of a batch: cached frames where the encoder takes them
    (`encode_batch`), else `encode(audio, audio_mask)`."""
    for key in ("audio", "audio_mask"):
        if key not in batch:
            raise KeyError(f"{type(encoder).__name__}: batch has no '{key}' (keys: {sorted(batch)})")
    if callable(getattr(encoder, "encode_batch", None)):
        return encoder.encode_batch(batch)
    return encoder.encode(batch["audio"], batch["audio_mask"])
