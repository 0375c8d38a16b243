"""wav2vec 1.0: equivalence with a fairseq-structured reference, and safe checkpoint loading."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import pytest
import torch
from fairseq_ref import (
    WAV2VEC_LARGE_ARGS,
    Wav2VecModel,
    randomize_,
    save_fairseq_checkpoint,
)

from mmser.models.safe_unpickle import RefusedGlobalError, safe_torch_load
from mmser.models.wav2vec1 import (
    Wav2Vec1,
    Wav2Vec1Config,
    config_from_fairseq_args,
    parse_layers,
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


@pytest.mark.parametrize("legacy_format", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_fairseq_reference(tmp_path: Path, variant: str, legacy_format: bool) -> None:
    ref, ns = _reference({**TINY_ARGS, **VARIANTS[variant]})
    path = tmp_path / "wav2vec_tiny.pt"
    save_fairseq_checkpoint(ref, ns, path, legacy_format=legacy_format)
    assert "fairseq" not in sys.modules

    model = Wav2Vec1.from_fairseq(path)
    assert "fairseq" not in sys.modules  # nothing imported fairseq while loading
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())

    ref = _as_loaded(ref)
    wav = _wave(2, 3000)
    with torch.no_grad():
        z_ref, c_ref = ref.extract(wav)
        z, c = model.features(wav), model.context(wav)
    assert z.shape == z_ref.shape and c.shape == c_ref.shape
    assert c.shape[1] == int(parse_layers(ns.conv_aggregator_layers)[-1][0])
    torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c, c_ref, atol=1e-5, rtol=1e-5)
    assert c.abs().mean() > 1e-2  # not a degenerate all-zero comparison


def test_full_size_wav2vec_large_architecture(tmp_path: Path) -> None:
    """The real layer lists and flags load into the right modules; 1 s -> 98 frames of 512."""
    ref, ns = _reference(WAV2VEC_LARGE_ARGS, seed=3)
    path = tmp_path / "wav2vec_large.pt"
    save_fairseq_checkpoint(ref, ns, path, legacy_format=True)
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


def test_extra_state_meters_become_inert(tmp_path: Path) -> None:
    ref, ns = _reference(TINY_ARGS)
    path = tmp_path / "ckpt.pt"
    save_fairseq_checkpoint(ref, ns, path)
    ckpt = safe_torch_load(path)
    assert isinstance(ckpt["args"], argparse.Namespace) and ckpt["args"].arch == "wav2vec"
    assert ckpt["model"]["feature_extractor.conv_layers.0.0.weight"].dtype == torch.float16
    meter = ckpt["extra_state"]["train_meters"]["train_loss"]
    assert type(meter).__name__ == "AverageMeter" and "inert" in repr(meter)
    assert meter.inert_state["sum"] == pytest.approx(3.21 * 8)  # state kept, not interpreted
    assert not hasattr(meter, "update")  # fairseq's class was not imported


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


@pytest.mark.parametrize("legacy_format", [False, True], ids=["zip", "legacy"])
def test_refuses_code_execution(tmp_path: Path, legacy_format: bool) -> None:
    ref, ns = _reference(TINY_ARGS)
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    save_fairseq_checkpoint(
        ref, ns, path, legacy_format=legacy_format, extra={"x": _Shell(f"touch {marker}")}
    )
    with pytest.raises(RefusedGlobalError) as err:
        Wav2Vec1.from_fairseq(path)
    msg = str(err.value)
    assert str(path) in msg and f"'{os.system.__module__}.system'" in msg
    assert not marker.exists()


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


def test_missing_args_take_fairseq_arch_defaults(caplog: pytest.LogCaptureFixture) -> None:
    dropped = ("log_compression", "skip_connections_agg")
    args = {k: v for k, v in TINY_ARGS.items() if k not in dropped}
    with caplog.at_level(logging.WARNING):
        cfg = config_from_fairseq_args(args, source="old.pt")
    # base_wav2vec_architecture: store_true flags default to off
    assert cfg.log_compression is False and cfg.skip_connections_agg is False
    assert "old.pt" in caplog.text and "log_compression" in caplog.text
    # the default layer expression uses + and *
    assert config_from_fairseq_args({"arch": "wav2vec"}).conv_feature_layers == [
        (512, 10, 5), (512, 8, 4), (512, 4, 2), (512, 4, 2), (512, 4, 2)
    ]  # fmt: skip


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
