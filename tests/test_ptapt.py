"""P-TAPT: frame model loss, masked pseudo-label loss, label/frame alignment of crops, and the
tiny (a) -> (b) -> (c) pipeline (no test-session audio, loadable encoder folder, idempotence)."""

import json
import logging
import shutil
import time

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Wav2Vec2Model

from mmser.config import Config, EncoderConfig, PtaptConfig, load_config
from mmser.data.manifest import split_fold
from mmser.labels import CLASSES
from mmser.models.frame_model import FrameEmotionModel, build_frame_model, frame_model_loss
from mmser.models.wav2vec1 import Wav2Vec1, Wav2Vec1Config
from mmser.models.wav2vec2 import AudioEncoder, build_encoder
from mmser.training.pseudo_labels import load_pseudo_labels
from mmser.training.ptapt import (
    IGNORE_INDEX,
    PseudoLabelDataset,
    PtaptModule,
    align_labels,
    build_ptapt_encoder,
    collate_pseudo,
    conv_frames,
    crop_with_labels,
    ptapt_loss,
    run_ptapt,
    split_train_val,
)

TINY = [
    "tracking.wandb=disabled", "trainer.log_every_n_steps=1",
    "encoder.name=random", "encoder.hidden_size=32", "encoder.num_hidden_layers=2",
    "encoder.num_attention_heads=2", "encoder.intermediate_size=64", "encoder.conv_dim=[16,16,16]",
    "encoder.conv_kernel=[10,8,4]", "encoder.conv_stride=[5,4,2]", "encoder.feat_extract_norm=layer",
    "encoder.num_conv_pos_embeddings=16", "encoder.num_conv_pos_embedding_groups=2", "encoder.mask_feature_length=16",
    # wav2vec 1.0: stride 5 * 4 = 20 samples, x 2 (the frame model's conv) = 40 = the encoder's hop
    "ptapt.wav2vec1_checkpoint=random", "ptapt.wav2vec1_feature_layers=[[16,10,5],[16,8,4]]",
    "ptapt.wav2vec1_aggregator_layers=[[16,2,1],[16,3,1]]", "ptapt.frame_dim=32", "ptapt.frame_head_hidden=16",
    "ptapt.frame_lstm_hidden=16", "ptapt.frame_mask_feature_length=4", "ptapt.frame_mask_time_length=5",
    "ptapt.frame_steps=3", "ptapt.frame_warmup_steps=1", "ptapt.frame_hold_steps=1", "ptapt.frame_batch_size=8",
    "ptapt.cluster_sizes=[4,8]", "ptapt.kmeans_iters=5", "ptapt.total_steps=3", "ptapt.warmup_steps=1",
    "ptapt.hold_steps=1", "ptapt.max_batch_seconds=1.5", "ptapt.crop_s=0.3", "ptapt.mask_time_length=5",
    "ptapt.head_hidden_size=16",
]


def tiny_config(*extra: str) -> Config:
    return load_config(overrides=TINY + list(extra))


def tiny_wav2vec1() -> Wav2Vec1:
    return Wav2Vec1(Wav2Vec1Config(conv_feature_layers=[(16, 10, 5), (16, 8, 4)],
                                   conv_aggregator_layers=[(16, 2, 1), (16, 3, 1)]))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """40 clips of 0.2-0.41 s over 5 sessions and the 4 classes."""
    root = tmp_path_factory.mktemp("ptapt_corpus")
    rng = np.random.default_rng(0)
    recs = []
    for s in range(1, 6):
        for i in range(8):
            n = 3200 + 480 * i
            path = root / f"s{s}_{i}.wav"
            sf.write(path, (rng.standard_normal(n) * 0.05 * (1 + i % 4)).astype(np.float32), 16000)
            g = "FM"[i % 2]
            recs.append({"id": f"Ses0{s}{g}_impro0{i}_{g}000", "path": str(path), "session": s,
                         "speaker": f"Ses0{s}{g}", "gender": g, "dialog": f"Ses0{s}{g}_impro0{i}", "scripted": False,
                         "emotion_code": "neu", "label": CLASSES[i % 4], "transcript": None, "duration": n / 16000})
    return recs


@pytest.fixture(scope="module")
def pipeline(corpus, tmp_path_factory):
    cfg = tiny_config("finetune.keep_checkpoints=true")  # the tests below read the resume points
    fold = split_fold(corpus, 2)
    out = tmp_path_factory.mktemp("ptapt_run")
    t0 = time.perf_counter()
    enc_dir = run_ptapt(cfg, fold, out)
    return {"cfg": cfg, "fold": fold, "out": out, "enc_dir": enc_dir, "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------
# Step (a): frame model
# ------------------------------------------------------------------------------------------------


def _tiny_frame_model(seed=0) -> FrameEmotionModel:
    torch.manual_seed(seed)
    cfg = PtaptConfig(frame_dim=24, frame_head_hidden=8, frame_lstm_hidden=8, frame_mask_feature_length=4,
                      frame_mask_time_length=5)
    return FrameEmotionModel(tiny_wav2vec1(), cfg)


def test_frame_model_loss_is_utterance_ce_plus_frame_ce_without_padding_frames():
    model = _tiny_frame_model().eval()
    g = torch.Generator().manual_seed(0)
    audio = torch.randn(3, 4000, generator=g) * 0.1
    mask = torch.ones(3, 4000, dtype=torch.bool)
    mask[1, 2500:] = False
    mask[2, 1800:] = False
    audio[~mask] = 0
    batch = {"audio": audio, "audio_mask": mask, "labels": torch.tensor([0, 3, 1])}
    w = torch.tensor([0.1, 0.2, 0.3, 0.4])
    parts = model.loss(batch, w)
    utt, frames, fm = parts["utterance_logits"], parts["frame_logits"], parts["frame_mask"]
    assert utt.shape == (3, 4) and frames.shape[:2] == fm.shape
    # valid frame counts = the frame count of each unpadded waveform
    n_valid = model.output_lengths(mask.sum(-1))
    assert fm.sum(-1).tolist() == n_valid.tolist() and fm[0].all() and not fm[2].all()
    # manual weighted CE: utterance + every valid frame with the utterance label
    y = batch["labels"]
    utt_ce = (w[y] * F.cross_entropy(utt, y, reduction="none")).sum() / w[y].sum()
    nll, wsum = 0.0, 0.0
    for i in range(3):
        for t in range(int(n_valid[i])):
            nll += w[y[i]] * F.cross_entropy(frames[i, t][None], y[i][None])
            wsum += w[y[i]]
    assert parts["utterance"].item() == pytest.approx(utt_ce.item(), rel=1e-5)
    assert parts["frame"].item() == pytest.approx((nll / wsum).item(), rel=1e-5)
    assert parts["loss"].item() == pytest.approx(utt_ce.item() + (nll / wsum).item(), rel=1e-5)
    # garbage logits at padding frames change nothing; at a valid frame they do
    junk = frames.clone()
    junk[~fm] = 1e3 * torch.randn_like(junk[~fm])
    same = frame_model_loss(utt, junk, fm, y, w)["loss"]
    assert same.item() == pytest.approx(parts["loss"].item(), rel=1e-6)
    junk[2, 0] = torch.tensor([50.0, -50.0, -50.0, -50.0])
    assert frame_model_loss(utt, junk, fm, y, w)["loss"].item() != pytest.approx(parts["loss"].item(), rel=1e-3)


def test_frame_model_trains_aggregator_not_feature_extractor_and_masks_z_in_training():
    model = _tiny_frame_model()
    assert not any(p.requires_grad for p in model.backbone.feature_extractor.parameters())
    assert all(p.requires_grad for p in model.backbone.feature_aggregator.parameters())
    batch = {"audio": torch.randn(4, 3000) * 0.1, "audio_mask": torch.ones(4, 3000, dtype=torch.bool),
             "labels": torch.tensor([0, 1, 2, 3])}
    model.train()
    model.loss(batch)["loss"].backward()
    assert all(p.grad is None for p in model.backbone.feature_extractor.parameters())
    assert model.backbone.feature_aggregator.conv_layers[0][1].weight.grad.abs().sum() > 0
    # SpecAugment on z only in training: train-mode features differ from eval-mode ones (no dropout here)
    with torch.no_grad():
        ev = model.eval().frame_features(batch["audio"], batch["audio_mask"])[0]
        np.random.seed(0)
        tr = model.train().frame_features(batch["audio"], batch["audio_mask"])[0]
    assert ev.shape == tr.shape and not torch.allclose(ev, tr)
    assert model.hop_samples == 40


def test_frame_model_on_a_wav2vec2_backbone_has_the_encoder_frame_grid():
    cfg = tiny_config("ptapt.frame_model=wav2vec2")
    model = build_frame_model(cfg).eval()
    assert isinstance(model.backbone, AudioEncoder) and isinstance(model.proj, nn.Linear)
    audio, mask = torch.randn(2, 4000), torch.ones(2, 4000, dtype=torch.bool)
    x, fm = model.frame_features(audio, mask)
    assert x.shape == (2, conv_frames(4000, [10, 8, 4], [5, 4, 2]), 32) and fm.all()
    assert model({"audio": audio, "audio_mask": mask}).shape == (2, 4)
    assert model.hop_samples == 40
    hc = model.backbone.model.config  # SpecAugment from ptapt.frame_mask_*, not encoder.mask_*
    assert (hc.mask_time_prob, hc.mask_time_length, hc.mask_feature_prob, hc.mask_feature_length) == (0.08, 5, 0.05, 4)
    assert not any(p.requires_grad for p in model.backbone.model.feature_projection.parameters())
    with pytest.raises(ValueError, match="ptapt.frame_mask_feature_length=64 exceeds"):
        build_frame_model(tiny_config("ptapt.frame_model=wav2vec2", "ptapt.frame_mask_feature_length=64"))
    with pytest.raises(ValueError, match="wav2vec1_checkpoint is not set"):
        build_frame_model(tiny_config("ptapt.wav2vec1_checkpoint=null"))


def test_frame_split_is_seeded_90_10_and_disjoint(corpus):
    train, val = split_train_val(corpus, 0.1, 58)
    assert len(train) == int(len(corpus) * 0.9) and len(train) + len(val) == len(corpus)
    assert not {r["id"] for r in train} & {r["id"] for r in val}
    again, _ = split_train_val(list(reversed(corpus)), 0.1, 58)  # input order does not matter
    assert [r["id"] for r in again] == [r["id"] for r in train]
    other, _ = split_train_val(corpus, 0.1, 59)
    assert [r["id"] for r in other] != [r["id"] for r in train]


def test_frame_split_is_torch_random_split_with_seed_58(corpus):
    # the reference: random_split(dataset, [int(0.9 n), n - int(0.9 n)], generator=manual_seed(58))
    train, val = split_train_val(corpus, 0.1, 58)
    recs = sorted(corpus, key=lambda r: r["id"])
    n_train = int(len(recs) * 0.9)
    a, b = torch.utils.data.random_split(recs, [n_train, len(recs) - n_train],
                                         generator=torch.Generator().manual_seed(58))
    assert [r["id"] for r in a] == [r["id"] for r in train] and [r["id"] for r in b] == [r["id"] for r in val]


def _crop_starts(batch, full: dict) -> list[int]:
    """Where each cropped item of `batch` starts in its full waveform (exact match of its samples)."""
    starts = []
    for uid, row in zip(batch["ids"], batch["audio"], strict=True):
        wav, n = full[uid], row.shape[0]
        hits = [s for s in range(wav.shape[0] - n + 1) if torch.equal(wav[s:s + n], row)]
        assert len(hits) == 1
        starts.append(hits[0])
    return starts


def test_frame_validation_batches_are_the_references_and_fixed_across_validations(corpus):
    """The reference's val loader: the split's (random) order, batches of 64, shuffle=False, each
    batch cropped by truncCollate to its shortest item at a random start in [0, surplus)."""
    from mmser.data.dataset import UtteranceDataset
    from mmser.training.ptapt import frame_training as ft

    _, val = split_train_val(corpus, 0.5, 58)  # 20 items in the split's permutation order
    val_set = UtteranceDataset(val, 16000, None)
    full = {r["id"]: val_set[i]["audio"] for i, r in enumerate(val)}
    lengths = {uid: w.shape[0] for uid, w in full.items()}
    pc = PtaptConfig(frame_batch_size=6)
    assert pc.frame_val_batches == "reference"  # the reference's batches by default
    loader = ft.validation_loader(val_set, pc)
    first, second = list(loader), list(loader)
    ids = [r["id"] for r in val]
    assert [b["ids"] for b in first] == [ids[i:i + 6] for i in range(0, 20, 6)]  # split order, last one smaller
    assert ids != sorted(ids, key=lambda u: (lengths[u], u))  # a random order, not ascending length
    starts = []
    for b in first:
        n = min(lengths[u] for u in b["ids"])
        assert b["audio"].shape[1] == n and bool(b["audio_mask"].all())  # cropped to its shortest item
        for uid, s in zip(b["ids"], _crop_starts(b, full), strict=True):
            over = lengths[uid] - n
            assert 0 <= s < max(over, 1)  # np.random.randint(over)
            if over > 10:
                starts.append((s, over // 2))
    assert len(starts) > 8
    assert sum(s != centre for s, centre in starts) > 0.8 * len(starts)  # random, not the centre
    # the same batches and crops at every validation (like-for-like checkpoint selection)
    for a, b in zip(first, second, strict=True):
        assert a["ids"] == b["ids"] and torch.equal(a["audio"], b["audio"])
    # the reference's redrawn crops, as a switch: the same batches, other crops at the next validation
    redrawn = ft.validation_loader(val_set, PtaptConfig(frame_batch_size=6, frame_val_batches="reference-redrawn"))
    r1, r2 = list(redrawn), list(redrawn)
    assert [b["ids"] for b in r1] == [b["ids"] for b in r2] == [b["ids"] for b in first]
    assert all(torch.equal(a["audio"], b["audio"]) for a, b in zip(r1, first, strict=True))  # draw 0 = the fixed one
    assert not all(torch.equal(a["audio"], b["audio"]) for a, b in zip(r1, r2, strict=True))
    # mmser's earlier batches: ascending length, centre crop
    old = list(ft.validation_loader(val_set, PtaptConfig(frame_batch_size=6, frame_val_batches="sorted-centre")))
    assert [u for b in old for u in b["ids"]] == sorted(ids, key=lambda u: (lengths[u], ids.index(u)))
    for b in old:
        n = b["audio"].shape[1]
        assert _crop_starts(b, full) == [(lengths[u] - n) // 2 for u in b["ids"]]


def test_frame_model_stage_validates_on_the_configured_batches(corpus, tmp_path, monkeypatch):
    import pytorch_lightning as pl

    from mmser.training.ptapt import frame_training as ft

    seen = {}

    class Stop(Exception):
        pass

    def fake_fit(self, module, train_loader, val_loader, ckpt_path=None):
        seen["val"] = val_loader
        raise Stop

    monkeypatch.setattr(pl.Trainer, "fit", fake_fit)
    with pytest.raises(Stop):
        ft.train_frame_model(tiny_config(), split_fold(corpus, 2), tmp_path, "fp")
    assert isinstance(seen["val"].batch_sampler, ft.ValidationBatches)
    assert not seen["val"].batch_sampler.redraw


# ------------------------------------------------------------------------------------------------
# Step (c): masked pseudo-label loss and alignment
# ------------------------------------------------------------------------------------------------


def _heads(sizes=(5, 9), hidden=12, seed=0):
    torch.manual_seed(seed)
    return nn.ModuleList(nn.Sequential(nn.Linear(hidden, 8), nn.Tanh(), nn.Linear(8, k)) for k in sizes)


def test_ptapt_loss_counts_only_masked_frames():
    heads = _heads()
    g = torch.Generator().manual_seed(1)
    frames = torch.randn(2, 20, 12, generator=g)
    labels = torch.stack([torch.randint(0, 5, (2, 20), generator=g), torch.randint(0, 9, (2, 20), generator=g)], -1)
    mask = torch.zeros(2, 20, dtype=torch.bool)
    mask[0, 3:8] = True
    mask[1, 10:17] = True
    base = ptapt_loss(frames, heads, labels, mask)["loss"]
    # reference: sum over heads of the mean CE over masked frames
    ref = sum(F.cross_entropy(h(frames[mask]), labels[mask][:, i]) for i, h in enumerate(heads))
    assert base.item() == pytest.approx(ref.item(), rel=1e-6)
    f2, l2 = frames.clone(), labels.clone()
    f2[~mask] = torch.randn_like(f2[~mask]) * 100
    l2[~mask] = (l2[~mask] + 1) % 5
    assert ptapt_loss(f2, heads, l2, mask)["loss"].item() == pytest.approx(base.item(), rel=1e-6)
    f3 = frames.clone()
    f3[0, 4] += 5.0
    assert ptapt_loss(f3, heads, labels, mask)["loss"].item() != pytest.approx(base.item(), rel=1e-4)
    l3 = labels.clone()
    l3[1, 12, 1] = (l3[1, 12, 1] + 1) % 9
    assert ptapt_loss(frames, heads, l3, mask)["loss"].item() != pytest.approx(base.item(), rel=1e-4)
    # -100 at masked frames = no target
    l4 = labels.clone()
    l4[0, 3:8] = IGNORE_INDEX
    m1 = torch.zeros_like(mask)
    m1[1, 10:17] = True
    assert ptapt_loss(frames, heads, l4, mask)["loss"].item() == pytest.approx(
        ptapt_loss(frames, heads, labels, m1)["loss"].item(), rel=1e-6)


def test_ptapt_module_loss_ignores_unmasked_labels_and_masks_with_the_embedding():
    cfg = tiny_config()
    torch.manual_seed(0)
    module = PtaptModule(build_ptapt_encoder(cfg), [4, 8], cfg.ptapt).eval()  # eval: no dropout
    enc = module.encoder
    assert not any(p.requires_grad for p in enc.feature_extractor.parameters())
    assert not any(p.requires_grad for p in enc.feature_projection.parameters())
    assert not enc.masked_spec_embed.requires_grad and enc.config.mask_feature_prob == 0.0
    audio, amask = torch.randn(2, 4000), torch.ones(2, 4000, dtype=torch.bool)
    f = conv_frames(4000, [10, 8, 4], [5, 4, 2])
    g = torch.Generator().manual_seed(0)
    labels = torch.stack([torch.randint(0, 4, (2, f), generator=g), torch.randint(0, 8, (2, f), generator=g)], -1)
    tmask = torch.zeros(2, f, dtype=torch.bool)
    tmask[:, 10:25] = True
    batch = {"audio": audio, "audio_mask": amask, "pseudo_labels": labels}
    seen = {}
    hook = enc.encoder.register_forward_pre_hook(lambda mod, args: seen.setdefault("h", args[0].detach().clone()))
    with torch.no_grad():
        base = module.compute_loss(batch, tmask)["loss"]
        hook.remove()
        # the transformer's input holds masked_spec_embed exactly at the masked frames
        emb = enc.masked_spec_embed.detach()
        assert torch.equal(seen["h"][tmask], emb.expand(int(tmask.sum()), -1))
        assert not torch.isclose(seen["h"][~tmask], emb.expand(int((~tmask).sum()), -1)).all(-1).any()
        other = labels.clone()
        other[~tmask] = (other[~tmask] + 1) % 4
        assert module.compute_loss({**batch, "pseudo_labels": other}, tmask)["loss"].item() == pytest.approx(
            base.item(), rel=1e-6)
        other = labels.clone()
        other[:, 10:25, 0] = (other[:, 10:25, 0] + 1) % 4
        assert module.compute_loss({**batch, "pseudo_labels": other}, tmask)["loss"].item() != pytest.approx(
            base.item(), rel=1e-4)
    # a drawn mask lies inside valid frames and the loss trains encoder and heads
    module.train()
    amask[1, 2000:] = False
    audio[1, 2000:] = 0
    np.random.seed(0)
    parts = module.compute_loss({"audio": audio, "audio_mask": amask, "pseudo_labels": labels})
    parts["loss"].backward()
    assert parts["n_masked"] > 0
    assert module.heads[1][2].weight.grad.abs().sum() > 0
    assert enc.encoder.layers[0].attention.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("seed", range(6))
def test_pseudo_labels_align_with_wav2vec2_frames_for_any_crop(seed):
    """Property: frame j of a crop starting at label frame s is frame s + j of the full utterance
    (checked on the CNN's own outputs), and carries label s + j or -100 past the label sequence."""
    enc = build_encoder(EncoderConfig(name="random", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=32, conv_dim=[8, 8, 8], conv_kernel=[10, 8, 4],
                                      conv_stride=[5, 4, 2], feat_extract_norm="layer", num_conv_pos_embeddings=16,
                                      num_conv_pos_embedding_groups=2, mask_feature_prob=0.0)).eval()
    kernels, strides, hop = [10, 8, 4], [5, 4, 2], 40
    rng = np.random.default_rng(seed)
    for _ in range(8):
        n = int(rng.integers(200, 6000))
        wav = rng.standard_normal(n).astype(np.float32)
        n_full = conv_frames(n, kernels, strides)
        # label sequences as long as the encoder's, or a frame or two off (the frame model's grid)
        n_lab = max(0, n_full + int(rng.integers(-2, 3)))
        labels = np.stack([np.arange(n_lab), np.arange(n_lab) % 7], axis=1)
        max_samples = int(rng.integers(100, 7000))
        crop, lab, s = crop_with_labels(wav, labels, hop, max_samples, rng=rng)
        assert crop.shape[0] == min(n, max_samples) and (s == 0 or n > max_samples)
        assert np.array_equal(crop, wav[s * hop: s * hop + crop.shape[0]])
        n_crop = conv_frames(crop.shape[0], kernels, strides)
        out = align_labels(lab, n_crop)
        assert out.shape == (n_crop, 2)
        j = np.arange(n_crop)
        assert np.array_equal(out[:, 0], np.where(s + j < n_lab, s + j, IGNORE_INDEX))
        assert np.array_equal(out[:, 1], np.where(s + j < n_lab, (s + j) % 7, IGNORE_INDEX))
        assert int(enc._get_feat_extract_output_lengths(crop.shape[0])) == n_crop
        if n_crop:
            with torch.no_grad():
                full = enc.feature_extractor(torch.from_numpy(wav)[None])[0].T  # (F, C)
                part = enc.feature_extractor(torch.from_numpy(crop)[None])[0].T
            assert torch.allclose(part, full[s:s + n_crop], atol=1e-5)


def test_pseudo_label_batches_have_the_encoder_frame_count(corpus):
    recs = corpus[:5]
    labels = {r["id"]: np.zeros((conv_frames(round(r["duration"] * 16000), [10, 8, 4], [5, 4, 2]) - 1, 2), np.int32)
              for r in recs}
    ds = PseudoLabelDataset(recs, labels, [10, 8, 4], [5, 4, 2], crop_s=0.25)
    batch = collate_pseudo([ds[i] for i in range(len(ds))])
    b, t = batch["audio"].shape
    assert t == 4000  # longest clip cropped to 0.25 s
    assert batch["pseudo_labels"].shape == (b, conv_frames(t, [10, 8, 4], [5, 4, 2]), 2)
    for i in range(b):
        n_i = conv_frames(int(batch["audio_mask"][i].sum()), [10, 8, 4], [5, 4, 2])
        row = batch["pseudo_labels"][i, :, 0]
        assert (row[n_i:] == IGNORE_INDEX).all()
        assert (row[: n_i] != IGNORE_INDEX).sum() >= n_i - 1  # a label sequence one frame short
    with pytest.raises(KeyError, match="pseudo-labels missing"):
        PseudoLabelDataset(corpus[:6], labels, [10, 8, 4], [5, 4, 2], crop_s=None)


# ------------------------------------------------------------------------------------------------
# The driver
# ------------------------------------------------------------------------------------------------


def test_pipeline_never_sees_the_test_session(pipeline):
    fold, out = pipeline["fold"], pipeline["out"]
    train_ids = {r["id"] for r in fold.train}
    test_ids = {r["id"] for r in fold.test}
    assert test_ids and all(i.startswith("Ses02") for i in test_ids)
    split = json.loads((out / "frame_model" / "split.json").read_text())
    used_a = set(split["train"]) | set(split["val"])
    assert used_a == train_ids and not used_a & test_ids and not set(split["train"]) & set(split["val"])
    clustered = set(load_pseudo_labels(out / "pseudo_labels"))
    assert clustered == train_ids and not clustered & test_ids
    meta = json.loads((out / "pseudo_labels" / "meta.json").read_text())
    assert set(meta["ids"]) == train_ids


def test_pipeline_refuses_a_fold_holding_test_session_audio(corpus, tmp_path):
    fold = split_fold(corpus, 2)
    fold.train = fold.train + fold.test[:1]
    with pytest.raises(AssertionError, match="test-session 2"):
        run_ptapt(tiny_config(), fold, tmp_path / "bad")
    assert not (tmp_path / "bad" / "frame_model").exists()


def test_pipeline_writes_a_loadable_encoder_and_is_idempotent(pipeline, caplog):
    out, enc_dir, cfg = pipeline["out"], pipeline["enc_dir"], pipeline["cfg"]
    assert enc_dir == out / "encoder" and (enc_dir / "config.json").is_file()
    times = {s: json.loads((out / s / "DONE.json").read_text())["seconds"]
             for s in ("frame_model", "pseudo_labels", "encoder")}
    logging.getLogger(__name__).info("tiny P-TAPT stage times (s): %s, total %.1f", times, pipeline["seconds"])
    # loads as a bare encoder through V-FT's own loader, without the pseudo-label heads
    model = build_encoder(EncoderConfig(**{**vars(cfg.encoder), "name": str(enc_dir)}))
    assert isinstance(model, Wav2Vec2Model)
    assert not any("heads" in k for k in model.state_dict())
    ckpt = torch.load(out / "encoder_training" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    trained = {k[len("encoder."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("encoder.")}
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k]), k
    assert ckpt["global_step"] == cfg.ptapt.total_steps
    feats, fmask = AudioEncoder(model.eval()).encode(torch.randn(1, 4000), torch.ones(1, 4000, dtype=torch.bool))
    assert feats.shape == (1, conv_frames(4000, [10, 8, 4], [5, 4, 2]), 32) and torch.isfinite(feats).all()
    # idempotent: a second call skips every stage and changes nothing
    def outputs():  # every file but the folder lock's own (.lock, .lock-owner.json): taking it is no output
        return {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and not p.name.startswith(".lock")}

    stamps = outputs()
    with caplog.at_level(logging.INFO, logger="mmser.training.ptapt"):
        t0 = time.perf_counter()
        assert run_ptapt(cfg, pipeline["fold"], out) == enc_dir
        assert time.perf_counter() - t0 < 5
    assert caplog.text.count("done, skipped") == 3
    assert outputs() == stamps


def test_pipeline_refuses_stale_stages_and_resumes_step_c(pipeline, tmp_path):
    out, cfg, fold = pipeline["out"], pipeline["cfg"], pipeline["fold"]
    with pytest.raises(ValueError, match="pseudo_labels was made from other inputs"):
        run_ptapt(tiny_config("ptapt.cluster_sizes=[4,6]"), fold, out)
    # step (c) interrupted after its last checkpoint: the rerun resumes there (no new steps)
    work = tmp_path / "copy"
    shutil.copytree(out, work)
    shutil.rmtree(work / "encoder")
    t0 = time.perf_counter()
    enc_dir = run_ptapt(cfg, fold, work)
    assert time.perf_counter() - t0 < 10
    done = json.loads((enc_dir / "DONE.json").read_text())
    assert done["steps"] == cfg.ptapt.total_steps
    # By default the resume points go once every stage is done; the selected frame model stays.
    run_ptapt(tiny_config(), fold, work)
    assert not (work / "encoder_training" / "checkpoints").exists()
    assert not (work / "frame_model" / "checkpoints").exists()
    assert (work / "frame_model" / "model.pt").is_file() and (work / "encoder" / "config.json").is_file()


def test_stage_bucketing_is_independent_of_vft_num_buckets(pipeline, corpus, tmp_path, monkeypatch):
    """data.num_buckets=1 (the README's exact-V-FT recipe) leaves TAPT's and P-TAPT's 50 buckets."""
    from mmser.training import tapt as taptmod
    from mmser.training.ptapt import masked_prediction as mp

    class Stop(Exception):
        pass

    seen = {}

    def spy(stage):
        def make(lengths, **kw):
            seen[stage] = kw["num_buckets"]
            raise Stop
        return make

    cfg = tiny_config("data.num_buckets=1", "tapt.mask_time_length=2", "tapt.num_negatives=4")
    assert (cfg.tapt.num_buckets, cfg.ptapt.num_buckets) == (50, 50)  # the reference's, per stage
    monkeypatch.setattr(taptmod, "BucketBatchSampler", spy("tapt"))
    monkeypatch.setattr(mp, "BucketBatchSampler", spy("ptapt"))
    fold = split_fold(corpus, 2)
    with pytest.raises(Stop):
        taptmod.run_tapt(cfg, fold, tmp_path / "tapt")
    with pytest.raises(Stop):
        mp.train_encoder(cfg, fold, pipeline["out"] / "pseudo_labels", tmp_path / "work", tmp_path / "enc", "fp")
    assert seen == {"tapt": 50, "ptapt": 50}
    cfg = tiny_config("tapt.num_buckets=3", "ptapt.num_buckets=7", "tapt.mask_time_length=2", "tapt.num_negatives=4")
    assert cfg.data.num_buckets == 50
    with pytest.raises(Stop):
        taptmod.run_tapt(cfg, fold, tmp_path / "tapt2")
    with pytest.raises(Stop):
        mp.train_encoder(cfg, fold, pipeline["out"] / "pseudo_labels", tmp_path / "work2", tmp_path / "enc2", "fp")
    assert seen == {"tapt": 3, "ptapt": 7}


def _old_ptapt_loss(frames, heads, labels, time_mask):
    """ptapt_loss as it was (boolean selections), for comparison."""
    selected, targets = frames[time_mask], labels[time_mask]
    total = frames.new_zeros((), dtype=torch.float32)
    for i, head in enumerate(heads):
        t = targets[:, i]
        valid = t != IGNORE_INDEX
        if not bool(valid.any()):
            total = total + 0.0 * head(selected).float().sum()
            continue
        total = total + F.cross_entropy(head(selected[valid]).float(), t[valid])
    return total


def test_ptapt_loss_is_unchanged_and_reads_nothing_on_the_host():
    from mmser.training.ptapt.masked_prediction import loss_indices

    heads = _heads(sizes=(5, 9, 3))
    g = torch.Generator().manual_seed(4)
    frames = torch.randn(3, 20, 12, generator=g, requires_grad=True)
    labels = torch.stack([torch.randint(0, 5, (3, 20), generator=g), torch.randint(0, 9, (3, 20), generator=g),
                          torch.full((3, 20), IGNORE_INDEX)], -1)  # head 3: no target at all
    labels[0, 2:9, 0] = IGNORE_INDEX  # some masked frames without a target
    labels[2, 15:, :2] = IGNORE_INDEX  # label padding
    mask = torch.rand(3, 20, generator=g) < 0.4
    ix = loss_indices(mask, labels)
    assert ix["head_counts"][2] == 0 and ix["n_masked"] == int(mask.sum())
    new = ptapt_loss(frames, heads, labels, mask, ix)
    old = _old_ptapt_loss(frames, heads, labels, mask)
    assert torch.equal(new["loss"], old)
    assert torch.equal(ptapt_loss(frames, heads, labels, mask)["loss"], old)  # indices made inside: the same
    new["loss"].backward()
    assert heads[2][0].weight.grad is not None  # the target-less head stays in the graph
    # meta tensors: no value is read on the host (the old loss's boolean selections fail there)
    meta_heads = _heads(sizes=(5, 9, 3)).to("meta")
    mix = {k: ([t.to("meta") for t in v] if isinstance(v, list) and v and torch.is_tensor(v[0]) else v)
           for k, v in ix.items()}
    mix["masked_index"] = ix["masked_index"].to("meta")
    out = ptapt_loss(frames.detach().to("meta"), meta_heads, labels.to("meta"), mask.to("meta"), mix)
    assert out["loss"].device.type == "meta"
    with pytest.raises((NotImplementedError, RuntimeError)):
        _old_ptapt_loss(frames.detach().to("meta"), meta_heads, labels.to("meta"), mask.to("meta"))


def test_ptapt_ranks_draw_their_own_masks_and_loss_matches_the_drawn_mask():
    from types import SimpleNamespace

    cfg = tiny_config()
    torch.manual_seed(0)
    module = PtaptModule(build_ptapt_encoder(cfg), [4, 8], cfg.ptapt)
    f = conv_frames(6000, [10, 8, 4], [5, 4, 2])
    g = torch.Generator().manual_seed(0)
    labels = torch.stack([torch.randint(0, 4, (3, f), generator=g), torch.randint(0, 8, (3, f), generator=g)], -1)
    amask = torch.ones(3, 6000, dtype=torch.bool)
    amask[2, 3000:] = False
    batch = {"audio": torch.randn(3, 6000) * amask, "audio_mask": amask, "pseudo_labels": labels}

    def drawn(rank, fetched):
        progress = SimpleNamespace(total=SimpleNamespace(ready=fetched))
        module._trainer = SimpleNamespace(training=True, global_rank=rank, log_every_n_steps=1,
                                          fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress)))
        torch.manual_seed(5)  # the same global state on every rank (seed_everything)
        np.random.seed(5)
        try:
            return module.on_before_batch_transfer(dict(batch), 0)
        finally:
            module._trainer = None

    r0, r1, r0b = drawn(0, 2), drawn(1, 2), drawn(0, 2)
    assert not torch.equal(r0["time_mask"], r1["time_mask"])  # each rank its own masks
    assert torch.equal(r0["time_mask"], r0b["time_mask"])
    assert not r0["time_mask"][2, conv_frames(3000, [10, 8, 4], [5, 4, 2]):].any()  # inside valid frames
    assert r0["counts"]["masked"] == int(r0["time_mask"].sum()) > 0
    from mmser.perf import AUDIO_LENGTHS

    assert r0[AUDIO_LENGTHS] == amask.sum(-1).tolist()  # lengths for the ThroughputMonitor, read on the CPU
    module.eval()
    with torch.no_grad():
        a = module.compute_loss(r0)["loss"]  # the prepared mask and indices
        b = module.compute_loss(batch, r0["time_mask"])["loss"]  # the same mask, indices made inside
    assert torch.equal(a, b)


def test_ptapt_step_c_accumulates_with_the_step_budget(pipeline, corpus, tmp_path, monkeypatch):
    from mmser.training.ptapt import common
    from mmser.training.ptapt import masked_prediction as mp

    class Stop(Exception):
        pass

    seen = {}
    real_sampler = mp.BucketBatchSampler

    def sampler(lengths, **kw):
        seen["budget"] = kw["max_batch_samples"]
        return real_sampler(lengths, **kw)

    def trainer(*a, **kw):
        seen["accumulate"] = kw.get("accumulate_grad_batches")
        raise Stop

    monkeypatch.setattr(mp, "BucketBatchSampler", sampler)
    monkeypatch.setattr(mp, "stage_trainer", trainer)
    assert common.stage_trainer is not trainer
    cfg = tiny_config("ptapt.accumulate_grad_batches=3")
    with pytest.raises(Stop):
        mp.train_encoder(cfg, split_fold(corpus, 2), pipeline["out"] / "pseudo_labels", tmp_path / "w", tmp_path / "e",
                         "fp")
    assert seen == {"budget": int(1.5 * 16000 / 3), "accumulate": 3}  # ptapt.max_batch_seconds=1.5 per step
