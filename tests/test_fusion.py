"""Fusion heads and the text-only classifier: masking, empty transcripts, decision-fusion algebra,
end-to-end learning on a task that needs both modalities, and the frozen-audio wrapper."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmser.config import FusionConfig
from mmser.models.fusion import (
    ConcatFusion,
    CrossAttentionFusion,
    DecisionFusion,
    FusionClassifier,
    TextClassifier,
    build_fusion_head,
    build_text_classifier,
    masked_mean,
)

HA, HT, C = 12, 10, 4  # audio frame width, text token width, classes

# Fixed class-signal directions shared by every synthetic split.
_dirs = torch.Generator().manual_seed(1234)
AUDIO_DIR = torch.randn(HA, generator=_dirs)
TEXT_DIR = torch.randn(HT, generator=_dirs)
TEXT_DIR_A = torch.randn(HT, generator=_dirs)  # used when the text also carries the audio bit
AUDIO_CLASS_DIRS = torch.randn(C, HA, generator=_dirs)  # one direction per class (complementary task)
TEXT_CLASS_DIRS = torch.randn(C, HT, generator=_dirs)


def _padded(n: int, length: int, min_len: int, dim: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Noise sequences (n, length, dim) of random valid lengths, garbage (x50) in the padding."""
    x = torch.randn(n, length, dim, generator=g)
    lengths = torch.randint(min_len, length + 1, (n,), generator=g)
    mask = torch.arange(length)[None, :] < lengths[:, None]  # (n, length)
    garbage = 50 * torch.randn(n, length, dim, generator=g)
    return torch.where(mask[..., None], x, garbage), mask


def make_task(n: int, seed: int, text_has_audio_bit: bool = False) -> dict[str, Tensor]:
    """Factorised 4-class task: label = 2a + b, bit a only in the audio, bit b only in the text.

    Audio alone or text alone can reach at most 50 % accuracy; both together give 100 %.
    (With text_has_audio_bit the text carries both bits: text alone suffices.)
    """
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 2, (n,), generator=g)
    b = torch.randint(0, 2, (n,), generator=g)
    audio, frame_mask = _padded(n, 8, 2, HA, g)
    text, text_mask = _padded(n, 6, 1, HT, g)
    sa, sb = (2.0 * a - 1)[:, None, None], (2.0 * b - 1)[:, None, None]
    audio = torch.where(frame_mask[..., None], audio + 1.5 * sa * AUDIO_DIR, audio)
    text_signal = sb * TEXT_DIR + (sa * TEXT_DIR_A if text_has_audio_bit else 0.0)
    text = torch.where(text_mask[..., None], text + 1.5 * text_signal, text)
    return _task(audio, frame_mask, text, text_mask, 2 * a + b)


def make_complementary_task(n: int, seed: int) -> dict[str, Tensor]:
    """4-class task where each utterance carries its class in ONE modality (chosen at random),
    the other being pure noise: like a noisy recording with a clear transcript or the reverse.

    Audio alone or text alone: at most 50 % + 50 % / 4 = 62.5 %; both together: 100 %.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (n,), generator=g)
    in_audio = torch.rand(n, generator=g) < 0.5  # (n,) which modality holds the class
    audio, frame_mask = _padded(n, 8, 2, HA, g)
    text, text_mask = _padded(n, 6, 1, HT, g)
    audio_signal = 2.0 * AUDIO_CLASS_DIRS[y] * in_audio[:, None].float()  # (n, HA)
    text_signal = 2.0 * TEXT_CLASS_DIRS[y] * (~in_audio)[:, None].float()  # (n, HT)
    audio = torch.where(frame_mask[..., None], audio + audio_signal[:, None], audio)
    text = torch.where(text_mask[..., None], text + text_signal[:, None], text)
    return _task(audio, frame_mask, text, text_mask, y)


def _task(audio: Tensor, frame_mask: Tensor, text: Tensor, text_mask: Tensor, y: Tensor) -> dict[str, Tensor]:
    return {"audio": audio, "frame_mask": frame_mask, "text": text, "text_mask": text_mask,
            "text_pooled": masked_mean(text, text_mask), "labels": y}


def call(model: nn.Module, d: dict[str, Tensor]) -> Tensor:
    """The tensor-level forward of any head in this file."""
    if isinstance(model, TextClassifier):
        return model.classify(d["text"], d["text_mask"], d.get("text_pooled"))
    return model(d["audio"], d["frame_mask"], d["text"], d["text_mask"], d.get("text_pooled"))


HEADS = {
    "text_mean": lambda: TextClassifier(HT, C, hidden=16, dropout=0.1),
    "text_pooled": lambda: TextClassifier(HT, C, hidden=16, dropout=0.1, pooling="pooled"),
    "concat": lambda: ConcatFusion(HA, HT, C, hidden=32, dropout=0.1),
    "decision_class": lambda: DecisionFusion(HA, HT, C, hidden=16, dropout=0.1),
    "decision_global": lambda: DecisionFusion(HA, HT, C, hidden=16, dropout=0.1, weights="global"),
    "decision_linear": lambda: DecisionFusion(HA, HT, C, hidden=16, dropout=0.1, rule="linear"),
    "xattn": lambda: CrossAttentionFusion(HA, HT, C, hidden=16, num_heads=4, dropout=0.1),
    "xattn_2layer_noffn": lambda: CrossAttentionFusion(
        HA, HT, C, hidden=16, num_heads=2, num_layers=2, ffn=False
    ),
}
FUSION_HEADS = [k for k in HEADS if not k.startswith("text")]


@pytest.fixture(autouse=True)
def _one_thread():
    """These modules are tiny: intra-op threads only add overhead, and on a busy 2-core machine
    spin-waiting threads made one training test 20x slower (44 s vs 2 s wall) than one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return HEADS[name]()


# --------------------------------------------------------------------------------------------
# Masking
# --------------------------------------------------------------------------------------------


def test_masked_mean_ignores_padding_and_empty_rows_give_zeros() -> None:
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [float("nan"), float("inf")]],
                      [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    out = masked_mean(x, mask)
    assert torch.equal(out, torch.tensor([[2.0, 3.0], [0.0, 0.0]]))


def _extend_with_garbage(d: dict[str, Tensor], extra_f: int, extra_l: int, seed: int) -> dict[str, Tensor]:
    """Same utterances, more padded frames/tokens; every padded value replaced by garbage,
    including NaN and inf."""
    g = torch.Generator().manual_seed(seed)
    out = dict(d)
    for key, mkey, extra in (("audio", "frame_mask", extra_f), ("text", "text_mask", extra_l)):
        x, m = d[key], d[mkey]
        n, t, dim = x.shape
        x = torch.cat([x, torch.zeros(n, extra, dim)], dim=1)
        m = torch.cat([m, torch.zeros(n, extra, dtype=torch.bool)], dim=1)
        garbage = 1e3 * torch.randn(x.shape, generator=g)
        garbage[0, -1, 0], garbage[-1, -1, -1] = float("nan"), float("inf")
        out[key], out[mkey] = torch.where(m[..., None], x, garbage), m
    return out


@pytest.mark.parametrize("name", list(HEADS))
def test_padding_on_both_sides_does_not_change_outputs(name: str) -> None:
    model = _model(name).eval()
    d = make_task(6, seed=1)
    d["frame_mask"][0] = True  # one utterance fills the frame axis, one the token axis
    d["text_mask"][1] = True
    with torch.no_grad():
        base = call(model, d)
        longer = call(model, _extend_with_garbage(d, extra_f=5, extra_l=4, seed=2))
        assert torch.isfinite(longer).all()
        torch.testing.assert_close(longer, base, atol=1e-5, rtol=0)
        # Each utterance alone, cut to its own lengths, equals its row of the padded batch.
        for i in range(6):
            nf, nl = int(d["frame_mask"][i].sum()), int(d["text_mask"][i].sum())
            one = {"audio": d["audio"][i : i + 1, :nf], "frame_mask": d["frame_mask"][i : i + 1, :nf],
                   "text": d["text"][i : i + 1, :nl], "text_mask": d["text_mask"][i : i + 1, :nl],
                   "text_pooled": d["text_pooled"][i : i + 1]}
            torch.testing.assert_close(call(model, one), base[i : i + 1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", list(HEADS))
def test_valid_positions_do_change_outputs(name: str) -> None:
    """The counterpart of the padding test: it must be able to fail, so real frames and tokens
    (or the pooled text vector, for pooled heads) do move the output."""
    model = _model(name).eval()
    d = make_task(6, seed=1)
    # A random direction, not a constant shift (LayerNorm would remove a shift of every channel).
    g = torch.Generator().manual_seed(3)
    da, dt = 3 * torch.randn(HA, generator=g), 3 * torch.randn(HT, generator=g)
    with torch.no_grad():
        base = call(model, d)
        if not name.startswith("text"):
            a = dict(d, audio=d["audio"].clone())
            a["audio"][:, 0] += da  # frame 0 is valid in every utterance (min length 2)
            assert (call(model, a) - base).abs().amax(dim=-1).min() > 1e-4
        t = dict(d, text=d["text"].clone(), text_pooled=d["text_pooled"] + dt)
        t["text"][:, 0] += dt  # token 0 is valid in every utterance (min length 1)
        assert (call(model, t) - base).abs().amax(dim=-1).min() > 1e-4


def test_text_classifier_reads_the_batch_keys_its_pooling_names() -> None:
    d = make_task(5, seed=3)
    batch = {"text": d["text"], "text_mask": d["text_mask"], "text_pooled": d["text_pooled"]}
    mean_model, pooled_model = _model("text_mean").eval(), _model("text_pooled").eval()
    with torch.no_grad():
        torch.testing.assert_close(mean_model(batch), mean_model.mlp(masked_mean(d["text"], d["text_mask"])))
        out = pooled_model(batch)
        # The pooled head ignores the tokens entirely and uses text_pooled.
        torch.testing.assert_close(pooled_model(dict(batch, text=torch.randn_like(d["text"]))), out)
        torch.testing.assert_close(out, pooled_model.mlp(d["text_pooled"]))
    with pytest.raises(ValueError, match="text_pooled"):
        pooled_model({"text": d["text"], "text_mask": d["text_mask"]})
    with pytest.raises(ValueError, match="text"):
        mean_model({"text_pooled": d["text_pooled"]})


# --------------------------------------------------------------------------------------------
# Empty transcripts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["text_mean", *FUSION_HEADS])
def test_empty_transcript_gives_finite_outputs_and_gradients(name: str) -> None:
    model = _model(name).train()
    d = make_task(4, seed=4)
    d["text_mask"][2] = False  # utterance 2 has an empty transcript (its tokens are garbage)
    d["text"] = d["text"].clone().requires_grad_(True)
    out = call(model, d)
    assert out.shape == (4, C) and torch.isfinite(out).all()
    out.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert d["text"].grad is not None and torch.isfinite(d["text"].grad).all()
    model.eval()
    with torch.no_grad():
        ref = call(model, d)
        other = dict(d, text=d["text"].detach().clone())
        other["text"][2] = 1e4 * torch.randn(other["text"].shape[1:])  # its garbage does not matter
        torch.testing.assert_close(call(model, other)[2], ref[2], atol=1e-5, rtol=0)
        # Every transcript in the batch empty, down to a zero-length token axis.
        none = dict(d, text=torch.zeros(4, 0, HT), text_mask=torch.zeros(4, 0, dtype=torch.bool))
        assert torch.isfinite(call(model, none)).all()


def test_cross_attention_empty_text_row_is_classified_from_audio_alone() -> None:
    """With no transcript, the audio side gets no cross-modal update at all (not even the
    attention output projection's bias): computed by hand, it is LayerNorm, FFN, pool, MLP."""
    model = _model("xattn").eval()
    with torch.no_grad():
        for p in model.parameters():  # trained-looking weights: non-zero biases everywhere
            p.add_(0.3 * torch.randn_like(p))
    d = make_task(3, seed=5)
    d["text_mask"][:] = False
    block = model.audio_to_text[0]
    assert block.ffn is not None and block.norm2 is not None
    with torch.no_grad():
        out = call(model, d)
        a = model.audio_proj(d["audio"].masked_fill(~d["frame_mask"][..., None], 0))  # (B, F, H)
        a = block.norm1(a)  # residual with a zero attention update
        a = block.norm2(a + block.ffn(a))
        expected = model.mlp(torch.cat([masked_mean(a, d["frame_mask"]), torch.zeros(3, 16)], dim=-1))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------
# Decision fusion algebra
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rule", ["log_linear", "linear"])
@pytest.mark.parametrize("weights", ["class", "global"])
def test_decision_fusion_is_a_normalised_weighted_pool(weights: str, rule: str) -> None:
    model = DecisionFusion(HA, HT, C, hidden=16, dropout=0.0, weights=weights, rule=rule).eval()
    with torch.no_grad():
        model.weight_logits.normal_(0.0, 2.0)
    w = model.modality_weights()
    assert w.shape == (2, C if weights == "class" else 1)
    torch.testing.assert_close(w.sum(dim=0), torch.ones(w.shape[1]))
    assert (w > 0).all()
    d = make_task(8, seed=6)
    with torch.no_grad():
        log_p = call(model, d)
        la, lt = model.last_branch_logits
        branches = model.branch_logits(d["audio"], d["frame_mask"], d["text"], d["text_mask"])
        torch.testing.assert_close((la, lt), branches)
        if rule == "linear":  # weighted average of the posteriors
            pool = w[0] * la.softmax(-1) + w[1] * lt.softmax(-1)
        else:  # weighted geometric mean
            pool = la.softmax(-1) ** w[0] * lt.softmax(-1) ** w[1]
        expected = pool / pool.sum(-1, keepdim=True)
    assert (log_p <= 1e-6).all() and torch.isfinite(log_p).all()
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(8))
    torch.testing.assert_close(log_p.exp(), expected)
    # Cross-entropy on the fused output is the NLL of the fused distribution.
    torch.testing.assert_close(F.cross_entropy(log_p, d["labels"]), F.nll_loss(log_p, d["labels"]))
    report = model.weights_report()
    assert set(report) == {"audio", "text"}
    for name in report["audio"]:
        assert report["audio"][name] + report["text"][name] == pytest.approx(1.0)


@pytest.mark.parametrize("rule", ["log_linear", "linear"])
def test_decision_fusion_stays_finite_with_saturated_branches(rule: str) -> None:
    """Branches that put ~zero probability on a class must not give log(0) = -inf; two confident,
    disagreeing branches with equal weights split the fused mass between their two classes."""
    model = DecisionFusion(HA, HT, C, hidden=0, dropout=0.0, rule=rule).eval()
    la = torch.tensor([[200.0, -200.0, -200.0, -200.0]])
    lt = torch.tensor([[-200.0, 200.0, -200.0, -200.0]])
    log_p = model.fuse(la, lt)
    assert torch.isfinite(log_p).all()
    torch.testing.assert_close(log_p.exp()[0], torch.tensor([0.5, 0.5, 0.0, 0.0]))


# --------------------------------------------------------------------------------------------
# Learning: fusion uses both modalities
# --------------------------------------------------------------------------------------------


def _fit(model: nn.Module, train: dict[str, Tensor], steps: int, lr: float) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        out = call(model, train)
        loss = F.cross_entropy(out, train["labels"])
        if isinstance(model, DecisionFusion):  # supervise each branch too, as a trainer would
            la, lt = model.last_branch_logits
            loss = loss + F.cross_entropy(la, train["labels"]) + F.cross_entropy(lt, train["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _accuracy(model: nn.Module, d: dict[str, Tensor]) -> float:
    with torch.no_grad():
        return (call(model, d).argmax(-1) == d["labels"]).float().mean().item()


def _shuffled(d: dict[str, Tensor], keys: tuple[str, ...]) -> dict[str, Tensor]:
    perm = torch.randperm(len(d["labels"]), generator=torch.Generator().manual_seed(0))
    return {k: (v[perm] if k in keys else v) for k, v in d.items()}


@pytest.mark.parametrize(
    "name,task,n_train",
    [(name, make_task, 256) for name in FUSION_HEADS if name != "decision_linear"]
    + [("decision_linear", make_complementary_task, 768), ("decision_class", make_complementary_task, 768)],
)
def test_fusion_head_learns_a_task_that_needs_both_modalities(name: str, task, n_train: int) -> None:
    """Factorised task (class = 2a + b) for every head but the linear-pool decision head, which
    cannot combine partial evidence (see DecisionFusion); it and the default decision head get
    the complementary task (the class is in one modality per utterance). The linear pool needs
    the branch that sees only noise to stay near uniform: with 256 training utterances it
    overfits that noise (0.92-0.97 test accuracy over 6 seeds), with 768 it reaches 0.97-0.99."""
    torch.manual_seed(0)
    model = _model(name)
    train, test = task(n_train, seed=10), task(512, seed=11)
    _fit(model, train, steps=80, lr=1e-2)
    assert _accuracy(model, test) > 0.9
    # Break the pairing of one modality with the labels: accuracy falls back towards 50 %.
    assert _accuracy(model, _shuffled(test, ("text", "text_mask", "text_pooled"))) < 0.75
    assert _accuracy(model, _shuffled(test, ("audio", "frame_mask"))) < 0.75


def test_text_classifier_learns_text_but_not_the_factorised_task() -> None:
    torch.manual_seed(0)
    model = _model("text_mean")
    _fit(model, make_task(256, seed=10, text_has_audio_bit=True), steps=120, lr=1e-2)
    assert _accuracy(model, make_task(512, seed=11, text_has_audio_bit=True)) > 0.9
    # On the fusion task the text alone holds one of the two bits: <= ~50 % is all it can do.
    model = _model("text_mean")
    _fit(model, make_task(256, seed=10), steps=120, lr=1e-2)
    assert _accuracy(model, make_task(512, seed=11)) < 0.65


# --------------------------------------------------------------------------------------------
# FusionClassifier: audio encoder + head
# --------------------------------------------------------------------------------------------


class TinyAudioEncoder(nn.Module):
    """Stand-in for the project's AudioEncoder: Conv1d over the waveform, 20 ms frames."""

    def __init__(self, hidden: int = HA) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, hidden, kernel_size=400, stride=320)
        self.dropout = nn.Dropout(0.5)

    def encode(self, audio: Tensor, audio_mask: Tensor) -> tuple[Tensor, Tensor]:
        frames = self.dropout(self.conv(audio.unsqueeze(1)).transpose(1, 2))  # (B, F, H)
        n_frames = ((audio_mask.sum(1) - 400) // 320 + 1).clamp(min=0)  # (B,)
        frame_mask = torch.arange(frames.shape[1])[None, :] < n_frames[:, None]  # (B, F)
        return frames, frame_mask


def make_wave_batch(n: int, seed: int) -> dict[str, Tensor]:
    """Waveform + text batch of the factorised task: bit a = pitch of a tone in noise (500 Hz or
    2 kHz, random phase), bit b = the text direction."""
    d = make_task(n, seed)
    g = torch.Generator().manual_seed(seed + 100)
    a = d["labels"] // 2
    t = 320 * 12 + 80
    lengths = torch.randint(320 * 4 + 80, t + 1, (n,), generator=g)
    audio_mask = torch.arange(t)[None, :] < lengths[:, None]
    freq = torch.where(a == 1, 2000.0, 500.0)[:, None]
    phase = 2 * torch.pi * torch.rand(n, 1, generator=g)
    tone = torch.sin(2 * torch.pi * freq * torch.arange(t)[None, :] / 16000 + phase)
    audio = (tone + 0.3 * torch.randn(n, t, generator=g)).masked_fill(~audio_mask, 0.0)
    return {"ids": [f"u{i}" for i in range(n)], "audio": audio, "audio_mask": audio_mask,
            "labels": d["labels"], "text": d["text"], "text_mask": d["text_mask"],
            "text_pooled": d["text_pooled"]}


@pytest.mark.parametrize("freeze", [True, False])
def test_frozen_audio_gets_no_gradient(freeze: bool) -> None:
    torch.manual_seed(0)
    encoder = TinyAudioEncoder()
    fusion = ConcatFusion(HA, HT, C, hidden=16, dropout=0.0)
    model = FusionClassifier(encoder, fusion, freeze_audio=freeze).train()
    assert encoder.training is (not freeze)  # frozen -> kept in eval mode (deterministic features)
    batch = make_wave_batch(4, seed=7)
    out = model(batch)
    assert out.shape == (4, C)
    F.cross_entropy(out, batch["labels"]).backward()
    assert all(p.grad is not None for p in model.fusion.parameters())
    if freeze:
        assert all(p.grad is None and not p.requires_grad for p in encoder.parameters())
        with torch.no_grad():
            assert torch.equal(model(batch), out.detach())  # deterministic: encoder dropout is off
    else:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())


def test_fusion_classifier_trains_end_to_end_through_the_encoder() -> None:
    torch.manual_seed(0)
    model = FusionClassifier(TinyAudioEncoder(), CrossAttentionFusion(HA, HT, C, hidden=16, num_heads=2),
                             freeze_audio=False)
    model.audio_encoder.dropout.p = 0.0
    train, test = make_wave_batch(128, seed=20), make_wave_batch(256, seed=21)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(80):
        loss = F.cross_entropy(model.train()(train), train["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (model.eval()(test).argmax(-1) == test["labels"]).float().mean().item()
    assert acc > 0.9


def test_missing_inputs_raise_clear_errors() -> None:
    model = FusionClassifier(TinyAudioEncoder(), ConcatFusion(HA, HT, C, hidden=16))
    batch = make_wave_batch(2, seed=8)
    with pytest.raises(KeyError, match="audio_mask"):
        model({k: v for k, v in batch.items() if k != "audio_mask"})
    with pytest.raises(ValueError, match="text"):
        model({k: v for k, v in batch.items() if k not in ("text", "text_mask")})
    with pytest.raises(ValueError, match="does not match"):
        model(dict(batch, text_mask=batch["text_mask"][:, :-1]))
    with pytest.raises(TypeError, match="encode"):
        FusionClassifier(nn.Linear(2, 2), ConcatFusion(HA, HT, C))


# --------------------------------------------------------------------------------------------
# Factories
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "head,cls",
    [("concat", ConcatFusion), ("decision", DecisionFusion), ("cross_attention", CrossAttentionFusion)],
)
def test_build_fusion_head_from_config(head: str, cls: type) -> None:
    cfg = dataclasses.replace(FusionConfig(), head=head, hidden_size=16, num_heads=2, text_pooling="mean")
    model = build_fusion_head(cfg, audio_dim=HA, text_dim=HT).eval()
    assert isinstance(model, cls)
    assert call(model, make_task(3, seed=9)).shape == (3, C)


def test_build_fusion_head_rejects_none_and_text_classifier_follows_config() -> None:
    with pytest.raises(ValueError, match="none"):
        build_fusion_head(FusionConfig(head="none"), audio_dim=HA, text_dim=HT)
    clf = build_text_classifier(FusionConfig(hidden_size=8, text_pooling="pooled"), text_dim=HT)
    assert clf.pooling == "pooled" and clf.mlp[1].out_features == 8


def test_decision_branches_add_their_own_loss():
    """FusionClassifier names the decision branches' logits for the training loss; the
    ClassifierModule adds weight x CE for each, so the loss differs from the fused CE alone."""
    from mmser.models.fusion import DecisionFusion, FusionClassifier
    from mmser.training.finetune import ClassifierModule

    torch.manual_seed(0)

    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(1, 8, 320, stride=320)

        def encode(self, audio, audio_mask):
            frames = self.conv(audio[:, None]).transpose(1, 2)  # (B, F, 8)
            return frames, audio_mask[:, ::320][:, : frames.shape[1]]

    batch = {"audio": torch.randn(4, 3200), "audio_mask": torch.ones(4, 3200, dtype=torch.bool),
             "text": torch.randn(4, 5, 6), "text_mask": torch.ones(4, 5, dtype=torch.bool),
             "text_pooled": torch.randn(4, 6), "labels": torch.tensor([0, 1, 2, 3]), "ids": list("abcd")}
    losses = {}
    for w in (0.0, 0.5):
        torch.manual_seed(0)
        model = FusionClassifier(Enc(), DecisionFusion(8, 6, 4, 16, 0.0), branch_loss_weight=w)
        module = ClassifierModule(model)
        module.log = lambda *a, **k: None  # no trainer attached
        fused = F.cross_entropy(model(batch), batch["labels"])
        assert len(model.auxiliary_logits()) == (2 if w else 0)
        losses[w] = (module.training_step(batch, 0).item(), fused.item())
    assert losses[0.0][0] == pytest.approx(losses[0.0][1])
    assert losses[0.5][0] > losses[0.5][1] + 0.1  # two branch CEs (each ~ln 4) at weight 0.5
