"""Text encoders and the frozen-feature cache, on the real offline all-MiniLM-L6-v2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mmser.text.embed as embed
from mmser.config import TextConfig
from mmser.text.embed import TextEncoderSpec, build_text_model, encode_texts, text_features

SHORT = "I am so happy today."
LONG = "This is a much longer sentence, padded against the short one, about a train station far away."


def _records(transcripts: list[str | None]) -> list[dict]:
    return [{"id": f"Ses01F_impro01_F{i:03d}", "session": 1, "transcript": t, "label": "neutral"}
            for i, t in enumerate(transcripts)]


@pytest.fixture(scope="module")
def minilm():
    return build_text_model(TextEncoderSpec(), local_files_only=True)


def test_spec_from_config() -> None:
    spec = TextEncoderSpec.from_config(TextConfig(pooling="cls", max_length=32))
    assert (spec.encoder, spec.pooling, spec.max_length) == ("minilm-offline", "cls", 32)
    assert Path(spec.path, "config.json").is_file()
    with pytest.raises(ValueError, match="pooling"):
        TextEncoderSpec(pooling="max")  # type: ignore[arg-type]


def test_known_words_get_real_ids(minilm) -> None:
    tokenizer, model = minilm
    ids = tokenizer("hello world, I am happy", add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["hello", "world", ",", "i", "am", "happy"]
    assert model.config.hidden_size == 384
    assert all(p.requires_grad for p in model.parameters())  # ready to fine-tune
    _, other = build_text_model(TextEncoderSpec(), local_files_only=True)
    assert other is not model  # a fresh instance per call


def test_vocab_check_catches_an_all_unk_tokenizer() -> None:
    from transformers import BertTokenizer

    broken = BertTokenizer(vocab={"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3})
    with pytest.raises(RuntimeError, match="did not load"):
        embed._check_vocab(broken, "broken")


def test_cls_and_mean_differ_and_mean_ignores_padding(minilm) -> None:
    tokenizer, _ = minilm
    mean = TextEncoderSpec(pooling="mean")
    cls = TextEncoderSpec(pooling="cls")
    (tok_alone, mean_alone), = encode_texts([SHORT], mean, local_files_only=True)
    (tok_batch, mean_batch), (tok_long, _) = encode_texts([SHORT, LONG], mean, local_files_only=True)
    n = len(tokenizer(SHORT)["input_ids"])
    assert tok_alone.shape == (n, 384) and tok_batch.shape == (n, 384) and tok_long.shape[0] > n
    torch.testing.assert_close(mean_batch, mean_alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(tok_batch, tok_alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(mean_alone, tok_alone.mean(0), atol=1e-5, rtol=0)
    (tok_c, cls_alone), = encode_texts([SHORT], cls, local_files_only=True)
    torch.testing.assert_close(cls_alone, tok_c[0])
    assert (cls_alone - mean_alone).abs().max() > 1e-2
    assert mean_alone.dtype == torch.float32


def test_sentence_pooling_matches_sentence_transformers(minilm) -> None:
    from sentence_transformers import SentenceTransformer

    texts = [SHORT, LONG, ""]
    ours = encode_texts(texts, TextEncoderSpec(pooling="sentence"), local_files_only=True)
    mean = encode_texts(texts, TextEncoderSpec(pooling="mean"), local_files_only=True)
    reference = SentenceTransformer(TextEncoderSpec().path, device="cpu").encode(texts, convert_to_tensor=True)
    for (tok_s, pooled_s), (tok_m, pooled_m), ref in zip(ours, mean, reference, strict=True):
        torch.testing.assert_close(pooled_s, ref.float(), atol=1e-5, rtol=0)
        # all-MiniLM-L6-v2's own pipeline = our masked mean, L2-normalised.
        torch.testing.assert_close(pooled_s, torch.nn.functional.normalize(pooled_m, dim=0), atol=1e-5, rtol=0)
        torch.testing.assert_close(tok_s, tok_m, atol=1e-5, rtol=0)


def test_truncation_to_max_length() -> None:
    (tokens, _), = encode_texts([LONG], TextEncoderSpec(max_length=8), local_files_only=True)
    assert tokens.shape == (8, 384)


def test_cached_features_equal_fresh_ones_and_hit_on_rerun(tmp_path: Path, monkeypatch) -> None:
    spec = TextEncoderSpec(pooling="mean")
    records = _records([SHORT, LONG, None, "Excuse me. [LAUGHTER]"])
    feats = text_features(records, "gold", spec, tmp_path, local_files_only=True)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1 and files[0].name.startswith("minilm-offline__gold__mean__L64__")
    fresh = encode_texts([SHORT, LONG, "", "Excuse me. [LAUGHTER]"], spec, local_files_only=True)
    for r, (tokens, pooled) in zip(records, fresh, strict=True):
        torch.testing.assert_close(feats[r["id"]].tokens, tokens, atol=1e-5, rtol=0)
        torch.testing.assert_close(feats[r["id"]].pooled, pooled, atol=1e-5, rtol=0)
    assert feats[records[2]["id"]].tokens.shape == (2, 384)  # null transcript -> [CLS] [SEP]

    def no_encoding(*args, **kwargs):
        raise AssertionError("cache miss: features were recomputed")

    monkeypatch.setattr(embed, "encode_texts", no_encoding)
    again = text_features(records, "gold", spec, tmp_path, local_files_only=True)
    assert list(again) == [r["id"] for r in records]
    for i in again:
        assert torch.equal(again[i].tokens, feats[i].tokens)
        assert torch.equal(again[i].pooled, feats[i].pooled)


def test_changed_texts_are_recomputed(tmp_path: Path) -> None:
    spec = TextEncoderSpec(pooling="cls")
    old = text_features(_records([SHORT, LONG]), "gold", spec, tmp_path, local_files_only=True)
    new = text_features(_records([SHORT, "Something else entirely."]), "gold", spec, tmp_path,
                        local_files_only=True)
    ids = list(old)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    torch.testing.assert_close(new[ids[0]].pooled, old[ids[0]].pooled, atol=1e-5, rtol=0)
    assert (new[ids[1]].pooled - old[ids[1]].pooled).abs().max() > 1e-2


def test_corrupt_cache_file_is_recomputed(tmp_path: Path) -> None:
    spec = TextEncoderSpec()
    records = _records([SHORT])
    first = text_features(records, "gold", spec, tmp_path, local_files_only=True)
    (path,) = tmp_path.glob("*.safetensors")
    path.write_bytes(path.read_bytes()[:100])  # truncated
    again = text_features(records, "gold", spec, tmp_path, local_files_only=True)
    i = records[0]["id"]
    torch.testing.assert_close(again[i].pooled, first[i].pooled)


def test_asr_transcript_source(tmp_path: Path) -> None:
    records = _records([SHORT, LONG])
    trans = tmp_path / "whisper.jsonl"
    trans.write_text(json.dumps({"id": records[0]["id"], "text": LONG, "backend": "faster-whisper",
                                 "model": "m", "beam_size": 5, "language": "en"}) + "\n")
    with pytest.raises(ValueError, match=r"whisper\.jsonl: no transcript for 1 of 2 .*F001"):
        text_features(records, trans, TextEncoderSpec(), tmp_path, local_files_only=True)
    gold = text_features(records[1:], "gold", TextEncoderSpec(), tmp_path, local_files_only=True)
    asr = text_features(records[:1], trans, TextEncoderSpec(), tmp_path, local_files_only=True)
    # The ASR text of utterance 0 is the gold text of utterance 1: same features.
    torch.testing.assert_close(asr[records[0]["id"]].pooled, gold[records[1]["id"]].pooled,
                               atol=1e-5, rtol=0)
    assert any(p.name.startswith("minilm-offline__asr-whisper__") for p in tmp_path.glob("*.safetensors"))


def test_missing_models_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="could not be loaded.*minilm-offline"):
        build_text_model(TextEncoderSpec(encoder="no-such-org/no-such-bert"), local_files_only=True)
    with pytest.raises(FileNotFoundError, match="text encoder directory not found"):
        build_text_model(TextEncoderSpec(encoder=str(tmp_path / "models" / "bert")), local_files_only=True)
    with pytest.raises(ValueError, match="no records"):
        text_features([], "gold", TextEncoderSpec(), tmp_path)


def test_features_plug_into_the_dataset(tmp_path: Path) -> None:
    import numpy as np
    import soundfile as sf

    from mmser.data.dataset import TextFeatures, UtteranceDataset

    wav = tmp_path / "a.wav"
    sf.write(wav, np.zeros(1600, dtype=np.float32), 16000)
    records = [dict(r, path=str(wav), duration=0.1) for r in _records([SHORT])]
    feats = text_features(records, "gold", TextEncoderSpec(), tmp_path, local_files_only=True)
    assert isinstance(feats[records[0]["id"]], TextFeatures)
    item = UtteranceDataset(records, text_features=feats)[0]
    assert torch.equal(item["text"], feats[records[0]["id"]].tokens)
    assert torch.equal(item["text_pooled"], feats[records[0]["id"]].pooled)
