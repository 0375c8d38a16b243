"""wav2vec 2.0-style audio encoders (wav2vec2 / HuBERT / WavLM): load, freeze, SpecAugment, frames.

`build_encoder(enc_cfg)` returns the bare Hugging Face model (no heads) with the paper's
fine-tuning setup applied (PAPER.md "V-FT"):
- the CNN feature encoder, the feature projection and `masked_spec_embed` are frozen;
- SpecAugment values come from `EncoderConfig` (time p=0.08, span 15, min 2; channel p=0.05, span 64,
  min 1);
- gradient checkpointing is what `encoder.gradient_checkpointing` says, whatever the checkpoint's
  config.json says (facebook/wav2vec2-base's holds `"gradient_checkpointing": true`, which
  transformers 5 turns on at load; the reference turned it off);
- hub names load at a pinned revision (`encoder.revision`, "auto" = the reference's pin for
  facebook/wav2vec2-base);
- the attention kernel is `encoder.attn_implementation` ("sdpa" by default: PyTorch's fused
  scaled_dot_product_attention; "eager" = the reference's explicit softmax), read back after setting.

`AudioEncoder` wraps it with the batch contract's `encode(audio, audio_mask) -> (frames, frame_mask)`.
It computes the time mask itself (`compute_time_mask`) and hands it to the HF model as
`mask_time_indices`, for two reasons:
1. the span count must follow the reference's training signal, which depended on how its batches
   were padded (see `compute_time_mask`), not on HF's current sampler; and
2. HF raises when a batch has fewer frames than the mask span (clips under ~0.3 s with span 15):
   such a batch gets no time mask instead (utterances shorter than the span get none anyway).
Channel masking stays with HF (`mask_feature_*` in the model config): it is over the hidden axis,
does not depend on lengths, and HF's sampler gives it the reference's distribution (one span of 64
of 768 channels per utterance with p=0.05, min 1).

The padding mask goes into the transformer, never into the CNN (the reference:
`encoder(x, attention_mask=mask)` after running the CNN on the zero-padded waveform; HF's
Wav2Vec2Model does the same with `attention_mask`: the CNN never sees it, the transformer zeroes and
ignores padded frames). The CNN's group norm of wav2vec2-base still sees the padding, as in the
reference. `encoder.attention_mask=auto` keeps HF's advice instead (no mask for group-norm models).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import (
    HubertConfig,
    HubertModel,
    PretrainedConfig,
    PreTrainedModel,
    Wav2Vec2Config,
    Wav2Vec2Model,
    WavLMConfig,
    WavLMModel,
)
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices

from mmser.config import EncoderConfig
from mmser.io import looks_like_path
from mmser.perf import set_attention_implementation

log = logging.getLogger(__name__)

# kind -> (config class, bare model class). Wiring in Python, not names in YAML.
ENCODER_CLASSES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    "wav2vec2": (Wav2Vec2Config, Wav2Vec2Model),
    "hubert": (HubertConfig, HubertModel),
    "wavlm": (WavLMConfig, WavLMModel),
}


class EncoderNotAvailableError(FileNotFoundError):
    """Pretrained encoder weights that cannot be found locally or downloaded."""


def _encoder_classes(kind: str) -> tuple[type[PretrainedConfig], type[PreTrainedModel]]:
    if kind not in ENCODER_CLASSES:
        raise ValueError(f"encoder.kind must be one of {sorted(ENCODER_CLASSES)}, got {kind!r}")
    return ENCODER_CLASSES[kind]


def spec_augment_kwargs(enc_cfg: EncoderConfig) -> dict:
    """The HF config fields that set SpecAugment (PAPER.md V-FT values by default)."""
    return {
        "apply_spec_augment": True,
        "mask_time_prob": enc_cfg.mask_time_prob,
        "mask_time_length": enc_cfg.mask_time_length,
        "mask_time_min_masks": enc_cfg.mask_time_min_masks,
        "mask_feature_prob": enc_cfg.mask_feature_prob,
        "mask_feature_length": enc_cfg.mask_feature_length,
        "mask_feature_min_masks": enc_cfg.mask_feature_min_masks,
    }


def config_overrides(enc_cfg: EncoderConfig) -> dict:
    """Every HF config field `EncoderConfig` sets on a random or a pretrained encoder: SpecAugment,
    plus the regularisation fields that are not None (None keeps the model's own value)."""
    out = spec_augment_kwargs(enc_cfg)
    for key in ("layerdrop", "hidden_dropout", "attention_dropout"):
        value = getattr(enc_cfg, key)
        if value is not None:
            out[key] = value
    return out


def make_hf_config(enc_cfg: EncoderConfig) -> PretrainedConfig:
    """HF config of a randomly initialised encoder built from `EncoderConfig`'s architecture fields.

    For wav2vec2 the quantizer fields are set too, so `Wav2Vec2ForPreTraining(make_hf_config(c))`
    gives the matching pre-training model (TAPT).
    """
    config_cls, _ = _encoder_classes(enc_cfg.kind)
    if not (len(enc_cfg.conv_dim) == len(enc_cfg.conv_kernel) == len(enc_cfg.conv_stride)):
        raise ValueError(
            "encoder.conv_dim, conv_kernel and conv_stride must have the same length, got "
            f"{len(enc_cfg.conv_dim)}, {len(enc_cfg.conv_kernel)}, {len(enc_cfg.conv_stride)}"
        )
    kwargs = dict(
        hidden_size=enc_cfg.hidden_size,
        num_hidden_layers=enc_cfg.num_hidden_layers,
        num_attention_heads=enc_cfg.num_attention_heads,
        intermediate_size=enc_cfg.intermediate_size,
        conv_dim=list(enc_cfg.conv_dim),
        conv_kernel=list(enc_cfg.conv_kernel),
        conv_stride=list(enc_cfg.conv_stride),
        feat_extract_norm=enc_cfg.feat_extract_norm,
        num_conv_pos_embeddings=enc_cfg.num_conv_pos_embeddings,
        num_conv_pos_embedding_groups=enc_cfg.num_conv_pos_embedding_groups,
        **config_overrides(enc_cfg),
    )
    if enc_cfg.kind in ("wav2vec2", "wavlm"):
        kwargs.update(
            codevector_dim=enc_cfg.codevector_dim,
            num_codevector_groups=enc_cfg.num_codevector_groups,
            num_codevectors_per_group=enc_cfg.num_codevectors_per_group,
            proj_codevector_dim=enc_cfg.proj_codevector_dim,
        )
    return config_cls(**kwargs)


# The reference (modules/FeatureFuser.py) loads facebook/wav2vec2-base at this hub commit.
REFERENCE_REVISIONS = {"facebook/wav2vec2-base": "2dcc7b7f9b11f0ef271067e62599a27317a03114"}


def is_local_name(name: str) -> bool:
    """Whether an encoder name is a local folder (as opposed to a hub id such as facebook/x)."""
    return Path(name).expanduser().exists() or looks_like_path(name)


def resolve_revision(enc_cfg: EncoderConfig) -> str | None:
    """The hub revision to load: None for local folders and random models; for hub names
    `encoder.revision`, where "auto" = the reference's pinned commit for facebook/wav2vec2-base and
    the hub's default branch for any other name."""
    if enc_cfg.name == "random" or is_local_name(enc_cfg.name):
        return None
    if enc_cfg.revision == "auto":
        return REFERENCE_REVISIONS.get(enc_cfg.name)
    return enc_cfg.revision


def encoder_provenance(model: nn.Module) -> dict | None:
    """Where the first HF audio encoder inside `model` came from: its name or path, the requested
    revision and the commit the hub resolved (None for local folders and random models)."""
    for m in model.modules():
        if isinstance(m, PreTrainedModel) and (hasattr(m.config, "conv_dim") or m.config.model_type == "whisper"):
            return {"name_or_path": getattr(m.config, "_name_or_path", None) or "random",
                    "revision": getattr(m, "mmser_revision", None),
                    "resolved_commit": getattr(m.config, "_commit_hash", None)}
        spec = getattr(m, "spec", None)  # the frozen CTranslate2 Whisper (mmser.models.whisper.Ct2WhisperEncoder)
        if type(m).__name__ == "Ct2WhisperEncoder" and spec is not None:
            return {"name_or_path": spec.name, "revision": None, "resolved_commit": None,
                    "backend": "ctranslate2", "compute_type": spec.resolved().compute_type}
    return None


def load_hf_pretrained(model_cls: type[PreTrainedModel], enc_cfg: EncoderConfig, what: str,
                       **overrides) -> PreTrainedModel:
    """`model_cls.from_pretrained` for an encoder name: a local folder written by save_pretrained,
    or a hub name at `resolve_revision(enc_cfg)`; one actionable error when it cannot be had."""
    name = enc_cfg.name
    path = Path(name).expanduser()
    if is_local_name(name):
        if not path.is_dir():
            raise EncoderNotAvailableError(f"encoder.name={name}: no such directory")
        if not (path / "config.json").is_file():
            raise EncoderNotAvailableError(
                f"encoder.name={name}: no config.json there (expected a folder written by save_pretrained)"
            )
        return model_cls.from_pretrained(str(path), **overrides)
    revision = resolve_revision(enc_cfg)
    try:
        model = model_cls.from_pretrained(name, revision=revision, **overrides)
    except OSError as e:  # offline, unknown name, gated repo: one actionable message
        pin = f" --revision {revision}" if revision else ""
        raise EncoderNotAvailableError(
            f"{what}: could not load '{name}' ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "Without network access, download it on a machine that has it, e.g. "
            f"`hf download {name}{pin} --local-dir DIR` (older clients: `huggingface-cli download`), "
            "copy DIR here and set `encoder.name=DIR`; or use `encoder.name=random` for a randomly "
            "initialised model."
        ) from None
    model.mmser_revision = revision
    return model


def set_gradient_checkpointing(model: PreTrainedModel, enabled: bool) -> None:
    """Make `enabled` the only authority on activation checkpointing (non-reentrant, which works with
    frozen inputs and DDP). transformers 5 turns checkpointing on at load when a checkpoint's
    config.json holds `"gradient_checkpointing": true` (facebook/wav2vec2-base's does), so `False`
    must switch it off explicitly, as the reference did. Used by V-FT, TAPT, P-TAPT and fusion."""
    # transformers >= 5.x renamed gradient_checkpointing_* to activation_checkpointing_*.
    if enabled:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    elif gradient_checkpointing_on(model):
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()
    if gradient_checkpointing_on(model) != enabled:
        raise RuntimeError(f"could not set gradient checkpointing to {enabled} on {type(model).__name__}")


def gradient_checkpointing_on(model: nn.Module) -> bool:
    """Whether any submodule of `model` checkpoints its activations (HF's per-module flag)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _load_pretrained(enc_cfg: EncoderConfig) -> PreTrainedModel:
    # A folder saved from Wav2Vec2ForPreTraining (TAPT output) holds "wav2vec2.*" weights;
    # from_pretrained on the bare model strips that prefix and drops the quantizer.
    _, model_cls = _encoder_classes(enc_cfg.kind)
    return load_hf_pretrained(model_cls, enc_cfg, "encoder", **config_overrides(enc_cfg))


def apply_freezing(model: PreTrainedModel, enc_cfg: EncoderConfig) -> None:
    """Freeze the parts PAPER.md V-FT keeps fixed: CNN feature encoder, feature projection,
    masked_spec_embed (trainable: positional conv, transformer layers, final LayerNorm)."""
    if enc_cfg.freeze_feature_encoder:
        # HF's own switch: also skips the CNN's backward pass.
        model.feature_extractor._freeze_parameters()
    if enc_cfg.freeze_feature_projection:
        for p in model.feature_projection.parameters():
            p.requires_grad = False
        if getattr(model, "masked_spec_embed", None) is not None:
            model.masked_spec_embed.requires_grad = False


def build_encoder(enc_cfg: EncoderConfig) -> PreTrainedModel:
    """The bare HF encoder (Wav2Vec2Model / HubertModel / WavLMModel) named by `enc_cfg`.

    `name`: "random" (architecture from the config fields), a local folder written by
    `save_pretrained` (also a `Wav2Vec2ForPreTraining` folder, i.e. TAPT output), or a hub name.
    """
    if enc_cfg.name == "random":
        _, model_cls = _encoder_classes(enc_cfg.kind)
        model = model_cls(make_hf_config(enc_cfg))
    else:
        model = _load_pretrained(enc_cfg)
    hidden = model.config.hidden_size
    if enc_cfg.mask_feature_prob > 0 and enc_cfg.mask_feature_length > hidden:
        raise ValueError(
            f"encoder.mask_feature_length={enc_cfg.mask_feature_length} exceeds the hidden size {hidden}: "
            "set encoder.mask_feature_length to at most the hidden size (or mask_feature_prob=0)"
        )
    apply_freezing(model, enc_cfg)
    set_gradient_checkpointing(model, enc_cfg.gradient_checkpointing)
    set_attention_implementation(model, enc_cfg.attn_implementation)
    return model


def uses_attention_mask(config: PretrainedConfig, policy: str = "auto") -> bool:
    """Whether to pass the attention mask into the HF model (see EncoderConfig.attention_mask)."""
    if policy == "always":
        return True
    if policy == "never":
        return False
    if policy != "auto":
        raise ValueError(f"encoder.attention_mask must be auto/always/never, got {policy!r}")
    return getattr(config, "feat_extract_norm", "group") == "layer"


MASK_TIME_POLICIES = ("expected", "padded", "per_utterance")


def compute_time_mask(frame_mask: torch.Tensor, mask_prob: float, mask_length: int,
                      min_masks: int, policy: str = "padded") -> torch.Tensor:
    """SpecAugment time-mask spans, kept inside each utterance's valid frames.

    frame_mask: (B, F) bool, True = valid (right-padded). Returns (B, F) bool, True = masked.
    Randomness comes from torch's global RNG (numpy's for "per_utterance"), both seeded by
    `seed_everything`. A batch with fewer frames than the span gets no time mask (the reference's
    sampler raises there).

    policy:
    - "padded": the sampler of the reference's transformers 4.10 (`_compute_mask_indices`,
      modeling_wav2vec2.py, as FeatureFuser.py calls it): ONE span count for the whole batch from
      its PADDED length F, `max(int(p * F / span + U), min_masks)` with U ~ U[0, 1), capped at
      F // span; each row draws that many distinct span starts uniformly over [0, F - span]; only
      spans' frames that fall on valid frames count. The reference's TAPT, P-TAPT step (a) and
      P-TAPT step (c) use it on batches shaped like mmser's (length-bucketed, or cropped to the
      shortest item), so it is their default.
    - "expected": per utterance of n valid frames, `int(p * n / span + U)` spans (no minimum, U per
      utterance), starts uniform over [0, n - span]. The reference's V-FT used "padded" on RANDOM
      batches of 64 (padded length ~10 s), which masks 7.9% of valid frames on IEMOCAP-like
      durations; on mmser's length-bucketed batches "padded" would mask 13.6% of valid frames
      (19.4% averaged per utterance: the minimum of 2 spans dominates short clips). "expected"
      reproduces the reference's masked fraction on any batching (7.85% vs 7.89%:
      benchmarks/masking.py), so it is V-FT's default.
    - "per_utterance": transformers 5's sampler with the attention mask: per utterance
      `max(int(p * n / span + U), min_masks)` spans (U per batch). mmser's behaviour before the
      reference's semantics were matched (13.8% of valid frames on IEMOCAP-like durations; 19.8%
      averaged per utterance, 28.5% for clips under 3.6 s).
    """
    if policy not in MASK_TIME_POLICIES:
        raise ValueError(f"time-mask policy must be one of {MASK_TIME_POLICIES}, got {policy!r}")
    batch, frames = frame_mask.shape
    if mask_prob <= 0 or frames < mask_length:
        return torch.zeros_like(frame_mask)
    valid = frame_mask.cpu()
    if policy == "per_utterance":
        spans = _compute_mask_indices((batch, frames), mask_prob=mask_prob, mask_length=mask_length,
                                      attention_mask=valid.long(), min_masks=min_masks)
        # HF pads rows with no span with a dummy index on the last (padding) frame: valid frames only.
        return torch.from_numpy(np.asarray(spans)).to(frame_mask.device) & frame_mask
    offsets = torch.arange(mask_length)  # (S,)
    mask = torch.zeros(batch, frames, dtype=torch.bool)  # (B, F)
    if policy == "padded":
        n = max(int(mask_prob * frames / mask_length + torch.rand(()).item()), min_masks)
        n = min(n, frames // mask_length)
        if n > 0:
            starts = torch.multinomial(torch.ones(batch, frames - mask_length + 1), n)  # (B, n) distinct
            mask.scatter_(1, (starts[:, :, None] + offsets).reshape(batch, -1), True)
    else:  # "expected"
        lengths = valid.sum(-1)  # (B,)
        for i, n_valid in enumerate(lengths.tolist()):
            if n_valid < mask_length:
                continue
            n = min(int(mask_prob * n_valid / mask_length + torch.rand(()).item()), n_valid // mask_length)
            if n > 0:
                starts = torch.randperm(n_valid - mask_length + 1)[:n]  # (n,) distinct
                mask[i, (starts[:, None] + offsets).reshape(-1)] = True
    return mask.to(frame_mask.device) & frame_mask


class AudioEncoder(nn.Module):
    """Batch-contract wrapper: `encode(audio (B, T), audio_mask (B, T)) -> (frames (B, F, H), frame_mask (B, F))`."""

    def __init__(self, model: PreTrainedModel, attention_mask: str = "always",
                 mask_time_policy: str = "expected"):
        super().__init__()
        if mask_time_policy not in MASK_TIME_POLICIES:
            raise ValueError(f"encoder.mask_time_policy must be one of {MASK_TIME_POLICIES}, "
                             f"got {mask_time_policy!r}")
        self.model = model
        self.attention_mask_policy = attention_mask
        self.pass_attention_mask = uses_attention_mask(model.config, attention_mask)
        self.mask_time_policy = mask_time_policy

    @classmethod
    def from_config(cls, enc_cfg: EncoderConfig) -> AudioEncoder:
        return cls(build_encoder(enc_cfg), attention_mask=enc_cfg.attention_mask,
                   mask_time_policy=enc_cfg.mask_time_policy)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def frame_lengths(self, sample_lengths: torch.Tensor) -> torch.Tensor:
        """Number of encoder frames for each waveform length (HF's conv-arithmetic)."""
        return self.model._get_feat_extract_output_lengths(sample_lengths).long()

    def encode(self, audio: torch.Tensor, audio_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """audio (B, T) float, audio_mask (B, T) bool -> frames (B, F, H), frame_mask (B, F) bool."""
        if audio.dim() != 2 or audio_mask.shape != audio.shape:
            raise ValueError(f"encode: expected audio (B, T) and a mask of the same shape, got "
                             f"{tuple(audio.shape)} and {tuple(audio_mask.shape)}")
        lengths = audio_mask.sum(-1)  # (B,)
        total_frames = int(self.frame_lengths(torch.tensor(audio.shape[1])))
        if total_frames < 1:
            raise ValueError(f"encode: batch of {audio.shape[1]} samples is shorter than one encoder frame")
        frame_len = self.frame_lengths(lengths).clamp(1, total_frames)  # (B,)
        frame_mask = torch.arange(total_frames, device=audio.device)[None, :] < frame_len[:, None]  # (B, F)

        mask_time_indices = None
        cfg = self.model.config
        if self.training and getattr(cfg, "apply_spec_augment", True) and cfg.mask_time_prob > 0:
            # Always passed in training (all False when skipped) so HF never draws its own time mask.
            mask_time_indices = compute_time_mask(frame_mask, cfg.mask_time_prob, cfg.mask_time_length,
                                                  cfg.mask_time_min_masks, policy=self.mask_time_policy)
        attention_mask = audio_mask.long() if self.pass_attention_mask else None
        out = self.model(audio, attention_mask=attention_mask, mask_time_indices=mask_time_indices)
        frames = out.last_hidden_state  # (B, F, H)
        if frames.shape[1] != total_frames:
            raise AssertionError(f"encoder returned {frames.shape[1]} frames, expected {total_frames}")
        return frames, frame_mask
