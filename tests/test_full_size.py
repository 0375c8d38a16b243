"""Faithful mode on full-size shapes (opt-in: `pytest -m slow -k full_size`, ~1-2 min on 2 CPU cores).

A facebook/wav2vec2-base-shaped model (95M parameters, group-norm CNN, the hub config.json's
pre-training fields, including `"gradient_checkpointing": true`) with RANDOM weights is saved with
save_pretrained and loaded back by folder, as the real checkpoint loads. Then, with the default
(reference) settings: two V-FT steps at batch 2, one TAPT step and one P-TAPT step, checking which
parameters get gradients, that the masked fractions are the configured ones, and that losses are
finite.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining

from mmser.config import Config, EncoderConfig
from mmser.labels import CLASSES

pytestmark = pytest.mark.slow

# The pre-training fields of facebook/wav2vec2-base's config.json that shape or regularise the model.
HUB_FIELDS = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    conv_dim=[512] * 7, conv_kernel=[10, 3, 3, 3, 3, 2, 2], conv_stride=[5, 2, 2, 2, 2, 2, 2], conv_bias=False,
    feat_extract_norm="group", feat_extract_activation="gelu", num_conv_pos_embeddings=128,
    num_conv_pos_embedding_groups=16, do_stable_layer_norm=False, hidden_dropout=0.1, attention_dropout=0.1,
    activation_dropout=0.0, feat_proj_dropout=0.1, layerdrop=0.1, mask_time_prob=0.05, mask_time_length=10,
    num_codevector_groups=2, num_codevectors_per_group=320, codevector_dim=256, proj_codevector_dim=256,
    num_negatives=100, contrastive_logits_temperature=0.1, diversity_loss_weight=0.1,
)
SR = 16000


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("w2v2base") / "wav2vec2-base-shaped"
    torch.manual_seed(0)
    Wav2Vec2ForPreTraining(Wav2Vec2Config(**HUB_FIELDS)).save_pretrained(folder)
    data = json.loads((folder / "config.json").read_text())
    data["gradient_checkpointing"] = True  # as the hub file has it
    (folder / "config.json").write_text(json.dumps(data))
    return str(folder)


def _batch(seconds=(3.0, 2.0)):
    g = torch.Generator().manual_seed(0)
    n = [int(s * SR) for s in seconds]
    audio = torch.zeros(len(n), max(n))
    mask = torch.zeros(len(n), max(n), dtype=torch.bool)
    for i, k in enumerate(n):
        audio[i, :k] = 0.1 * torch.randn(k, generator=g)
        mask[i, :k] = True
    return {"ids": [f"u{i}" for i in range(len(n))], "audio": audio, "audio_mask": mask,
            "labels": torch.arange(len(n)) % len(CLASSES)}


def _mean_masked_fraction(frame_mask, p, span, min_masks, policy, draws=400):
    from mmser.models.wav2vec2 import compute_time_mask

    total = sum(int(compute_time_mask(frame_mask, p, span, min_masks, policy=policy).sum()) for _ in range(draws))
    return total / draws / int(frame_mask.sum())


def test_full_size_vft_steps(base_folder):
    from mmser.models.heads import AudioClassifier
    from mmser.models.wav2vec2 import AudioEncoder, gradient_checkpointing_on

    torch.manual_seed(0)
    enc_cfg = EncoderConfig(name=base_folder)  # the defaults = the reference's V-FT
    model = AudioClassifier(AudioEncoder.from_config(enc_cfg), num_classes=len(CLASSES))
    assert sum(p.numel() for p in model.parameters()) > 90e6
    assert not gradient_checkpointing_on(model)  # config.json said true; encoder.gradient_checkpointing=false
    assert model.encoder.pass_attention_mask  # the padding mask goes into the transformer
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = _batch()
    for _ in range(2):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(batch), batch["labels"])
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
    names = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert any(".encoder.layers.11." in n for n in names) and any("pos_conv_embed" in n for n in names)
    assert any(n.startswith("head") or ".head" in n or "classifier" in n for n in names - {
        n for n in names if ".encoder." in n})
    assert not any("feature_extractor" in n or "feature_projection" in n or "masked_spec_embed" in n for n in names)
    # the configured time-mask density: ~p = 0.08 of the valid frames ("expected" policy)
    lengths = model.encoder.frame_lengths(batch["audio_mask"].sum(-1))
    fmask = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]
    frac = _mean_masked_fraction(fmask, enc_cfg.mask_time_prob, enc_cfg.mask_time_length,
                                 enc_cfg.mask_time_min_masks, enc_cfg.mask_time_policy)
    assert 0.06 < frac < 0.09, frac


def test_full_size_tapt_step(base_folder):
    from mmser.training.tapt import TaptModule, build_pretraining_model

    torch.manual_seed(0)
    cfg = Config()
    # LayerDrop off: the check below is that every parameter CAN train; with LayerDrop (0.1 x 12
    # layers) a step leaves a dropped layer without gradient (which layers depends on the RNG)
    cfg.encoder = EncoderConfig(name=base_folder, layerdrop=0.0)
    model = build_pretraining_model(cfg)
    module = TaptModule(model, cfg.tapt, attention_mask=cfg.tapt.attention_mask)
    logged = {}
    module.log_dict = lambda d, **k: logged.update({key: float(v) for key, v in d.items()})
    module.train()
    loss = module.training_step(_batch(), 0)
    assert torch.isfinite(loss)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, no_grad[:5]  # everything trains: CNN and quantizer included
    assert model.quantizer.codevectors.grad.abs().sum() > 0  # the Gumbel path reaches the codebooks
    assert logged["tapt/gumbel_temperature"] == 1.0
    # 4.10's sampler on this batch: spans from the padded length (p = 0.05, span 10, min 2)
    assert 0.0 < logged["tapt/masked_fraction"] < 0.3


def test_full_size_ptapt_step(base_folder):
    from mmser.training.ptapt import PtaptModule, build_ptapt_encoder

    torch.manual_seed(0)
    cfg = Config()
    cfg.encoder = EncoderConfig(name=base_folder)
    encoder = build_ptapt_encoder(cfg)
    module = PtaptModule(encoder, cfg.ptapt.cluster_sizes, cfg.ptapt, attention_mask=cfg.encoder.attention_mask)
    module.log_dict = lambda *a, **k: None
    module.train()
    batch = _batch()
    n_frames = int(encoder._get_feat_extract_output_lengths(torch.tensor(batch["audio"].shape[1])))
    g = torch.Generator().manual_seed(1)
    batch["pseudo_labels"] = torch.stack(
        [torch.randint(0, k, (2, n_frames), generator=g) for k in cfg.ptapt.cluster_sizes], dim=-1)
    loss = module.training_step(batch, 0)
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert all(any(n.startswith(f"heads.{i}.") for n in grads) for i in range(3))
    assert any(".layers.11." in n for n in grads)
    assert not any("feature_extractor" in n or "feature_projection" in n or "masked_spec_embed" in n for n in grads)
    valid = encoder._get_feat_extract_output_lengths(batch["audio_mask"].sum(-1))
    fmask = torch.arange(n_frames)[None, :] < valid[:, None]
    frac = _mean_masked_fraction(fmask, cfg.ptapt.mask_time_prob, cfg.ptapt.mask_time_length,
                                 cfg.ptapt.mask_time_min_masks, "padded")
    assert 0.05 < frac < 0.2, frac  # min 2 spans of 15 over 150 padded frames dominate: ~0.15
