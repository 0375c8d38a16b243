"""Test-only reference: fairseq's wav2vec 1.0 model and checkpoint format, without fairseq.

Written from fairseq's source, facebookresearch/fairseq fairseq/models/wav2vec/wav2vec.py
(Namespace era, and the later Wav2VecConfig version, commit 1c3b984c), re-typed here in fairseq's
structure: same class names, constructor arguments, attribute names and Sequential indices (so
state_dict keys are fairseq's), and the same forward arithmetic (ka + kb padding, abs/+1/log
compression, strided feature residuals, Fp32GroupNorm). It is deliberately *not* shared with
mmser.models.wav2vec1, so the tests compare two independent implementations.

`save_fairseq_checkpoint` writes what fairseq's checkpoint_utils.save_state wrote: a dict with
argparse.Namespace "args", an fp16 "model" state_dict, "optimizer_history", "extra_state" holding
fairseq.meters objects, and "last_optimizer_state". The meter classes live in a fake
`fairseq.meters` module that exists in sys.modules only while pickling (or trusted loading).

`save_2019_checkpoint` writes it the way the released wav2vec_large.pt (2019) is: the Namespace
holds the pre-rename names (arch "audio_cpc", task "speech_pretraining", criterion
"binary_cross_entropy") and no `activation` / `vq_type` (fairseq added them in 2020), fp16 weights,
torch's legacy (non-zip) serialisation. `load_fairseq_reference` reads a checkpoint back the way
fairseq >= 0.12 does (checkpoint_utils._upgrade_state_dict's renames, then the Wav2VecConfig
defaults for missing fields, as convert_namespace_to_omegaconf fills them), with plain pickle.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import math
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------------------------
# Args
# --------------------------------------------------------------------------------------------

WAV2VEC_LARGE_ARGS = dict(
    # fairseq examples/wav2vec/README.md, "Train a wav2vec model" (the wav2vec_large recipe);
    # store_true flags not given there are False, as argparse stores them.
    arch="wav2vec",
    task="audio_pretraining",
    criterion="binary_cross_entropy",
    conv_feature_layers="[(512, 10, 5), (512, 8, 4), (512, 4, 2), (512, 4, 2), (512, 4, 2), "
    "(512, 1, 1), (512, 1, 1)]",
    conv_aggregator_layers="[(512, 2, 1), (512, 3, 1), (512, 4, 1), (512, 5, 1), (512, 6, 1), "
    "(512, 7, 1), (512, 8, 1), (512, 9, 1), (512, 10, 1), (512, 11, 1), (512, 12, 1), "
    "(512, 13, 1)]",
    skip_connections_agg=True,
    residual_scale=0.5,
    log_compression=True,
    num_negatives=10,
    prediction_steps=12,
    offset="auto",
    dropout=0.0,
    dropout_features=0.0,
    dropout_agg=0.0,
    encoder="cnn",
    aggregator="cnn",
    skip_connections_feat=False,
    no_conv_bias=False,
    agg_zero_pad=False,
    non_affine_group_norm=False,
    balanced_classes=False,
    project_features="none",
    sample_distance=None,
    cross_sample_negatives=False,
    gru_dim=512,
    fp16=True,
    lr=[0.005],
    max_update=400000,
)


# fairseq/models/wav2vec/wav2vec.py `Wav2VecConfig` field defaults (fairseq >= 0.12), for the
# fields this reference reads. convert_namespace_to_omegaconf -> _override_attr uses them for every
# field a Namespace checkpoint lacks.
WAV2VEC_CONFIG_DEFAULTS = dict(
    prediction_steps=12,
    sample_distance=None,
    cross_sample_negatives=0,
    num_negatives=10,
    conv_feature_layers="[(512, 10, 5), (512, 8, 4), (512, 4, 2), (512, 4, 2), (512, 4, 2), "
    "(512, 1, 1), (512, 1, 1), (512, 1, 1)]",
    conv_aggregator_layers="[(512, 2, 1), (512, 3, 1), (512, 4, 1), (512, 5, 1), (512, 6, 1), "
    "(512, 7, 1), (512, 8, 1), (512, 9, 1), (512, 10, 1), (512, 11, 1), (512, 12, 1), "
    "(512, 13, 1)]",
    dropout=0.0,
    dropout_features=0.0,
    dropout_agg=0.0,
    aggregator="cnn",
    gru_dim=512,
    no_conv_bias=False,
    agg_zero_pad=False,
    skip_connections_feat=False,
    skip_connections_agg=True,
    residual_scale=0.5,
    log_compression=True,
    balanced_classes=False,
    project_features="none",
    non_affine_group_norm=False,
    offset="auto",
    activation="relu",
    vq_type="none",
)


def fill_wav2vec_config_defaults(args: argparse.Namespace) -> None:
    for k, v in WAV2VEC_CONFIG_DEFAULTS.items():
        if not hasattr(args, k):
            setattr(args, k, v)


def upgrade_args(args: argparse.Namespace) -> None:
    """fairseq/checkpoint_utils.py `_upgrade_state_dict`, the wav2vec renames (in place)."""
    if hasattr(args, "criterion") and args.criterion in [
        "binary_cross_entropy",
        "kd_binary_cross_entropy",
    ]:
        args.criterion = "wav2vec"
    if hasattr(args, "task") and args.task == "speech_pretraining":
        args.task = "audio_pretraining"
    if hasattr(args, "arch") and args.arch == "audio_cpc":
        args.arch = "wav2vec"


# What the 2019 trainer stored besides the options given on the command line: fairseq's train.py
# (options.parse_args_and_arch) ran the architecture function on the args before training, so the
# Namespace holds every field the 2019 `base_wav2vec_architecture` set (fairseq commit 392fce8a,
# fairseq/models/wav2vec.py; model options without a value are otherwise absent, argparse.SUPPRESS).
BASE_WAV2VEC_ARCHITECTURE_2019 = dict(
    conv_feature_layers="[(512, 10, 5)] + [(512, 8, 4)] + [(512, 4, 2)] * 3",
    conv_aggregator_layers="[(512, 3, 1)] * 9",
    prediction_steps=12,
    num_negatives=1,
    sample_distance=None,
    cross_sample_negatives=False,
    dropout=0.0,
    dropout_features=0.0,
    dropout_agg=0.0,
    encoder="cnn",
    aggregator="cnn",
    skip_connections_feat=False,
    skip_connections_agg=False,
    residual_scale=0.5,
    gru_dim=512,
    no_conv_bias=False,
    agg_zero_pad=False,
    log_compression=False,
    balanced_classes=False,
    project_features="none",
    non_affine_group_norm=False,
    offset="auto",
)

# Some training options of the 2019 release's Namespace (fairseq 0.8 train.py; values as in the
# wav2vec_large recipe): not read by the model, present so the Namespace looks like the real one.
_ARGS_2019_TRAINING = dict(
    data="/manifest/path",
    sample_rate=16000,
    max_sample_size=150000,
    min_lr=1e-09,
    optimizer="adam",
    lr_scheduler="cosine",
    warmup_updates=500,
    max_tokens=1500000,
)


def legacy_2019_args(args: dict) -> argparse.Namespace:
    """`args` as the 2019 release stores them: pre-rename names, no activation / vq_type.

    The 2019 code had neither field (ReLU everywhere, no quantizer), so they must be the values
    fairseq fills in later, "relu" and "none"."""
    if args.get("activation", "relu") != "relu" or args.get("vq_type", "none") != "none":
        raise ValueError("a 2019 checkpoint can only hold activation=relu, vq_type=none")
    ns = {**_ARGS_2019_TRAINING, **BASE_WAV2VEC_ARCHITECTURE_2019}
    ns.update((k, v) for k, v in args.items() if k not in ("activation", "vq_type"))
    ns.update(arch="audio_cpc", task="speech_pretraining", criterion="binary_cross_entropy")
    return argparse.Namespace(**ns)


# --------------------------------------------------------------------------------------------
# Model (fairseq structure)
# --------------------------------------------------------------------------------------------


class Fp32GroupNorm(nn.GroupNorm):
    def forward(self, input):
        output = F.group_norm(
            input.float(),
            self.num_groups,
            self.weight.float() if self.weight is not None else None,
            self.bias.float() if self.bias is not None else None,
            self.eps,
        )
        return output.type_as(input)


def norm_block(is_layer_norm, dim, affine=True):
    assert not is_layer_norm  # wav2vec 1.0 only ever builds group norm here
    return Fp32GroupNorm(1, dim, affine=affine)


class ConvFeatureExtractionModel(nn.Module):
    def __init__(self, conv_layers, dropout, log_compression, skip_connections,
                 residual_scale, non_affine_group_norm, activation):  # fmt: skip
        super().__init__()

        def block(n_in, n_out, k, stride):
            return nn.Sequential(
                nn.Conv1d(n_in, n_out, k, stride=stride, bias=False),
                nn.Dropout(p=dropout),
                norm_block(is_layer_norm=False, dim=n_out, affine=not non_affine_group_norm),
                activation,
            )

        in_d = 1
        self.conv_layers = nn.ModuleList()
        for dim, k, stride in conv_layers:
            self.conv_layers.append(block(in_d, dim, k, stride))
            in_d = dim
        self.log_compression = log_compression
        self.skip_connections = skip_connections
        self.residual_scale = math.sqrt(residual_scale)

    def forward(self, x):
        x = x.unsqueeze(1)  # BxT -> BxCxT
        for conv in self.conv_layers:
            residual = x
            x = conv(x)
            if self.skip_connections and x.size(1) == residual.size(1):
                tsz = x.size(2)
                r_tsz = residual.size(2)
                residual = residual[..., :: r_tsz // tsz][..., :tsz]
                x = (x + residual) * self.residual_scale
        if self.log_compression:
            x = x.abs()
            x = x + 1
            x = x.log()
        return x


class ZeroPad1d(nn.Module):
    def __init__(self, pad_left, pad_right):
        super().__init__()
        self.pad_left = pad_left
        self.pad_right = pad_right

    def forward(self, x):
        return F.pad(x, (self.pad_left, self.pad_right))


class ConvAggegator(nn.Module):  # sic: fairseq's spelling
    def __init__(self, conv_layers, embed, dropout, skip_connections, residual_scale,
                 non_affine_group_norm, conv_bias, zero_pad, activation):  # fmt: skip
        super().__init__()

        def block(n_in, n_out, k, stride):
            ka = k // 2
            kb = ka - 1 if k % 2 == 0 else ka
            pad = ZeroPad1d(ka + kb, 0) if zero_pad else nn.ReplicationPad1d((ka + kb, 0))
            return nn.Sequential(
                pad,
                nn.Conv1d(n_in, n_out, k, stride=stride, bias=conv_bias),
                nn.Dropout(p=dropout),
                norm_block(False, n_out, affine=not non_affine_group_norm),
                activation,
            )

        in_d = embed
        self.conv_layers = nn.ModuleList()
        self.residual_proj = nn.ModuleList()
        for dim, k, stride in conv_layers:
            if in_d != dim and skip_connections:
                self.residual_proj.append(nn.Conv1d(in_d, dim, 1, bias=False))
            else:
                self.residual_proj.append(None)
            self.conv_layers.append(block(in_d, dim, k, stride))
            in_d = dim
        self.conv_layers = nn.Sequential(*self.conv_layers)
        self.skip_connections = skip_connections
        self.residual_scale = math.sqrt(residual_scale)

    def forward(self, x):
        for rproj, conv in zip(self.residual_proj, self.conv_layers, strict=True):
            residual = x
            x = conv(x)
            if self.skip_connections:
                if rproj is not None:
                    residual = rproj(residual)
                x = (x + residual) * self.residual_scale
        return x


class Wav2VecPredictionsModel(nn.Module):
    """Only the parameters (the contrastive forward is not needed for features/context)."""

    def __init__(self, in_dim, out_dim, prediction_steps, dropout, offset):
        super().__init__()
        self.project_to_steps = nn.ConvTranspose2d(in_dim, out_dim, (1, prediction_steps))
        self.dropout = nn.Dropout(p=dropout)
        self.offset = offset


class Wav2VecModel(nn.Module):
    def __init__(self, args):
        super().__init__()
        args = copy.copy(args)
        fill_wav2vec_config_defaults(args)  # fairseq >= 0.12 gets a complete Wav2VecConfig
        self.prediction_steps = args.prediction_steps
        activation = nn.ReLU() if args.activation == "relu" else nn.GELU()
        feature_enc_layers = _literal_layers(args.conv_feature_layers)
        self.feature_extractor = ConvFeatureExtractionModel(
            conv_layers=feature_enc_layers,
            dropout=0.0,
            log_compression=args.log_compression,
            skip_connections=args.skip_connections_feat,
            residual_scale=args.residual_scale,
            non_affine_group_norm=args.non_affine_group_norm,
            activation=activation,
        )
        embed = feature_enc_layers[-1][0]

        # offset "auto": from the receptive field (only used by the prediction loss)
        jin = rin = 0
        for _, k, stride in feature_enc_layers:
            if rin == 0:
                rin = k
            rin = rin + (k - 1) * jin
            jin = stride if jin == 0 else jin * stride
        offset = math.ceil(rin / jin) if args.offset == "auto" else int(args.offset)

        agg_layers = _literal_layers(args.conv_aggregator_layers)
        agg_dim = agg_layers[-1][0]
        self.feature_aggregator = ConvAggegator(
            conv_layers=agg_layers,
            embed=embed,
            dropout=args.dropout,
            skip_connections=args.skip_connections_agg,
            residual_scale=args.residual_scale,
            non_affine_group_norm=args.non_affine_group_norm,
            conv_bias=not args.no_conv_bias,
            zero_pad=args.agg_zero_pad,
            activation=activation,
        )
        self.wav2vec_predictions = Wav2VecPredictionsModel(
            in_dim=agg_dim,
            out_dim=embed,
            prediction_steps=args.prediction_steps,
            dropout=args.dropout,
            offset=offset,
        )
        self.dropout_feats = nn.Dropout(p=args.dropout_features)
        self.dropout_agg = nn.Dropout(p=args.dropout_agg)

    def extract(self, source):
        """What fairseq's examples/wav2vec/wav2vec_featurize.py does: z, then c."""
        z = self.feature_extractor(source)
        c = self.dropout_agg(self.feature_aggregator(self.dropout_feats(z)))
        return z, c


def _literal_layers(expr: str):
    # fairseq eval()s this string; the test inputs are our own, so eval with no builtins suffices
    return eval(expr, {"__builtins__": {}}, {})  # noqa: S307


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Non-trivial values for every parameter (GroupNorm defaults to weight 1, bias 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if isinstance(module, nn.GroupNorm) and name == "weight":
                    p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
                elif p.dim() == 1:  # biases
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
    return model


# --------------------------------------------------------------------------------------------
# Checkpoint format
# --------------------------------------------------------------------------------------------


# Stand-ins for fairseq 0.8's fairseq/meters.py classes (same names and attributes), pickled as
# `fairseq.meters.<Name>` inside `fake_fairseq_meters()`.


class AverageMeter:
    def __init__(self):
        self.val, self.avg, self.sum, self.count = 0.0, 0.0, 0.0, 0

    def update(self, val, n=1):
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count


class TimeMeter:
    def __init__(self, init=0):
        self.init, self.start, self.n = init, time.time(), 0


class StopwatchMeter:
    def __init__(self):
        self.sum, self.n, self.start_time = 0.0, 0, None


@contextlib.contextmanager
def fake_fairseq_meters() -> Iterator[types.ModuleType]:
    """Make `fairseq.meters` importable (for pickling and trusted loading) only inside the block."""
    saved = {k: sys.modules.get(k) for k in ("fairseq", "fairseq.meters")}
    pkg = types.ModuleType("fairseq")
    meters = types.ModuleType("fairseq.meters")
    for cls in (AverageMeter, TimeMeter, StopwatchMeter):
        meters.__dict__[cls.__name__] = cls
    pkg.meters = meters
    orig_modules = {cls: cls.__module__ for cls in (AverageMeter, TimeMeter, StopwatchMeter)}
    for cls in orig_modules:
        cls.__module__ = "fairseq.meters"
    sys.modules["fairseq"], sys.modules["fairseq.meters"] = pkg, meters
    try:
        yield meters
    finally:
        for cls, mod in orig_modules.items():
            cls.__module__ = mod
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def save_fairseq_checkpoint(
    model: Wav2VecModel,
    args: argparse.Namespace,
    path: str | Path,
    *,
    legacy_format: bool = False,
    fp16: bool = True,
    extra: dict | None = None,
) -> None:
    """Write `model` the way fairseq 0.8-0.9 did (checkpoint_utils.save_state)."""
    state = model.state_dict()
    if fp16:
        state = collections.OrderedDict((k, v.half()) for k, v in state.items())
    loss = AverageMeter()
    loss.update(3.21, 8)
    train_meters = collections.OrderedDict(
        [("train_loss", loss), ("wps", TimeMeter()), ("wall", StopwatchMeter())]
    )
    first = next(iter(state.values()))
    ckpt = {
        "args": copy.copy(args),
        "model": state,
        "optimizer_history": [
            {
                "criterion_name": "BinaryCrossEntropyCriterion",
                "optimizer_name": "FP16Optimizer",
                "lr_scheduler_state": {"best": 2.5},
                "num_updates": 400000,
            }
        ],
        "extra_state": {
            "train_iterator": {"epoch": 9, "iterations_in_epoch": 0},
            "val_loss": 2.5,
            "best": 2.5,
            "train_meters": train_meters,
        },
        "last_optimizer_state": {
            "state": {0: {"step": 400000, "exp_avg": torch.zeros_like(first, dtype=torch.float32)}},
            "param_groups": [{"lr": 1e-6, "betas": (0.9, 0.999), "params": [0]}],
            "loss_scale": 128.0,
        },
    }
    if extra:
        ckpt.update(extra)
    with fake_fairseq_meters():
        torch.save(ckpt, path, _use_new_zipfile_serialization=not legacy_format)


def save_2019_checkpoint(model: Wav2VecModel, args: dict, path: str | Path) -> argparse.Namespace:
    """Write `model` as the released wav2vec_large.pt is: legacy Namespace args, fp16 weights,
    legacy serialisation, fairseq.meters objects. Returns the Namespace stored."""
    ns = legacy_2019_args(args)
    save_fairseq_checkpoint(model, ns, path, legacy_format=True, fp16=True)
    return ns


def load_fairseq_reference(path: str | Path) -> Wav2VecModel:
    """Read a checkpoint the way fairseq >= 0.12's load_model_ensemble_and_task does, with plain
    (trusting) pickle: upgrade the args, fill Wav2VecConfig defaults, build, load the weights
    (fp16 copied into the float32 modules), eval mode."""
    with fake_fairseq_meters():
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    args = ckpt["args"]
    upgrade_args(args)
    assert args.arch == "wav2vec", args.arch
    fill_wav2vec_config_defaults(args)
    model = Wav2VecModel(args)
    model.load_state_dict(ckpt["model"], strict=True)
    return model.eval()
