"""One saved-model format for every task: save -> load gives identical predictions; crafted folders
cannot run code at load."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from helpers import TEXT_SIDE as TEXT
from helpers import (  # noqa: F401 (single_torch_thread: autouse fixture)
    make_batch,
    single_torch_thread,
    tiny_audio_classifier,
    tiny_encoder_config,
)

from mmser.labels import CLASSES
from mmser.models.fusion import (
    ConcatFusion,
    CrossAttentionFusion,
    DecisionFusion,
    FusionClassifier,
    TextClassifier,
)
from mmser.models.pretrained import ModelFormatError, from_pretrained, save_pretrained
from mmser.models.text_encoder import TextEncoder, WithTextEncoder
from mmser.models.wav2vec2 import AudioEncoder


def _meta(task: str) -> dict:
    return {"task": task, "classes": list(CLASSES), "sample_rate": 16000,
            "text": TEXT if task != "audio" else None}


def _with_text(batch: dict, dim: int = 12, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = len(batch["ids"])
    mask = torch.ones(n, 5, dtype=torch.bool)
    mask[0, 3:] = False
    return {**batch, "text": torch.randn(n, 5, dim, generator=g), "text_mask": mask,
            "text_pooled": torch.randn(n, dim, generator=g)}


def _tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=50, hidden_size=12, num_hidden_layers=1, num_attention_heads=2,
                                intermediate_size=16, max_position_embeddings=32))


def _models():
    torch.manual_seed(0)
    enc = lambda: AudioEncoder.from_config(tiny_encoder_config())  # noqa: E731
    h = enc().hidden_size
    yield "audio", tiny_audio_classifier(), "audio"
    yield "text", TextClassifier(12, hidden=8), "text"
    yield "concat", FusionClassifier(enc(), ConcatFusion(h, 12, hidden=8)), "fusion"
    yield "decision", FusionClassifier(enc(), DecisionFusion(h, 12, hidden=8, weights="global", rule="linear"),
                                       branch_loss_weight=0.5), "fusion"
    yield "cross_attention", FusionClassifier(enc(), CrossAttentionFusion(h, 12, hidden=8, num_heads=2),
                                              freeze_audio=True), "fusion"
    yield "text_finetuned", WithTextEncoder(TextClassifier(12, hidden=8), TextEncoder(_tiny_bert()), 1e-5), "text"


@pytest.mark.parametrize("name", ["audio", "text", "concat", "decision", "cross_attention", "text_finetuned"])
def test_every_task_round_trips_with_identical_predictions(tmp_path, name):
    model, task = next((m, t) for n, m, t in _models() if n == name)
    model.eval()
    batch = _with_text(make_batch([4000, 2500]))
    batch["text_ids"] = torch.tensor([[1, 5, 7, 2], [1, 9, 2, 0]])
    batch["text_ids_mask"] = batch["text_ids"] != 0
    save_pretrained(model, tmp_path / "m", _meta(task), card="card")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "mmser" and config["classes"] == list(CLASSES)
    assert config["sample_rate"] == 16000 and (config["text"] is not None) == (task != "audio")
    saved = from_pretrained(tmp_path / "m")
    assert not saved.model.training and saved.task == task
    with torch.no_grad():
        assert torch.equal(model(batch), saved.model(batch))
    assert not (tmp_path / "m" / "pytorch_model.bin").exists()


def test_a_text_or_fusion_model_needs_its_text_side(tmp_path):
    with pytest.raises(ValueError, match="needs meta\\['text'\\]"):
        save_pretrained(TextClassifier(12), tmp_path / "m", {**_meta("text"), "text": None})


def test_a_crafted_model_folder_cannot_run_code(tmp_path):
    """Pickled weights (model.safetensors holding a pickle, or a pytorch_model.bin) and class names
    in config.json are refused without running anything."""
    marker = tmp_path / "pwned"

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    model = tiny_audio_classifier()
    good = tmp_path / "good"
    save_pretrained(model, good, _meta("audio"))
    # 1) a pickle where the safetensors file should be
    bad = tmp_path / "pickle_weights"
    bad.mkdir()
    (bad / "config.json").write_text((good / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(Exception) as e:
        from_pretrained(bad)
    assert "model.safetensors" in str(e.value) or "header" in str(e.value).lower()
    # 2) only a pytorch_model.bin: never read
    bin_only = tmp_path / "bin_only"
    bin_only.mkdir()
    (bin_only / "config.json").write_text((good / "config.json").read_text())
    (bin_only / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        from_pretrained(bin_only)
    # 3) a config naming something that is not an mmser class
    for arch in ({"model": "os.system"}, {"model": "AudioClassifier", "encoder_kind": "__import__"},
                 {"model": "FusionClassifier", "audio_encoder": {"encoder_kind": "subprocess"}}):
        crafted = tmp_path / f"arch{len(list(tmp_path.iterdir()))}"
        crafted.mkdir()
        (crafted / "config.json").write_text(json.dumps({**json.loads((good / "config.json").read_text()),
                                                         "architecture": arch}))
        (crafted / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
        with pytest.raises(ModelFormatError):
            from_pretrained(crafted)
    # 4) not a model folder at all
    with pytest.raises(FileNotFoundError):
        from_pretrained(tmp_path / "nowhere" / "x")
    assert not marker.exists()


def test_a_run_refuses_a_saved_model_that_does_not_reproduce_its_outputs(tmp_path):
    from mmser.training.run import check_saved_model

    model = tiny_audio_classifier().eval()
    save_pretrained(model, tmp_path / "m", _meta("audio"))
    batch = make_batch([3000, 2000])
    check_saved_model(model, tmp_path / "m", batch)  # the saved folder reproduces the model
    with torch.no_grad():
        model.classifier.bias.add_(1.0)  # the trained model moved on after saving
    with pytest.raises(RuntimeError, match="does not reproduce"):
        check_saved_model(model, tmp_path / "m", batch)


def test_model_card_has_hub_metadata_scores_config_citation_and_caveat():
    import yaml

    from mmser.card import model_card

    meta = {**_meta("fusion"), "config": {"experiment": "f-concat", "task": "fusion",
                                          "data": {"manifest": "runs/demo/synth/manifest.jsonl"},
                                          "encoder": {"name": "random"}}}
    card = model_card(meta, {"test": {"ua": 0.5, "wa": 0.625, "n": 16}, "test_session": 2})
    header = yaml.safe_load(card.split("---")[1])
    assert header["pipeline_tag"] == "audio-classification" and "speech-emotion-recognition" in header["tags"]
    scores = header["model-index"][0]["results"][0]["metrics"]
    assert [(m["name"], m["value"]) for m in scores] == [("UA", 0.5), ("WA", 0.625)]
    assert "arXiv:2110.06309" in card and "synthetic corpus" in card and "randomly initialised" in card
    assert "experiment: f-concat" in card and "minilm-offline" in card


def test_hub_ids_download_only_the_model_files_and_push_uploads_the_folder(tmp_path, monkeypatch):
    """No network in tests: the Hub client is replaced; what mmser asks of it is checked."""
    import huggingface_hub

    folder = save_pretrained(tiny_audio_classifier(), tmp_path / "m", _meta("audio"), card="---\n---\n")
    asked = {}

    def fake_download(repo_id, allow_patterns=None, **kw):
        asked["download"] = (repo_id, sorted(allow_patterns))
        return str(folder)

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private, exist_ok):
            asked["create"] = (repo_id, private)

        def upload_folder(self, repo_id, folder_path, allow_patterns):
            asked["upload"] = (repo_id, folder_path, sorted(allow_patterns))
            return "https://huggingface.co/user/mmser-tiny/commit/1"

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_download)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    from mmser.models.pretrained import push_to_hub

    saved = from_pretrained("user/mmser-tiny")
    assert saved.task == "audio"
    assert asked["download"] == ("user/mmser-tiny", ["README.md", "config.json", "model.safetensors"])
    assert push_to_hub(folder, "user/mmser-tiny").endswith("/commit/1")
    assert asked["upload"] == ("user/mmser-tiny", str(folder), ["README.md", "config.json", "model.safetensors"])
    assert asked["create"] == ("user/mmser-tiny", True)

    # `mmser push RUN_DIR REPO`: the run folder's model/ goes up, public only when asked
    from mmser.cli import main

    run = tmp_path / "run"
    run.mkdir()
    folder.rename(run / "model")
    assert main(["push", str(run), "user/mmser-run", "--public"]) == 0
    assert asked["upload"] == ("user/mmser-run", str(run / "model"), ["README.md", "config.json", "model.safetensors"])
    assert asked["create"] == ("user/mmser-run", False)
    assert main(["push", str(tmp_path / "nothing"), "user/x"]) == 2


def test_a_model_folder_from_before_the_format_is_one_clear_error(tmp_path):
    """Run folders of mmser before issue 10 saved config.json with 'architecture' (None for text and
    fusion models) and no 'format': loading says what it is and what to do."""
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(json.dumps({"task": "fusion", "architecture": None, "classes": ["neu"]}))
    with pytest.raises(ModelFormatError, match=r"old/config\.json: a model folder from before mmser's model "
                                               r"format 'mmser-classifier/1'.*train it again"):
        from_pretrained(old)
