"""ONNX export (issue 21, items 1 and 4): `mmser export --format onnx`, the torch-free predictor
mmser.onnx, parity with EmotionClassifier at three lengths for an audio, a text and a fusion model,
and embeddings (the vector that feeds the classifier) from both predictors.

Models are tiny and random, saved the way runs save them (save_pretrained). The text side is a tiny
random BERT in a local folder with all-MiniLM-L6-v2's tokenizer files (a real WordPiece vocabulary:
the `tokenizers` ids are compared with transformers' on real words)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import (  # noqa: F401 (single_torch_thread: autouse fixture)
    REPO,
    single_torch_thread,
    tiny_audio_classifier,
    tiny_encoder_config,
    tone,
)

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")

from mmser.export.onnx import export_onnx  # noqa: E402
from mmser.inference import EmotionClassifier  # noqa: E402
from mmser.labels import CLASSES  # noqa: E402
from mmser.models.fusion import ConcatFusion, CrossAttentionFusion, FusionClassifier, TextClassifier  # noqa: E402
from mmser.models.heads import masked_mean  # noqa: E402
from mmser.models.pretrained import save_pretrained  # noqa: E402
from mmser.models.wav2vec2 import AudioEncoder  # noqa: E402
from mmser.onnx import OnnxClassifier  # noqa: E402

SR = 16000
TOL = 1e-4
# Three lengths for audio: one window, several windows, and longer than any training clip
# (training clips of the toy corpus are 0.2-0.5 s; 23 s is three 10 s windows at 8 s hops).
AUDIO_SECONDS = (0.37, 2.3, 23.0)
# Three texts: short, medium, and longer than the model's max_length (16 tokens: truncated).
TEXTS = ("yes", "I told you already, this is not fine",
         "this is a very long sentence that goes on and on about nothing in particular until the tokenizer cuts it")
MEASURED: dict[str, float] = {}  # max abs differences, printed at the end of the module


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny random BERT with all-MiniLM-L6-v2's tokenizer (a local text.encoder folder)."""
    from transformers import BertConfig, BertModel

    from mmser.text.embed import resolve_encoder

    d = tmp_path_factory.mktemp("bert")
    minilm = Path(resolve_encoder("minilm-offline"))
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm / name, d / name)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(d)
    return d


def _text_side(bert_dir):
    return {"encoder": str(bert_dir), "pooling": "mean", "max_length": 16, "fine_tuned": False,
            "source": "gold", "asr": None}


@pytest.fixture(scope="module")
def models(tmp_path_factory, bert_dir):
    """{task: (model folder, export folder)} for an audio, a text and two fusion models, exported."""
    root = tmp_path_factory.mktemp("onnx")
    out = {}
    save_pretrained(tiny_audio_classifier(), root / "audio", {"task": "audio", "classes": list(CLASSES),
                                                              "sample_rate": SR})
    torch.manual_seed(1)
    save_pretrained(TextClassifier(32, hidden=8), root / "text",
                    {"task": "text", "classes": list(CLASSES), "sample_rate": SR, "text": _text_side(bert_dir)})
    for name, head in (("fusion", lambda h: ConcatFusion(h, 32, hidden=8)),
                       ("fusion_xattn", lambda h: CrossAttentionFusion(h, 32, hidden=8, num_heads=2))):
        torch.manual_seed(2)
        enc = AudioEncoder.from_config(tiny_encoder_config())
        save_pretrained(FusionClassifier(enc, head(enc.hidden_size)), root / name,
                        {"task": "fusion", "classes": list(CLASSES), "sample_rate": SR, "text": _text_side(bert_dir)})
    # decision fusion with a fine-tuned text encoder (WithTextEncoder: token ids, the model's own BERT)
    from transformers import AutoModel

    from mmser.models.fusion import DecisionFusion
    from mmser.models.text_encoder import TextEncoder, WithTextEncoder

    torch.manual_seed(3)
    enc = AudioEncoder.from_config(tiny_encoder_config())
    tuned = WithTextEncoder(FusionClassifier(enc, DecisionFusion(enc.hidden_size, 32, hidden=8)),
                            TextEncoder(AutoModel.from_pretrained(str(bert_dir)), "cls"))
    save_pretrained(tuned, root / "fusion_tuned", {"task": "fusion", "classes": list(CLASSES), "sample_rate": SR,
                                                   "text": {**_text_side(bert_dir), "pooling": "cls",
                                                            "fine_tuned": True}})
    # transformers' Whisper encoder, 1 s windows (max_source_positions 50): recordings span several
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from mmser.models.heads import AudioClassifier
    from mmser.models.whisper import WhisperAudioEncoder, make_whisper_config

    torch.manual_seed(4)
    whisper = AudioClassifier(WhisperAudioEncoder(WhisperEncoder(make_whisper_config(16, 1, 2, 32,
                                                                                     max_source_positions=50))))
    save_pretrained(whisper, root / "whisper", {"task": "audio", "classes": list(CLASSES), "sample_rate": SR})
    for name in ("audio", "text", "fusion", "fusion_xattn", "fusion_tuned", "whisper"):
        export_onnx(root / name, root / f"{name}.onnx")
        out[name] = (root / name, root / f"{name}.onnx")
    yield out
    if MEASURED:
        print("\nONNX parity (max abs difference, onnxruntime vs PyTorch):")
        for k, v in MEASURED.items():
            print(f"  {k}: {v:.2e}")


def _wav(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (tone(440.0, seconds, rng, SR) + 0.1 * rng.standard_normal(int(round(seconds * SR)))).astype(np.float32)


def _compare(name: str, a, b) -> None:
    """Whole-recording and per-window probabilities and embeddings of two Predictions agree."""
    pairs = [(a, b), *zip(a.windows, b.windows, strict=True)]
    assert len(a.windows) == len(b.windows)
    dp = max(abs(x.probs[c] - y.probs[c]) for x, y in pairs for c in CLASSES)
    de = max(float(np.abs(x.embedding - y.embedding).max()) for x, y in pairs)
    MEASURED[f"{name} probs"] = max(MEASURED.get(f"{name} probs", 0.0), dp)
    MEASURED[f"{name} embedding"] = max(MEASURED.get(f"{name} embedding", 0.0), de)
    assert dp <= TOL, (name, dp)
    assert de <= TOL, (name, de)
    assert a.label == b.label and [(w.start, w.end) for w in a.windows] == [(w.start, w.end) for w in b.windows]


@pytest.mark.parametrize("name", ["audio", "whisper"])
def test_audio_parity_at_three_lengths(models, name):
    model_dir, export_dir = models[name]
    torch_clf, onnx_clf = EmotionClassifier.from_pretrained(model_dir), OnnxClassifier(export_dir)
    for k, seconds in enumerate(AUDIO_SECONDS):
        wav = _wav(seconds, k)
        a, b = torch_clf.classify_waveform(wav, SR), onnx_clf.classify(wav, SR)
        _compare(f"{name} {seconds} s", a, b)
    assert len(b.windows) == 3  # the 23 s recording: windows 0-10, 8-18, 13-23


def test_text_parity_at_three_lengths_and_the_tokenizer(models, bert_dir):
    from transformers import AutoTokenizer

    model_dir, export_dir = models["text"]
    torch_clf, onnx_clf = EmotionClassifier.from_pretrained(model_dir), OnnxClassifier(export_dir)
    hf = AutoTokenizer.from_pretrained(str(bert_dir))
    lengths = []
    for k, text in enumerate(TEXTS):
        ids = onnx_clf.token_ids(text)
        assert ids.tolist() == hf(text, truncation=True, max_length=16)["input_ids"]
        assert hf.unk_token_id not in ids.tolist()  # real words get real ids
        lengths.append(len(ids))
        wav = _wav(0.3, k)
        _compare(f"text {len(ids)} tokens", torch_clf.classify_waveform(wav, SR, text=text),
                 onnx_clf.classify(wav, SR, text=text))
    assert lengths[0] < lengths[1] < lengths[2] == 16  # the last one is truncated to max_length


@pytest.mark.parametrize("name", ["fusion", "fusion_xattn", "fusion_tuned"])
def test_fusion_parity_at_three_lengths(models, name):
    model_dir, export_dir = models[name]
    torch_clf, onnx_clf = EmotionClassifier.from_pretrained(model_dir), OnnxClassifier(export_dir)
    for k, (seconds, text) in enumerate(zip(AUDIO_SECONDS, TEXTS, strict=True)):
        wav = _wav(seconds, k)
        _compare(f"{name} {seconds} s", torch_clf.classify_waveform(wav, SR, text=text),
                 onnx_clf.classify(wav, SR, text=text))


def test_metadata_dynamic_axes_and_the_files_beside(models):
    import onnx

    model_dir, export_dir = models["fusion"]
    proto = onnx.load(str(export_dir / "model.onnx"))
    props = {p.key: p.value for p in proto.metadata_props}
    meta = json.loads(props["mmser"])
    assert meta["classes"] == list(CLASSES) and meta["sample_rate"] == SR and meta["task"] == "fusion"
    assert json.loads(props["classes"]) == list(CLASSES) and props["sample_rate"] == "16000"
    assert meta["text"]["max_length"] == 16 and meta["window_s"] == 10.0
    assert meta["min_samples"] == EmotionClassifier.from_pretrained(model_dir).min_samples > 1
    assert meta["parity"]["probs"] <= TOL
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert set(dims) == {"audio", "input_ids", "attention_mask"}
    assert all(isinstance(d, str) and d for shape in dims.values() for d in shape)  # every axis symbolic
    assert dims["audio"][0] == dims["input_ids"][0]  # one batch axis
    assert [o.name for o in proto.graph.output] == ["probs", "utterance_embedding"]
    assert json.loads((export_dir / "mmser_onnx.json").read_text()) == meta
    assert (export_dir / "tokenizer.json").is_file() and "onnx" in (export_dir / "README.md").read_text().lower()


def test_batch_of_windows_runs_with_another_batch_size(models):
    """The graph's batch axis is dynamic: 1 and 5 windows of a new length give the same rows."""
    import onnxruntime as ort

    _, export_dir = models["audio"]
    sess = ort.InferenceSession(str(export_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.stack([_wav(0.61, k) for k in range(5)])  # (5, T)
    p5, e5 = sess.run(None, {"audio": x})
    p1, e1 = sess.run(None, {"audio": x[2:3]})
    assert p5.shape == (5, len(CLASSES)) and np.abs(p5[2] - p1[0]).max() <= 1e-5 and np.abs(e5[2] - e1[0]).max() <= 1e-5


def test_predictor_imports_no_torch(models, tmp_path):
    _, export_dir = models["fusion"]
    wav = tmp_path / "x.wav"
    sf.write(str(wav), _wav(0.5), 44100)  # resampled on read
    code = f"""
import sys
from mmser.onnx import OnnxClassifier
p = OnnxClassifier({str(export_dir)!r}).classify_file({str(wav)!r}, text="I told you already")
heavy = sorted(m for m in ("torch", "transformers", "mmser.training", "mmser.models", "mmser.inference")
               if m in sys.modules)
print(p.label, len(p.embedding), heavy)
assert not heavy, heavy
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr[-2000:]
    label, dim, heavy = res.stdout.split(maxsplit=2)
    assert label in CLASSES and int(dim) == 32 + 32 and heavy.strip() == "[]"


def test_embedding_is_the_vector_that_feeds_the_head(models, bert_dir):
    """EmotionClassifier.embed = the pooled features the head reads, computed here from the parts;
    the ONNX predictor gives the same vectors (parity above)."""
    from mmser.text.embed import TextEncoderSpec, encode_texts

    wav = _wav(0.4, 3)
    batch = {"audio": torch.from_numpy(wav)[None], "audio_mask": torch.ones(1, len(wav), dtype=torch.bool)}
    audio = EmotionClassifier.from_pretrained(models["audio"][0])
    with torch.no_grad():
        want = audio.model.embed(batch)[0].numpy()  # AudioClassifier's pooled vector
        assert np.allclose(audio.model.classifier(torch.from_numpy(want)).numpy(),
                           audio.model(batch)[0].numpy(), atol=1e-6)  # it is what the linear head reads
    assert np.allclose(audio.embed(wav, SR), want, atol=1e-6)
    text = "I told you already"
    tokens, _ = encode_texts([text], TextEncoderSpec(encoder=str(bert_dir), max_length=16), device="cpu")[0]
    text_clf = EmotionClassifier.from_pretrained(models["text"][0])
    assert np.allclose(text_clf.embed(wav, SR, text=text), tokens.mean(0).numpy(), atol=1e-5)  # mean pooling
    fusion = EmotionClassifier.from_pretrained(models["fusion"][0])
    head = fusion.model.fusion
    with torch.no_grad():
        frames, mask = fusion.model.audio_encoder.encode(batch["audio"], batch["audio_mask"])
        a = head.audio_norm(masked_mean(torch.relu(frames), mask))[0]
        t = head.text_norm(tokens.mean(0))
    assert np.allclose(fusion.embed(wav, SR, text=text), torch.cat([a, t]).numpy(), atol=1e-5)
    # a long recording: the length-weighted mean of its windows' vectors
    long = _wav(12.0, 4)
    p = audio.classify_waveform(long, SR)
    lengths = np.array([w.end - w.start for w in p.windows])
    mean = (np.stack([w.embedding for w in p.windows]) * lengths[:, None]).sum(0) / lengths.sum()
    assert len(p.windows) == 2 and np.allclose(p.embedding, mean, atol=1e-6)


def test_cli_export_predict_onnx_and_embeddings(models, tmp_path, capsys):
    from mmser.cli import main

    model_dir, _ = models["fusion"]
    files = []
    for k, seconds in enumerate((0.3, 11.0)):
        files.append(tmp_path / f"f{k}.wav")
        sf.write(str(files[-1]), _wav(seconds, k), SR)
    assert main(["export", str(model_dir), "--format", "onnx", "--out", str(tmp_path / "exp")]) == 0
    assert (tmp_path / "exp" / "model.onnx").is_file()
    args = [str(tmp_path), "--text", "fine thanks", "--windows"]
    assert main(["predict", str(model_dir), *args, "--out", str(tmp_path / "t.csv"),
                 "--embeddings", str(tmp_path / "t.npy")]) == 0
    assert main(["predict", "--onnx", str(tmp_path / "exp"), *args, "--out", str(tmp_path / "o.jsonl"),
                 "--embeddings", str(tmp_path / "o.npy")]) == 0
    import csv

    rows_t = list(csv.DictReader((tmp_path / "t.csv").open()))
    rows_o = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [(r["id"], r["label"]) for r in rows_t] == [(r["id"], r["label"]) for r in rows_o]
    assert len(rows_o) == 2 + 2  # f0; f1 and its two windows
    for rt, ro in zip(rows_t, rows_o, strict=True):
        assert max(abs(float(rt[f"prob_{c}"]) - ro[f"prob_{c}"]) for c in CLASSES) <= TOL
    et, eo = np.load(tmp_path / "t.npy"), np.load(tmp_path / "o.npy")
    assert et.shape == eo.shape == (4, 64) and np.abs(et - eo).max() <= TOL
    ids = (tmp_path / "o.ids.txt").read_text().splitlines()
    assert ids == [r["id"] + ("" if r["window"] is None else f"\t{r['window']}") for r in rows_o]
    assert (tmp_path / "t.ids.txt").read_text().splitlines() == ids


def test_real_minilm_sentence_pooling_and_attentive_audio_pooling(tmp_path):
    """The real all-MiniLM-L6-v2 (text.encoder=minilm-offline) with sentence pooling (mean + L2 norm,
    run by sentence-transformers in PyTorch) and a text model on its pooled vector; an audio model with
    attentive pooling. Both exported and compared at three inputs."""
    from mmser.models.heads import AudioClassifier

    side = {"encoder": "minilm-offline", "pooling": "sentence", "max_length": 16, "fine_tuned": False,
            "source": "gold", "asr": None}
    torch.manual_seed(5)
    save_pretrained(TextClassifier(384, hidden=8, pooling="pooled"), tmp_path / "minilm",
                    {"task": "text", "classes": list(CLASSES), "sample_rate": SR, "text": side})
    torch.manual_seed(6)
    save_pretrained(AudioClassifier(AudioEncoder.from_config(tiny_encoder_config()), len(CLASSES), pooling="attentive"),
                    tmp_path / "attentive", {"task": "audio", "classes": list(CLASSES), "sample_rate": SR})
    for name in ("minilm", "attentive"):
        export_onnx(tmp_path / name, tmp_path / f"{name}.onnx")
        torch_clf = EmotionClassifier.from_pretrained(tmp_path / name)
        onnx_clf = OnnxClassifier(tmp_path / f"{name}.onnx")
        for k, (seconds, text) in enumerate(zip(AUDIO_SECONDS, TEXTS, strict=True)):
            wav = _wav(seconds if name == "attentive" else 0.3, k)
            t = text if name == "minilm" else None
            _compare(f"{name} {k}", torch_clf.classify_waveform(wav, SR, text=t), onnx_clf.classify(wav, SR, text=t))
    emb = OnnxClassifier(tmp_path / "minilm.onnx").embed(_wav(0.3), SR, text="I told you already")
    assert emb.shape == (384,) and abs(float(np.linalg.norm(emb)) - 1.0) < 1e-5  # sentence pooling: unit norm
    print({k: f"{v:.2e}" for k, v in MEASURED.items() if k.startswith(("minilm", "attentive"))})
