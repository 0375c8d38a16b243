"""Audio encoder wrapper and the paper's head: freezing, padding behaviour, SpecAugment placement,
short clips, loading (random / local dir / TAPT dir / offline hub name)."""

from __future__ import annotations

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from helpers import (  # noqa: F401 (single_torch_thread: autouse fixture)
    make_batch,
    single_torch_thread,
    tiny_audio_classifier,
    tiny_encoder_config,
)
from torch import nn
from transformers import Wav2Vec2ForPreTraining
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices

from mmser.models.heads import AudioClassifier, masked_mean
from mmser.models.wav2vec2 import (
    AudioEncoder,
    EncoderNotAvailableError,
    build_encoder,
    compute_time_mask,
    make_hf_config,
)

LENGTHS = [8000, 5600, 3200]  # 0.5 / 0.35 / 0.2 s


def _frozen_and_trainable(model: AudioClassifier) -> tuple[list[str], list[str]]:
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    return frozen, trainable


def test_frozen_parts_get_no_gradient_and_the_rest_does():
    model = tiny_audio_classifier()
    model.train()
    model(make_batch(LENGTHS)).sum().backward()
    frozen, trainable = _frozen_and_trainable(model)
    # PAPER.md V-FT: CNN feature encoder, feature projection and masked_spec_embed are frozen.
    assert any(n.startswith("encoder.model.feature_extractor.") for n in frozen)
    assert any(n.startswith("encoder.model.feature_projection.") for n in frozen)
    assert "encoder.model.masked_spec_embed" in frozen
    assert all(n.startswith(("encoder.model.feature_extractor.", "encoder.model.feature_projection.",
                             "encoder.model.masked_spec_embed")) for n in frozen)
    params = dict(model.named_parameters())
    assert all(params[n].grad is None for n in frozen)
    # Trained: positional conv, transformer layers, final LayerNorm, head.
    for prefix in ("encoder.model.encoder.pos_conv_embed.", "encoder.model.encoder.layers.1.",
                   "encoder.model.encoder.layer_norm.", "classifier."):
        names = [n for n in trainable if n.startswith(prefix)]
        assert names, prefix
        assert any(params[n].grad is not None and params[n].grad.abs().sum() > 0 for n in names), prefix


def test_unfrozen_feature_encoder_does_get_gradient():
    model = tiny_audio_classifier(freeze_feature_encoder=False)
    model.train()
    model(make_batch(LENGTHS)).sum().backward()
    w = model.encoder.model.feature_extractor.conv_layers[0].conv.weight
    assert w.requires_grad and w.grad is not None and w.grad.abs().sum() > 0


def test_masked_mean_ignores_padding():
    x = torch.randn(2, 5, 3)
    mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])
    x_garbage = x.clone()
    x_garbage[0, 3:] = 1e6
    out = masked_mean(x_garbage, mask)
    assert torch.allclose(out[0], x[0, :3].mean(0))
    assert torch.allclose(out[1], x[1].mean(0))
    assert torch.equal(masked_mean(x, torch.zeros(2, 5, dtype=torch.bool)), torch.zeros(2, 3))


class _FixedFrames(nn.Module):
    """A stand-in encoder whose frames are given, to test the head alone."""

    hidden_size = 3

    def __init__(self, frames, frame_mask):
        super().__init__()
        self.frames, self.frame_mask = frames, frame_mask

    def encode(self, audio, audio_mask):
        return self.frames, self.frame_mask


def test_head_pools_relu_frames_over_valid_frames_only():
    frames = torch.tensor([[[1.0, -2.0, 3.0], [3.0, 4.0, -5.0], [100.0, 100.0, 100.0]]])  # (1, 3, 3)
    mask = torch.tensor([[True, True, False]])
    head = AudioClassifier(_FixedFrames(frames, mask), num_classes=2)
    emb = head.embed({"audio": None, "audio_mask": None})
    # mean of ReLU over the 2 valid frames (not len-1, not the padded frame)
    assert torch.allclose(emb, torch.tensor([[2.0, 2.0, 1.5]]))
    logits = head({"audio": None, "audio_mask": None})
    assert torch.allclose(logits, head.classifier(emb))


def _single_vs_padded(model: AudioClassifier) -> float:
    model.eval()
    batch = make_batch(LENGTHS, seed=3)
    with torch.no_grad():
        padded = model(batch)
        single = torch.cat([
            model({"audio": batch["audio"][i:i + 1, :n], "audio_mask": batch["audio_mask"][i:i + 1, :n]})
            for i, n in enumerate(LENGTHS)])
    return float((padded - single).abs().max())


def test_padded_batch_equals_single_items_on_layer_norm():
    assert _single_vs_padded(tiny_audio_classifier()) < 1e-5


def test_group_norm_is_padding_sensitive_with_or_without_the_attention_mask():
    # Documents why eval uses batch 1 / length buckets for wav2vec2-base (STYLE.md): the CNN's group
    # norm sees the padding whatever goes into the transformer.
    for policy in ("auto", "always"):
        model = tiny_audio_classifier(feat_extract_norm="group", attention_mask=policy)
        assert model.encoder.pass_attention_mask == (policy == "always")
        assert _single_vs_padded(model) > 1e-4


@pytest.mark.parametrize("policy", ["always", "auto"])
def test_padding_mask_goes_into_the_transformer_not_the_cnn(policy):
    """Given the same CNN features on valid frames, what the padded frames hold no longer changes a
    valid frame's transformer output ("always" = the reference); without the mask it does."""
    enc = AudioEncoder.from_config(tiny_encoder_config(feat_extract_norm="group", attention_mask=policy)).eval()
    batch = make_batch([8000, 3200])
    n_valid = int(enc.frame_lengths(torch.tensor(3200)))
    outs = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)

        def noisy_padding(module, args, out, g=g):  # out: (B, C, F) CNN features
            out = out.clone()
            out[1, :, n_valid:] = torch.randn(out[1, :, n_valid:].shape, generator=g)
            return out

        h = enc.model.feature_extractor.register_forward_hook(noisy_padding)
        with torch.no_grad():
            frames, _ = enc.encode(batch["audio"], batch["audio_mask"])
        h.remove()
        outs.append(frames[1, :n_valid])
    diff = float((outs[0] - outs[1]).abs().max())
    if policy == "always":
        assert diff < 1e-5
    else:
        assert diff > 1e-3


def test_frame_mask_matches_hf_output_lengths():
    enc = AudioEncoder.from_config(tiny_encoder_config()).eval()
    batch = make_batch(LENGTHS)
    with torch.no_grad():
        frames, fmask = enc.encode(batch["audio"], batch["audio_mask"])
    # conv arithmetic of kernels (10, 4, 4) / strides (5, 4, 4)
    expected = []
    for n in LENGTHS:
        for k, s in zip((10, 4, 4), (5, 4, 4), strict=True):
            n = (n - k) // s + 1
        expected.append(n)
    assert frames.shape == (3, expected[0], 32)
    assert fmask.sum(1).tolist() == expected


def test_per_utterance_time_masks_stay_inside_valid_frames():
    np.random.seed(0)
    lengths = torch.tensor([100, 60, 30, 16, 10])
    fmask = torch.arange(100)[None, :] < lengths[:, None]
    for _ in range(50):
        m = compute_time_mask(fmask, mask_prob=0.3, mask_length=15, min_masks=2, policy="per_utterance")
        assert not (m & ~fmask).any()
        # every utterance at least as long as the span gets masked frames; shorter ones none
        assert (m[:4].sum(1) >= 15).all()
        assert m[4].sum() == 0
    # HF's raw output marks a padding frame for rows with no span: the reason for the `& frame_mask`.
    np.random.seed(0)
    raw = _compute_mask_indices((5, 100), 0.3, 15, attention_mask=fmask.long(), min_masks=2)
    assert raw[4, 99]


def _masked_fraction(policy, lengths, frames, trials, p=0.08, span=15, min_masks=2):
    """Mean fraction of valid frames masked, per row, over `trials` draws."""
    fmask = torch.arange(frames)[None, :] < torch.tensor(lengths)[:, None]
    total = torch.zeros(len(lengths))
    for _ in range(trials):
        m = compute_time_mask(fmask, p, span, min_masks, policy=policy)
        assert not (m & ~fmask).any()
        total += m.sum(1).float()
    return total / trials / torch.tensor(lengths, dtype=torch.float)


def test_padded_policy_counts_spans_from_the_padded_length():
    """The reference's sampler: a 1 s clip in a batch padded to 10 s gets ~8% masked (spans fall on it
    by chance); alone in its batch, the minimum of 2 spans of 15 frames masks ~60% of it."""
    torch.manual_seed(0)
    in_long_batch = _masked_fraction("padded", [500, 50], 500, 2000)
    alone = _masked_fraction("padded", [50], 50, 500)
    assert 0.065 < float(in_long_batch[0]) < 0.085  # 2.67 spans x 15 / 500, minus overlaps
    assert 0.05 < float(in_long_batch[1]) < 0.10
    assert float(alone[0]) > 0.45


def test_expected_policy_masks_p_of_every_utterance_whatever_the_padding():
    """V-FT's default: int(p * n / span + U) spans per utterance, no minimum -> ~p of each
    utterance's valid frames, on bucketed or random batches alike."""
    torch.manual_seed(0)
    frac = _masked_fraction("expected", [500, 150, 50, 10], 500, 2000)
    assert 0.07 < float(frac[0]) < 0.085
    assert 0.07 < float(frac[1]) < 0.09
    assert 0.06 < float(frac[2]) < 0.10
    assert float(frac[3]) == 0.0  # shorter than one span
    per_utt = _masked_fraction("per_utterance", [50], 50, 300)
    assert float(per_utt[0]) > 0.45  # the old default's 2-span minimum on a 1 s clip


def test_unknown_time_mask_policy_is_refused():
    with pytest.raises(ValueError, match="policy"):
        compute_time_mask(torch.ones(1, 50, dtype=torch.bool), 0.1, 5, 2, policy="fancy")


def test_spec_augment_replaces_valid_frames_only_in_training():
    torch.manual_seed(0)
    np.random.seed(0)
    enc = AudioEncoder.from_config(tiny_encoder_config(mask_time_prob=0.5, mask_feature_prob=0.0))
    seen = {}
    enc.model.encoder.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0].detach().clone()))
    batch = make_batch(LENGTHS)
    embed = enc.model.masked_spec_embed.detach()
    enc.train()
    _, fmask = enc.encode(batch["audio"], batch["audio_mask"])
    is_masked = torch.isclose(seen["x"], embed).all(-1)  # (B, F)
    assert is_masked.any()
    assert not (is_masked & ~fmask).any()
    enc.eval()
    with torch.no_grad():
        enc.encode(batch["audio"], batch["audio_mask"])
    assert not torch.isclose(seen["x"], embed).all(-1).any()


def test_clips_shorter_than_the_mask_span_do_not_crash():
    # 15-frame span; 800 samples = 8 frames with the tiny CNN (80 samples/frame): HF alone raises.
    with pytest.raises(ValueError):
        _compute_mask_indices((2, 8), 0.08, 15, min_masks=2)
    model = tiny_audio_classifier()
    model.train()
    logits = model(make_batch([800, 600]))
    assert logits.shape == (2, 4) and torch.isfinite(logits).all()
    logits.sum().backward()


def test_spec_augment_settings_come_from_the_encoder_config():
    hf = build_encoder(tiny_encoder_config()).config
    assert (hf.mask_time_prob, hf.mask_time_length, hf.mask_time_min_masks) == (0.08, 15, 2)
    assert (hf.mask_feature_prob, hf.mask_feature_length, hf.mask_feature_min_masks) == (0.05, 8, 1)
    with pytest.raises(ValueError, match="mask_feature_length"):
        build_encoder(tiny_encoder_config(mask_feature_length=64))


def test_loads_a_tapt_pretraining_folder_and_a_bare_model_folder(tmp_path):
    enc_cfg = tiny_encoder_config()
    torch.manual_seed(1)
    pre = Wav2Vec2ForPreTraining(make_hf_config(enc_cfg))
    pre.save_pretrained(tmp_path / "tapt")
    loaded = build_encoder(tiny_encoder_config(name=str(tmp_path / "tapt")))
    ref = pre.wav2vec2.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert not loaded.feature_extractor.conv_layers[0].conv.weight.requires_grad  # freezing applied
    loaded.save_pretrained(tmp_path / "bare")
    again = build_encoder(tiny_encoder_config(name=str(tmp_path / "bare")))
    assert all(torch.equal(again.state_dict()[k], ref[k]) for k in ref)


def test_missing_local_dir_and_offline_hub_name_give_actionable_errors(tmp_path, monkeypatch):
    with pytest.raises(EncoderNotAvailableError, match="no such directory"):
        build_encoder(tiny_encoder_config(name=str(tmp_path / "nowhere")))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(EncoderNotAvailableError, match="--local-dir DIR") as e:
        build_encoder(tiny_encoder_config(name="facebook/wav2vec2-base-not-cached"))
    assert "encoder.name=DIR" in str(e.value)


@pytest.mark.parametrize("kind", ["hubert", "wavlm"])
def test_other_encoder_kinds_build_and_encode(kind):
    model = tiny_audio_classifier(kind=kind)
    model.train()
    logits = model(make_batch(LENGTHS))
    assert logits.shape == (3, 4)
    assert model.encoder.model.__class__.__name__.lower().startswith(kind)


def _folder_with_checkpointing_in_its_config(tmp_path):
    """A save_pretrained folder whose config.json holds "gradient_checkpointing": true, as
    facebook/wav2vec2-base's does."""
    import json

    pre = Wav2Vec2ForPreTraining(make_hf_config(tiny_encoder_config()))
    pre.save_pretrained(tmp_path / "hub-like")
    cfg_path = tmp_path / "hub-like" / "config.json"
    data = json.loads(cfg_path.read_text())
    data["gradient_checkpointing"] = True
    cfg_path.write_text(json.dumps(data))
    return str(tmp_path / "hub-like")


def test_gradient_checkpointing_flag_is_the_only_authority(tmp_path):
    """transformers 5 switches checkpointing on from a checkpoint's config.json; the config flag
    decides, for V-FT / P-TAPT (build_encoder) and TAPT (build_pretraining_model)."""
    from mmser.config import Config
    from mmser.models.wav2vec2 import gradient_checkpointing_on
    from mmser.training.tapt import build_pretraining_model

    folder = _folder_with_checkpointing_in_its_config(tmp_path)
    from transformers import Wav2Vec2Model

    assert gradient_checkpointing_on(Wav2Vec2Model.from_pretrained(folder))  # what HF does on its own
    for flag in (False, True):
        encoder = build_encoder(tiny_encoder_config(name=folder, gradient_checkpointing=flag))
        assert gradient_checkpointing_on(encoder) == flag
        cfg = Config()
        cfg.encoder = tiny_encoder_config(name=folder, gradient_checkpointing=flag)
        assert gradient_checkpointing_on(build_pretraining_model(cfg)) == flag


def test_hub_names_load_at_the_reference_revision(monkeypatch):
    from transformers import Wav2Vec2Model

    from mmser.models.wav2vec2 import REFERENCE_REVISIONS, resolve_revision

    pin = "2dcc7b7f9b11f0ef271067e62599a27317a03114"
    assert REFERENCE_REVISIONS["facebook/wav2vec2-base"] == pin
    assert resolve_revision(tiny_encoder_config(name="facebook/wav2vec2-base")) == pin
    assert resolve_revision(tiny_encoder_config(name="facebook/hubert-base-ls960")) is None  # default branch
    assert resolve_revision(tiny_encoder_config(name="facebook/wav2vec2-base", revision="main")) == "main"
    assert resolve_revision(tiny_encoder_config(name="/some/local/dir")) is None
    seen = {}

    def fake_from_pretrained(name, **kwargs):
        seen.update(kwargs, name=name)
        raise OSError("offline")

    monkeypatch.setattr(Wav2Vec2Model, "from_pretrained", fake_from_pretrained)
    with pytest.raises(EncoderNotAvailableError, match=f"--revision {pin}"):
        build_encoder(tiny_encoder_config(name="facebook/wav2vec2-base"))
    assert seen["name"] == "facebook/wav2vec2-base" and seen["revision"] == pin


def test_gradient_checkpointing_option_trains():
    model = tiny_audio_classifier(gradient_checkpointing=True)
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.encoder.model.modules())
    model.train()
    model(make_batch(LENGTHS)).sum().backward()
    assert model.encoder.model.encoder.layers[0].feed_forward.output_dense.weight.grad is not None
