"""Inference beside training: load any saved mmser model and classify recordings.

    clf = mmser.EmotionClassifier.from_pretrained("runs/vft/s1-seed0")   # run folder, model folder or Hub id
    p = clf.classify_file("call.flac")                  # any rate / channels / WAV, FLAC, OGG
    p.label, p.probs                                    # "neutral", {"angry": 0.1, ...}
    p.windows                                           # per-window results of a long recording
    clf.classify_batch([wav1, wav2], sample_rate=44100) # numpy arrays (T,), (T, C) or (C, T), C <= 8
    fusion = mmser.EmotionClassifier.from_pretrained("runs/fusion/s1-seed0")
    fusion.classify_file("call.wav", text="I told you already")   # or asr=True
    clf.embed(wav, 16000)                               # (D,) the pooled vector that feeds the classifier

What a prediction is (the waveform checks, the windows, their length-weighted mean, the label) lives
in mmser.prediction (numpy only), shared with the torch-free ONNX predictor mmser.onnx. Each
Prediction carries its embedding (`head_layers`: the input of the classifier), from the same pass.

Audio is read with mmser.audio (down-mixed, resampled with scipy's polyphase filter) to the model's
sample rate. Arrays given to the API are float samples in [-1, 1] or integer PCM, scaled as a WAV
reader does (int16 / 32768, int32 / 2**31, uint8 as unsigned 8-bit PCM: (x - 128) / 128); any other
integer type is refused (an int64 array says nothing of its scale). A 2-D array is (T, C) or (C, T):
the axis of at most 8 is the channels (down-mixed by their mean); any other shape is refused.

A recording longer than `window_s` (default 10 s) is split into windows of `window_s`
overlapping by `overlap_s` (default 2 s; the last window is aligned to the end of the recording);
each window is classified, and the recording's probabilities are the mean of the windows' weighted
by their length. Windows of one recording have the same length, so no padding enters the encoder
(group-norm wav2vec 2.0 encoders are not padding-invariant, STYLE.md).

No silent wrong results: a recording with a NaN or infinite sample is refused (an error row in
`mmser predict`, a ValueError in the API) rather than classified, and a model output that is not
finite is never turned into a label. Windows (`window_s`) shorter than the encoder's receptive
field (one output frame: 400 samples for wav2vec 2.0's CNN; at inference nothing is masked, so no
mask span adds to it) are refused when the classifier is made. Text and fusion models refuse empty
or whitespace-only text given to them (`--text`, `text=`): they classify words. An ASR transcript
with no words (`asr=True`, or an entry of `--transcripts`) is classified with a warning naming the
file: a recording without speech has none, and training on ASR transcripts met the same.

Text and fusion models need text: given (`text=`), or transcribed by the ASR system the model
records (`asr=True`; a model trained on gold transcripts falls back to faster-whisper
offline-tiny.en). Text is embedded with the model's text encoder (mmser.text.embed), frozen as in
training, or tokenised for a model whose text encoder was fine-tuned. Every window of a recording
uses the recording's whole text. A text or fusion model with no text is an error, never an
audio-only answer.

`mmser predict --transcripts FILE` reads JSON lines {"id", "text"} (as `mmser transcribe` writes) or
{"path", "text"}. An entry with a "path" matches the audio file at that path only: absolute, or
relative to the folder of the transcripts file (not to the working directory), compared after
resolving links. An entry with only an "id" matches a file whose stem is the id, and only when no other input file
has that stem: two files a/x.wav and b/x.wav are refused as ambiguous (give them "path" entries)
rather than given one text. An id or path twice in the file is refused, naming the file and line.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mmser.audio import resample
from mmser.io import atomic_write_text
from mmser.models.pretrained import SavedModel, from_pretrained
from mmser.models.text_encoder import WithTextEncoder
from mmser.prediction import (  # noqa: F401 (MAX_CHANNELS, PCM_SCALES: re-exported, as before the move)
    MAX_CHANNELS,
    PCM_SCALES,
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

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif")


def encoder_min_samples(module: torch.nn.Module) -> int:
    """The fewest samples the model's audio encoder turns into one frame (its CNN's receptive field:
    400 for wav2vec 2.0 / HuBERT / WavLM; 1 for Whisper, whose mel frontend pads; 1 with no audio)."""
    for attr in ("inner", "encoder", "audio_encoder"):  # WithTextEncoder, AudioClassifier, FusionClassifier
        if isinstance(getattr(module, attr, None), torch.nn.Module):
            return encoder_min_samples(getattr(module, attr))
    if hasattr(module, "first") and hasattr(module, "second"):  # PairedAudioEncoder
        return max(encoder_min_samples(module.first), encoder_min_samples(module.second))
    frame_lengths = getattr(module, "frame_lengths", None)
    if not callable(frame_lengths):
        return 1
    lo, hi = 1, 1 << 20  # frame_lengths is monotone in the length: the first length with >= 1 frame
    if int(frame_lengths(torch.tensor([hi]))[0]) < 1:
        raise ValueError(f"{type(module).__name__}: no output frame from {hi} samples")
    while lo < hi:
        mid = (lo + hi) // 2
        if int(frame_lengths(torch.tensor([mid]))[0]) >= 1:
            hi = mid
        else:
            lo = mid + 1
    return lo


def resolve_model_dir(model: str | Path) -> str | Path:
    """A run folder -> its model/; a model folder or a Hub id unchanged."""
    path = Path(model).expanduser()
    if path.is_dir() and not (path / "config.json").is_file() and (path / "model" / "config.json").is_file():
        return path / "model"
    return path if path.is_dir() else str(model)


def head_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers whose input is the pooled utterance vector that feeds the model's classifier; the
    model's embedding is that input (several layers: their inputs joined feature-wise):
    - audio (AudioClassifier): the pooled frames, ReLU(masked mean of ReLU(frames)) or the attentive pool (B, H);
    - text (TextClassifier): the pooled text vector its MLP reads (B, Dt);
    - fusion, concat: [LayerNorm(audio pooled) ; LayerNorm(text pooled)] (B, Ha + Dt), the MLP's input;
    - fusion, cross-attention: [pooled attended audio ; pooled attended text] (B, 2 hidden), the MLP's input;
    - fusion, decision: [audio pooled ; text pooled] (B, Ha + Dt), the inputs of its two branch heads."""
    from mmser.models.fusion import ConcatFusion, CrossAttentionFusion, DecisionFusion, FusionClassifier, TextClassifier
    from mmser.models.heads import AudioClassifier

    if isinstance(model, WithTextEncoder):
        return head_layers(model.inner)
    if isinstance(model, FusionClassifier):
        model = model.fusion
    if isinstance(model, AudioClassifier):
        return [model.classifier]
    if isinstance(model, DecisionFusion):
        return [model.audio_head, model.text_branch.mlp]
    if isinstance(model, (TextClassifier, ConcatFusion, CrossAttentionFusion)):
        return [model.mlp]
    return []  # a head this function does not know: no embedding (predictions are unaffected)


class EmbeddingCapture:
    """`with EmbeddingCapture(model) as c: model(batch); c.pop()` -> the embedding (B, D) of that
    forward: forward pre-hooks on `head_layers(model)` record their inputs (the model code is not
    changed, so the embedding is by construction what the head reads)."""

    def __init__(self, model: torch.nn.Module):
        self.layers = head_layers(model)
        self.seen: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self.handles: list = []

    def __enter__(self) -> EmbeddingCapture:
        for k, layer in enumerate(self.layers):
            self.handles.append(layer.register_forward_pre_hook(lambda _m, args, k=k: self.seen[k].append(args[0])))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def pop(self) -> torch.Tensor | None:
        """The embedding of the last forward (B, D); None when the model has no known head layer or
        one did not run exactly once (then no vector is a well-defined embedding)."""
        ran = [len(s) for s in self.seen]
        out = torch.cat([s[0].float() for s in self.seen], dim=-1) if ran and all(n == 1 for n in ran) else None
        for s in self.seen:
            s.clear()
        return out  # (B, D)


class EmotionClassifier:
    """A loaded mmser model that classifies waveforms and files (see the module docstring)."""

    def __init__(self, saved: SavedModel, window_s: float = 10.0, overlap_s: float = 2.0,
                 device: str = "cpu", batch_size: int = 8):
        if not window_s > 0 or not 0 <= overlap_s < window_s:
            raise ValueError(f"windows: need window_s > 0 and 0 <= overlap_s < window_s, got {window_s}, {overlap_s}")
        kind = (saved.meta.get("target") or {}).get("kind", "categorical")
        if kind != "categorical":  # issue 19 item 4: predict does not give dimensions yet
            raise ValueError(f"{saved.path}: a {kind} model (target.kind); inference of dimensions is not built yet")
        self.saved = saved
        self.model = saved.model.to(device).eval()
        self.classes = list(saved.classes)
        self.sample_rate = saved.sample_rate
        self.window = int(round(window_s * self.sample_rate))
        self.hop = self.window - int(round(overlap_s * self.sample_rate))
        self.min_samples = encoder_min_samples(self.model) if saved.needs_audio else 1
        sr = self.sample_rate
        if self.window < self.min_samples:
            raise ValueError(f"window_s (--window-s) {window_s}: windows of {self.window} samples at {sr} Hz are "
                             f"shorter than the encoder's minimum of {self.min_samples} samples "
                             f"({self.min_samples / sr:.4f} s, one frame of its receptive field)")
        if self.hop < 1:
            raise ValueError(f"overlap_s (--overlap-s) {overlap_s}: windows of {self.window} samples would not "
                             "advance (the overlap rounds to the whole window)")
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
                                                 beam_size=int(asr.get("beam_size") or 5),
                                                 seed=int(asr.get("seed") or 0))  # the training ASR's base seed
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
        """Window (start, end) samples over n samples (mmser.prediction.window_spans)."""
        return window_spans(n, self.window, self.hop)

    @torch.no_grad()
    def classify_waveform(self, wav: np.ndarray, sample_rate: int, text: str | None = None,
                          asr: bool = False, *, empty_text: str = "error", source: str = "waveform") -> Prediction:
        """One recording (T,), (T, C) or (C, T) at `sample_rate` (float, or int16 / int32 / uint8 PCM)
        -> Prediction with per-window results. ValueError for non-finite samples.

        Empty or whitespace-only `text` for a text / fusion model: a ValueError (`empty_text="error"`,
        text the caller gives) or a warning (`"warn"`: ASR output, where a recording with no speech
        has no words, as in training on ASR transcripts; an ASR transcript made here always warns).
        `source` names the recording in errors and warnings (classify_file: its path)."""
        if empty_text not in ("error", "warn"):
            raise ValueError(f"empty_text must be 'error' or 'warn', got {empty_text!r}")
        wav = as_waveform(wav, source)
        check_finite_audio(wav, sample_rate, source)
        wav = resample(wav, sample_rate, self.sample_rate)  # (T,)
        if self.saved.needs_text:
            if text is None:
                if not asr:
                    raise ValueError(f"this {self.task} model needs the text of each recording "
                                     "(--text / --transcripts, or --asr to transcribe it); "
                                     "it never answers from audio alone")
                text, empty_text = self.transcribe(wav), "warn"
            if not text.strip():
                if empty_text == "error":
                    raise ValueError(f"empty text {text!r}: this {self.task} model classifies words; give the "
                                     "recording's text")
                log.warning("%s: empty transcript: the %s model sees no words for it", source, self.task)
        if self.saved.needs_audio and len(wav) < self.min_samples:
            raise ValueError(f"{len(wav) / self.sample_rate:.3f} s of audio: the encoder needs at least "
                             f"{self.min_samples / self.sample_rate:.3f} s")
        spans = self._spans(len(wav)) if self.saved.needs_audio else [(0, len(wav))]
        probs, embeddings = [], []
        with EmbeddingCapture(self.model) as capture:
            for i in range(0, len(spans), self.batch_size):
                chunk = spans[i:i + self.batch_size]
                audio = torch.stack([torch.from_numpy(wav[s:e]) for s, e in chunk]).to(self.device)  # (n, W)
                batch = {"audio": audio, "audio_mask": torch.ones_like(audio, dtype=torch.bool)}
                if self.saved.needs_text:
                    batch.update(self._text_batch(text, len(chunk)))
                probs.append(torch.softmax(self.model(batch).float(), dim=-1).cpu().numpy())  # (n, C)
                vectors = capture.pop()  # (n, D) or None (a head with no known embedding)
                embeddings.append(None if vectors is None else vectors.cpu().numpy())
        p = np.concatenate(probs)  # (windows, C)
        emb = None if any(e is None for e in embeddings) else np.concatenate(embeddings)  # (windows, D)
        sr = self.sample_rate
        windows = [make_prediction(self.classes, p[k], s / sr, e / sr, text, None if emb is None else emb[k])
                   for k, (s, e) in enumerate(spans)]
        result = make_prediction(self.classes, weighted_mean(p, spans), 0.0, len(wav) / sr, text,
                                 None if emb is None else weighted_mean(emb, spans))  # length-weighted means
        result.windows = windows if len(windows) > 1 else []
        return result

    def embed(self, wav: np.ndarray, sample_rate: int, text: str | None = None, asr: bool = False) -> np.ndarray:
        """The recording's embedding (D,) float32: the pooled vector that feeds the model's classifier
        (see `head_layers`), the length-weighted mean over the windows of a long recording. The same
        pass as `classify_waveform`, whose Prediction carries it as `.embedding`. ValueError for a
        model whose head has no known embedding."""
        return self._embedding(self.classify_waveform(wav, sample_rate, text, asr))

    def _embedding(self, pred: Prediction) -> np.ndarray:
        if pred.embedding is None:
            raise ValueError(f"{type(self.model).__name__}: no embedding (its head is not one of head_layers')")
        return pred.embedding

    def embed_file(self, path: str | Path, text: str | None = None, asr: bool = False) -> np.ndarray:
        """`embed` of a sound file (errors name the file)."""
        return self._embedding(self.classify_file(path, text, asr))

    def classify_batch(self, waveforms: Sequence[np.ndarray], sample_rate: int,
                       texts: Sequence[str | None] | None = None, asr: bool = False,
                       *, empty_text: str = "error") -> list[Prediction]:
        """Several recordings at one sample rate -> one Prediction each (each classified on its own)."""
        texts = list(texts) if texts is not None else [None] * len(waveforms)
        if len(texts) != len(waveforms):
            raise ValueError(f"classify_batch: {len(waveforms)} waveforms but {len(texts)} texts")
        return [self.classify_waveform(w, sample_rate, t, asr, empty_text=empty_text)
                for w, t in zip(waveforms, texts, strict=True)]

    def classify_file(self, path: str | Path, text: str | None = None, asr: bool = False,
                      *, empty_text: str = "error") -> Prediction:
        """A sound file (any format soundfile reads, any rate, mono or multichannel) -> Prediction.
        Errors name the file."""
        return classify_file(self, path, text, asr, empty_text=empty_text)


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


@dataclass
class Transcripts:
    """The text of each audio file for `mmser predict --transcripts` (rules: the module docstring).

    by_path: resolved audio path -> text; by_id: id (a file stem) -> text."""

    source: str = "the transcripts"
    by_path: dict[Path, str] = field(default_factory=dict)
    by_id: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> Transcripts:
        """Read a JSONL of {"id" and/or "path", "text"}; ValueError naming the file and line for a bad
        line, a missing text, or an id or path given twice. A half-written last line (an interrupted
        `mmser transcribe`) is ignored with a warning, as `load_transcripts` does."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: transcript file not found")
        out = cls(source=str(path))
        from mmser.text.transcribe import SYSTEM_FIELDS

        seen: dict[object, int] = {}
        systems: dict[tuple, int] = {}  # ASR system -> first line
        lines = path.read_bytes().split(b"\n")
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                entry = json.loads(raw.decode("utf-8"))
            except (ValueError, UnicodeDecodeError, RecursionError) as e:
                if number == len(lines):  # no newline after it: a write cut short
                    log.warning("%s:%d: ignoring a half-written last line", path, number)
                    break
                raise ValueError(f"{path}:{number}: not a JSON line ({' '.join(str(e).split())[:120]})") from None
            where = f"{path}:{number}"
            if not isinstance(entry, dict) or not isinstance(entry.get("text"), str):
                raise ValueError(f"{where}: a transcript line needs \"text\" (a string) and \"id\" or \"path\"")
            keys = []
            if entry.get("path") is not None:
                if not isinstance(entry["path"], str) or not entry["path"]:
                    raise ValueError(f"{where}: \"path\" must be a non-empty string, got {entry['path']!r}")
                audio = Path(entry["path"]).expanduser()
                keys.append(("path", (audio if audio.is_absolute() else path.parent / audio).resolve()))
            if entry.get("id") is not None:
                if not isinstance(entry["id"], str) or not entry["id"]:
                    raise ValueError(f"{where}: \"id\" must be a non-empty string, got {entry['id']!r}")
                if entry.get("path") is None:  # an id beside a path is a label only
                    keys.append(("id", entry["id"]))
            if not keys:
                raise ValueError(f"{where}: a transcript line needs \"id\" or \"path\"")
            for key in keys:
                if key in seen:
                    raise ValueError(f"{where}: {key[0]} {str(key[1])!r} appears twice (first on line {seen[key]})")
                seen[key] = number
                (out.by_path if key[0] == "path" else out.by_id)[key[1]] = entry["text"]
            system = tuple(entry.get(k) for k in SYSTEM_FIELDS)
            systems.setdefault(system, number)
            if len(systems) > 1:  # as load_transcripts: one file, one ASR system
                first = next(iter(systems))
                raise ValueError(f"{where}: a transcript of ASR system {system} (fields {', '.join(SYSTEM_FIELDS)}), "
                                 f"line {systems[first]} of {first}: one file, one ASR system")
        return out

    def text_for(self, audio: Path) -> str:
        """The text of one audio file (by its path, else by its stem); ValueError when there is none."""
        resolved = Path(audio).resolve()
        if resolved in self.by_path:
            return self.by_path[resolved]
        if audio.stem in self.by_id:
            return self.by_id[audio.stem]
        raise ValueError(f"no transcript with id {audio.stem!r} or path {str(resolved)!r} in {self.source}")

    def check_unambiguous(self, files: Sequence[Path]) -> None:
        """Refuse (one ValueError) two input files whose text would be looked up by one stem."""
        by_stem: dict[str, Path] = {}
        for f in files:
            if Path(f).resolve() in self.by_path:
                continue
            other = by_stem.setdefault(f.stem, f)
            if other != f:
                raise ValueError(f"{self.source}: ids are file stems, and {other} and {f} share the stem "
                                 f"{f.stem!r}: give each a \"path\" entry (absolute, or relative to the "
                                 "transcripts file)")


def predict_rows(clf: EmotionClassifier, files: Sequence[Path], text: str | None = None,
                 transcripts: Transcripts | Mapping[str, str] | None = None, asr: bool = False,
                 windows: bool = False, progress: bool = True) -> list[dict]:
    """A row per file (and per window with `windows`): id, path, window, start, end, duration,
    label, prob_<class>..., text, error, and "embedding" (D,) numpy (None in an error row; not a CSV
    column). A file that fails gets a row naming the problem. `clf`: an EmotionClassifier or an
    mmser.onnx.OnnxClassifier (the same classify_file and classes).

    `transcripts`: a Transcripts, or a mapping id (file stem) -> text; files sharing a stem whose
    text is looked up by it are refused (ValueError) before any file is classified."""
    from tqdm import tqdm

    if transcripts is not None and not isinstance(transcripts, Transcripts):
        transcripts = Transcripts(by_id=dict(transcripts))
    if transcripts is not None:
        transcripts.check_unambiguous(files)
    rows = []
    for path in tqdm(files, desc="predict", unit="file", disable=not progress or len(files) < 2):
        base = {"id": path.stem, "path": str(path)}
        try:
            t = text if transcripts is None else transcripts.text_for(path)
            # a transcripts entry is ASR output: no words (no speech) warns; an empty --text was refused
            pred = clf.classify_file(path, text=t, asr=asr, empty_text="error" if transcripts is None else "warn")
        except (OSError, ValueError, RuntimeError) as e:
            message = " ".join(str(e).split()) or type(e).__name__
            if not message.startswith(str(path)):
                message = f"{path}: {message}"
            rows.append({**base, "window": None, "error": message})
            continue
        rows.append({**base, **_row(pred, clf.classes), "window": None})
        if windows:
            rows += [{**base, **_row(w, clf.classes), "window": k} for k, w in enumerate(pred.windows)]
    return rows


def _row(p: Prediction, classes: Sequence[str]) -> dict:
    return {"start": p.start, "end": p.end, "duration": round(p.duration, 4), "label": p.label,
            **{f"prob_{c}": round(p.probs[c], 6) for c in classes}, "text": p.text, "error": None,
            "embedding": p.embedding}


def format_rows(rows: Sequence[dict], classes: Sequence[str], kind: str) -> str:
    """rows as CSV ("csv") or JSON lines ("jsonl")."""
    if kind == "jsonl":
        return "".join(json.dumps({k: v for k, v in r.items() if k != "embedding"}, ensure_ascii=False) + "\n"
                       for r in rows)
    columns = ["id", "path", "window", "start", "end", "duration", "label",
               *[f"prob_{c}" for c in classes], "text", "error"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return buf.getvalue()


def write_embeddings(rows: Sequence[dict], out: Path) -> tuple[Path, Path]:
    """`--embeddings OUT.npy`: the rows' embeddings (N, D) float32 in row order (NaN for an error row)
    and OUT.ids.txt beside, one line per row: the id, and `<TAB>window` for a window row."""
    from mmser.io import atomic_open

    if out.suffix.lower() != ".npy":
        raise ValueError(f"--embeddings {out}: write a .npy file (ids go beside it, in .ids.txt)")
    dims = {r["embedding"].shape[0] for r in rows if r.get("embedding") is not None}
    if len(dims) != 1:
        raise ValueError(f"--embeddings {out}: no embedding to write (no file predicted, or the head gives none)")
    dim = dims.pop()
    matrix = np.full((len(rows), dim), np.nan, dtype=np.float32)  # (N, D)
    for i, r in enumerate(rows):
        if r.get("embedding") is not None:
            matrix[i] = r["embedding"]
    with atomic_open(out, "wb") as f:
        np.save(f, matrix)
    ids = out.with_suffix(".ids.txt")
    atomic_write_text(ids, "".join(f"{r['id']}" + ("" if r.get("window") is None else f"\t{r['window']}") + "\n"
                                   for r in rows))
    return out, ids


def predict_command(model: str | None, inputs: Sequence[Path], out: Path | None = None, text: str | None = None,
                    transcripts: Path | None = None, asr: bool = False, windows: bool = False,
                    window_s: float = 10.0, overlap_s: float = 2.0, device: str = "cpu",
                    onnx: Path | None = None, embeddings: Path | None = None) -> int:
    """`mmser predict`: rows to `out` (.csv or .jsonl) or CSV on stdout; a one-line summary on stderr;
    `embeddings`: the rows' embeddings (write_embeddings). `onnx`: an `mmser export` folder, predicted
    with mmser.onnx.OnnxClassifier (onnxruntime) instead of the saved model `model`.
    Exit code 0 when at least one file was predicted, 2 when none was."""
    import sys

    kind = "jsonl" if out is not None and out.suffix.lower() in (".jsonl", ".json") else "csv"
    if out is not None and out.suffix.lower() not in (".csv", ".jsonl", ".json"):
        raise ValueError(f"--out {out}: write .csv or .jsonl")
    if embeddings is not None and embeddings.suffix.lower() != ".npy":
        raise ValueError(f"--embeddings {embeddings}: write a .npy file (ids go beside it, in .ids.txt)")
    if onnx is not None and asr:
        raise ValueError("--onnx: the ONNX predictor does no ASR; give --text or --transcripts (mmser transcribe)")
    files = audio_files(inputs)
    if not files:
        raise FileNotFoundError(f"no audio files in {', '.join(map(str, inputs))}")
    trans = None
    if transcripts is not None:  # read and checked before the model is loaded
        trans = Transcripts.load(transcripts)
        trans.check_unambiguous(files)
    if onnx is not None:
        from mmser.onnx import OnnxClassifier

        clf = OnnxClassifier(onnx, window_s=window_s, overlap_s=overlap_s)
        name, needs_text = str(onnx), clf.needs_text
    else:
        clf = EmotionClassifier.from_pretrained(model, window_s=window_s, overlap_s=overlap_s, device=device)
        name, needs_text = str(model), clf.saved.needs_text
    if needs_text and text is None and transcripts is None and not asr:
        raise ValueError(f"{name}: a {clf.task} model needs text: pass --text, --transcripts FILE"
                         + ("" if onnx is not None else " or --asr") + " (it never answers from audio alone)")
    if needs_text and text is not None and not text.strip():
        raise ValueError(f"--text {text!r} is empty: a {clf.task} model classifies words (give the recordings' "
                         "text, or --transcripts / --asr)")
    rows = predict_rows(clf, files, text=text, transcripts=trans, asr=asr, windows=windows,
                        progress=sys.stderr.isatty())
    body = format_rows(rows, clf.classes, kind)
    if out is None:
        sys.stdout.write(body)
    else:
        atomic_write_text(out, body)
    failed = sum(1 for r in rows if r["error"])
    ok = len(files) - failed
    if embeddings is not None and ok:
        write_embeddings(rows, embeddings)
    print(f"mmser predict: {ok} of {len(files)} files predicted"
          + (f", {failed} failed (error rows)" if failed else "") + (f" -> {out}" if out else "")
          + (f", embeddings -> {embeddings}" if embeddings is not None and ok else ""), file=sys.stderr)
    return 0 if ok else 2
