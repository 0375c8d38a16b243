"""LightningDataModule over one leave-one-session-out fold (the only Lightning import in data/)."""

from __future__ import annotations

import random
from collections.abc import Mapping

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from mmser.config import DataConfig
from mmser.data.batching import BucketBatchSampler, collate_batch
from mmser.data.dataset import TextFeatures, UtteranceDataset
from mmser.data.manifest import Fold, class_counts
from mmser.labels import CLASSES


def class_weights(records: list[dict]) -> torch.Tensor:
    """Cross-entropy weights N / n_c normalised to sum 1 (PAPER.md V-FT), index order = CLASSES."""
    counts = class_counts(records)
    empty = [c for c in CLASSES if counts[c] == 0]
    if empty:
        raise ValueError(f"class weights: no training utterances of class(es) {empty}; "
                         "every class needs at least one training example")
    total = sum(counts.values())
    w = torch.tensor([total / counts[c] for c in CLASSES], dtype=torch.float32)
    return w / w.sum()


class SERDataModule(pl.LightningDataModule):
    """Train / val / test loaders of one fold (mmser.data.manifest.split_fold).

    Training: first `train_crop_s` seconds, shuffled length buckets (seeded, new order each
    epoch), fixed `batch_size` or `max_batch_seconds` of padded audio per batch.
    Val / test: full utterances, batches in ascending length (`eval_batch_size`).
    Class weights come from the training split only.
    """

    def __init__(self, fold: Fold, data_cfg: DataConfig, seed: int = 0,
                 text_features: Mapping[str, TextFeatures] | None = None,
                 text_ids: Mapping[str, torch.Tensor] | None = None):
        super().__init__()
        self.fold = fold
        self.cfg = data_cfg
        self.seed = seed
        self.text_features = text_features
        train = list(fold.train)
        if data_cfg.limit_train is not None and data_cfg.limit_train < len(train):
            train = random.Random(seed).sample(train, data_cfg.limit_train)
        self.train_records = train
        self.val_records = list(fold.val)
        self.test_records = list(fold.test)
        if not self.train_records:
            raise ValueError(f"fold {fold.test_session}: empty training split")
        self.class_weights = class_weights(self.train_records)
        sr = data_cfg.sample_rate
        text = {"text_features": text_features, "text_ids": text_ids}
        self.train_set = UtteranceDataset(self.train_records, sr, data_cfg.train_crop_s, **text)
        self.val_set = UtteranceDataset(self.val_records, sr, None, **text) if self.val_records else None
        self.test_set = UtteranceDataset(self.test_records, sr, None, **text)

    def counts(self) -> dict:
        """Split sizes and per-class counts (for metrics.json)."""
        out = {}
        for name, recs in (("train", self.train_records), ("val", self.val_records), ("test", self.test_records)):
            out[name] = {"n": len(recs), "classes": class_counts(recs)}
        return out

    def _loader(self, dataset: UtteranceDataset, sampler: BucketBatchSampler) -> DataLoader:
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_batch,
                          num_workers=self.cfg.num_workers, persistent_workers=False,
                          pin_memory=torch.cuda.is_available())

    def train_sampler(self) -> BucketBatchSampler:
        cfg = self.cfg
        if cfg.max_batch_seconds is not None:
            size = {"max_batch_samples": int(cfg.max_batch_seconds * cfg.sample_rate)}
        else:
            size = {"batch_size": cfg.batch_size}
        return BucketBatchSampler(self.train_set.lengths, num_buckets=cfg.num_buckets, shuffle=True,
                                  seed=self.seed, **size)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.train_sampler())

    def _eval_loader(self, dataset: UtteranceDataset | None) -> DataLoader | list:
        if dataset is None or len(dataset) == 0:
            return []
        sampler = BucketBatchSampler(dataset.lengths, batch_size=self.cfg.eval_batch_size, shuffle=False)
        return self._loader(dataset, sampler)

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader | list:
        return self._eval_loader(self.test_set)
