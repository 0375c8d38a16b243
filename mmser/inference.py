"""Inference beside training: load any saved mmser model and classify recordings.

    clf = mmser.EmotionClassifier.from_pretrained("runs/vft/s1-seed0")   # run folder, model folder or Hub id
    p = clf.classify_file("call.flac")                  # any rate / channels / WAV, FLAC, OGG
    p.label, p.probs                                    # "neutral", {"angry": 0.1, ...}
    p.windows                                           # per-window results of a long recording
    clf.classify_batch([wav1, wav2], sample_rate=44100) # numpy arrays (T,) or (T, channels)
    fusion = mmser.EmotionClassifier.from_pretrained("runs/fusion/s1-seed0")
    fusion.classify_file("call.wav", text="I told you already")   # or asr=True

Audio is read with mmser.audio (down-mixed, resampled with scipy's polyphase filter) to the model's
sample rate. A recording longer than `window_s` (default 10 s) is split into windows of `window_s`
overlapping by `overlap_s` (default 2 s; the last window is aligned to the end of the recording);
each window is classified, and the recording's probabilities are the mean of the windows' weighted
by their length. Windows of one recording have the same length, so no padding enters the encoder
(group-norm wav2vec 2.0 encoders are not padding-invariant, STYLE.md).

Text and fusion models need text: given (`text=`), or transcribed by the ASR system the model
records (`asr=True`; a model trained on gold transcripts falls back to faster-whisper
offline-tiny.en). Text is embedded with the model's text encoder (mmser.text.embed), frozen as in
training, or tokenised for a model whose text encoder was fine-tuned. Every window of a recording
uses the recording's whole text. A text or fusion model with no text is an error, never an
audio-only answer.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from mmser.audio import load_audio, resample, to_mono
from mmser.data.dataset import MIN_ENCODER_SAMPLES
from mmser.models.pretrained import SavedModel, from_pretrained
from mmser.models.text_encoder import WithTextEncoder

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif")


@dataclass
class Prediction:
    """One recording's (or window's) result. start / end in seconds; probs per class name."""

    label: str
    probs: dict[str, float]
    start: float
    end: float
    text: str | None = None
    windows: list[Prediction] = field(default_factory=list)

    @property
    def duration(self) -> float:
        return self.end - self.start

    def as_dict(self) -> dict:
        return asdict(self)


def resolve_model_dir(model: str | Path) -> str | Path:
    """A run folder -> its model/; a model folder or a Hub id unchanged."""
    path = Path(model).expanduser()
    if path.is_dir() and not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
        return path / "model"
    return path if path.is_dir() else str(model)


class EmotionClassifier:
    """A loaded mmser model that classifies waveforms and files (see the module docstring)."""

    def __init__(self, saved: SavedModel, window_s: float = 10.0, overlap_s: float = 2.0,
                 device: str = "cpu", batch_size: int = 8):
        if window_s <= 0 or not 0 <= overlap_s < window_s:
            raise ValueError(f"windows: need window_s > 0 and 0 <= overlap_s < window_s, got {window_s}, {overlap_s}")
        self.saved = saved
        self.model = saved.model.to(device).eval()
        self.classes = list(saved.classes)
        self.sample_rate = saved.sample_rate
        self.window = int(round(window_s * self.sample_rate))
        self.hop = self.window - int(round(overlap_s * self.sample_rate))
        self.device = device
        self.batch_size = batch_size
        self._tokenizer = None
        self._transcriber = None

    @classmethod
    def from_pretrained(cls, model: str | Path, **kwargs) -> EmotionClassifier:
        """`model`: a run folder (its model/), a model folder, or a Hub id."""
        return cls(from_pretrained(resolve_model_dir(model), device=kwargs.get("device", "cpu")), **kwargs)

    @property
    def task(self) -> str:
        return self.saved.task

    # -- text ---------------------------------------------------------------------------------

    def transcribe(self, wav: np.ndarray) -> str:
        """Text of a waveform at the model's rate by the ASR system the model was trained with."""
        from mmser.text.transcribe import OFFLINE_TINY_EN, SAMPLE_RATE, make_transcriber

        if self._transcriber is None:
            asr = (self.saved.text or {}).get("asr") or {}
            if not asr:
                log.info("model trained on gold transcripts: ASR with faster-whisper %s", OFFLINE_TINY_EN)
            self._transcriber = make_transcriber(asr.get("backend") or "faster-whisper",
                                                 asr.get("model") or OFFLINE_TINY_EN, device="auto",
                                                 language=asr.get("language") or "en",
                                                 beam_size=int(asr.get("beam_size") or 5))
        return self._transcriber.transcribe(resample(wav, self.sample_rate, SAMPLE_RATE))

    def _text_batch(self, text: str, n: int) -> dict:
        """Batch keys for `text`, repeated for n windows."""
        side = self.saved.text or {}
        if isinstance(self.model, WithTextEncoder):  # a fine-tuned text encoder: token ids
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                from mmser.text.embed import resolve_encoder

                self._tokenizer = AutoTokenizer.from_pretrained(resolve_encoder(side["encoder"]))
            ids = self._tokenizer(text, truncation=True, max_length=int(side.get("max_length", 64)),
                                  return_tensors="pt")["input_ids"]  # (1, L)
            ids = ids.expand(n, -1).to(self.device)  # (n, L)
            return {"text_ids": ids, "text_ids_mask": torch.ones_like(ids, dtype=torch.bool)}
        from mmser.text.embed import TextEncoderSpec, encode_texts

        spec = TextEncoderSpec(encoder=side["encoder"], pooling=side.get("pooling", "mean"),
                               max_length=int(side.get("max_length", 64)))
        tokens, pooled = encode_texts([text], spec, device=str(self.device))[0]  # (L, D), (D,)
        tokens = tokens[None].expand(n, -1, -1).to(self.device)  # (n, L, D)
        return {"text": tokens, "text_mask": torch.ones(tokens.shape[:2], dtype=torch.bool, device=self.device),
                "text_pooled": pooled[None].expand(n, -1).to(self.device)}

    # -- audio --------------------------------------------------------------------------------

    def _spans(self, n: int) -> list[tuple[int, int]]:
        """Window (start, end) samples over n samples: one window up to `window`, else windows of
        `window` every `hop`, the last one aligned to the end."""
        if n <= self.window:
            return [(0, n)]
        spans, s = [], 0
        while s + self.window < n:
            spans.append((s, s + self.window))
            s += self.hop
        spans.append((n - self.window, n))
        return spans

    @torch.no_grad()
    def classify_waveform(self, wav: np.ndarray, sample_rate: int, text: str | None = None,
                          asr: bool = False) -> Prediction:
        """One recording (T,) or (T, channels) at `sample_rate` -> Prediction with per-window results."""
        wav = resample(to_mono(wav), sample_rate, self.sample_rate)  # (T,)
        if self.saved.needs_text and text is None:
            if not asr:
                raise ValueError(f"this {self.task} model needs the text of each recording "
                                 "(--text / --transcripts, or --asr to transcribe it); "
                                 "it never answers from audio alone")
            text = self.transcribe(wav)
        if self.saved.needs_audio and len(wav) < MIN_ENCODER_SAMPLES:
            raise ValueError(f"{len(wav) / self.sample_rate:.3f} s of audio: the encoder needs at least "
                             f"{MIN_ENCODER_SAMPLES / self.sample_rate:.3f} s")
        spans = self._spans(len(wav)) if self.saved.needs_audio else [(0, len(wav))]
        probs = []
        for i in range(0, len(spans), self.batch_size):
            chunk = spans[i:i + self.batch_size]
            audio = torch.stack([torch.from_numpy(wav[s:e]) for s, e in chunk]).to(self.device)  # (n, W)
            batch = {"audio": audio, "audio_mask": torch.ones_like(audio, dtype=torch.bool)}
            if self.saved.needs_text:
                batch.update(self._text_batch(text, len(chunk)))
            probs.append(torch.softmax(self.model(batch).float(), dim=-1).cpu())  # (n, C)
        p = torch.cat(probs)  # (windows, C)
        lengths = torch.tensor([e - s for s, e in spans], dtype=torch.float32)  # (windows,)
        whole = (p * lengths[:, None]).sum(0) / lengths.sum()  # (C,) length-weighted mean
        sr = self.sample_rate
        windows = [self._prediction(p[k], s / sr, e / sr, text) for k, (s, e) in enumerate(spans)]
        result = self._prediction(whole, 0.0, len(wav) / sr, text)
        result.windows = windows if len(windows) > 1 else []
        return result

    def _prediction(self, probs: torch.Tensor, start: float, end: float, text: str | None) -> Prediction:
        return Prediction(label=self.classes[int(probs.argmax())],
                          probs={c: float(v) for c, v in zip(self.classes, probs, strict=True)},
                          start=round(start, 4), end=round(end, 4), text=text)

    def classify_batch(self, waveforms: Sequence[np.ndarray], sample_rate: int,
                       texts: Sequence[str | None] | None = None, asr: bool = False) -> list[Prediction]:
        """Several recordings at one sample rate -> one Prediction each (each classified on its own)."""
        texts = list(texts) if texts is not None else [None] * len(waveforms)
        if len(texts) != len(waveforms):
            raise ValueError(f"classify_batch: {len(waveforms)} waveforms but {len(texts)} texts")
        return [self.classify_waveform(np.asarray(w), sample_rate, t, asr)
                for w, t in zip(waveforms, texts, strict=True)]

    def classify_file(self, path: str | Path, text: str | None = None, asr: bool = False) -> Prediction:
        """A sound file (any format soundfile reads, any rate, mono or multichannel) -> Prediction."""
        return self.classify_waveform(load_audio(path, self.sample_rate), self.sample_rate, text, asr)


# -- mmser predict ------------------------------------------------------------------------------------


def audio_files(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, and the audio files (by suffix) under each folder, sorted."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in AUDIO_SUFFIXES)
        else:
            out.append(p)
    return out


def predict_rows(clf: EmotionClassifier, files: Sequence[Path], text: str | None = None,
                 transcripts: dict[str, str] | None = None, asr: bool = False,
                 windows: bool = False, progress: bool = True) -> list[dict]:
    """A row per file (and per window with `windows`): id, path, window, start, end, duration,
    label, prob_<class>..., text, error. A file that fails gets a row naming the problem."""
    from tqdm import tqdm

    rows = []
    for path in tqdm(files, desc="predict", unit="file", disable=not progress or len(files) < 2):
        base = {"id": path.stem, "path": str(path)}
        try:
            t = text
            if transcripts is not None:
                if path.stem not in transcripts:
                    raise ValueError(f"no transcript with id {path.stem!r} in the transcripts file")
                t = transcripts[path.stem]
            pred = clf.classify_file(path, text=t, asr=asr)
        except (OSError, ValueError, RuntimeError) as e:
            message = " ".join(str(e).split()) or type(e).__name__
            if str(path) not in message:
                message = f"{path}: {message}"
            rows.append({**base, "window": None, "error": message})
            continue
        rows.append({**base, **_row(pred, clf.classes), "window": None})
        if windows:
            rows += [{**base, **_row(w, clf.classes), "window": k} for k, w in enumerate(pred.windows)]
    return rows


def _row(p: Prediction, classes: Sequence[str]) -> dict:
    return {"start": p.start, "end": p.end, "duration": round(p.duration, 4), "label": p.label,
            **{f"prob_{c}": round(p.probs[c], 6) for c in classes}, "text": p.text, "error": None}


def format_rows(rows: Sequence[dict], classes: Sequence[str], kind: str) -> str:
    """rows as CSV ("csv") or JSON lines ("jsonl")."""
    if kind == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    columns = ["id", "path", "window", "start", "end", "duration", "label",
               *[f"prob_{c}" for c in classes], "text", "error"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return buf.getvalue()


def predict_command(model: str, inputs: Sequence[Path], out: Path | None = None, text: str | None = None,
                    transcripts: Path | None = None, asr: bool = False, windows: bool = False,
                    window_s: float = 10.0, overlap_s: float = 2.0, device: str = "cpu") -> int:
    """`mmser predict`: rows to `out` (.csv or .jsonl) or CSV on stdout; a one-line summary on stderr.
    Exit code 0 when at least one file was predicted, 2 when none was."""
    import sys

    from mmser.io import atomic_write_text

    kind = "jsonl" if out is not None and out.suffix.lower() in (".jsonl", ".json") else "csv"
    if out is not None and out.suffix.lower() not in (".csv", ".jsonl", ".json"):
        raise ValueError(f"--out {out}: write .csv or .jsonl")
    files = audio_files(inputs)
    if not files:
        raise FileNotFoundError(f"no audio files in {', '.join(map(str, inputs))}")
    clf = EmotionClassifier.from_pretrained(model, window_s=window_s, overlap_s=overlap_s, device=device)
    if clf.saved.needs_text and text is None and transcripts is None and not asr:
        raise ValueError(f"{model}: a {clf.task} model needs text: pass --text, --transcripts FILE or --asr "
                         "(it never answers from audio alone)")
    trans = None
    if transcripts is not None:
        from mmser.text.transcribe import load_transcripts

        trans = load_transcripts(transcripts)
    rows = predict_rows(clf, files, text=text, transcripts=trans, asr=asr, windows=windows,
                        progress=sys.stderr.isatty())
    body = format_rows(rows, clf.classes, kind)
    if out is None:
        sys.stdout.write(body)
    else:
        atomic_write_text(out, body)
    failed = sum(1 for r in rows if r["error"])
    ok = len(files) - failed
    print(f"mmser predict: {ok} of {len(files)} files predicted"
          + (f", {failed} failed (error rows)" if failed else "") + (f" -> {out}" if out else ""), file=sys.stderr)
    return 0 if ok else 2
