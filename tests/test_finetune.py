"""ClassifierModule: weighted loss, optimiser over trainable parameters only, evaluation that
collects de-duplicated predictions whose logged metrics equal mmser.metrics, and learning."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import (  # noqa: F401 (single_torch_thread: autouse fixture)
    make_batch,
    single_torch_thread,
    tiny_audio_classifier,
)
from torch import nn
from torch.utils.data import DataLoader

from mmser.labels import CLASSES
from mmser.metrics import classification_report
from mmser.training.finetune import ClassifierModule


class _TableModel(nn.Module):
    """Logits looked up by utterance id (plus one trainable scalar so an optimiser has work)."""

    def __init__(self, table: dict[str, list[float]]):
        super().__init__()
        self.table = table
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, batch):
        return torch.tensor([self.table[u] for u in batch["ids"]]) + self.bias


def _loader(batches):
    """Ready-made batch dicts as a DataLoader (no collation)."""
    return DataLoader(batches, batch_size=None)


def _trainer(**kw):
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **kw)


def test_weighted_loss_is_the_weighted_mean_nll():
    w = torch.tensor([0.1, 0.2, 0.3, 0.4])
    module = ClassifierModule(_TableModel({}), class_weights=w)
    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 3, 1])
    nll = -torch.log_softmax(logits, -1)[torch.arange(6), labels]
    expected = (w[labels] * nll).sum() / w[labels].sum()
    assert torch.allclose(module.loss(logits, labels), expected)
    assert torch.allclose(module.loss(logits, labels), F.cross_entropy(logits, labels, weight=w))
    assert torch.allclose(ClassifierModule(_TableModel({})).loss(logits, labels), nll.mean())
    with pytest.raises(ValueError, match="class_weights"):
        ClassifierModule(_TableModel({}), class_weights=torch.ones(3))


def test_optimizer_holds_only_trainable_parameters():
    model = tiny_audio_classifier()
    opt = ClassifierModule(model, lr=1e-4).configure_optimizers()
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["lr"] == 1e-4
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    assert in_opt == trainable and frozen and not in_opt & frozen


def test_test_metrics_come_from_deduplicated_predictions():
    ids = [f"u{i}" for i in range(6)]
    labels = [0, 1, 2, 3, 0, 1]
    table = {u: [0.0] * 4 for u in ids}
    preds = [0, 1, 2, 0, 3, 1]  # 4 of 6 right
    for u, p in zip(ids, preds, strict=True):
        table[u][p] = 3.0
    batches = [
        {"ids": ids[:4], "labels": torch.tensor(labels[:4])},
        {"ids": ids[4:], "labels": torch.tensor(labels[4:])},
        {"ids": ids[:2], "labels": torch.tensor(labels[:2])},  # a repeated batch (DDP wrap-around)
    ]
    w = torch.tensor([0.4, 0.3, 0.2, 0.1])
    module = ClassifierModule(_TableModel(table), class_weights=w)
    out = _trainer().test(module, dataloaders=_loader(batches), verbose=False)[0]
    rows = module.test_predictions
    assert [r["id"] for r in rows] == ids
    assert [r["pred"] for r in rows] == preds and [r["true"] for r in rows] == labels
    ref = classification_report(labels, preds, CLASSES)
    assert out["test/ua"] == pytest.approx(ref["ua"]) and out["test/wa"] == pytest.approx(4 / 6)
    assert out["test/macro_f1"] == pytest.approx(ref["macro_f1"])
    logits = torch.tensor([table[u] for u in ids])
    assert out["test/loss"] == pytest.approx(float(F.cross_entropy(logits, torch.tensor(labels), weight=w)),
                                             rel=1e-5)
    assert all(sum(r["probs"]) == pytest.approx(1.0) for r in rows)


def test_a_tiny_model_learns_a_separable_toy_task():
    # Class-dependent tone frequency, 0.25 s clips: learnable by the frozen random CNN + transformer.
    torch.manual_seed(0)
    freqs = [1760.0, 880.0, 220.0, 440.0]
    t = torch.arange(4000) / 16000

    def batch(seed):
        g = torch.Generator().manual_seed(seed)
        labels = torch.arange(16) % 4
        phase = torch.rand(16, 1, generator=g) * 6.28
        audio = 0.5 * torch.sin(2 * torch.pi * torch.tensor(freqs)[labels][:, None] * t + phase)
        return {"ids": [f"s{seed}-{i}" for i in range(16)], "audio": audio,
                "audio_mask": torch.ones_like(audio, dtype=torch.bool), "labels": labels}

    train = [batch(s) for s in range(6)]
    module = ClassifierModule(tiny_audio_classifier(), class_weights=torch.full((4,), 0.25), lr=1e-3)
    trainer = _trainer(max_epochs=4, log_every_n_steps=1)
    trainer.fit(module, train_dataloaders=_loader(train))
    out = trainer.test(module, dataloaders=_loader([batch(100), batch(101)]), verbose=False)[0]
    assert out["test/ua"] >= 0.75, out
    s = module.training_summary()
    assert s["train_steps"] == 24 and s["padding_efficiency"] == 1.0 and s["throughput"] > 0


def test_padding_efficiency_is_tracked_from_the_masks():
    module = ClassifierModule(tiny_audio_classifier(), class_weights=None)
    module.train()
    module.training_step(make_batch([800, 400]), 0)
    assert module.training_summary()["padding_efficiency"] == pytest.approx(1200 / 1600)
