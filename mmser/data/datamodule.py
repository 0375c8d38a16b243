"""LightningDataModule over one fold (the only Lightning import in data/)."""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from mmser.config import DataConfig
from mmser.data.batching import BucketBatchSampler, collate_batch
from mmser.data.dataset import MIN_ENCODER_SAMPLES, TextFeatures, UtteranceDataset, split_too_short
from mmser.data.manifest import Fold, class_counts
from mmser.labels import CLASSES

log = logging.getLogger(__name__)
_MAX_LISTED = 20  # ids named in a warning


def class_weights(records: list[dict], classes: Sequence[str] | None = None) -> torch.Tensor:
    """Cross-entropy weights N / n_c normalised to sum 1 (PAPER.md V-FT), in the index order of
    `classes` (the run's classes; None = IEMOCAP's CLASSES)."""
    classes = tuple(classes) if classes is not None else CLASSES
    counts = class_counts(records, classes)
    if sum(counts.values()) != len(records):
        outside = sorted({str(r["label"]) for r in records if r["label"] not in counts})
        raise ValueError(f"class weights: training labels outside the classes {list(classes)}: {outside}")
    empty = [c for c in classes if counts[c] == 0]
    if empty:
        raise ValueError(f"class weights: no training utterances of class(es) {empty}; "
                         "every class needs at least one training example")
    total = sum(counts.values())
    w = torch.tensor([total / counts[c] for c in classes], dtype=torch.float32)
    return w / w.sum()


def collate_with_targets(items: list[dict]) -> dict:
    """collate_batch, plus "targets" (B, K) float: the items' scaled dimensions (dimensional and
    multitask tasks; mmser.data.dataset.UtteranceDataset)."""
    batch = collate_batch(items)
    if "targets" in items[0]:
        batch["targets"] = torch.stack([it["targets"] for it in items]).float()  # (B, K)
    return batch


class SERDataModule(pl.LightningDataModule):
    """Train / val / test loaders of one fold (mmser.data.manifest.split_fold).

    Training: first `train_crop_s` seconds, shuffled length buckets (seeded, new order each
    epoch), fixed `batch_size` or `max_batch_seconds` of padded audio per batch (dynamic batches:
    e.g. 640 s holds 64 x 10 s), each process (global rank, over every node) taking its own share.
    Val / test: full utterances, batches in ascending length (`eval_batch_size`).
    Class weights come from the training split only. The class index order is the fold's
    (`fold.classes`: the manifest's labels or data.classes; IEMOCAP's CLASSES for a bare Fold).

    Clips shorter than `min_samples` (after the training crop; lengths from the manifest) are left
    out of every split: a batch of only such clips has no encoder frame and would end the fold
    mid-training. The default is one wav2vec 2.0 frame (MIN_ENCODER_SAMPLES = 400); pass the
    encoder's own minimum for another one. Nothing on the real corpus is that short (its shortest
    utterance is 0.6 s). The skipped clips are counted per split in `counts()["skipped_too_short"]`
    (written to metrics.json) and named in a warning: skipped test clips change the test set.
    `train_records` / `val_records` / `test_records` hold what is actually used.
    """

    def __init__(self, fold: Fold, data_cfg: DataConfig, seed: int = 0,
                 text_features: Mapping[str, TextFeatures] | None = None,
                 text_ids: Mapping[str, torch.Tensor] | None = None,
                 min_samples: int = MIN_ENCODER_SAMPLES,
                 audio_features: Mapping[str, torch.Tensor] | None = None, task=None):
        super().__init__()
        if min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, got {min_samples}")
        self.fold = fold
        # mmser.tasks.Task (None = categorical over the fold's classes); the dimensional kind has no
        # classes and no class weights, and its batches carry "targets" (B, K)
        self.task = task
        self.categorical = task is None or task.categorical
        self.classes = tuple(task.classes) if task is not None else tuple(fold.classes) if fold.classes else CLASSES
        self.cfg = data_cfg
        self.seed = seed
        self.text_features = text_features
        self.min_samples = int(min_samples)
        sr = data_cfg.sample_rate
        train, short_train = split_too_short(fold.train, self.min_samples, sr, data_cfg.train_crop_s)
        val, short_val = split_too_short(fold.val, self.min_samples, sr)
        test, short_test = split_too_short(fold.test, self.min_samples, sr)
        self.too_short = {"train": short_train, "val": short_val, "test": short_test}
        self._warn_too_short()
        if data_cfg.limit_train is not None and data_cfg.limit_train < len(train):
            train = random.Random(seed).sample(train, data_cfg.limit_train)
        self.train_records = train
        self.val_records = val
        self.test_records = test
        if not self.train_records:
            raise ValueError(f"fold {fold.test_session}: empty training split")
        self.class_weights = class_weights(self.train_records, self.classes) if self.categorical else None
        text = {"text_features": text_features, "text_ids": text_ids, "audio_features": audio_features,
                "classes": self.classes, "task": task}
        self.train_set = UtteranceDataset(self.train_records, sr, data_cfg.train_crop_s, **text)
        self.val_set = UtteranceDataset(self.val_records, sr, None, **text) if self.val_records else None
        self.test_set = UtteranceDataset(self.test_records, sr, None, **text)

    def counts(self) -> dict:
        """Split sizes and per-class counts (for metrics.json)."""
        out = {}
        for name, recs in (("train", self.train_records), ("val", self.val_records), ("test", self.test_records)):
            out[name] = {"n": len(recs), "classes": class_counts(recs, self.classes) if self.categorical else {}}
        # Clips left out for being shorter than the encoder's minimum (see the class docstring).
        out["skipped_too_short"] = {"min_samples": self.min_samples,
                                    **{name: len(recs) for name, recs in self.too_short.items()}}
        return out

    def _warn_too_short(self) -> None:
        for name, recs in self.too_short.items():
            if not recs:
                continue
            ids = ", ".join(r["id"] for r in recs[:_MAX_LISTED])
            more = f" and {len(recs) - _MAX_LISTED} more" if len(recs) > _MAX_LISTED else ""
            why = " (this changes the test set)" if name == "test" else ""
            log.warning("fold %s: skipping %d %s clip(s) shorter than %d samples, too short for the "
                        "encoder%s: %s%s", self.fold.test_session, len(recs), name, self.min_samples,
                        why, ids, more)

    def _loader(self, dataset: UtteranceDataset, sampler: BucketBatchSampler) -> DataLoader:
        # Workers read and crop audio while the model trains; they persist across epochs (the
        # datasets here hold no per-epoch state: the crop is the first train_crop_s seconds), and
        # batches land in pinned memory on a CUDA machine (asynchronous host-to-device copies).
        workers = self.cfg.num_workers
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_with_targets,
                          num_workers=workers, persistent_workers=workers > 0,
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
