"""Inference on any audio: sample rates, stereo, long files (windows), bad files, fusion text."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers import TEXT_SIDE as TEXT
from helpers import (  # noqa: F401 (single_torch_thread: autouse fixture)
    random_openai_whisper_state,
    single_torch_thread,
    tiny_audio_classifier,
    tiny_encoder_config,
    tone,
)

import mmser
from mmser.audio import load_audio
from mmser.inference import EmotionClassifier, audio_files, format_rows, predict_rows
from mmser.labels import CLASSES
from mmser.models.fusion import ConcatFusion, FusionClassifier
from mmser.models.pretrained import save_pretrained
from mmser.models.wav2vec2 import AudioEncoder


@pytest.fixture(scope="module")
def audio_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("m") / "model"
    save_pretrained(tiny_audio_classifier(), d, {"task": "audio", "classes": list(CLASSES), "sample_rate": 16000})
    return d


@pytest.fixture(scope="module")
def fusion_model(tmp_path_factory):
    torch.manual_seed(0)
    enc = AudioEncoder.from_config(tiny_encoder_config())
    model = FusionClassifier(enc, ConcatFusion(enc.hidden_size, 384, hidden=8))
    d = tmp_path_factory.mktemp("f") / "model"
    save_pretrained(model, d, {"task": "fusion", "classes": list(CLASSES), "sample_rate": 16000, "text": TEXT})
    return d


def _wav(path, seconds, sr, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    x = tone(440.0, seconds, rng, sr)
    if channels > 1:
        x = np.stack([x] * channels, axis=1)
    sf.write(str(path), x, sr)
    return path


def test_load_audio_resamples_and_downmixes_any_format(tmp_path):
    for sr in (8000, 16000, 44100):
        wav = load_audio(_wav(tmp_path / f"a{sr}.wav", 0.5, sr), 16000)
        assert wav.dtype == np.float32 and abs(len(wav) - 8000) <= 1
    stereo = load_audio(_wav(tmp_path / "s.flac", 0.5, 22050, channels=2), 16000)
    assert stereo.ndim == 1 and abs(len(stereo) - 8000) <= 1
    sf.write(str(tmp_path / "v.ogg"), np.zeros(4000, dtype=np.float32), 16000, format="OGG", subtype="VORBIS")
    assert len(load_audio(tmp_path / "v.ogg")) == 4000
    with pytest.raises(ValueError, match="empty audio"):
        sf.write(str(tmp_path / "e.wav"), np.zeros(0, dtype=np.float32), 16000)
        load_audio(tmp_path / "e.wav")


def test_predict_rates_stereo_long_empty_and_non_audio(tmp_path, audio_model):
    clf = mmser.EmotionClassifier.from_pretrained(audio_model)
    files = [_wav(tmp_path / "r8k.wav", 0.5, 8000), _wav(tmp_path / "r16k.wav", 0.5, 16000),
             _wav(tmp_path / "r44k.wav", 0.5, 44100), _wav(tmp_path / "stereo.wav", 0.5, 16000, channels=2),
             _wav(tmp_path / "long.wav", 60.0, 16000)]
    empty = tmp_path / "empty.wav"
    sf.write(str(empty), np.zeros(0, dtype=np.float32), 16000)
    text = tmp_path / "notes.wav"
    text.write_text("not audio at all")
    rows = predict_rows(clf, [*files, empty, text, tmp_path / "missing.wav"], windows=True, progress=False)
    whole = {r["id"]: r for r in rows if r["window"] is None}
    for f in files:
        r = whole[f.stem]
        assert r["error"] is None and r["label"] in CLASSES
        assert sum(r[f"prob_{c}"] for c in CLASSES) == pytest.approx(1.0, abs=1e-4)
    assert whole["r8k"]["duration"] == pytest.approx(0.5, abs=1e-3)
    assert whole["long"]["duration"] == pytest.approx(60.0)
    assert "empty audio" in whole["empty"]["error"] and "empty.wav" in whole["empty"]["error"]
    assert "cannot read audio" in whole["notes"]["error"] and "not found" in whole["missing"]["error"]
    # 60 s in 10 s windows every 8 s: 0, 8, ..., 48 and the last aligned to the end (50-60)
    wins = [r for r in rows if r["id"] == "long" and r["window"] is not None]
    assert [(w["start"], w["end"]) for w in wins] == [(s, s + 10.0) for s in range(0, 49, 8)] + [(50.0, 60.0)]
    assert all(r["window"] is None for r in rows if r["id"] != "long")
    # whole-file = length-weighted mean of the windows (all 10 s here)
    mean = np.mean([[w[f"prob_{c}"] for c in CLASSES] for w in wins], axis=0)
    assert np.allclose(mean, [whole["long"][f"prob_{c}"] for c in CLASSES], atol=1e-5)
    csv_text = format_rows(rows, CLASSES, "csv")
    assert csv_text.splitlines()[0].startswith("id,path,window,start,end,duration,label,prob_angry")


def test_classify_batch_matches_classify_file_and_the_model(tmp_path, audio_model):
    clf = EmotionClassifier.from_pretrained(audio_model)
    x = tone(880.0, 0.4, np.random.default_rng(1), 16000)
    sf.write(str(tmp_path / "x.wav"), x, 16000, subtype="FLOAT")
    a, b = clf.classify_batch([x, np.stack([x, x], axis=1)], sample_rate=16000)
    f = clf.classify_file(tmp_path / "x.wav")
    assert a.probs == pytest.approx(f.probs, abs=1e-6) and a.probs == pytest.approx(b.probs, abs=1e-6)
    with torch.no_grad():
        logits = clf.model({"audio": torch.from_numpy(x)[None], "audio_mask": torch.ones(1, len(x), dtype=torch.bool)})
    assert list(a.probs.values()) == pytest.approx(torch.softmax(logits, -1)[0].tolist(), abs=1e-6)
    # shorter windows are configurable
    short = EmotionClassifier.from_pretrained(audio_model, window_s=0.2, overlap_s=0.05)
    assert len(short.classify_waveform(x, 16000).windows) == 3


def test_run_folder_resolves_to_its_model(tmp_path, audio_model):
    import shutil

    shutil.copytree(audio_model, tmp_path / "run" / "model")
    clf = EmotionClassifier.from_pretrained(tmp_path / "run")
    assert clf.task == "audio" and clf.classes == list(CLASSES)
    assert audio_files([tmp_path]) == []


def test_fusion_model_predicts_with_given_text_and_refuses_without(tmp_path, fusion_model):
    clf = EmotionClassifier.from_pretrained(fusion_model)
    wav = _wav(tmp_path / "a.wav", 0.5, 16000)
    p = clf.classify_file(wav, text="I am so happy today")
    q = clf.classify_file(wav, text="this is terrible and I hate it")
    assert p.text == "I am so happy today" and p.label in CLASSES
    assert p.probs != q.probs  # the text reaches the prediction
    with pytest.raises(ValueError, match="needs the text of each recording"):
        clf.classify_file(wav)
    rows = predict_rows(clf, [wav], transcripts={"other": "x"}, progress=False)
    assert "no transcript with id 'a'" in rows[0]["error"]


def test_cli_predict_writes_rows_and_error_rows(tmp_path, audio_model, fusion_model, capsys):
    import json

    from mmser.cli import main

    d = tmp_path / "in"
    d.mkdir()
    _wav(d / "a.wav", 0.5, 44100)
    _wav(d / "b.flac", 12.0, 8000, channels=2)
    (d / "broken.wav").write_bytes(b"RIFF....nonsense")
    out = tmp_path / "preds.csv"
    assert main(["predict", str(audio_model), str(d), "--out", str(out), "--windows"]) == 0
    lines = out.read_text().splitlines()
    assert lines[0].split(",")[:7] == ["id", "path", "window", "start", "end", "duration", "label"]
    assert len(lines) == 1 + 3 + 2  # a, b (+ 2 windows of 12 s), broken
    assert "1 failed" in capsys.readouterr().err
    # JSONL, and only bad files: exit code 2
    out = tmp_path / "p.jsonl"
    assert main(["predict", str(audio_model), str(d / "broken.wav"), "--out", str(out)]) == 2
    assert json.loads(out.read_text())["error"]
    # a fusion model: text given -> rows with the text; none -> one-line error, exit 2
    assert main(["predict", str(fusion_model), str(d / "a.wav"), "--text", "hello there"]) == 0
    assert "hello there" in capsys.readouterr().out
    trans = tmp_path / "t.jsonl"
    trans.write_text(json.dumps({"id": "a", "text": "from the file"}) + "\n")
    assert main(["predict", str(fusion_model), str(d / "a.wav"), "--transcripts", str(trans)]) == 0
    assert "from the file" in capsys.readouterr().out
    assert main(["predict", str(fusion_model), str(d / "a.wav")]) == 2
    assert "needs text" in capsys.readouterr().err


def test_fusion_model_predicts_with_asr_text_from_its_recorded_system(tmp_path, fusion_model, monkeypatch):
    """--asr uses the ASR system the model records (here the real offline faster-whisper tiny.en)."""
    import json

    import mmser.text.transcribe as tr

    d = tmp_path / "m"
    d.mkdir()
    config = json.loads((fusion_model / "config.json").read_text())
    config["text"] = {**TEXT, "source": "asr", "asr": {"backend": "faster-whisper", "model": "offline-tiny.en",
                                                       "beam_size": 1, "language": "en", "seed": 7}}
    (d / "config.json").write_text(json.dumps(config))
    (d / "model.safetensors").write_bytes((fusion_model / "model.safetensors").read_bytes())
    asked = []
    real = tr.make_transcriber
    monkeypatch.setattr(tr, "make_transcriber", lambda *a, **k: asked.append((a, k)) or real(*a, **k))
    clf = EmotionClassifier.from_pretrained(d)
    p = clf.classify_file(_wav(tmp_path / "a.wav", 1.0, 22050), asr=True)
    assert asked == [(("faster-whisper", "offline-tiny.en"),
                      {"device": "auto", "language": "en", "beam_size": 1, "seed": 7})]  # the recorded base seed
    assert isinstance(p.text, str) and p.label in CLASSES


def test_fusion_model_transcribes_with_a_recorded_openai_whisper_checkpoint(tmp_path, fusion_model):
    """The other ASR backend a model can record: openai-whisper with a .pt checkpoint (a tiny random
    one here: garbage text, real plumbing), loaded on first use and reused for the next file."""
    import json

    import torch
    from whisper.model import ModelDimensions

    torch.manual_seed(0)
    dims = ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=16, n_audio_head=2, n_audio_layer=1,
                           n_vocab=51864, n_text_ctx=8, n_text_state=16, n_text_head=2, n_text_layer=1)
    ckpt = tmp_path / "tiny-random.pt"
    torch.save({"dims": dims.__dict__, "model_state_dict": random_openai_whisper_state(dims)}, ckpt)
    d = tmp_path / "m"
    d.mkdir()
    config = json.loads((fusion_model / "config.json").read_text())
    config["text"] = {**TEXT, "source": "asr", "asr": {"backend": "openai-whisper", "model": str(ckpt),
                                                       "beam_size": 1, "language": "en", "seed": 7}}
    (d / "config.json").write_text(json.dumps(config))
    (d / "model.safetensors").write_bytes((fusion_model / "model.safetensors").read_bytes())
    clf = EmotionClassifier.from_pretrained(d)
    first = clf.classify_file(_wav(tmp_path / "a.wav", 1.0, 16000), asr=True)
    backend = clf._transcriber
    second = clf.classify_file(_wav(tmp_path / "b.wav", 0.5, 8000), asr=True)
    assert type(backend).__name__.lower().startswith("openai") and clf._transcriber is backend
    assert isinstance(first.text, str) and isinstance(second.text, str) and first.label in CLASSES


def test_demo_shows_predict_rows_of_an_audio_and_a_fusion_model(tmp_path, audio_model, fusion_model):
    import json
    import shutil

    from helpers import write_toy_corpus

    from mmser.data.manifest import load_manifest
    from mmser.demo import show_predictions

    records = load_manifest(write_toy_corpus(tmp_path / "toy", per_class=1, sessions=(1,)))
    out = tmp_path / "demo"
    shutil.copytree(audio_model, out / "runs" / "vft" / "s1-seed0" / "model")
    shutil.copytree(fusion_model, out / "runs" / "fusion-concat-asr" / "s1-seed0" / "model")
    asr = tmp_path / "asr.jsonl"
    asr.write_text("".join(json.dumps({"id": r["id"], "text": f"words of {r['id']}", "backend": "faster-whisper",
                                       "model": "offline-tiny.en", "beam_size": 5, "language": "en"}) + "\n"
                           for r in records))
    audio_block, fusion_block = show_predictions(out, records, asr, n=2)
    assert audio_block.startswith("$ mmser predict") and "--transcripts" in fusion_block
    for block in (audio_block, fusion_block):
        lines = block.splitlines()
        assert lines[1].startswith("id,path,window") and len(lines) == 2 + 2 + 1  # command, header, 2 rows, labels
        assert ",," in lines[2] and "error" not in lines[2].split(",")[-1]
    assert "words of" in fusion_block


def test_one_reader_for_headers_too(tmp_path):
    """prepare and the pre-training file check read headers through mmser.audio, with its errors."""
    from mmser.audio import UnreadableAudio, audio_info

    info = audio_info(_wav(tmp_path / "a.wav", 0.5, 8000))
    assert (info.samplerate, info.channels, info.frames) == (8000, 1, 4000)
    (tmp_path / "junk.wav").write_bytes(b"not audio at all")
    with pytest.raises(UnreadableAudio, match=r"junk\.wav: cannot read audio \(") as e:
        audio_info(tmp_path / "junk.wav")
    assert e.value.reason and "\n" not in e.value.reason
    with pytest.raises(FileNotFoundError, match=r"gone\.wav: audio file not found"):
        audio_info(tmp_path / "gone.wav")


def test_transcripts_file_rules(tmp_path):
    """mmser predict --transcripts: paths relative to the file, one ASR system per file, a half-written
    last line ignored (an interrupted `mmser transcribe`), a complete one without a newline kept."""
    import json

    from mmser.inference import Transcripts

    (tmp_path / "t").mkdir()
    (tmp_path / "a").mkdir()
    audio = _wav(tmp_path / "a" / "x.wav", 0.3, 16000)
    asr = {"backend": "faster-whisper", "model": "offline-tiny.en", "beam_size": 5, "language": "en"}
    f = tmp_path / "t" / "t.jsonl"
    f.write_text(json.dumps({"path": "../a/x.wav", "text": "by path", **asr}) + "\n"
                 + json.dumps({"id": "y", "text": "by id", **asr}) + "\n"
                 + json.dumps({"id": "z", "text": "last", **asr}))
    t = Transcripts.load(f)
    assert t.text_for(audio) == "by path" and t.text_for(tmp_path / "elsewhere" / "y.flac") == "by id"
    assert t.text_for(Path("z.wav")) == "last"
    with pytest.raises(ValueError, match="no transcript with id 'w'"):
        t.text_for(Path("w.wav"))
    f.write_text(f.read_text() + "\n" + '{"id": "q", "te')  # cut mid-write
    assert set(Transcripts.load(f).by_id) == {"y", "z"}
    f.write_text(json.dumps({"id": "y", "text": "a", **asr}) + "\n"
                 + json.dumps({"id": "z", "text": "b", **asr, "model": "large-v3"}) + "\n")
    with pytest.raises(ValueError, match=r"t\.jsonl:2: a transcript of ASR system .*one file, one ASR system"):
        Transcripts.load(f)
    f.write_text('{"id": "y", "text": 3}\n{"id": "z", "text": "b"}\n')
    with pytest.raises(ValueError, match=r"t\.jsonl:1: a transcript line needs \"text\""):
        Transcripts.load(f)
