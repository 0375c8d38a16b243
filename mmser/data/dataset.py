"""Utterance dataset over manifest records: reads 16 kHz mono audio with soundfile, crops for
training, and attaches optional frozen text features.

Training keeps each utterance's FIRST `crop_s` seconds (PAPER.md V-FT: the reference truncates to
the first 10 s); testing uses full utterances (crop_s=None). Waveforms are used as read, without
per-utterance normalisation, as in the reference (wav2vec2-base was pre-trained on raw waveforms).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from mmser.audio import read_audio  # noqa: F401 - the one strict reader, imported from here by the trainers
from mmser.labels import CLASSES


class TextFeatures(NamedTuple):
    """Frozen text features of one utterance: token features (L, D) and a pooled vector (D,)."""

    tokens: torch.Tensor
    pooled: torch.Tensor


# The fewest samples a wav2vec 2.0 encoder turns into one frame: the receptive field of its conv
# feature encoder (kernels 10,3,3,3,3,2,2, strides 5,2,2,2,2,2,2: 10 + 2*5 + 2*10 + 2*20 + 2*40
# + 80 + 160 = 400 samples, 25 ms at 16 kHz). A batch of only shorter clips has no frame at all
# (AudioEncoder.encode raises). Callers with another encoder pass its own minimum.
MIN_ENCODER_SAMPLES = 400


def split_too_short(records: Sequence[dict], min_samples: int, sample_rate: int,
                    crop_s: float | None = None) -> tuple[list[dict], list[dict]]:
    """(kept, too short): records whose length in samples (from the manifest's duration, after the
    optional crop) is at least `min_samples`, and the others, both in the input order."""
    kept, short = [], []
    for r in records:
        (kept if num_samples(r, sample_rate, crop_s) >= min_samples else short).append(r)
    return kept, short


def num_samples(record: dict, sample_rate: int, crop_s: float | None = None) -> int:
    """Length in samples from the manifest's duration (no file read), after the optional crop."""
    n = int(round(float(record["duration"]) * sample_rate))
    if crop_s is not None:
        n = min(n, int(round(crop_s * sample_rate)))
    return max(n, 1)


class UtteranceDataset(Dataset):
    """Items: {"id", "audio" FloatTensor (T,), "label" int, ["text" (L, D), "text_pooled" (D,)],
    ["targets" (K,)]}.

    `task` (mmser.tasks.Task; None = categorical over `classes`): a dimensional or multitask task
    adds "targets", the record's dimensions scaled to [0, 1]; the dimensional kind has no classes
    (every "label" is -1).

    Pre-training datasets that crop otherwise or return more (P-TAPT's `PseudoLabelDataset`)
    subclass it: same records, label check and bucketing lengths, items built by `make_item`."""

    def __init__(
        self,
        records: Sequence[dict],
        sample_rate: int = 16000,
        crop_s: float | None = None,
        text_features: Mapping[str, TextFeatures] | None = None,
        text_ids: Mapping[str, torch.Tensor] | None = None,
        audio_features: Mapping[str, torch.Tensor] | None = None,
        classes: Sequence[str] | None = None,
        task=None,
    ):
        self.records = list(records)
        self.task = task
        # Class index order (the run's classes: mmser.data.manifest.resolve_classes); None = IEMOCAP's.
        self.classes = tuple(task.classes) if task is not None else tuple(classes) if classes is not None else CLASSES
        self.class_to_index = {c: i for i, c in enumerate(self.classes)}
        self.categorical = task is None or task.categorical
        # Cached frozen Whisper frames (F, H) per utterance (mmser.models.whisper), cropped like the audio.
        self.audio_features = audio_features
        self.sample_rate = sample_rate
        self.crop_s = crop_s
        self.text_features = text_features
        self.text_ids = text_ids  # token ids per utterance, for a fine-tuned text encoder
        if task is not None and task.dimensional:
            lacking = [r["id"] for r in self.records if not task.in_task(r)]
            if lacking:
                raise ValueError(f"utterance {lacking[0]}: no value of every dimension of {list(task.dimensions)} "
                                 f"({len(lacking)} such)")
        for r in self.records if self.categorical else ():
            if r.get("label") not in self.class_to_index:
                raise ValueError(f"utterance {r.get('id')}: label {r.get('label')!r} is not one of "
                                 f"{list(self.classes)}")
        for what, table in (("text features", text_features), ("text token ids", text_ids),
                            ("Whisper audio features", audio_features)):
            if table is not None:
                self.require(table, what)
        # Lengths (samples, after cropping) for the length-bucketed sampler.
        self.lengths = [num_samples(r, sample_rate, crop_s) for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def require(self, table: Mapping[str, object], what: str) -> None:
        """Every record's id is a key of `table` (per-utterance data such as text features)."""
        missing = [r["id"] for r in self.records if r["id"] not in table]
        if missing:
            raise KeyError(f"{what} missing for {len(missing)} utterances, e.g. {missing[:3]}")

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        wav = read_audio(r["path"], self.sample_rate)
        if self.crop_s is not None:
            wav = wav[: int(round(self.crop_s * self.sample_rate))]  # the FIRST crop_s seconds
        return self.make_item(r, wav)

    def make_item(self, r: dict, wav: np.ndarray) -> dict:
        """The item of record `r` holding the (already cropped) waveform `wav` (T,): what every
        dataset over manifest records returns; subclasses crop differently or add fields."""
        item = {"id": r["id"], "audio": torch.from_numpy(np.ascontiguousarray(wav)),
                "label": self.class_to_index[r["label"]] if self.categorical else -1}
        if self.task is not None and self.task.dimensional:
            item["targets"] = torch.tensor(self.task.scaled_targets(r), dtype=torch.float32)  # (K,)
        if self.text_features is not None:
            feats = self.text_features[r["id"]]
            item["text"] = torch.as_tensor(feats[0], dtype=torch.float32)
            item["text_pooled"] = torch.as_tensor(feats[1], dtype=torch.float32)
        if self.text_ids is not None:
            item["text_ids"] = torch.as_tensor(self.text_ids[r["id"]], dtype=torch.long)
        if self.audio_features is not None:
            from mmser.models.whisper import FRAMES_KEY, crop_frames

            crop = None if self.crop_s is None else int(round(self.crop_s * self.sample_rate))
            item[FRAMES_KEY] = crop_frames(torch.as_tensor(self.audio_features[r["id"]], dtype=torch.float32), crop)
        return item
