"""TAPT: the wav2vec 2.0 objective in fp32, masks inside valid frames, the paper's schedule."""

import json
import math

import pytest
import torch
import yaml
from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining

from mmser.config import TaptConfig
from mmser.training.schedule import warmup_hold_decay
from mmser.training.tapt import (
    TaptModule,
    contrastive_diversity_loss,
    frame_lengths,
    gumbel_temperature,
    tapt_masks,
)

CFG = TaptConfig(num_negatives=10, mask_time_length=4, mask_time_prob=0.3)


def tiny_pretraining_model(seed=0):
    torch.manual_seed(seed)
    hc = Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        conv_dim=[32, 32, 32], conv_kernel=[10, 3, 3], conv_stride=[5, 4, 4], feat_extract_norm="layer",
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, codevector_dim=16,
        proj_codevector_dim=16, num_codevector_groups=2, num_codevectors_per_group=8,
        mask_time_prob=CFG.mask_time_prob, mask_time_length=CFG.mask_time_length, mask_feature_prob=0.0)
    return Wav2Vec2ForPreTraining(hc)


def _batch():
    g = torch.Generator().manual_seed(1)
    audio = torch.randn(4, 8000, generator=g)
    mask = torch.ones(4, 8000, dtype=torch.bool)
    mask[1, 5000:] = False
    audio[1, 5000:] = 0
    return audio, mask


def _step_loss(model, audio, audio_mask, autocast_dtype=None):
    lengths = frame_lengths(model, audio_mask)
    n = int(model._get_feat_extract_output_lengths(audio.shape[1]))
    mask_np, neg_np = tapt_masks(lengths, n, CFG)
    mask, neg = torch.as_tensor(mask_np), torch.as_tensor(neg_np).long()
    ctx = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else torch.autocast("cpu", enabled=False)
    with ctx:
        out = model(audio, attention_mask=audio_mask.long(), mask_time_indices=mask)
        parts = contrastive_diversity_loss(model, out, mask, neg, CFG)
    return parts["loss_sum"] / parts["n_masked"], parts, mask_np, lengths


def test_masks_stay_inside_valid_frames_and_have_two_spans():
    import numpy as np

    np.random.seed(0)
    lengths = torch.tensor([50, 20, 35])
    for _ in range(20):
        mask, neg = tapt_masks(lengths, 50, CFG)
        for i, n in enumerate(lengths.tolist()):
            assert not mask[i, n:].any()
            assert mask[i, :n].sum() >= CFG.mask_time_length  # >= min 2 spans (may overlap)
            # negatives of masked frames point at masked frames of the same item
            flat = neg[i][mask[i]] - i * 50
            assert mask[i][flat].all()


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_loss_is_fp32_finite_and_decreases(dtype):
    model = tiny_pretraining_model()
    audio, audio_mask = _batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        loss, parts, _, _ = _step_loss(model, audio, audio_mask, dtype)
        assert parts["loss_sum"].dtype == torch.float32
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses


def test_contrastive_loss_matches_transformers_reference():
    """Our fp32 loss equals transformers' own Wav2Vec2ForPreTraining loss in fp32."""
    model = tiny_pretraining_model().eval()  # eval: no dropout, deterministic quantizer
    audio, audio_mask = _batch()
    audio_mask = torch.ones_like(audio_mask)
    lengths = frame_lengths(model, audio_mask)
    n = int(model._get_feat_extract_output_lengths(audio.shape[1]))
    mask_np, neg_np = tapt_masks(lengths, n, CFG)
    mask, neg = torch.as_tensor(mask_np), torch.as_tensor(neg_np).long()
    model.config.contrastive_logits_temperature = CFG.contrastive_temperature
    model.config.diversity_loss_weight = CFG.diversity_loss_weight
    with torch.no_grad():
        ref = model(audio, mask_time_indices=mask, sampled_negative_indices=neg)
        ours = contrastive_diversity_loss(model, ref, mask, neg, CFG)
    assert ours["contrastive"].item() == pytest.approx(ref.contrastive_loss.item(), rel=1e-4)
    assert ours["loss_sum"].item() == pytest.approx(ref.loss.item(), rel=1e-4)


def test_module_refuses_zero_mask_prob_and_schedule_matches_paper():
    with pytest.raises(ValueError, match="mask_time_prob must be > 0"):
        TaptModule(tiny_pretraining_model(), TaptConfig(mask_time_prob=0.0))
    w, h, t = 100, 1000, 20000
    assert warmup_hold_decay(0, w, h, t) == pytest.approx(0.01)
    assert warmup_hold_decay(99, w, h, t) == 1.0
    assert warmup_hold_decay(1099, w, h, t) == 1.0
    assert warmup_hold_decay(1100, w, h, t) == pytest.approx(1.0)
    assert warmup_hold_decay(10550, w, h, t) == pytest.approx(0.5)
    assert warmup_hold_decay(20000, w, h, t) == 0.0
    with pytest.raises(ValueError):
        warmup_hold_decay(0, 600, 600, 1000)
    assert gumbel_temperature(0) == 2.0 and gumbel_temperature(10**7) == 0.5


def test_tapt_stage_sees_only_training_sessions_and_feeds_vft(tmp_path, monkeypatch):
    """TAPT via the cv runner: once per fold, training split only, resumable, V-FT loads it."""
    from helpers import tiny_config, write_toy_corpus

    from mmser.training import tapt as taptmod
    from mmser.training.cv import run_cv

    manifest = write_toy_corpus(tmp_path / "toy", per_class=2, durations=(0.4, 0.6))
    cfg = tiny_config(tmp_path, manifest, ["experiment=tapt-toy", "pretrain=tapt", "finetune.epochs=1",
                                           "tapt.total_steps=4", "tapt.warmup_steps=1", "tapt.hold_steps=1",
                                           "tapt.mask_time_length=4", "tapt.num_negatives=5",
                                           "tapt.max_batch_seconds=4.0"])
    seen = []
    real_init = taptmod.RandomCropDataset.__init__

    def spy(self, records, *a, **k):
        seen.append({r["session"] for r in records})
        real_init(self, records, *a, **k)

    monkeypatch.setattr(taptmod.RandomCropDataset, "__init__", spy)
    out = tmp_path / "runs" / "tapt-toy"
    summary = run_cv(cfg, sessions=[2], seeds=[0, 1], out_dir=out)
    assert not summary.failed, summary.failed
    assert seen == [{1, 3, 4, 5}]  # one TAPT per fold, never session 2
    done = json.loads((out / "pretrain" / "s2" / "DONE.json").read_text())
    assert done["steps"] == 4 and done["train_sessions"] == [1, 3, 4, 5]
    assert math.isfinite(done["final_loss"])
    # Both fine-tuning runs started from the TAPT folder, by explicit path.
    for seed in (0, 1):
        run_cfg = yaml.safe_load((out / f"s2-seed{seed}" / "config.yaml").read_text())
        assert run_cfg["encoder"]["name"] == str(out / "pretrain" / "s2" / "encoder")
    # Second call: nothing is pre-trained or trained again.
    seen.clear()
    again = run_cv(cfg, sessions=[2], seeds=[0, 1], out_dir=out)
    assert seen == [] and sorted(again.skipped) == [(2, 0), (2, 1)]
    # A TAPT folder made with other settings is refused, never silently reused.
    from mmser.training.pretrain import pretrain_fold

    cfg.tapt.lr = 0.5
    with pytest.raises(ValueError, match="was made from other inputs"):
        pretrain_fold(cfg, test_session=2, out_dir=out / "pretrain" / "s2")
    assert seen == []
