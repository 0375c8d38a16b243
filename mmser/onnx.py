"""A torch-free predictor for models exported by `mmser export --format onnx` (mmser.export.onnx).

    from mmser.onnx import OnnxClassifier
    clf = OnnxClassifier("exported/vft")            # the export folder (or its model.onnx)
    p = clf.classify_file("call.flac")               # any rate / channels, as EmotionClassifier
    p.label, p.probs, p.embedding                    # embedding: the vector that feeds the classifier
    clf.classify(wav, sample_rate, text="...")       # numpy samples; text for text and fusion models

Imports numpy, soundfile (mmser.audio; scipy to resample), onnxruntime and, for text and fusion
models, `tokenizers`: never torch, transformers or mmser's training and model code (a test checks
`sys.modules` in a fresh interpreter). Everything it needs is in the graph's metadata_props["mmser"]
(classes, sample rate, task, window, minimum length, tokenizer settings), so a model.onnx and its
tokenizer.json are the whole model.

It predicts as `mmser.EmotionClassifier` does, with the same shared functions (mmser.prediction):
the same waveform checks, windows of `window_s` (default: the export's, 10 s) overlapping by
`overlap_s` (2 s), batches of windows of one recording only (all of one length: the graph never sees
padding), the recording's probabilities and embedding the length-weighted mean of its windows', and
no label from a non-finite output. Text: the tokenizer of the text encoder, truncated to the model's
max_length, as in training. No ASR here: give text= (e.g. from `mmser transcribe`, then
`mmser predict --onnx DIR --transcripts FILE`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from mmser.audio import resample
from mmser.extras import require
from mmser.prediction import (
    Prediction,
    as_waveform,
    check_finite_audio,
    classify_file,
    make_prediction,
    weighted_mean,
    window_samples,
    window_spans,
)

log = logging.getLogger(__name__)

ONNX_FORMAT = "mmser-onnx/1"  # = mmser.export.onnx.ONNX_FORMAT (not imported: that module imports torch)
GRAPH, TOKENIZER = "model.onnx", "tokenizer.json"
OUTPUTS = ["probs", "utterance_embedding"]  # = mmser.export.onnx.OUTPUTS


class OnnxClassifier:
    """An exported mmser model on onnxruntime (see the module docstring)."""

    def __init__(self, path: str | Path, window_s: float | None = None, overlap_s: float | None = None,
                 batch_size: int = 8, providers: list[str] | None = None):
        ort = require("onnxruntime", "onnx", "the ONNX predictor")
        path = Path(path).expanduser()
        graph = path / GRAPH if path.is_dir() else path
        if not graph.is_file():
            raise FileNotFoundError(f"{graph}: missing (export a model: mmser export RUN --format onnx --out DIR)")
        try:
            self.session = ort.InferenceSession(str(graph), providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for a bad file
            raise ValueError(f"{graph}: not a readable ONNX graph ({' '.join(str(e).split())[:200]})") from None
        raw = self.session.get_modelmeta().custom_metadata_map.get("mmser")
        try:
            meta = json.loads(raw) if raw is not None else None
        except ValueError:
            meta = None
        if not isinstance(meta, dict) or meta.get("format") != ONNX_FORMAT:
            raise ValueError(f"{graph}: no mmser metadata of format {ONNX_FORMAT!r} (not exported by mmser export)")
        self.meta = meta
        self.path = graph
        self.task = meta["task"]
        self.classes = list(meta["classes"])
        self.sample_rate = int(meta["sample_rate"])
        self.min_samples = int(meta.get("min_samples", 1))
        self.needs_audio = self.task in ("audio", "fusion")
        self.needs_text = self.task in ("text", "fusion")
        self.window_s = float(meta["window_s"] if window_s is None else window_s)
        self.overlap_s = float(meta["overlap_s"] if overlap_s is None else overlap_s)
        self.window, self.hop = window_samples(self.window_s, self.overlap_s, self.sample_rate)
        if self.needs_audio and self.window < self.min_samples:
            raise ValueError(f"window_s (--window-s) {self.window_s}: windows of {self.window} samples are shorter "
                             f"than the encoder's minimum of {self.min_samples} samples")
        self.batch_size = int(batch_size)
        self.tokenizer = None
        if self.needs_text:
            tokenizers = require("tokenizers", "onnx", "the ONNX predictor of a text or fusion model")
            tok_file = graph.parent / (meta.get("text") or {}).get("tokenizer", TOKENIZER)
            if not tok_file.is_file():
                raise FileNotFoundError(f"{tok_file}: missing (a {self.task} model's export holds its tokenizer)")
            self.tokenizer = tokenizers.Tokenizer.from_file(str(tok_file))
            self.tokenizer.no_padding()
            self.tokenizer.enable_truncation(int(meta["text"]["max_length"]))

    # -- inputs ---------------------------------------------------------------------------------

    def token_ids(self, text: str) -> np.ndarray:
        """Token ids (L,) int64 of `text`, as the model's tokenizer gives them in training."""
        return np.asarray(self.tokenizer.encode(text).ids, dtype=np.int64)

    def _run(self, audio: np.ndarray | None, ids: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        n = audio.shape[0] if audio is not None else 1
        feed = {}
        if audio is not None:
            feed["audio"] = audio.astype(np.float32, copy=False)  # (n, W)
        if ids is not None:
            feed["input_ids"] = np.repeat(ids[None], n, axis=0)  # (n, L)
            feed["attention_mask"] = np.ones_like(feed["input_ids"])  # (n, L)
        probs, emb = self.session.run(OUTPUTS, feed)  # (n, C), (n, D)
        return probs, emb

    # -- predictions ----------------------------------------------------------------------------

    def classify(self, wav, sample_rate: int, text: str | None = None, asr: bool = False, *,
                 empty_text: str = "error", source: str = "waveform") -> Prediction:
        """One recording (T,), (T, C) or (C, T) at `sample_rate` -> Prediction (with per-window results
        and the embedding), as EmotionClassifier.classify_waveform (see the module docstring)."""
        if empty_text not in ("error", "warn"):
            raise ValueError(f"empty_text must be 'error' or 'warn', got {empty_text!r}")
        if asr:
            raise ValueError("the ONNX predictor does no ASR: give the text (text=, or --transcripts from "
                             "`mmser transcribe`)")
        wav = as_waveform(wav, source)
        check_finite_audio(wav, sample_rate, source)
        wav = resample(wav, sample_rate, self.sample_rate)  # (T,)
        ids = None
        if self.needs_text:
            if text is None:
                raise ValueError(f"this {self.task} model needs the text of each recording (text= / --text / "
                                 "--transcripts); it never answers from audio alone")
            if not text.strip():
                if empty_text == "error":
                    raise ValueError(f"empty text {text!r}: this {self.task} model classifies words; give the "
                                     "recording's text")
                log.warning("%s: empty transcript: the %s model sees no words for it", source, self.task)
            ids = self.token_ids(text)
        if self.needs_audio and len(wav) < self.min_samples:
            raise ValueError(f"{len(wav) / self.sample_rate:.3f} s of audio: the encoder needs at least "
                             f"{self.min_samples / self.sample_rate:.3f} s")
        spans = window_spans(len(wav), self.window, self.hop) if self.needs_audio else [(0, len(wav))]
        probs, embs = [], []
        for i in range(0, len(spans), self.batch_size):
            chunk = spans[i:i + self.batch_size]
            audio = np.stack([wav[s:e] for s, e in chunk]) if self.needs_audio else None  # (n, W)
            p, e = self._run(audio, ids)
            probs.append(p)
            embs.append(e)
        p, emb = np.concatenate(probs), np.concatenate(embs)  # (windows, C), (windows, D)
        sr = self.sample_rate
        windows = [make_prediction(self.classes, p[k], s / sr, e / sr, text, emb[k]) for k, (s, e) in enumerate(spans)]
        result = make_prediction(self.classes, weighted_mean(p, spans), 0.0, len(wav) / sr, text,
                                 weighted_mean(emb, spans))
        result.windows = windows if len(windows) > 1 else []
        return result

    classify_waveform = classify  # EmotionClassifier's name, so mmser.inference.predict_rows takes either

    def classify_file(self, path: str | Path, text: str | None = None, asr: bool = False, *,
                      empty_text: str = "error") -> Prediction:
        """A sound file (any format soundfile reads, any rate, mono or multichannel) -> Prediction.
        Errors name the file."""
        return classify_file(self, path, text, asr, empty_text=empty_text)

    def embed(self, wav, sample_rate: int, text: str | None = None) -> np.ndarray:
        """The recording's embedding (D,) float32 (see EmotionClassifier.embed)."""
        return self.classify(wav, sample_rate, text).embedding

    def embed_file(self, path: str | Path, text: str | None = None) -> np.ndarray:
        return self.classify_file(path, text).embedding
