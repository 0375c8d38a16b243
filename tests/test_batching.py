"""Dataset, collate, length-bucketed sampler and the fold datamodule."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import (  # noqa: F401 (single_torch_thread: autouse fixture)
    single_torch_thread,
    tiny_config,
    write_toy_corpus,
)
from lightning_fabric.utilities.data import _set_sampler_epoch
from torch.utils.data import DataLoader

from mmser.data.batching import BucketBatchSampler, collate_batch, padding_efficiency
from mmser.data.datamodule import SERDataModule, class_weights
from mmser.data.dataset import TextFeatures, UtteranceDataset, read_audio
from mmser.data.manifest import load_manifest, split_fold
from mmser.labels import CLASSES

RNG_LENGTHS = np.random.default_rng(0).integers(8_000, 160_000, size=203).tolist()


# -- collate ----------------------------------------------------------------------------------------


def test_collate_pads_and_masks_audio_and_text():
    items = [
        {"id": "a", "audio": torch.ones(5), "label": 2,
         "text": torch.ones(3, 4), "text_pooled": torch.full((4,), 2.0)},
        {"id": "b", "audio": torch.full((2,), 3.0), "label": 0,
         "text": torch.ones(1, 4), "text_pooled": torch.zeros(4)},
    ]
    b = collate_batch(items)
    assert b["ids"] == ["a", "b"]
    assert b["audio"].shape == (2, 5) and b["audio"].dtype == torch.float32
    assert b["audio_mask"].tolist() == [[True] * 5, [True, True, False, False, False]]
    assert b["audio"][1].tolist() == [3.0, 3.0, 0.0, 0.0, 0.0]
    assert b["labels"].tolist() == [2, 0] and b["labels"].dtype == torch.long
    assert b["text"].shape == (2, 3, 4) and b["text_mask"].tolist() == [[True] * 3, [True, False, False]]
    assert b["text"][1, 1:].abs().sum() == 0
    assert b["text_pooled"].shape == (2, 4)
    with pytest.raises(ValueError, match="some items have text"):
        collate_batch([items[0], {"id": "c", "audio": torch.ones(2), "label": 1}])


# -- sampler ----------------------------------------------------------------------------------------


def _flat(batches):
    return [i for b in batches for i in b]


@pytest.mark.parametrize("size", [{"batch_size": 16}, {"max_batch_samples": 16000 * 60}])
def test_sampler_covers_every_item_once_per_epoch(size):
    s = BucketBatchSampler(RNG_LENGTHS, num_buckets=10, seed=3, **size)
    for epoch in range(3):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s)
        assert sorted(_flat(batches)) == list(range(len(RNG_LENGTHS)))


def test_sampler_is_deterministic_per_seed_and_epoch():
    def batches(seed, epoch):
        s = BucketBatchSampler(RNG_LENGTHS, batch_size=16, num_buckets=10, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    assert batches(1, 0) == batches(1, 0)
    assert batches(1, 0) != batches(1, 1)
    assert batches(1, 0) != batches(2, 0)


def test_dynamic_batches_respect_the_budget():
    budget = 16000 * 60
    s = BucketBatchSampler(RNG_LENGTHS, max_batch_samples=budget, num_buckets=10)
    for b in s:
        padded = len(b) * max(RNG_LENGTHS[i] for i in b)
        assert padded <= budget or len(b) == 1
    # a budget smaller than one item: every item alone
    tiny = BucketBatchSampler([100, 200, 300], max_batch_samples=50)
    assert sorted(map(len, tiny)) == [1, 1, 1]


def test_eval_order_is_ascending_length_without_shuffle():
    s = BucketBatchSampler(RNG_LENGTHS, batch_size=7, shuffle=False)
    flat = [RNG_LENGTHS[i] for i in _flat(s)]
    assert flat == sorted(RNG_LENGTHS)


@pytest.mark.parametrize("drop_last", [False, True])
def test_ddp_shards_are_disjoint_and_equal_length(drop_last):
    world = 3
    shards = [list(BucketBatchSampler(RNG_LENGTHS, batch_size=8, seed=5, num_replicas=world, rank=r,
                                      drop_last=drop_last)) for r in range(world)]
    assert len({len(sh) for sh in shards}) == 1  # same number of batches on every rank
    single = BucketBatchSampler(RNG_LENGTHS, batch_size=8, seed=5, drop_last=drop_last).all_batches()
    flat_shards = [_flat(sh) for sh in shards]
    if drop_last:
        # cut to a multiple of the world size: nothing repeated anywhere
        all_ids = [i for f in flat_shards for i in f]
        assert len(all_ids) == len(set(all_ids))
        assert len(single) - sum(len(sh) for sh in shards) < world
    else:
        # wrapped around: every item is covered; only the few padding batches repeat
        covered = set(i for f in flat_shards for i in f)
        assert covered == set(range(len(RNG_LENGTHS)))
        n_batches = sum(len(sh) for sh in shards)
        assert n_batches - len(single) < world
        # the shards' first batches are distinct batches of the same epoch
        firsts = [tuple(sh[0]) for sh in shards]
        assert len(set(firsts)) == world


def test_bucketing_reduces_padding_and_efficiency_is_exact():
    assert padding_efficiency([[0, 1], [2]], [2, 4, 3]) == pytest.approx((2 + 4 + 3) / (4 + 4 + 3))
    bucketed = BucketBatchSampler(RNG_LENGTHS, batch_size=16, num_buckets=20, seed=0)
    random_batches = BucketBatchSampler(RNG_LENGTHS, batch_size=16, num_buckets=1, seed=0)
    eff_b = padding_efficiency(list(bucketed), RNG_LENGTHS)
    eff_r = padding_efficiency(list(random_batches), RNG_LENGTHS)
    assert eff_b > 0.9 and eff_r < 0.75, (eff_b, eff_r)


def test_lightning_sets_the_sampler_epoch():
    s = BucketBatchSampler(RNG_LENGTHS, batch_size=16)
    dl = DataLoader(list(range(len(RNG_LENGTHS))), batch_sampler=s)
    _set_sampler_epoch(dl, 4)
    assert s.epoch == 4


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match="exactly one"):
        BucketBatchSampler([1, 2], batch_size=2, max_batch_samples=10)
    with pytest.raises(ValueError, match="no items"):
        BucketBatchSampler([], batch_size=2)


# -- dataset ----------------------------------------------------------------------------------------


def _wav(path, data, sr=16000):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, sr, subtype="FLOAT")
    return path


def _record(path, n, label="sad", uid="Ses01F_impro01_F000"):
    return {"id": uid, "path": str(path), "label": label, "duration": n / 16000}


def test_training_crop_keeps_the_first_seconds_and_test_keeps_all(tmp_path):
    ramp = np.linspace(-1, 1, 16000, dtype=np.float32)
    p = _wav(tmp_path / "a.wav", ramp)
    train = UtteranceDataset([_record(p, 16000)], crop_s=0.25)
    item = train[0]
    assert item["audio"].shape == (4000,)
    assert torch.allclose(item["audio"], torch.from_numpy(ramp[:4000]))
    assert train.lengths == [4000]
    full = UtteranceDataset([_record(p, 16000)], crop_s=None)
    assert full[0]["audio"].shape == (16000,) and full.lengths == [16000]
    assert item["label"] == CLASSES.index("sad")


def test_bad_audio_gives_errors_naming_the_file(tmp_path):
    p8 = _wav(tmp_path / "eight_k.wav", np.zeros(800, np.float32), sr=8000)
    with pytest.raises(ValueError, match=r"eight_k\.wav.*8000 Hz"):
        read_audio(p8)
    stereo = _wav(tmp_path / "stereo.wav", np.zeros((800, 2), np.float32))
    with pytest.raises(ValueError, match=r"stereo\.wav.*2 channels"):
        read_audio(stereo)
    junk = tmp_path / "._junk.wav"
    junk.write_bytes(b"\x00\x05\x16\x07AppleDouble junk")
    with pytest.raises(ValueError, match=r"\._junk\.wav: cannot read audio"):
        read_audio(junk)
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        read_audio(tmp_path / "missing.wav")


def test_text_features_are_attached_and_checked(tmp_path):
    p = _wav(tmp_path / "a.wav", np.zeros(1600, np.float32))
    feats = {"Ses01F_impro01_F000": TextFeatures(torch.ones(3, 5), torch.zeros(5))}
    item = UtteranceDataset([_record(p, 1600)], text_features=feats)[0]
    assert item["text"].shape == (3, 5) and item["text_pooled"].shape == (5,)
    with pytest.raises(KeyError, match="text features missing"):
        UtteranceDataset([_record(p, 1600, uid="Ses01F_impro01_F001")], text_features=feats)


# -- datamodule -------------------------------------------------------------------------------------


def test_class_weights_on_a_hand_made_split():
    recs = [{"label": c} for c, n in zip(CLASSES, (1, 2, 4, 8), strict=True) for _ in range(n)]
    w = class_weights(recs)
    raw = torch.tensor([15 / 1, 15 / 2, 15 / 4, 15 / 8])
    assert torch.allclose(w, raw / raw.sum())
    assert w.sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="sad"):
        class_weights([{"label": "angry"}, {"label": "happy"}, {"label": "neutral"}])


@pytest.fixture(scope="module")
def toy_manifest(tmp_path_factory):
    return write_toy_corpus(tmp_path_factory.mktemp("toy"), per_class=1)


def _loader_ids(loader):
    return [uid for batch in loader for uid in batch["ids"]]


@pytest.mark.parametrize("validation", ["none", "speaker"])
def test_datamodule_loaders_never_see_the_test_session(tmp_path, toy_manifest, validation):
    cfg = tiny_config(tmp_path, toy_manifest, [f"data.validation={validation}"])
    records = load_manifest(toy_manifest)
    session_of = {r["id"]: r["session"] for r in records}
    fold = split_fold(records, 3, cfg.data)
    dm = SERDataModule(fold, cfg.data, seed=0)
    train_ids = _loader_ids(dm.train_dataloader())
    val_ids = _loader_ids(dm.val_dataloader()) if validation != "none" else []
    test_ids = _loader_ids(dm.test_dataloader())
    assert train_ids and test_ids
    assert all(session_of[u] != 3 for u in train_ids + val_ids)
    assert {session_of[u] for u in test_ids} == {3}
    # each split's loader yields every 4-class utterance of that split exactly once
    assert sorted(train_ids) == sorted(r["id"] for r in fold.train)
    assert sorted(test_ids) == sorted(r["id"] for r in fold.test)
    assert all(r["label"] is not None for r in fold.train + fold.test)
    if validation == "speaker":
        assert val_ids and not set(val_ids) & set(train_ids)
    # class weights come from the training split
    assert torch.allclose(dm.class_weights, class_weights(fold.train))
    counts = dm.counts()
    assert counts["train"]["n"] == len(fold.train)
    assert Counter(r["label"] for r in fold.test) == Counter(
        {c: n for c, n in counts["test"]["classes"].items() if n})


def test_rank_is_read_when_batches_are_drawn_not_at_construction(monkeypatch):
    """TAPT / P-TAPT build their sampler before Lightning starts the process group: the shard
    must follow the group that exists when the epoch is drawn."""
    import mmser.data.batching as batching

    sampler = BucketBatchSampler(RNG_LENGTHS, batch_size=8, seed=5)  # no process group yet
    alone = list(sampler)
    monkeypatch.setattr(batching.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(batching.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(batching.dist, "get_rank", lambda: 1)
    shard = list(sampler)
    assert sampler.num_replicas == 2 and sampler.rank == 1
    assert len(shard) == -(-len(alone) // 2)  # half the batches (rounded up: wrap-around)
    assert shard == (sampler.all_batches() + sampler.all_batches()[:1])[1::2][: len(shard)]


def test_collate_pads_text_token_ids():
    items = [{"id": "a", "audio": torch.ones(5), "label": 0, "text_ids": torch.tensor([101, 7, 102])},
             {"id": "b", "audio": torch.ones(3), "label": 1, "text_ids": torch.tensor([101, 102])}]
    b = collate_batch(items)
    assert b["text_ids"].tolist() == [[101, 7, 102], [101, 102, 0]]
    assert b["text_ids_mask"].tolist() == [[True, True, True], [True, True, False]]
