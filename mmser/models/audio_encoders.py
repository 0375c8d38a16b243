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
from mmser.models.whisper import Ct2Spec, Ct2WhisperEncoder, WhisperAudioEncoder, load_whisper_encoder

AUDIO_KINDS = (*ENCODER_CLASSES, "whisper", "whisper-ct2")  # "encoder_kind" values a saved model may hold


def build_audio_encoder(enc_cfg: EncoderConfig) -> nn.Module:
    """The audio encoder `enc_cfg` describes (see the module docstring)."""
    if enc_cfg.kind != "whisper":
        return AudioEncoder.from_config(enc_cfg)
    if enc_cfg.backend == "ctranslate2":
        return Ct2WhisperEncoder(ct2_spec(enc_cfg))
    return WhisperAudioEncoder(load_whisper_encoder(enc_cfg), freeze=enc_cfg.freeze)


def ct2_spec(enc_cfg: EncoderConfig) -> Ct2Spec:
    return Ct2Spec(name=enc_cfg.name, compute_type=enc_cfg.compute_type)


def uses_cached_whisper(enc_cfg: EncoderConfig) -> bool:
    """Whether runs of this encoder read cached frozen Whisper frames (mmser.models.whisper)."""
    return enc_cfg.kind == "whisper" and enc_cfg.backend == "ctranslate2"


def audio_encoder_dict(encoder: nn.Module) -> dict:
    """JSON description of an audio encoder's architecture (`audio_encoder_from_dict` rebuilds it)."""
    if isinstance(encoder, (WhisperAudioEncoder, Ct2WhisperEncoder)):
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
    if kind == "whisper-ct2":
        if not isinstance(d.get("encoder_model"), str):
            raise ValueError(f"{where}: a whisper-ct2 encoder needs encoder_model (a name or folder)")
        return Ct2WhisperEncoder(Ct2Spec(d["encoder_model"], str(d.get("compute_type") or "auto")),
                                 hidden_size=int(d["hidden_size"]) if d.get("hidden_size") else None)
    if kind not in ENCODER_CLASSES and kind != "whisper":
        raise ValueError(f"{where}: unknown encoder kind {kind!r} (known: {list(AUDIO_KINDS)})")
    if not isinstance(d.get("encoder_config"), dict):
        raise ValueError(f"{where}: encoder_config must be a JSON object")
    if kind == "whisper":
        from transformers import WhisperConfig
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        return WhisperAudioEncoder(WhisperEncoder(WhisperConfig.from_dict(d["encoder_config"])),
                                   freeze=bool(d.get("encoder_freeze", False)))
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
