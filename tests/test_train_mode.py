"""Training from a pretrained FOLDER runs in train mode (dropout on, TAPT's Gumbel quantizer on).

Hugging Face's `from_pretrained` returns models in eval mode and Lightning 2.x does not switch them
back; randomly initialised models start in train mode, so only the loaded path shows the bug. Every
test here loads its encoder the way a real checkpoint loads (save_pretrained -> encoder.name=DIR).
"""

from __future__ import annotations

import pytest
import torch
from helpers import (  # noqa: F401 (single_torch_thread: autouse fixture)
    single_torch_thread,
    tiny_config,
    tiny_encoder_config,
    write_toy_corpus,
)
from pytorch_lightning.callbacks import Callback
from transformers import Wav2Vec2ForPreTraining, Wav2Vec2Model

from mmser.models.wav2vec2 import make_hf_config


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainmode")
    manifest = write_toy_corpus(root / "toy", per_class=2, durations=(0.4, 0.6))
    torch.manual_seed(0)
    hf = make_hf_config(tiny_encoder_config())
    hf.hidden_dropout = hf.attention_dropout = hf.feat_proj_dropout = 0.1  # dropout to observe
    Wav2Vec2ForPreTraining(hf).save_pretrained(root / "pretrained")
    return root, manifest, str(root / "pretrained")


class DropoutSpy:
    """Counts nn.Dropout calls while gradients are on (training steps), by the module's mode."""

    def __init__(self, monkeypatch):
        self.train_calls = self.eval_calls = 0
        real = torch.nn.Dropout.forward

        def forward(module, x):
            if torch.is_grad_enabled():
                if module.training:
                    self.train_calls += 1
                else:
                    self.eval_calls += 1
            return real(module, x)

        monkeypatch.setattr(torch.nn.Dropout, "forward", forward)


class ModeRecorder(Callback):
    """Whether every module is in train mode at each training batch, and none at each test batch."""

    def __init__(self):
        self.train, self.test = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train.append(all(m.training for m in pl_module.modules()))

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.test.append(any(m.training for m in pl_module.modules()))


def test_from_pretrained_returns_eval_mode(toy):
    """The precondition of the bug: the loaded model is in eval mode."""
    _, _, folder = toy
    assert not Wav2Vec2Model.from_pretrained(folder).training


def test_vft_from_a_folder_trains_with_dropout_and_tests_in_eval_mode(toy, tmp_path, monkeypatch):
    from mmser.training.run import run_one

    _, manifest, folder = toy
    cfg = tiny_config(tmp_path, manifest, [f"encoder.name={folder}", "finetune.epochs=2"])
    spy, rec = DropoutSpy(monkeypatch), ModeRecorder()
    m = run_one(cfg, test_session=1, seed=0, run_dir=tmp_path / "run", callbacks=[rec])
    assert rec.train and all(rec.train)  # the whole module, frozen parts included (the reference)
    assert rec.test and not any(rec.test)
    assert spy.train_calls > 0 and spy.eval_calls == 0
    assert m["encoder"]["name_or_path"] == folder and m["encoder"]["revision"] is None


def test_tapt_from_a_folder_takes_the_gumbel_path_and_trains_the_codebooks(toy, tmp_path, monkeypatch):
    from mmser.data.manifest import load_manifest, split_fold
    from mmser.training.tapt import run_tapt

    _, manifest, folder = toy
    cfg = tiny_config(tmp_path, manifest, [f"encoder.name={folder}", "pretrain=tapt", "tapt.total_steps=3",
                                           "tapt.warmup_steps=1", "tapt.hold_steps=1", "tapt.mask_time_length=4",
                                           "tapt.num_negatives=5", "tapt.max_batch_seconds=4.0"])
    gumbel_calls = []
    real_gumbel = torch.nn.functional.gumbel_softmax

    def gumbel(*args, **kwargs):
        gumbel_calls.append(kwargs.get("tau"))
        return real_gumbel(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "gumbel_softmax", gumbel)
    spy = DropoutSpy(monkeypatch)
    fold = split_fold(load_manifest(manifest), 1, cfg.data)
    out = run_tapt(cfg, fold, tmp_path / "tapt")
    assert len(gumbel_calls) == 3 and set(gumbel_calls) == {1.0}  # constant temperature 1 (4.10)
    assert spy.train_calls > 0 and spy.eval_calls == 0
    before = Wav2Vec2ForPreTraining.from_pretrained(folder).quantizer.codevectors
    after = Wav2Vec2ForPreTraining.from_pretrained(str(tmp_path / "tapt" / "encoder")).quantizer.codevectors
    assert not torch.equal(before, after)  # gradient reached the codebooks
    assert out == tmp_path / "tapt" / "encoder"


def test_ptapt_stages_from_a_folder_train_with_dropout(toy, tmp_path, monkeypatch):
    from mmser.training.ptapt import run_ptapt

    _, manifest, folder = toy
    cfg = tiny_config(tmp_path, manifest, [f"encoder.name={folder}", "pretrain=ptapt",
                                           "ptapt.frame_model=wav2vec2", "ptapt.frame_dim=16",
                                           "ptapt.frame_head_hidden=8", "ptapt.frame_lstm_hidden=8",
                                           "ptapt.frame_mask_feature_length=8", "ptapt.frame_steps=2",
                                           "ptapt.frame_warmup_steps=1", "ptapt.frame_hold_steps=0",
                                           "ptapt.frame_batch_size=8", "ptapt.cluster_sizes=[4,8]",
                                           "ptapt.kmeans_iters=2", "ptapt.total_steps=2", "ptapt.warmup_steps=1",
                                           "ptapt.hold_steps=0", "ptapt.max_batch_seconds=4.0",
                                           "ptapt.mask_time_length=4"])
    from mmser.data.manifest import load_manifest, split_fold

    spy = DropoutSpy(monkeypatch)
    fold = split_fold(load_manifest(manifest), 1, cfg.data)
    run_ptapt(cfg, fold, tmp_path / "ptapt")
    assert spy.train_calls > 0 and spy.eval_calls == 0
