"""TAPT: the wav2vec 2.0 objective in fp32, masks inside valid frames, the paper's schedule."""

import json
import math

import numpy as np
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
    reference_negative_indices,
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


def _step_loss(model, audio, audio_mask, autocast_dtype=None, cfg=CFG):
    lengths = frame_lengths(model, audio_mask)
    n = int(model._get_feat_extract_output_lengths(audio.shape[1]))
    mask, neg = tapt_masks(lengths, n, cfg)
    ctx = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else torch.autocast("cpu", enabled=False)
    with ctx:
        out = model(audio, attention_mask=audio_mask.long(), mask_time_indices=mask)
        parts = contrastive_diversity_loss(model, out, mask, neg, cfg)
    return parts["loss"], parts, mask, lengths


def test_reference_masks_share_one_span_count_from_the_padded_length():
    """tapt.mask_time_policy=padded (default): transformers 4.10's sampler, padding excluded."""
    torch.manual_seed(0)
    lengths = torch.tensor([50, 20, 35])
    cfg = TaptConfig(num_negatives=10, mask_time_length=4, mask_time_prob=0.3)
    for _ in range(50):
        mask, neg = tapt_masks(lengths, 50, cfg)
        assert neg.shape == (3, 50, 10)
        for i, n in enumerate(lengths.tolist()):
            assert not mask[i, n:].any()
        # the full-length row holds all of the batch's spans: int(0.3 * 50 / 4 + U) in {3, 4}, distinct
        # starts, so between 4 (all overlapping) and 16 frames
        assert 4 <= int(mask[0].sum()) <= 16


def test_reference_negatives_are_other_frames_of_the_same_padded_row():
    torch.manual_seed(0)
    b, f, k = 3, 12, 200
    neg = reference_negative_indices(b, f, k)  # (B, F, K) flat
    row, col = neg // f, neg % f
    assert (row == torch.arange(b)[:, None, None]).all()  # same utterance
    assert (col != torch.arange(f)[None, :, None]).all()  # never the frame itself
    # uniform over the other F - 1 frames, padding included (no attention mask in the reference)
    counts = torch.bincount(col[:, 0].reshape(-1), minlength=f)
    assert counts[0] == 0 and (counts[1:] > 0).all()


def test_masked_negatives_switch_keeps_fairseq_sampling():
    np.random.seed(0)
    torch.manual_seed(0)
    lengths = torch.tensor([50, 20, 35])
    cfg = TaptConfig(num_negatives=10, mask_time_length=4, mask_time_prob=0.3, negatives="masked",
                     mask_time_policy="per_utterance")
    for _ in range(20):
        mask, neg = tapt_masks(lengths, 50, cfg)
        for i, n in enumerate(lengths.tolist()):
            assert not mask[i, n:].any()
            assert mask[i, :n].sum() >= cfg.mask_time_length  # >= min 2 spans (may overlap)
            flat = neg[i][mask[i]] - i * 50  # negatives of masked frames: masked frames of the item
            assert mask[i][flat].all()


@pytest.mark.parametrize("loss_form", ["reference", "fairseq"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_loss_is_fp32_finite_and_decreases(dtype, loss_form):
    torch.manual_seed(0)
    cfg = TaptConfig(num_negatives=10, mask_time_length=4, mask_time_prob=0.3, loss_form=loss_form)
    model = tiny_pretraining_model()
    audio, audio_mask = _batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    # fp16 trains under a gradient scaler on GPU (Lightning's 16-mixed), not here: forward only
    for _ in range(1 if dtype == torch.float16 else 12):
        loss, parts, mask, _ = _step_loss(model, audio, audio_mask, dtype, cfg)
        assert parts["loss"].dtype == torch.float32
        assert torch.isfinite(loss)
        if dtype == torch.float16:
            return
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item() / (mask.sum().item() if loss_form == "reference" else 1))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses


@pytest.mark.parametrize("loss_form", ["reference", "fairseq"])
def test_contrastive_loss_matches_transformers(loss_form):
    """Against transformers' own Wav2Vec2ForPreTraining loss (contrastive sum + w x diversity x M):
    "reference" = 4.10's sum + w x the UNSCALED diversity; "fairseq" = transformers' loss / M."""
    torch.manual_seed(0)
    cfg = TaptConfig(num_negatives=10, mask_time_length=4, mask_time_prob=0.3, loss_form=loss_form)
    model = tiny_pretraining_model().eval()  # eval: no dropout, deterministic quantizer
    audio, audio_mask = _batch()
    audio_mask = torch.ones_like(audio_mask)
    lengths = frame_lengths(model, audio_mask)
    n = int(model._get_feat_extract_output_lengths(audio.shape[1]))
    mask, neg = tapt_masks(lengths, n, cfg)
    model.config.contrastive_logits_temperature = cfg.contrastive_temperature
    model.config.diversity_loss_weight = cfg.diversity_loss_weight
    with torch.no_grad():
        ref = model(audio, mask_time_indices=mask, sampled_negative_indices=neg)
        ours = contrastive_diversity_loss(model, ref, mask, neg, cfg)
    m = mask.sum().item()
    assert ours["contrastive_per_frame"].item() * m == pytest.approx(ref.contrastive_loss.item(), rel=1e-4)
    if loss_form == "reference":
        expected = ref.contrastive_loss.item() + cfg.diversity_loss_weight * ref.diversity_loss.item() / m
    else:
        expected = ref.loss.item() / m
    assert ours["loss"].item() == pytest.approx(expected, rel=1e-4)
    # the reference's diversity term weighs M times less than fairseq's, relative to the contrastive sum
    assert ours["diversity"].item() == pytest.approx(ref.diversity_loss.item() / m, rel=1e-5)


def test_gumbel_temperature_is_constant_by_default_and_annealed_as_a_switch():
    audio, audio_mask = _batch()
    batch = {"audio": audio, "audio_mask": audio_mask}
    for schedule, expected in (("constant", 1.0), ("fairseq", 2.0)):
        cfg = TaptConfig(num_negatives=10, mask_time_length=4, mask_time_prob=0.3, gumbel_schedule=schedule)
        module = TaptModule(tiny_pretraining_model(), cfg)
        module.log_dict = lambda *a, **k: None
        module.training_step(batch, 0)
        assert module.model.quantizer.temperature == expected  # transformers 5 starts at 2


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
