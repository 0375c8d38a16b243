"""Text-only and fusion runs through the same runner, with the real offline MiniLM text encoder."""

from __future__ import annotations

import pytest
import torch
from helpers import (  # noqa: F401 (single_torch_thread: autouse fixture)
    CONFIGS,
    single_torch_thread,
    tiny_config,
    write_toy_corpus,
)

from mmser.training.multimodal import audio_run_model_dir, run_task
from mmser.training.run import run_one


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("mm")
    return root, write_toy_corpus(root / "toy", per_class=2)


def _cfg(root, manifest, files=(), overrides=()):
    cfg = tiny_config(root, manifest, [f"text.cache_dir={root / 'cache'}", *overrides])
    from mmser.config import load_config

    if files:  # re-apply the tiny overlay after the task file so the tiny encoder/trainer win
        cfg = load_config(CONFIGS / "base.yaml", CONFIGS / "vft.yaml", *files, CONFIGS / "tiny.yaml",
                          overrides=[f"output_dir={root / 'runs'}", f"data.manifest={manifest}",
                                     f"text.cache_dir={root / 'cache'}", *overrides])
    return cfg


def test_text_only_run_learns_from_gold_text(toy):
    root, manifest = toy
    cfg = _cfg(root, manifest, [CONFIGS / "text.yaml"], ["experiment=text", "finetune.epochs=15"])
    m = run_task(cfg, test_session=1, seed=0, run_dir=root / "runs" / "text" / "s1-seed0")
    # The toy transcripts name the emotion code ("tone ang 0"): text alone should learn it.
    assert m["test"]["n"] == 16 and m["test"]["ua"] >= 0.75, m["test"]
    assert m["test_improvised"]["n"] == 8
    # The text features were cached once on disk and are reused.
    caches = list((root / "cache").rglob("*.safetensors"))
    assert len(caches) == 1


@pytest.mark.parametrize("head", ["concat", "decision", "cross_attention"])
def test_fusion_heads_train_end_to_end_from_a_finished_audio_run(toy, head):
    root, manifest = toy
    audio_cfg = _cfg(root, manifest, (), ["experiment=audio", "finetune.epochs=1"])
    audio_dir = root / "runs" / "audio"
    run_one(audio_cfg, test_session=2, seed=0, run_dir=audio_dir / "s2-seed0")
    cfg = _cfg(root, manifest, [CONFIGS / "fusion_concat.yaml"],
               [f"experiment=f-{head}", f"fusion.head={head}", f"fusion.audio_runs={audio_dir}",
                "fusion.hidden_size=32", "fusion.num_heads=2", "finetune.epochs=2"])
    run_dir = root / "runs" / f"f-{head}" / "s2-seed0"
    m = run_task(cfg, test_session=2, seed=0, run_dir=run_dir)
    assert m["test"]["n"] == 16 and 0.0 <= m["test"]["ua"] <= 1.0
    assert (run_dir / "predictions.csv").read_text().count("\n") == 17
    # A fold without its audio run is a clear error, never a silent fresh encoder.
    with pytest.raises(FileNotFoundError, match="no finished audio run for session 3, seed 0"):
        audio_run_model_dir(audio_dir, 3, 0)


def test_text_encoder_can_be_fine_tuned_inside_fusion(toy):
    """text.freeze=false: token ids in the batches, the real MiniLM trained at its own lr."""
    from safetensors.torch import load_file

    from mmser.config import TextConfig
    from mmser.text.embed import TextEncoderSpec, build_text_model

    root, manifest = toy
    audio_dir = root / "runs" / "audio-ft"
    run_one(_cfg(root, manifest, (), ["experiment=audio-ft", "finetune.epochs=1"]), test_session=4, seed=0,
            run_dir=audio_dir / "s4-seed0")
    cfg = _cfg(root, manifest, [CONFIGS / "fusion_concat.yaml"],
               ["experiment=ft-text", f"fusion.audio_runs={audio_dir}", "fusion.hidden_size=32",
                "finetune.epochs=1", "text.freeze=false", "text.lr=1e-4", "text.max_length=16"])
    run_dir = root / "runs" / "ft-text" / "s4-seed0"
    m = run_task(cfg, test_session=4, seed=0, run_dir=run_dir)
    assert m["test"]["n"] == 16
    saved = load_file(str(run_dir / "model" / "model.safetensors"))
    key = "text_encoder.model.embeddings.word_embeddings.weight"
    assert key in saved  # the text encoder is part of the trained model
    _, original = build_text_model(TextEncoderSpec.from_config(TextConfig()))
    before = original.embeddings.word_embeddings.weight.detach()
    assert not torch.equal(saved[key], before)  # it was trained
    # 8 Adam steps move a weight by about lr per step at most: text.lr 1e-4 -> < 8e-4 (the
    # head's 1e-3 would allow ~8e-3), so the text encoder had its own, smaller learning rate.
    assert (saved[key] - before).abs().max() < 1.6e-3
