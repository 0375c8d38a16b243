"""P-TAPT step (b): torch k-means and the pseudo-label files."""

import numpy as np
import pytest
import soundfile as sf
import torch
from sklearn.metrics import adjusted_rand_score

from mmser.config import PtaptConfig
from mmser.models.frame_model import FrameEmotionModel
from mmser.models.wav2vec1 import Wav2Vec1, Wav2Vec1Config
from mmser.training.pseudo_labels import (
    CENTROIDS_FILE,
    assign_clusters,
    extract_frame_features,
    kmeans,
    load_pseudo_labels,
    make_pseudo_labels,
    read_meta,
)


def _blobs(n_per=100, k=6, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(k, dim, generator=g) * 20  # far apart relative to unit noise
    y = torch.arange(k).repeat_interleave(n_per)
    return centers[y] + torch.randn(k * n_per, dim, generator=g), y, centers


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_kmeans_recovers_well_separated_blobs(seed):
    x, y, centers = _blobs()
    c, stats = kmeans(x, 6, iters=20, seed=seed)
    ids, _ = assign_clusters(x, c)
    assert adjusted_rand_score(y.numpy(), ids.numpy()) == 1.0
    # every true centre has a centroid within noise distance; inertia ~ per-point noise (dim 8 -> ~8)
    assert torch.cdist(centers, c).min(dim=1).values.max() < 0.5
    assert 6.0 < stats["inertia"] < 10.0


def test_kmeans_is_deterministic_per_seed_and_chunking_does_not_matter():
    x, _, _ = _blobs(n_per=50, k=10, dim=16, seed=3)
    a, _ = kmeans(x, 16, iters=5, seed=7)
    b, _ = kmeans(x, 16, iters=5, seed=7, chunk=33)  # tiny chunks: same assignments, same centroids
    assert torch.allclose(a, b, atol=1e-5)
    c, _ = kmeans(x, 16, iters=5, seed=8)
    assert not torch.allclose(a, c)
    r1, _ = kmeans(x, 16, iters=5, seed=7, init="random")
    r2, _ = kmeans(x, 16, iters=5, seed=7, init="random")
    assert torch.equal(r1, r2)


def test_assign_matches_brute_force_distances():
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(300, 12, generator=g), torch.randn(17, 12, generator=g)
    ids, d = assign_clusters(x, c, chunk=64)
    full = torch.cdist(x, c) ** 2
    assert torch.equal(ids, full.argmin(1))
    assert torch.allclose(d, full.min(1).values, atol=1e-4)


@pytest.mark.parametrize("empty", ["split", "reseed"])
def test_empty_clusters_are_filled_and_bad_input_is_refused(empty):
    # 3 distinct points repeated: with K=5 at least two centroids coincide and one cluster empties.
    x = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]).repeat(20, 1)
    c, stats = kmeans(x, 5, iters=3, seed=0, init="random", empty=empty)
    assert stats["empty_clusters"] > 0 and torch.isfinite(c).all()
    assert stats["empty_clusters"] == sum(stats["empty_per_iter"]) and len(stats["empty_per_iter"]) == 3
    assert stats["inertia"] == pytest.approx(0.0, abs=1e-6)  # the 3 points are still found
    with pytest.raises(ValueError, match="at least K frames"):
        kmeans(x[:3], 4)
    with pytest.raises(ValueError, match="init"):
        kmeans(x, 2, init="kmeans")
    with pytest.raises(ValueError, match="empty"):
        kmeans(x, 2, empty="random")


def test_empty_cluster_takes_half_of_a_split_cluster_as_faiss():
    from mmser.training.ptapt.clustering import SPLIT_EPS, split_empty_clusters

    assert PtaptConfig().kmeans_empty == "split"  # faiss' rule by default
    c = torch.tensor([[9.0, 9.0, 9.0], [1.0, 2.0, 4.0], [5.0, 5.0, 5.0]])
    before = c[1].clone()
    # sizes 0 / 10 / 1 (N = 11, K = 3): p = (n_j - 1) / (N - K) -> only cluster 1 can be split
    assert split_empty_clusters(c, torch.tensor([0, 10, 1]), np.random.default_rng(0)) == 1
    up = torch.tensor([1 + SPLIT_EPS, 1 - SPLIT_EPS, 1 + SPLIT_EPS])
    assert torch.allclose(c[0], before * up) and torch.allclose(c[1], before * (2 - up))
    assert torch.equal(c[2], torch.tensor([5.0, 5.0, 5.0]))  # the singleton is never split
    assert split_empty_clusters(c, torch.tensor([4, 6, 1]), np.random.default_rng(0)) == 0


def test_split_picks_clusters_with_faiss_cyclic_scan_probabilities():
    from mmser.training.ptapt.clustering import split_empty_clusters

    sizes = np.array([0, 3, 5, 9, 1, 6])
    n, k = sizes.sum(), len(sizes)
    p = np.clip((sizes - 1) / (n - k), 0, None)
    # faiss scans 0, 1, ... cyclically and stops at j with probability p_j: first hit in a cycle
    first = p * np.concatenate([[1.0], np.cumprod(1 - p)[:-1]])
    expected = first / first.sum()
    rng = np.random.default_rng(5)
    picks = np.zeros(k)
    trials = 3000
    for _ in range(trials):
        c = torch.arange(k, dtype=torch.float32)[:, None].repeat(1, 2) + 1  # centroid j = (j+1, j+1)
        split_empty_clusters(c, torch.from_numpy(sizes), rng)
        picks[int(round(float(c[0, 0])))  - 1] += 1  # cluster 0 now holds (1 + eps) x the split one's
    freq = picks / trials
    assert freq[0] == 0 and freq[4] == 0  # empty and singleton clusters are never split
    assert np.abs(freq - expected).max() < 0.03


def test_kmeans_is_deterministic_whatever_ran_before(monkeypatch):
    """The cluster sums run under deterministic algorithms by themselves: a fresh process (P-TAPT
    resumed at step (b)) clusters as one where a Trainer (deterministic=True) was built first."""
    import pytorch_lightning as pl

    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    flags = []
    real = torch.Tensor.index_add_

    def spy(self, *a, **k):
        flags.append(torch.are_deterministic_algorithms_enabled())
        return real(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "index_add_", spy)
    x, _, _ = _blobs(n_per=40, k=8, dim=6, seed=2)
    try:
        torch.use_deterministic_algorithms(False)  # a fresh process
        fresh, _ = kmeans(x, 12, iters=4, seed=3)
        assert flags and all(flags)  # CUDA's index_add_ is deterministic only with the flag on
        assert not torch.are_deterministic_algorithms_enabled()  # the caller's setting restored
        pl.Trainer(accelerator="cpu", deterministic=True, logger=False, enable_progress_bar=False)
        assert torch.are_deterministic_algorithms_enabled()
        after, _ = kmeans(x, 12, iters=4, seed=3)
        assert torch.equal(fresh, after)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


def test_pseudo_label_files_round_trip(tmp_path):
    g = np.random.default_rng(0)
    feats = {f"utt{i}": g.standard_normal((5 + i, 6)).astype(np.float32) for i in range(8)}
    out = make_pseudo_labels(feats, [3, 7], iters=4, seed=0, out_dir=tmp_path / "pl", fit_fraction=0.5)
    labels = load_pseudo_labels(out)
    assert sorted(labels) == sorted(feats)
    for uid, f in feats.items():
        assert labels[uid].shape == (f.shape[0], 2)
        assert labels[uid][:, 0].max() < 3 and labels[uid][:, 1].max() < 7 and labels[uid].min() >= 0
    with np.load(out / CENTROIDS_FILE) as z:
        assert z["k3"].shape == (3, 6) and z["k7"].shape == (7, 6)
        # the labels are the nearest centroids of each frame
        x = torch.from_numpy(np.concatenate([feats[u] for u in labels]))
        ids, _ = assign_clusters(x, torch.from_numpy(z["k7"]))
        assert np.array_equal(ids.numpy(), np.concatenate([labels[u][:, 1] for u in labels]))
    meta = read_meta(out)
    assert meta["n_frames"] == sum(f.shape[0] for f in feats.values()) and meta["n_fit_frames"] < meta["n_frames"]
    with pytest.raises(FileNotFoundError, match="no pseudo-labels"):
        load_pseudo_labels(tmp_path / "nothing")


def test_frame_features_are_full_utterance_eval_mode_and_match_frame_counts(tmp_path):
    torch.manual_seed(0)
    cfg = PtaptConfig(frame_dim=24, frame_head_hidden=8, frame_lstm_hidden=8, frame_mask_feature_length=4)
    w1 = Wav2Vec1(Wav2Vec1Config(conv_feature_layers=[(16, 10, 5), (16, 8, 4)],
                                 conv_aggregator_layers=[(16, 2, 1), (16, 3, 1)]))
    model = FrameEmotionModel(w1, cfg).train()  # extract_frame_features must switch to eval
    recs = []
    for i, n in enumerate([1600, 2400, 4001]):
        p = tmp_path / f"{i}.wav"
        sf.write(p, np.random.default_rng(i).standard_normal(n).astype(np.float32) * 0.1, 16000)
        recs.append({"id": f"u{i}", "path": str(p)})
    feats = extract_frame_features(model, recs)
    again = extract_frame_features(model, recs)
    for r, n in zip(recs, [1600, 2400, 4001], strict=True):
        f = feats[r["id"]]
        assert f.shape == (int(model.output_lengths(torch.tensor(n))), 24) and f.dtype == np.float32
        assert (f >= 0).all()  # ReLU(conv(aggregator))
        assert np.array_equal(f, again[r["id"]])  # eval mode: no SpecAugment, no dropout
