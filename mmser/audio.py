"""The one audio reader: any format soundfile reads (WAV, FLAC, OGG/Vorbis, ...), any sample rate,
any channel count -> float32 mono at the rate asked for.

    wav = load_audio("speech.flac", 16000)        # (T,) float32, down-mixed and resampled
    wav, sr = read_audio_file("speech.wav")       # (T, C) float32 as stored
    info = audio_info("speech.wav")               # header only: frames, samplerate, channels, format
    wav = read_audio("utt.wav", 16000)            # (T,) float32; refuses another rate, channels, no samples

Resampling is scipy's polyphase filter (`resample_poly`, a Kaiser-windowed FIR; scipy is already a
dependency, soxr is not installed here). Stereo and multichannel files are down-mixed by the mean of
the channels. Every error names the file: missing (FileNotFoundError), unreadable or empty (ValueError),
NaN or Inf samples (NonFiniteAudio, a ValueError: checked on every read, one pass over the samples).
"""

from __future__ import annotations

from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf


class UnreadableAudio(ValueError):
    """A file soundfile cannot decode; `reason` is libsndfile's message on one line."""

    def __init__(self, path: str | Path, reason: str | None = None):
        if reason is None:  # re-raised from a DataLoader worker: keep the original one-line message
            message = _worker_message(str(path), type(self).__name__)
            self.path, self.reason = Path(message.split(": ", 1)[0]), message
            super().__init__(message)
            return
        self.path, self.reason = Path(path), " ".join(str(reason).split())
        super().__init__(f"{path}: cannot read audio ({self.reason})")


def _worker_message(text: str, name: str) -> str:
    """The original message of an exception that torch's DataLoader re-raises from a worker as
    `type(message + traceback)`: the traceback's last line, `module.Name: message`."""
    last = text.strip().splitlines()[-1] if text.strip() else text
    return last.split(f"{name}: ", 1)[-1]


class NonFiniteAudio(ValueError):
    """A file holding NaN or Inf samples (only float-coded files can): a model fed one returns NaN
    probabilities and the first class as its label, so every reader refuses it, naming the file."""

    def __init__(self, path: str | Path, count: int | None = None, first: int | None = None,
                 sample_rate: int | None = None):
        if count is None:  # re-raised from a DataLoader worker: keep the original one-line message
            message = _worker_message(str(path), type(self).__name__)
            self.path, self.count, self.first = Path(message.split(": ", 1)[0]), None, None
            self.reason = message.split(": ", 1)[-1]
            super().__init__(message)
            return
        self.path, self.count, self.first = Path(path), int(count), int(first or 0)
        at = f"{self.first / sample_rate:.3f} s" if sample_rate else f"sample {self.first}"
        self.reason = f"{count} NaN/Inf sample(s), the first at {at}"
        super().__init__(f"{path}: {self.reason}")


# Subtypes whose samples can be NaN or Inf; integer PCM (and FLAC, ...) cannot hold them.
FLOAT_SUBTYPES = frozenset({"FLOAT", "DOUBLE"})


def check_finite(path: str | Path, wav: np.ndarray, sample_rate: int | None = None) -> np.ndarray:
    """`wav` unchanged, or NonFiniteAudio naming `path` when a sample is NaN or Inf (one pass)."""
    finite = np.isfinite(wav)
    if not finite.all():
        bad = np.flatnonzero(~finite.reshape(finite.shape[0], -1).all(axis=1))
        raise NonFiniteAudio(path, int((~finite).sum()), int(bad[0]), sample_rate)
    return wav


def check_finite_file(path: str | Path, info=None) -> None:
    """Prepare's check without decoding every file: only float-coded files (FLOAT_SUBTYPES, from
    the header) are read, and refused (NonFiniteAudio) when they hold NaN or Inf."""
    info = info if info is not None else audio_info(path)
    if info.subtype in FLOAT_SUBTYPES:
        read_audio_file(path)


def audio_info(path: str | Path):
    """soundfile's header (frames, samplerate, channels, format) without reading the samples; a
    missing file is a FileNotFoundError and an unreadable one a ValueError, each naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: audio file not found")
    try:
        return sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError, OSError) as e:
        raise UnreadableAudio(path, str(e)) from None


def read_audio_file(path: str | Path) -> tuple[np.ndarray, int]:
    """(samples (T, C) float32, sample rate) as stored in the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: audio file not found")
    try:
        wav, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise UnreadableAudio(path, str(e)) from None
    return check_finite(path, wav, int(sr)), int(sr)


def to_mono(wav: np.ndarray) -> np.ndarray:
    """(T,) or (T, C) -> (T,) float32, the mean of the channels."""
    wav = np.asarray(wav, dtype=np.float32)
    if wav.ndim == 1:
        return wav
    if wav.ndim != 2:
        raise ValueError(f"audio must be (T,) or (T, channels), got shape {wav.shape}")
    return wav[:, 0] if wav.shape[1] == 1 else wav.mean(axis=1)


def resample(wav: np.ndarray, sample_rate: int, target_sr: int) -> np.ndarray:
    """(T,) at `sample_rate` -> (T',) float32 at `target_sr` (polyphase; unchanged when equal)."""
    if sample_rate <= 0 or target_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {sample_rate} -> {target_sr}")
    if sample_rate == target_sr:
        return np.ascontiguousarray(wav, dtype=np.float32)
    from scipy.signal import resample_poly

    g = gcd(int(sample_rate), int(target_sr))
    return np.ascontiguousarray(resample_poly(wav, target_sr // g, sample_rate // g), dtype=np.float32)


def load_audio(path: str | Path, target_sr: int = 16000) -> np.ndarray:
    """float32 mono waveform (T,) of any readable file at `target_sr`; an empty file is a ValueError."""
    wav, sr = read_audio_file(path)
    if wav.shape[0] == 0:
        raise ValueError(f"{path}: empty audio file")
    return resample(to_mono(wav), sr, target_sr)


def read_audio(path: str | Path, sample_rate: int = 16000) -> np.ndarray:
    """float32 waveform (T,) of a mono file at exactly `sample_rate` (training data and cached
    features are never resampled or down-mixed on the fly); errors name the file and the problem."""
    wav, sr = read_audio_file(path)
    if sr != sample_rate:
        raise ValueError(f"{path}: sample rate {sr} Hz, expected {sample_rate} Hz (resample the corpus first)")
    if wav.shape[1] != 1:
        raise ValueError(f"{path}: {wav.shape[1]} channels, expected mono")
    if wav.shape[0] == 0:
        raise ValueError(f"{path}: empty audio file")
    return wav[:, 0]
