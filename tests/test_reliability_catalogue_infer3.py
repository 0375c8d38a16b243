"""Reliability catalogue, round 3: prediction and saved models (`mmser predict`,
`mmser.EmotionClassifier`, model folders), issue 22 part B.

Each case asserts its outcome (a one-line error naming the file and key, an error row, or a correct
result) and adds a `case | outcome` row to the table pytest prints at the end (conftest.catalogue).
Models are tiny and random, saved once per module; no model is trained.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import (
    TEXT_SIDE,
    cli_error,
    cli_last_line,
    single_torch_thread,  # noqa: F401 (autouse fixture)
    tiny_audio_classifier,
    tone,
)
from safetensors.torch import load_file, save_file

import mmser.models.pretrained as pretrained
from mmser.inference import EmotionClassifier
from mmser.labels import CLASSES
from mmser.models.fusion import TextClassifier
from mmser.models.pretrained import ModelFormatError, save_pretrained

SR = 16000


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny audio model and a tiny text model (MiniLM features -> MLP), saved once."""
    root = tmp_path_factory.mktemp("infer3")
    audio = save_pretrained(tiny_audio_classifier(), root / "audio",
                            {"task": "audio", "classes": list(CLASSES), "sample_rate": SR})
    torch.manual_seed(0)
    text = save_pretrained(TextClassifier(384, hidden=8), root / "text",
                           {"task": "text", "classes": list(CLASSES), "sample_rate": SR, "text": TEXT_SIDE})
    from transformers import BertConfig, BertModel

    from mmser.models.text_encoder import TextEncoder, WithTextEncoder

    bert = BertModel(BertConfig(vocab_size=50, hidden_size=12, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=16, max_position_embeddings=32))
    text_ft = save_pretrained(WithTextEncoder(TextClassifier(12, hidden=8), TextEncoder(bert), 1e-5), root / "text_ft",
                              {"task": "text", "classes": list(CLASSES), "sample_rate": SR, "text": TEXT_SIDE})
    return {"audio": audio, "text": text, "text_ft": text_ft}


def _wav(path: Path, seconds: float = 0.4, seed: int = 0, subtype: str = "PCM_16") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), tone(440.0, seconds, np.random.default_rng(seed)), SR, subtype=subtype)
    return path


def _copy(model: Path, dest: Path, config=None, weights=None) -> Path:
    """A copy of a model folder with config.json changed by `config(c)` / tensors by `weights(w)`."""
    shutil.copytree(model, dest)
    if config is not None:
        c = json.loads((dest / "config.json").read_text())
        config(c)
        (dest / "config.json").write_text(json.dumps(c))
    if weights is not None:
        w = load_file(str(dest / "model.safetensors"))
        weights(w)
        save_file(w, str(dest / "model.safetensors"))
    return dest


# -- 1. no silent wrong results: non-finite audio, weights, outputs ---------------------------------------


def test_non_finite_audio_is_an_error_row_not_a_label(models, tmp_path, capsys, catalogue):
    x = tone(440.0, 0.4, np.random.default_rng(0))
    bad = x.copy()
    bad[1000] = np.nan
    sf.write(str(tmp_path / "nan.wav"), bad, SR, subtype="FLOAT")
    bad[1000] = np.inf
    sf.write(str(tmp_path / "inf.wav"), bad, SR, subtype="FLOAT")
    good = _wav(tmp_path / "good.wav")
    out = tmp_path / "p.jsonl"
    code, last = cli_last_line(capsys, "predict", str(models["audio"]), str(tmp_path / "nan.wav"),
                               str(tmp_path / "inf.wav"), str(good), "--out", str(out))
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert code == 0 and "1 of 3 files predicted, 2 failed" in last  # was: 3 of 3, NaN probs, label "angry"
    for name in ("nan", "inf"):
        assert rows[name].get("label") is None and str(tmp_path / f"{name}.wav") in rows[name]["error"]
        assert "NaN/Inf" in rows[name]["error"]
    assert rows["good"]["error"] is None and rows["good"]["label"] in CLASSES
    catalogue("predict: a NaN / an Inf sample in a file", rows["nan"]["error"])
    # the API: a clear ValueError, never NaN probabilities
    clf = EmotionClassifier.from_pretrained(models["audio"])
    with pytest.raises(ValueError, match="non-finite samples") as e:
        clf.classify_waveform(np.where(np.arange(len(x)) == 5, np.nan, x), SR)
    catalogue("API: classify_waveform with a NaN sample", str(e.value))


def test_non_finite_weights_are_refused_at_load(models, tmp_path, capsys, catalogue):
    def poison(w):
        w["classifier.weight"][0, 0] = float("nan")

    folder = _copy(models["audio"], tmp_path / "nanw", weights=poison)
    line = cli_error(capsys, catalogue, "model folder with a NaN weight",
                     ["predict", str(folder), str(_wav(tmp_path / "a.wav"))], "non-finite")
    assert "classifier.weight" in line and str(folder / "model.safetensors") in line  # was: exit 0, NaN probs
    with pytest.raises(ModelFormatError, match="tensor classifier.weight has 1 non-finite"):
        EmotionClassifier.from_pretrained(folder)


def test_a_non_finite_output_is_never_turned_into_a_label(models, tmp_path, capsys, catalogue):
    """Finite weights that overflow (1e38): infinite logits, NaN softmax. The label is refused."""
    def overflow(w):
        w["classifier.weight"].fill_(1e38)

    folder = _copy(models["audio"], tmp_path / "overflow", weights=overflow)
    out = tmp_path / "p.jsonl"
    code, _ = cli_last_line(capsys, "predict", str(folder), str(_wav(tmp_path / "a.wav")), "--out", str(out))
    row = json.loads(out.read_text())
    assert code == 2 and row.get("label") is None and "non-finite probabilities" in row["error"]  # was: label "angry"
    catalogue("a model whose output overflows to NaN", row["error"])


# -- 2. transcripts and text --------------------------------------------------------------------------


def test_two_files_with_one_stem_get_their_own_text_or_are_refused(models, tmp_path, capsys, catalogue):
    a, b = _wav(tmp_path / "a" / "x.wav"), _wav(tmp_path / "b" / "x.wav", seed=1)
    by_id = tmp_path / "by_id.jsonl"
    by_id.write_text(json.dumps({"id": "x", "text": "one text for both"}) + "\n")
    cli_error(capsys, catalogue, "--transcripts by stem, two files share it",  # was: both got that one text
              ["predict", str(models["text"]), str(a), str(b), "--transcripts", str(by_id)], "share the stem 'x'")
    # keyed by path: relative to the transcripts file's folder (here t/), or absolute
    (tmp_path / "t").mkdir()
    by_path = tmp_path / "t" / "by_path.jsonl"
    by_path.write_text(json.dumps({"id": "x", "path": "../a/x.wav", "text": "I am so happy today"}) + "\n"
                       + json.dumps({"id": "x", "path": str(b), "text": "this is terrible and I hate it"}) + "\n")
    out = tmp_path / "p.jsonl"
    code, _ = cli_last_line(capsys, "predict", str(models["text"]), str(a), str(b), "--transcripts",
                            str(by_path), "--out", str(out))
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert code == 0 and [r["text"] for r in rows] == ["I am so happy today", "this is terrible and I hate it"]
    assert rows[0]["prob_angry"] != rows[1]["prob_angry"]  # each file's own text reached the model
    catalogue("--transcripts by path (relative to the file), two files with one stem", "each its own text")


def test_an_id_twice_in_the_transcripts_is_refused(models, tmp_path, capsys, catalogue):
    wav = _wav(tmp_path / "x.wav")
    trans = tmp_path / "t.jsonl"
    trans.write_text(json.dumps({"id": "x", "text": "first"}) + "\n" + json.dumps({"id": "y", "text": "y"}) + "\n"
                     + json.dumps({"id": "x", "text": "second"}) + "\n")
    line = cli_error(capsys, catalogue, "an id twice in --transcripts",  # was: last wins, exit 0
                     ["predict", str(models["text"]), str(wav), "--transcripts", str(trans)], "appears twice")
    assert f"{trans}:3" in line and "first on line 1" in line


def test_empty_text_is_refused_for_text_models(models, tmp_path, capsys, caplog, catalogue):
    wav = _wav(tmp_path / "x.wav")
    for text in ("", "   "):
        cli_error(capsys, catalogue, f"predict a text model --text {text!r}",  # was: classified, exit 0
                  ["predict", str(models["text"]), str(wav), "--text", text], "is empty")
    clf = EmotionClassifier.from_pretrained(models["text"])
    with pytest.raises(ValueError, match=r"x\.wav: empty text"):
        clf.classify_file(wav, text=" \n")
    # an ASR transcript with no words (a recording without speech): classified, with a warning naming the file
    trans = tmp_path / "t.jsonl"
    trans.write_text(json.dumps({"id": "x", "text": " "}) + "\n")
    from mmser.cli import main

    caplog.clear()
    assert main(["predict", str(models["text"]), str(wav), "--transcripts", str(trans)]) == 0
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(m.startswith(f"{wav}: empty transcript") for m in warned), warned
    catalogue("predict --transcripts with an empty ASR transcript", f"classified; warning: {warned[-1]}")
    # an audio model has no use for text: --text "" changes nothing there
    assert cli_last_line(capsys, "predict", str(models["audio"]), str(wav), "--text", "")[0] == 0


# -- 3. arrays through the API, window length -------------------------------------------------------------


def _audio_seen(clf: EmotionClassifier) -> list[torch.Tensor]:
    """The audio batches the model receives (a spy on its forward)."""
    seen = []
    forward = clf.model.forward
    clf.model.forward = lambda batch: seen.append(batch["audio"].clone()) or forward(batch)
    return seen


def test_integer_pcm_arrays_are_scaled_and_channel_first_arrays_are_read(models, catalogue):
    clf = EmotionClassifier.from_pretrained(models["audio"])
    seen = _audio_seen(clf)
    x = tone(440.0, 0.4, np.random.default_rng(0))  # (T,) float32 in [-1, 1]
    pcm16 = np.round(x * 32767).astype(np.int16)
    cases = {"int16": (pcm16, pcm16 / 32768.0), "int32": (pcm16.astype(np.int32) << 16, pcm16 / 32768.0),
             "uint8": ((pcm16 >> 8).astype(np.int16) + 128).astype(np.uint8)}
    cases["uint8"] = (cases["uint8"], (cases["uint8"].astype(np.float64) - 128) / 128)
    for name, (pcm, want) in cases.items():
        clf.classify_waveform(pcm, SR)
        got = seen[-1][0].numpy()
        assert np.abs(got).max() <= 1.0 and np.allclose(got, want, atol=1e-6), name  # was: int16 values as floats
    catalogue("API: int16 / int32 / uint8 arrays", "scaled as PCM (/32768, /2**31, (x-128)/128)")
    mono = clf.classify_waveform(x, SR)
    for shape, arr in (("(2, T)", np.stack([x, x])), ("(T, 2)", np.stack([x, x], axis=1))):
        p = clf.classify_waveform(arr, SR)  # was: (2, T) read as 2 samples of T channels
        assert len(seen[-1][0]) == len(x) and p.probs == pytest.approx(mono.probs, abs=1e-6), shape
    catalogue("API: a (2, T) array", "2 channels of T samples, down-mixed")
    for bad, match in ((np.zeros((3, 2, 8000), np.float32), "shape"), (np.zeros((20, 30), np.float32), "shape"),
                       (np.arange(8000), "dtype int64")):
        with pytest.raises(ValueError, match=match) as e:
            clf.classify_waveform(bad, SR)
        assert "\n" not in str(e.value)
    catalogue("API: a (3, 2, T), a (20, 30) or an int64 array", str(e.value))


def test_window_shorter_than_the_receptive_field_is_refused(models, tmp_path, capsys, catalogue):
    wav = _wav(tmp_path / "a.wav", 1.0)
    # tiny.yaml's CNN (kernels 10, 4, 4; strides 5, 4, 4): 10 + 3*5 + 3*20 = 85 samples
    line = cli_error(capsys, catalogue, "predict --window-s 0.001",  # was: an error row per file
                     ["predict", str(models["audio"]), str(wav), "--window-s", "0.001", "--overlap-s", "0"],
                     "minimum of 85 samples")
    assert "--window-s" in line
    assert cli_last_line(capsys, "predict", str(models["audio"]), str(wav), "--window-s", str(85 / SR),
                         "--overlap-s", "0")[0] == 0  # exactly the minimum is fine
    cli_error(capsys, catalogue, "predict --overlap-s that rounds to the window",
              ["predict", str(models["audio"]), str(wav), "--window-s", "0.5", "--overlap-s", "0.49999"],
              "--overlap-s")
    # wav2vec 2.0's CNN (kernels 10, 3x4, 2x2; strides 5, 2x6): one frame needs 400 samples
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    from mmser.inference import encoder_min_samples
    from mmser.models.wav2vec2 import AudioEncoder

    torch.manual_seed(0)
    w2v2 = AudioEncoder(Wav2Vec2Model(Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=16, conv_dim=[4] * 7)))
    assert encoder_min_samples(w2v2) == 400
    w2v2.eval()  # at inference no time mask is drawn: one frame is all the encoder needs
    with torch.no_grad():
        assert w2v2.encode(torch.zeros(1, 400), torch.ones(1, 400, dtype=torch.bool))[0].shape[1] == 1
        with pytest.raises(ValueError, match="shorter than one encoder frame"):
            w2v2.encode(torch.zeros(1, 399), torch.ones(1, 399, dtype=torch.bool))


# -- 4. crafted model folders cannot exhaust memory ---------------------------------------------------------


@pytest.fixture
def build_spy(monkeypatch):
    """Records the default device of every build_architecture call; a real (non-meta) build of a crafted
    folder fails the test at once (before it can allocate)."""
    calls: list[str] = []
    real = pretrained.build_architecture

    def spy(d, where="config.json"):
        device = torch.empty(0).device.type
        calls.append(device)
        if device != "meta":
            raise AssertionError("a crafted model folder was built before its sizes were checked")
        return real(d, where)

    monkeypatch.setattr(pretrained, "build_architecture", spy)
    return calls


@pytest.mark.parametrize("case, mutate, expect", [
    ("200,000 layers", lambda c: c["architecture"]["encoder_config"].update(num_hidden_layers=200_000),
     "num_hidden_layers = 200000 layers"),
    ("hidden size 2**40", lambda c: c["architecture"]["encoder_config"].update(hidden_size=2**40), "hidden_size"),
    ("intermediate size 10**12", lambda c: c["architecture"]["encoder_config"].update(intermediate_size=10**12),
     "intermediate_size"),
    ("num_labels 10**7", lambda c: c["architecture"]["encoder_config"].update(num_labels=10**7), "num_labels"),
    ("sample_rate 1e9", lambda c: c.update(sample_rate=1e9), "sample_rate"),
    ("hidden size 64 (not the weights' 32)", lambda c: c["architecture"]["encoder_config"].update(hidden_size=64),
     "in the architecture but"),
    ("one layer more than the weights", lambda c: c["architecture"]["encoder_config"].update(num_hidden_layers=3),
     "no tensor encoder.model.encoder.layers.2"),
])
def test_crafted_sizes_are_bounded_by_the_weights_before_building(models, tmp_path, capsys, catalogue, build_spy,
                                                                  case, mutate, expect):
    folder = _copy(models["audio"], tmp_path / "crafted", config=mutate)
    t0 = time.perf_counter()
    argv = ["predict", str(folder), str(_wav(tmp_path / "a.wav"))]
    line = cli_error(capsys, catalogue, f"model folder: {case}", argv, expect)
    assert time.perf_counter() - t0 < 5 and str(folder) in line
    assert all(device == "meta" for device in build_spy)  # built for real: never
    if case in ("200,000 layers", "hidden size 2**40", "intermediate size 10**12", "num_labels 10**7",
                "sample_rate 1e9"):
        assert build_spy == []  # refused before even a shapes-only build


def _bert(c) -> dict:
    return c["architecture"]["text_encoder"]["config"]


@pytest.mark.parametrize("case, mutate, expect, built", [
    ("text encoder vocab 10**9", lambda c: _bert(c).update(vocab_size=10**9), "vocab_size", False),
    ("text encoder 200,000 layers", lambda c: _bert(c).update(num_hidden_layers=200_000), "num_hidden_layers", False),
    ("text encoder vocab 60 (the weights' 50)", lambda c: _bert(c).update(vocab_size=60),
     "word_embeddings.weight is [60, 12] in the architecture but [50, 12]", True),
])
def test_a_crafted_text_encoder_is_bounded_too(models, tmp_path, capsys, catalogue, build_spy, case, mutate, expect,
                                              built):
    folder = _copy(models["text_ft"], tmp_path / "crafted", config=mutate)
    cli_error(capsys, catalogue, f"model folder: {case}",
              ["predict", str(folder), str(_wav(tmp_path / "a.wav")), "--text", "hello"], expect)
    assert all(device == "meta" for device in build_spy) and bool(build_spy) == built


def test_a_good_folder_still_builds_once_for_real_after_one_meta_build(models, monkeypatch):
    devices = []
    real = pretrained.build_architecture
    monkeypatch.setattr(pretrained, "build_architecture",
                        lambda d, where="config.json": devices.append(torch.empty(0).device.type) or real(d, where))
    assert EmotionClassifier.from_pretrained(models["audio"]).classes == list(CLASSES)
    assert devices == ["meta", "cpu"]


# -- 5. one line naming config.json and the key, at load ----------------------------------------------------


def _ct2_folder(root: Path) -> Path:
    from mmser.models.heads import AudioClassifier
    from mmser.models.whisper import Ct2Spec, Ct2WhisperEncoder

    model = AudioClassifier(Ct2WhisperEncoder(Ct2Spec(str(root / "no-such-ct2")), hidden_size=32), num_classes=4)
    return save_pretrained(model, root / "ct2", {"task": "audio", "classes": list(CLASSES), "sample_rate": SR})


@pytest.mark.parametrize("case, mutate, key", [
    ("attention_mask 'bogus'", lambda c: c["architecture"].update(encoder_attention_mask="bogus"),
     "architecture.encoder_attention_mask"),
    ("pooling 'bogus'", lambda c: c["architecture"].update(pooling="bogus"), "architecture.pooling"),
    ("sample_rate 'abc'", lambda c: c.update(sample_rate="abc"), "sample_rate"),
    ("sample_rate -16000", lambda c: c.update(sample_rate=-16000), "sample_rate"),
    ("model_type 'bert'", lambda c: c.update(model_type="bert"), "model_type"),
    ("task 'regression'", lambda c: c.update(task="regression"), "task"),
    ("task 'text' for an audio architecture", lambda c: c.update(task="text"), "task"),
    ("num_classes 'four'", lambda c: c["architecture"].update(num_classes="four"),
     "architecture.num_classes"),
])
def test_bad_config_values_are_one_line_at_load(models, tmp_path, capsys, catalogue, case, mutate, key):
    folder = _copy(models["audio"], tmp_path / "bad", config=mutate)
    wavs = [str(_wav(tmp_path / f"{i}.wav", seed=i)) for i in range(2)]
    line = cli_error(capsys, catalogue, f"config.json {case}", ["predict", str(folder), *wavs], key)
    assert str(folder / "config.json") in line  # at load: no per-file error rows
    assert capsys.readouterr().out == ""


def test_text_side_values_are_checked_at_load(models, tmp_path, capsys, catalogue):
    wav = str(_wav(tmp_path / "a.wav"))
    for case, side, key in (("text.pooling 'bogus'", {**TEXT_SIDE, "pooling": "bogus"}, "text.pooling"),
                            ("text.max_length -1", {**TEXT_SIDE, "max_length": -1}, "text.max_length"),
                            ("no text.encoder", {**TEXT_SIDE, "encoder": None}, "text.encoder")):
        folder = _copy(models["text"], tmp_path / key.replace(".", "_") / case.split()[0], config=lambda c,
                       s=side: c.update(text=s))
        line = cli_error(capsys, catalogue, f"config.json {case}", ["predict", str(folder), wav, "--text", "hi"], key)
        assert str(folder / "config.json") in line


def test_a_missing_ct2_encoder_folder_is_refused_at_load(tmp_path, capsys, catalogue):
    folder = _ct2_folder(tmp_path)
    line = cli_error(capsys, catalogue, "config.json: CTranslate2 encoder folder missing",  # was: per-file rows
                     ["predict", str(folder), str(_wav(tmp_path / "a.wav"))], "encoder_model")
    assert str(folder / "config.json") in line and "no-such-ct2" in line


def test_a_whisper_encoder_at_another_sample_rate_is_refused_at_load(tmp_path, capsys, catalogue):
    folder = _ct2_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "sample_rate": 8000}))
    line = cli_error(capsys, catalogue, "config.json: sample_rate 8000 for a Whisper encoder",  # was: misread audio
                     ["predict", str(folder), str(_wav(tmp_path / "a.wav"))], "sample_rate 8000 for a Whisper encoder")
    assert str(folder / "config.json") in line
