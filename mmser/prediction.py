"""What a prediction is, shared by the PyTorch classifier (mmser.inference) and the onnxruntime one
(mmser.onnx): input checks, the windows of a long recording, their length-weighted mean, and the
one place probabilities become a label. numpy only (no torch), so the ONNX predictor stays torch-free
and both predictors window, weight and label a recording the same way (one function each, not two
copies that could drift).

    spans = window_spans(len(wav), window, hop)   # [(start, end), ...] samples
    whole = weighted_mean(window_probs, spans)    # (C,) by window length
    pred = make_prediction(classes, whole, 0.0, seconds, text)

Waveform rules (as_waveform): float samples in [-1, 1] or integer PCM, scaled as a WAV reader does
(int16 / 32768, int32 / 2**31, uint8 as unsigned 8-bit PCM: (x - 128) / 128); any other integer type
is refused (an int64 array says nothing of its scale). A 2-D array is (T, C) or (C, T): the axis of
at most 8 is the channels (down-mixed by their mean); any other shape is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

MAX_CHANNELS = 8  # the channel axis of a 2-D array is the one of at most this many
# Integer PCM as WAV readers (soundfile, scipy.io.wavfile) scale it: dtype -> (offset, full scale).
PCM_SCALES = {np.dtype(np.int16): (0.0, 32768.0), np.dtype(np.int32): (0.0, 2.0**31),
              np.dtype(np.uint8): (128.0, 128.0)}


def as_waveform(wav, where: str = "waveform") -> np.ndarray:
    """Samples (T,), (T, C) or (C, T), float in [-1, 1] or int16 / int32 / uint8 PCM -> (T,) float32 mono.
    Any other dtype or shape is a ValueError naming `where` (see the module docstring)."""
    a = np.asarray(wav)
    if a.dtype in PCM_SCALES:
        offset, scale = PCM_SCALES[a.dtype]
        a = (a.astype(np.float32) - offset) / scale
    elif a.dtype.kind == "f":
        a = a.astype(np.float32, copy=False)
    else:
        raise ValueError(f"{where}: samples of dtype {a.dtype}: give float samples in [-1, 1] or int16, "
                         "int32 or uint8 PCM")
    if a.ndim == 2:
        rows, cols = a.shape
        if cols <= MAX_CHANNELS < rows:  # (T, C)
            pass
        elif rows <= MAX_CHANNELS < cols:  # (C, T)
            a = a.T
        else:
            raise ValueError(f"{where}: shape {a.shape}: give (T,), (T, C) or (C, T) with at most "
                             f"{MAX_CHANNELS} channels and more samples than channels")
        a = a[:, 0] if a.shape[1] == 1 else a.mean(axis=1)  # (T,)
    elif a.ndim != 1:
        raise ValueError(f"{where}: shape {a.shape}: give (T,), (T, C) or (C, T) samples")
    if a.shape[0] == 0:
        raise ValueError(f"{where}: empty audio (no samples)")
    return np.ascontiguousarray(a, dtype=np.float32)


def check_finite_audio(wav: np.ndarray, sample_rate: int, where: str = "waveform") -> None:
    """ValueError naming `where` when a sample of `wav` (T,) is NaN or infinite."""
    bad = ~np.isfinite(wav)
    if bad.any():
        first = int(np.argmax(bad))
        raise ValueError(f"{where}: {int(bad.sum())} non-finite samples (NaN/Inf) of {len(wav)}, the first at "
                         f"{first / sample_rate:.3f} s: refusing to classify it")


def window_samples(window_s: float, overlap_s: float, sample_rate: int) -> tuple[int, int]:
    """(window, hop) in samples for windows of `window_s` overlapping by `overlap_s`; ValueError
    naming the option when they cannot make advancing windows."""
    if not window_s > 0 or not 0 <= overlap_s < window_s:
        raise ValueError(f"windows: need window_s > 0 and 0 <= overlap_s < window_s, got {window_s}, {overlap_s}")
    window = int(round(window_s * sample_rate))
    hop = window - int(round(overlap_s * sample_rate))
    if hop < 1:
        raise ValueError(f"overlap_s (--overlap-s) {overlap_s}: windows of {window} samples would not "
                         "advance (the overlap rounds to the whole window)")
    return window, hop


def window_spans(n: int, window: int, hop: int) -> list[tuple[int, int]]:
    """Window (start, end) samples over n samples: one window up to `window`, else windows of
    `window` every `hop`, the last one aligned to the end. All windows of a recording longer than
    one window have the same length, so a batch of them needs no padding."""
    if n <= window:
        return [(0, n)]
    spans, s = [], 0
    while s + window < n:
        spans.append((s, s + window))
        s += hop
    spans.append((n - window, n))
    return spans


def weighted_mean(values: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """values (windows, D) -> (D,), the mean of the windows' rows weighted by their length."""
    lengths = np.asarray([e - s for s, e in spans], dtype=np.float64)  # (windows,)
    return ((np.asarray(values, dtype=np.float64) * lengths[:, None]).sum(0) / lengths.sum()).astype(np.float32)


@dataclass
class Prediction:
    """One recording's (or window's) result. start / end in seconds; probs per class name;
    embedding: the pooled vector that feeds the model's classifier (`EmotionClassifier.embed`), for a
    whole recording the length-weighted mean of its windows' vectors."""

    label: str
    probs: dict[str, float]
    start: float
    end: float
    text: str | None = None
    windows: list[Prediction] = field(default_factory=list)
    embedding: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def duration(self) -> float:
        return self.end - self.start

    def as_dict(self) -> dict:
        """JSON-ready: the embedding (when there is one) as a list of floats."""
        d = asdict(self)
        _embeddings_to_lists(d)
        return d


def _embeddings_to_lists(d: dict) -> None:
    if isinstance(d.get("embedding"), np.ndarray):
        d["embedding"] = d["embedding"].tolist()
    for w in d.get("windows") or []:
        _embeddings_to_lists(w)


def make_prediction(classes: Sequence[str], probs, start: float, end: float, text: str | None,
                    embedding: np.ndarray | None = None) -> Prediction:
    """The one place probabilities (C,) become a label: never from a non-finite output."""
    p = np.asarray(probs, dtype=np.float64)
    if not np.isfinite(p).all() or (embedding is not None and not np.isfinite(embedding).all()):
        raise ValueError(f"the model gave non-finite probabilities (NaN/Inf) for {start:.2f}-{end:.2f} s: "
                         "refusing to label it (its weights or the input are broken)")
    return Prediction(label=classes[int(p.argmax())], probs={c: float(v) for c, v in zip(classes, p, strict=True)},
                      start=round(start, 4), end=round(end, 4), text=text, embedding=embedding)


def classify_file(classifier, path: str | Path, text: str | None = None, asr: bool = False, *,
                  empty_text: str = "error") -> Prediction:
    """`classifier.classify_waveform` of a sound file (any format soundfile reads, any rate, mono or
    multichannel), read at the classifier's `sample_rate`: the one file path of EmotionClassifier and
    the torch-free OnnxClassifier. Errors name the file."""
    from mmser.audio import load_audio

    wav = load_audio(path, classifier.sample_rate)
    try:
        return classifier.classify_waveform(wav, classifier.sample_rate, text, asr, empty_text=empty_text,
                                            source=str(path))
    except ValueError as e:
        if str(path) in str(e):
            raise
        raise ValueError(f"{path}: {e}") from None
