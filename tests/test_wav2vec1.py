"""wav2vec 1.0: equivalence with a fairseq-structured reference, and safe checkpoint loading, for
checkpoints with modern args and as the 2019 release (wav2vec_large.pt) stores them."""

from __future__ import annotations

import argparse
import copy
import logging
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch
from fairseq_ref import (
    WAV2VEC_LARGE_ARGS,
    AverageMeter,
    StopwatchMeter,
    TimeMeter,
    Wav2VecModel,
    fake_fairseq_meters,
    legacy_2019_args,
    load_fairseq_reference,
    randomize_,
    save_2019_checkpoint,
    save_fairseq_checkpoint,
    upgrade_args,
)

from mmser.config import load_config
from mmser.models.frame_model import build_frame_model
from mmser.models.safe_unpickle import InertObject, RefusedGlobalError, safe_torch_load
from mmser.models.safe_unpickle import loads as safe_loads
from mmser.models.wav2vec1 import (
    Wav2Vec1,
    Wav2Vec1Config,
    config_from_fairseq_args,
    parse_layers,
    upgrade_fairseq_args,
)

TINY_ARGS = dict(
    arch="wav2vec",
    conv_feature_layers="[(16, 10, 5), (16, 8, 4), (16, 4, 2), (16, 1, 1)]",
    conv_aggregator_layers="[(16, 2, 1), (16, 3, 1), (16, 4, 1)]",
    skip_connections_agg=True,
    residual_scale=0.5,
    log_compression=True,
    skip_connections_feat=False,
    agg_zero_pad=False,
    non_affine_group_norm=False,
    no_conv_bias=False,
    dropout=0.0,
    dropout_features=0.0,
    dropout_agg=0.0,
    activation="relu",
    vq_type="none",
    prediction_steps=3,
    offset="auto",
)

# Flag combinations that change the forward pass (each differs from TINY_ARGS).
VARIANTS = {
    "large-flags": {},
    "zero-pad-gelu-skipfeat": dict(
        agg_zero_pad=True, activation="gelu", skip_connections_feat=True
    ),
    "nonaffine-nobias-nolog": dict(
        non_affine_group_norm=True, no_conv_bias=True, log_compression=False
    ),
    "agg-width-change": dict(
        conv_aggregator_layers="[(16, 2, 1), (24, 3, 1), (24, 5, 1)]", residual_scale=0.3
    ),
    "no-agg-skip": dict(skip_connections_agg=False),
}


def _reference(args: dict, seed: int = 0) -> tuple[Wav2VecModel, argparse.Namespace]:
    ns = argparse.Namespace(**args)
    ref = randomize_(Wav2VecModel(argparse.Namespace(**args)), seed).eval()
    return ref, ns


def _as_loaded(ref: Wav2VecModel) -> Wav2VecModel:
    """The reference with the same fp16 -> fp32 rounding the checkpoint applies."""
    return ref.half().float()


def _wave(b: int, t: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(b, t, generator=g)  # (B, T)


# Checkpoint styles: modern args (arch wav2vec, every field) in torch's zip or legacy format, and
# the 2019 release's (arch audio_cpc, task speech_pretraining, no activation / vq_type, fp16,
# legacy format).
STYLES = ["zip", "legacy", "2019"]


def _save(ref: Wav2VecModel, args: dict, path: Path, style: str, **kw) -> argparse.Namespace:
    """Write `ref` with `args` in `style`; returns the Namespace stored."""
    ns = legacy_2019_args(args) if style == "2019" else argparse.Namespace(**args)
    save_fairseq_checkpoint(ref, ns, path, legacy_format=style != "zip", fp16=True, **kw)
    return ns


def _for_style(args: dict, style: str) -> dict:
    """The 2019 code had ReLU only (no `activation` field): variants using GELU become ReLU."""
    return {**args, "activation": "relu"} if style == "2019" else args


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_fairseq_reference(tmp_path: Path, variant: str, style: str) -> None:
    args = _for_style({**TINY_ARGS, **VARIANTS[variant]}, style)
    ref, _ = _reference(args)
    path = tmp_path / "wav2vec_tiny.pt"
    ns = _save(ref, args, path, style)
    assert "fairseq" not in sys.modules

    model = Wav2Vec1.from_fairseq(path)
    assert "fairseq" not in sys.modules  # nothing imported fairseq while loading
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())

    # fairseq's own reading of the file (renames, Wav2VecConfig defaults) and the in-memory model
    # (built with the full args, fp16-rounded like the stored weights) must both agree with it
    refs = {"fairseq-load": load_fairseq_reference(path), "in-memory": _as_loaded(ref)}
    wav = _wave(2, 3000)
    for name, r in refs.items():
        with torch.no_grad():
            z_ref, c_ref = r.extract(wav)
            z, c = model.features(wav), model.context(wav)
        assert z.shape == z_ref.shape and c.shape == c_ref.shape, name
        assert c.shape[1] == int(parse_layers(ns.conv_aggregator_layers)[-1][0])
        torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name} z: {m}")
        torch.testing.assert_close(c, c_ref, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name} c: {m}")
    assert c.abs().mean() > 1e-2  # not a degenerate all-zero comparison


@pytest.mark.parametrize("style", ["legacy", "2019"])
def test_full_size_wav2vec_large_architecture(tmp_path: Path, style: str) -> None:
    """The real layer lists and flags load into the right modules; 1 s -> 98 frames of 512."""
    ref, _ = _reference(WAV2VEC_LARGE_ARGS, seed=3)
    path = tmp_path / "wav2vec_large.pt"
    ns = _save(ref, WAV2VEC_LARGE_ARGS, path, style)
    assert ns.arch == ("audio_cpc" if style == "2019" else "wav2vec")
    model = Wav2Vec1.from_fairseq(path)
    assert model.cfg == Wav2Vec1Config()  # defaults are wav2vec_large's
    assert len(model.feature_extractor.conv_layers) == 7
    assert len(model.feature_aggregator.conv_layers) == 12
    assert model.feature_aggregator.conv_layers[11][1].kernel_size == (13,)

    ref = _as_loaded(ref)
    wav = _wave(1, 16000)
    with torch.no_grad():
        z_ref, c_ref = ref.extract(wav)
        z, c = model.features(wav), model.context(wav)
    assert z.shape == c.shape == (1, 512, 98)
    assert int(model.output_lengths(torch.tensor([16000]))) == 98
    torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c, c_ref, atol=1e-5, rtol=1e-5)


def test_2019_fp16_checkpoint_loads_as_float32_equal_to_stored(tmp_path: Path) -> None:
    ref, _ = _reference(TINY_ARGS, seed=5)
    path = tmp_path / "wav2vec_2019.pt"
    save_2019_checkpoint(ref, TINY_ARGS, path)
    with open(path, "rb") as f:  # torch's legacy format starts with a pickled magic number
        assert f.read(2) == b"\x80\x02"
    stored = safe_torch_load(path)["model"]
    assert {v.dtype for v in stored.values()} == {torch.float16}

    loaded = Wav2Vec1.from_fairseq(path).state_dict()
    assert loaded and set(loaded) <= set(stored)
    assert set(stored) - set(loaded) == {k for k in stored if k.startswith("wav2vec_predictions.")}
    for key, value in loaded.items():
        assert value.dtype == torch.float32, key
        assert torch.equal(value, stored[key].float()), key  # exact: fp16 -> fp32 is lossless
    # and the stored values are the model's, rounded to fp16 (not some other tensor)
    w = "feature_aggregator.conv_layers.1.1.weight"
    assert torch.equal(loaded[w], ref.state_dict()[w].half().float())
    assert not torch.equal(loaded[w], ref.state_dict()[w])  # fp16 rounding did happen


def test_2019_args_are_upgraded_like_fairseq(caplog: pytest.LogCaptureFixture) -> None:
    ns = legacy_2019_args(TINY_ARGS)
    assert (ns.arch, ns.task, ns.criterion) == ("audio_cpc", "speech_pretraining", "binary_cross_entropy")
    assert not hasattr(ns, "activation") and not hasattr(ns, "vq_type")

    upgraded = upgrade_fairseq_args(vars(ns))
    expected = copy.copy(ns)
    upgrade_args(expected)  # the fixture's re-typing of fairseq's _upgrade_state_dict
    assert upgraded == vars(expected)
    assert (upgraded["arch"], upgraded["task"], upgraded["criterion"]) == (
        "wav2vec", "audio_pretraining", "wav2vec"
    )  # fmt: skip
    assert ns.arch == "audio_cpc"  # the input is not modified
    # only the exact legacy values are renamed; others (and non-strings) pass through
    for key, value in [("criterion", "kd_binary_cross_entropy"), ("criterion", "cross_entropy"),
                       ("task", "audio_pretraining"), ("arch", "audio_cpc_gru"), ("arch", ["audio_cpc"])]:  # fmt: skip
        other = argparse.Namespace(**{key: value})
        upgrade_args(other)
        assert upgrade_fairseq_args({key: value}) == vars(other), (key, value)

    # missing activation / vq_type: fairseq's defaults, logged as expected (INFO), no warning
    with caplog.at_level(logging.INFO, logger="mmser.models.wav2vec1"):
        cfg = config_from_fairseq_args(upgraded, source="old.pt")
    assert cfg.activation == "relu"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "activation" in caplog.text and "vq_type" in caplog.text
    # without the upgrade the legacy arch is refused, naming it
    with pytest.raises(ValueError, match="old.pt: arch is 'audio_cpc'"):
        config_from_fairseq_args(vars(ns), source="old.pt")


def test_ptapt_frame_model_trains_on_2019_checkpoint(tmp_path: Path) -> None:
    """P-TAPT step (a) (`build_frame_model` with ptapt.wav2vec1_checkpoint=PATH): forward, backward
    and one Adam step on the 2019-format checkpoint."""
    ref, _ = _reference(TINY_ARGS, seed=7)
    path = tmp_path / "wav2vec_2019.pt"
    save_2019_checkpoint(ref, TINY_ARGS, path)
    cfg = load_config(overrides=[
        f"ptapt.wav2vec1_checkpoint={path}", "ptapt.frame_model=wav2vec1", "ptapt.frame_dim=24",
        "ptapt.frame_head_hidden=8", "ptapt.frame_lstm_hidden=8", "ptapt.frame_mask_feature_length=4",
        "ptapt.frame_mask_time_length=5",
    ])  # fmt: skip
    model = build_frame_model(cfg)
    assert model.kind == "wav2vec1" and model.training
    stored = safe_torch_load(path)["model"]
    backbone = model.backbone.state_dict()
    assert all(torch.equal(backbone[k], stored[k].float()) for k in backbone)  # the checkpoint's weights

    torch.manual_seed(0)
    batch = {"audio": _wave(4, 3000, seed=2), "audio_mask": torch.ones(4, 3000, dtype=torch.bool),
             "labels": torch.tensor([0, 1, 2, 3])}  # fmt: skip
    parts = model.loss(batch)
    assert parts["utterance_logits"].shape == (4, 4) and torch.isfinite(parts["loss"])
    parts["loss"].backward()
    fe, agg = model.backbone.feature_extractor, model.backbone.feature_aggregator
    assert all(p.grad is None and not p.requires_grad for p in fe.parameters())  # frozen
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in agg.parameters())
    assert model.proj.weight.grad.abs().sum() > 0

    trainable = [p for p in model.parameters() if p.requires_grad]
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    torch.optim.Adam(trainable, lr=1e-3).step()
    after = model.backbone.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in fe.state_dict(prefix="feature_extractor."))
    assert not torch.equal(after["feature_aggregator.conv_layers.0.1.weight"],
                           before["feature_aggregator.conv_layers.0.1.weight"])  # fmt: skip


@pytest.mark.parametrize("style", STYLES)
def test_extra_state_meters_become_inert(tmp_path: Path, style: str) -> None:
    ref, _ = _reference(TINY_ARGS)
    path = tmp_path / "ckpt.pt"
    _save(ref, TINY_ARGS, path, style)
    ckpt = safe_torch_load(path)
    assert isinstance(ckpt["args"], argparse.Namespace)
    assert ckpt["args"].arch == ("audio_cpc" if style == "2019" else "wav2vec")  # read as stored
    assert ckpt["model"]["feature_extractor.conv_layers.0.0.weight"].dtype == torch.float16
    meters = ckpt["extra_state"]["train_meters"]
    assert [type(m).__name__ for m in meters.values()] == ["AverageMeter", "TimeMeter", "StopwatchMeter"]
    assert all(isinstance(m, InertObject) and "inert fairseq.meters." in repr(m) for m in meters.values())
    meter = meters["train_loss"]
    assert meter.inert_state["sum"] == pytest.approx(3.21 * 8)  # state kept, not interpreted
    assert not hasattr(meter, "update")  # fairseq's class was not imported
    assert "fairseq" not in sys.modules


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_meters_pickled_with_any_protocol_become_inert(protocol: int) -> None:
    loss = AverageMeter()
    loss.update(2.0, 4)
    with fake_fairseq_meters():
        data = pickle.dumps({"loss": loss, "wps": TimeMeter(), "wall": StopwatchMeter()}, protocol=protocol)
    out = safe_loads(data)
    assert {k: type(v).__name__ for k, v in out.items()} == {
        "loss": "AverageMeter", "wps": "TimeMeter", "wall": "StopwatchMeter"
    }  # fmt: skip
    assert all(isinstance(v, InertObject) for v in out.values())
    assert out["loss"].inert_state == {"val": 2.0, "avg": 2.0, "sum": 8.0, "count": 4}


class _Marker:
    """A class with a harmless constructor that only a trusting unpickler would call."""

    made = 0

    def __init__(self) -> None:
        type(self).made += 1

    def __reduce__(self):
        return (_Marker, ())


class _Shell:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


@pytest.mark.parametrize("style", STYLES)
def test_refuses_code_execution(tmp_path: Path, style: str) -> None:
    ref, _ = _reference(TINY_ARGS)
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    _save(ref, TINY_ARGS, path, style, extra={"x": _Shell(f"touch {marker}")})
    with pytest.raises(RefusedGlobalError) as err:
        Wav2Vec1.from_fairseq(path)
    msg = str(err.value)
    assert str(path) in msg and f"'{os.system.__module__}.system'" in msg and "\n" not in msg
    assert not marker.exists()


def _global_call(module: str, name: str, arg: str) -> bytes:
    """Protocol-0 pickle calling module.name(arg) (GLOBAL + REDUCE), as a crafted file would."""
    return f"c{module}\n{name}\n(V{arg}\ntR.".encode()


@pytest.mark.parametrize(
    "module, name",
    [("os", "system"), ("posix", "system"), ("subprocess", "check_call"), ("builtins", "eval"),
     ("__builtin__", "eval"), ("builtins", "getattr"), ("builtins", "__import__"), ("torch", "load"),
     ("fairseq", "meters"), ("fairseq.metersx", "AverageMeter"), ("torch._utils", "os")],
)  # fmt: skip
def test_restricted_unpickler_refuses_crafted_globals(tmp_path: Path, module: str, name: str) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(RefusedGlobalError, match=r"refused to unpickle '[\w.]+\.\w+'"):
        safe_loads(_global_call(module, name, f"touch {marker}"))
    assert not marker.exists()


def test_inert_module_classes_never_run_code(tmp_path: Path) -> None:
    """A crafted file may name any class under fairseq.meters and call it: it gets a placeholder
    that only stores the arguments."""
    marker = tmp_path / "pwned"
    for name in ("AverageMeter", "system", "__init__"):
        obj = safe_loads(_global_call("fairseq.meters", name, f"touch {marker}"))
        assert isinstance(obj, InertObject) and obj.inert_args == (f"touch {marker}",)
    assert not marker.exists()
    assert "fairseq" not in sys.modules


def test_refuses_unknown_class(tmp_path: Path) -> None:
    ref, ns = _reference(TINY_ARGS)
    path = tmp_path / "odd.pt"
    save_fairseq_checkpoint(ref, ns, path, extra={"x": _Marker()})
    made = _Marker.made
    with pytest.raises(RefusedGlobalError, match=rf"{__name__}\._Marker"):
        Wav2Vec1.from_fairseq(path)
    assert _Marker.made == made  # the constructor never ran


def test_bad_files_get_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        Wav2Vec1.from_fairseq(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: not a readable torch checkpoint"):
        Wav2Vec1.from_fairseq(junk)
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, plain)
    with pytest.raises(ValueError, match="plain.pt: not a fairseq checkpoint"):
        Wav2Vec1.from_fairseq(plain)
    cut = tmp_path / "cut.pt"  # a truncated 2019-format download
    ref, _ = _reference(TINY_ARGS)
    save_2019_checkpoint(ref, TINY_ARGS, cut)
    cut.write_bytes(cut.read_bytes()[:3000])
    with pytest.raises(ValueError, match="cut.pt: not a readable torch checkpoint") as err:
        Wav2Vec1.from_fairseq(cut)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("style", ["zip", "2019"])
def test_weights_that_do_not_fit_the_args_get_one_line(tmp_path: Path, style: str) -> None:
    ref, _ = _reference(TINY_ARGS)
    wider = {**TINY_ARGS, "conv_aggregator_layers": "[(16, 2, 1), (16, 3, 1), (16, 5, 1)]"}
    path = tmp_path / "mismatch.pt"
    _save(ref, wider, path, style)  # same tensor names, one kernel size differs
    with pytest.raises(ValueError) as err:
        Wav2Vec1.from_fairseq(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: weights do not fit the architecture in its args")
    assert "feature_aggregator.conv_layers.2.1.weight" in msg and "\n" not in msg


def test_refuses_other_architectures(tmp_path: Path) -> None:
    ref, ns = _reference(TINY_ARGS)
    for change, pattern in [
        (dict(arch="wav2vec2"), "not 'wav2vec'"),
        (dict(vq_type="gumbel"), "vq-wav2vec"),
        (dict(conv_aggregator_layers="[(16, 2, 1)]"), "state_dict does not match"),
    ]:
        path = tmp_path / "other.pt"
        save_fairseq_checkpoint(ref, argparse.Namespace(**{**vars(ns), **change}), path)
        with pytest.raises(ValueError, match=pattern):
            Wav2Vec1.from_fairseq(path)


def test_missing_args_take_fairseq_wav2vec_config_defaults(caplog: pytest.LogCaptureFixture) -> None:
    dropped = ("log_compression", "skip_connections_agg", "no_conv_bias", "activation", "vq_type")
    args = {**TINY_ARGS, "log_compression": False, "skip_connections_agg": False, "no_conv_bias": True}
    args = {k: v for k, v in args.items() if k not in dropped}
    with caplog.at_level(logging.INFO, logger="mmser.models.wav2vec1"):
        cfg = config_from_fairseq_args(args, source="old.pt")
    # fairseq/models/wav2vec/wav2vec.py Wav2VecConfig: log_compression and skip_connections_agg
    # default on, no_conv_bias off, activation relu (the values stored above were the opposite)
    assert (cfg.log_compression, cfg.skip_connections_agg, cfg.no_conv_bias) == (True, True, False)
    assert cfg.activation == "relu"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "old.pt" in warnings[0] and "log_compression" in warnings[0]
    assert "activation" not in warnings[0]  # absent from every 2019 checkpoint: INFO only
    # with nothing stored, the layer lists are Wav2VecConfig's (8 feature layers, 12 aggregator)
    empty = config_from_fairseq_args({"arch": "wav2vec"})
    assert empty.conv_feature_layers == [
        (512, 10, 5), (512, 8, 4), (512, 4, 2), (512, 4, 2), (512, 4, 2), (512, 1, 1), (512, 1, 1), (512, 1, 1)
    ]  # fmt: skip
    assert empty.conv_aggregator_layers == [(512, k, 1) for k in range(2, 14)]


def test_parse_layers_refuses_code() -> None:
    assert parse_layers("[(8, 3, 1)] * 2 + [(4, 1, 1)]") == [(8, 3, 1), (8, 3, 1), (4, 1, 1)]
    for expr in ["__import__('os').system('true')", "[(8, 3)]", "[(8, 3, 1.5)]", "[(1,2,3)"]:
        with pytest.raises(ValueError, match="x.pt"):
            parse_layers(expr, "x.pt")


def test_freeze_feature_extractor_trains_only_aggregator() -> None:
    cfg = Wav2Vec1Config(
        conv_feature_layers=[(8, 10, 5), (8, 4, 2)], conv_aggregator_layers=[(8, 2, 1), (8, 3, 1)]
    )
    model = Wav2Vec1(cfg)
    model.freeze_feature_extractor()
    model.context(_wave(2, 400)).pow(2).mean().backward()
    assert all(p.grad is None and not p.requires_grad for p in model.feature_extractor.parameters())
    assert all(p.grad is not None for p in model.feature_aggregator.parameters())


def test_encode_masks_and_dropout() -> None:
    cfg = Wav2Vec1Config(
        conv_feature_layers=[(8, 10, 5), (8, 4, 2)],
        conv_aggregator_layers=[(8, 2, 1), (8, 3, 1)],
        dropout_features=0.5,
    )
    model = Wav2Vec1(cfg).eval()
    audio = _wave(2, 600)
    mask = torch.ones(2, 600, dtype=torch.bool)
    mask[1, 400:] = False
    frames, frame_mask = model.encode(audio, mask)
    assert frames.shape == (2, 58, 8)  # (600 - 10) // 5 + 1 = 119 -> (119 - 4) // 2 + 1 = 58
    assert frame_mask.sum(-1).tolist() == [58, 38]  # 400 -> 79 -> 38
    # equal-length items do not interact (GroupNorm is per item)
    torch.testing.assert_close(frames[0], model.encode(audio[:1])[0][0])
    # feature dropout acts only in train mode
    with torch.no_grad():
        assert torch.equal(model.context(audio), model.context(audio))
        model.train()
        assert not torch.allclose(model.context(audio), model.context(audio))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model.features(audio[0])


@pytest.mark.slow
def test_real_wav2vec_large_checkpoint() -> None:
    """Opt-in: MMSER_WAV2VEC1_CHECKPOINT=/path/wav2vec_large.pt pytest -m slow -k real_wav2vec"""
    path = os.environ.get("MMSER_WAV2VEC1_CHECKPOINT")
    if not path:
        pytest.skip("set MMSER_WAV2VEC1_CHECKPOINT to fairseq's wav2vec_large.pt")
    model = Wav2Vec1.from_fairseq(path)
    # the released model follows the wav2vec_large recipe (fairseq examples/wav2vec/README.md)
    expected = Wav2Vec1Config()
    for name in ("conv_feature_layers", "conv_aggregator_layers", "log_compression",
                 "skip_connections_agg", "skip_connections_feat", "agg_zero_pad"):  # fmt: skip
        assert getattr(model.cfg, name) == getattr(expected, name), name
    with torch.no_grad():
        c = model.context(_wave(1, 16000))
    assert c.shape == (1, 512, 98) and torch.isfinite(c).all()
