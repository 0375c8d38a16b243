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


# ------------------------------------------------------------------------------------------------
# No host-device sync in the step; per-rank mask streams; gradient accumulation
# ------------------------------------------------------------------------------------------------


def _old_contrastive(model, out, mask, negatives, cfg):
    """The loss as computed before (a boolean selection of the masked frames), for comparison."""
    pred, q = out.projected_states.float(), out.projected_quantized_states.float()
    b, f, d = q.shape
    neg = q.reshape(-1, d)[negatives.long().reshape(-1)].reshape(b, f, -1, d).permute(2, 0, 1, 3)
    logits = torch.nn.functional.cosine_similarity(pred[None], torch.cat([q[None], neg]), dim=-1)
    logits = logits / cfg.contrastive_temperature
    neg_is_pos = (q[None] == neg).all(-1)
    logits = torch.cat([logits[:1], logits[1:].masked_fill(neg_is_pos, float("-inf"))], dim=0)
    logits = logits.permute(1, 2, 0)[mask]
    contrastive = torch.nn.functional.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long),
                                                    reduction="sum")
    g, v = model.config.num_codevector_groups, model.config.num_codevectors_per_group
    diversity = (g * v - out.codevector_perplexity.float()) / (g * v)
    n = mask.sum()
    if cfg.loss_form == "reference":
        return contrastive + cfg.diversity_loss_weight * diversity
    return (contrastive + cfg.diversity_loss_weight * diversity * n) / n


@pytest.mark.parametrize("loss_form", ["reference", "fairseq"])
def test_step_loss_is_unchanged_and_reads_nothing_on_the_host(loss_form, monkeypatch):
    import contextlib
    import dataclasses
    from types import SimpleNamespace

    cfg = dataclasses.replace(CFG, loss_form=loss_form)
    model = tiny_pretraining_model()
    audio, audio_mask = _batch()
    module = TaptModule(model, cfg)
    prepared = module.prepare_masks({"audio": audio, "audio_mask": audio_mask})
    assert prepared["counts"]["masked"] == int(prepared["mask_time_indices"].sum()) > 0
    assert prepared["counts"]["valid_frames"] == int(frame_lengths(model, audio_mask).sum())
    torch.manual_seed(0)
    out = model(audio, mask_time_indices=prepared["mask_time_indices"])
    new = contrastive_diversity_loss(model, out, prepared["mask_time_indices"], prepared["negatives"], cfg,
                                     masked_index=prepared["masked_index"])["loss"]
    old = _old_contrastive(model, out, prepared["mask_time_indices"], prepared["negatives"], cfg)
    assert torch.equal(new, old)
    # On meta tensors nothing can be read on the host (no .item(), no boolean selection): the loss
    # of a training step needs no host-device sync. The old loss fails here.
    meta = SimpleNamespace(**{k: getattr(out, k).detach().to("meta") for k in
                              ("projected_states", "projected_quantized_states", "codevector_perplexity")})
    m = {k: prepared[k].to("meta") for k in ("mask_time_indices", "negatives", "masked_index")}
    monkeypatch.setattr(torch, "autocast", lambda *a, **k: contextlib.nullcontext())  # no meta autocast
    loss = contrastive_diversity_loss(model, meta, m["mask_time_indices"], m["negatives"], cfg,
                                      masked_index=m["masked_index"])["loss"]
    assert loss.device.type == "meta" and loss.shape == ()
    with pytest.raises((NotImplementedError, RuntimeError)):
        _old_contrastive(model, meta, m["mask_time_indices"], m["negatives"], cfg)


def _fake_trainer(rank: int, fetched: int):
    from types import SimpleNamespace

    progress = SimpleNamespace(total=SimpleNamespace(ready=fetched))
    return SimpleNamespace(training=True, global_rank=rank, log_every_n_steps=1,
                           fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))


def test_each_rank_draws_its_own_masks_and_the_global_rng_is_untouched():
    model = tiny_pretraining_model()
    audio, audio_mask = _batch()
    batch = {"audio": audio, "audio_mask": audio_mask}
    drawn = {}
    for rank in (0, 1):
        for fetched in (3, 4):
            module = TaptModule(model, CFG, seed=7)
            module._trainer = _fake_trainer(rank, fetched)  # what Lightning's DDP gives each process
            torch.manual_seed(123)  # seed_everything: the same global state on every rank
            np.random.seed(123)
            before = (torch.get_rng_state(), np.random.get_state()[1].copy())
            out = module.on_before_batch_transfer(dict(batch), 0)
            assert torch.equal(torch.get_rng_state(), before[0])  # the global streams are left as they were
            assert np.array_equal(np.random.get_state()[1], before[1])
            drawn[rank, fetched] = (out["mask_time_indices"], out["negatives"])
    assert not torch.equal(drawn[0, 3][0], drawn[1, 3][0])  # ranks differ (today: identical)
    assert not torch.equal(drawn[0, 3][1], drawn[1, 3][1])
    assert not torch.equal(drawn[0, 3][0], drawn[0, 4][0])  # successive micro-batches differ
    module = TaptModule(model, CFG, seed=7)
    module._trainer = _fake_trainer(1, 3)
    again = module.on_before_batch_transfer(dict(batch), 0)
    assert torch.equal(again["mask_time_indices"], drawn[1, 3][0])  # a pure function of (seed, rank, batch)
    assert torch.equal(again["negatives"], drawn[1, 3][1])
    from mmser.perf import AUDIO_LENGTHS, audio_lengths

    # the ThroughputMonitor's per-item lengths are read here, on the CPU batch, not from a device mask
    assert again[AUDIO_LENGTHS] == audio_mask.sum(-1).tolist() == audio_lengths(again)


def test_accumulation_splits_the_step_budget_into_micro_batches():
    from mmser.data.batching import BucketBatchSampler, micro_batch_samples

    assert micro_batch_samples(250.0, 1, 16000) == 4_000_000
    assert micro_batch_samples(250.0, 2, 16000) == 2_000_000
    # IEMOCAP-like durations (log-normal, median 3.6 s, mean 4.6 s), cropped to 10 s
    rng = np.random.default_rng(0)
    sec = np.clip(np.exp(rng.normal(np.log(3.6), 0.70, 4400)), 0.6, 34.0)
    lengths = (np.minimum(sec, 10.0) * 16000).astype(int)
    whole = BucketBatchSampler(lengths, max_batch_samples=micro_batch_samples(250.0, 1, 16000), seed=0)
    halves = BucketBatchSampler(lengths, max_batch_samples=micro_batch_samples(250.0, 2, 16000), seed=0)
    n_whole, n_half = len(whole.all_batches(0)), len(halves.all_batches(0))
    # the same audio per optimizer step: 2 micro-batches per step, as many steps per epoch within 2%
    assert abs(n_half / 2 - n_whole) / n_whole < 0.02
    audio = lengths.sum() / 16000
    assert abs(audio / (n_half / 2) - audio / n_whole) < 0.02 * audio / n_whole


def test_tapt_accumulation_keeps_the_optimizer_step_schedule(tmp_path, monkeypatch):
    """accumulate=2 with half-size micro-batches: the same optimizer steps (total_steps), the same
    lr at each, twice the micro-batches, and the same audio per optimizer step."""
    from helpers import tiny_config, write_toy_corpus

    from mmser.data.manifest import load_manifest, split_fold
    from mmser.training import tapt as taptmod

    manifest = write_toy_corpus(tmp_path / "toy", per_class=3, durations=(0.4, 0.6))
    fold = split_fold(load_manifest(manifest), 2)
    runs = {}
    for acc in (1, 2):
        cfg = tiny_config(tmp_path, manifest, ["tapt.total_steps=6", "tapt.warmup_steps=2", "tapt.hold_steps=1",
                                               "tapt.mask_time_length=4", "tapt.num_negatives=5",
                                               "tapt.max_batch_seconds=2.4", f"tapt.accumulate_grad_batches={acc}"])
        seen = {"micro": [], "lr": [], "budget": []}
        real_step, real_adam = taptmod.TaptModule.training_step, torch.optim.Adam.step
        real_sampler = taptmod.BucketBatchSampler

        def step(self, batch, batch_idx, seen=seen, real_step=real_step):
            seen["micro"].append(int(batch["audio_mask"].sum()))
            return real_step(self, batch, batch_idx)

        def adam_step(self, *a, seen=seen, real_adam=real_adam, **k):
            seen["lr"].append(self.param_groups[0]["lr"])
            out = real_adam(self, *a, **k)  # runs the closure (the step's last training_step) first
            seen["micro"].append("step")
            return out

        def sampler(lengths, seen=seen, real_sampler=real_sampler, **kw):
            seen["budget"].append(kw["max_batch_samples"])
            return real_sampler(lengths, **kw)

        monkeypatch.setattr(taptmod.TaptModule, "training_step", step)
        monkeypatch.setattr(torch.optim.Adam, "step", adam_step)
        monkeypatch.setattr(taptmod, "BucketBatchSampler", sampler)
        taptmod.run_tapt(cfg, fold, tmp_path / f"tapt{acc}")
        done = json.loads((tmp_path / f"tapt{acc}" / "DONE.json").read_text())
        runs[acc] = {**seen, "steps": done["steps"]}
        monkeypatch.undo()
    one, two = runs[1], runs[2]
    assert one["steps"] == two["steps"] == 6  # total_steps counts optimizer steps
    assert one["budget"] == [int(2.4 * 16000)] and two["budget"] == [int(1.2 * 16000)]
    assert one["lr"] == two["lr"] and len(one["lr"]) == 6  # the schedule, step by step

    def per_step(events):  # audio samples of each optimizer step, and micro-batches per step
        groups, cur = [], []
        for e in events:
            if e == "step":
                groups.append(cur)
                cur = []
            else:
                cur.append(e)
        return groups

    g1, g2 = per_step(one["micro"]), per_step(two["micro"])
    assert [len(g) for g in g1] == [1] * 6
    assert sum(len(g) for g in g2) >= 11  # two micro-batches per step (an epoch's last step may hold one)
    a1, a2 = np.mean([sum(g) for g in g1]), np.mean([sum(g) for g in g2])
    assert abs(a2 - a1) / a1 < 0.25  # the same audio per optimizer step (tiny corpus: coarse)


def test_finite_guard_reports_a_nan_at_the_next_check_without_reading_every_step():
    from mmser.training.finite import FiniteGuard

    guard = FiniteGuard("TAPT")
    reads = []
    real_bool = torch.Tensor.__bool__

    def counting_bool(self):
        reads.append(1)
        return real_bool(self)

    torch.Tensor.__bool__ = counting_bool
    try:
        for step in range(4):
            guard.update(torch.tensor(1.0), step, every=5)
        assert reads == []  # nothing read on the host between checks
        guard.update(torch.tensor(float("nan")), 4, every=5)  # the 5th call checks
    except FloatingPointError as e:
        assert "TAPT loss is not finite at a step in [0, 4]" in str(e)
    else:
        raise AssertionError("a NaN loss was not reported")
    finally:
        torch.Tensor.__bool__ = real_bool
    late = FiniteGuard("P-TAPT")
    late.update(torch.tensor(float("inf")), 7, every=10)
    with pytest.raises(FloatingPointError, match=r"at a step in \[0, 7\]"):
        late.check(7)  # the end-of-training check (on_train_end)
