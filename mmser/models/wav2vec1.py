"""wav2vec 1.0 (Schneider et al., 2019) in plain PyTorch, loading fairseq's `wav2vec_large.pt`.

P-TAPT's frame-level emotion model (PAPER.md, P-TAPT step 1) starts from fairseq's wav2vec 1.0
large checkpoint. fairseq no longer installs, so this file re-implements the two parts of
fairseq's `Wav2VecModel` that produce representations (fairseq/models/wav2vec/wav2vec.py):

    wav (B, T) --ConvFeatureExtractionModel--> z (B, 512, T')  --ConvAggegator--> c (B, 512, T')

with module and parameter names equal to fairseq's, so a fairseq state_dict loads as is
(`feature_extractor.conv_layers.N.0.weight`, `feature_aggregator.conv_layers.N.1.weight`, ...).
The contrastive prediction head (`wav2vec_predictions.*`), `offset` and `prediction_steps` only
serve pre-training and are dropped on load. vq-wav2vec checkpoints (`vq_type` != "none") and the
GRU aggregator are refused with a clear error.

The released `wav2vec_large.pt` (2019) predates the wav2vec names: its argparse.Namespace args say
`arch='audio_cpc'`, `task='speech_pretraining'`, `criterion='binary_cross_entropy'` and have no
`activation` / `vq_type` (added in 2020 with vq-wav2vec). `upgrade_fairseq_args` renames them as
fairseq's `checkpoint_utils._upgrade_state_dict` does, and missing fields take the defaults of
fairseq's `Wav2VecConfig` (relu, "none"), as `convert_namespace_to_omegaconf` fills them.

Input is the raw 16 kHz waveform, not normalised (wav2vec 1.0 was trained on raw audio).
Frames are 10 ms apart (total stride 160). Every conv block ends in GroupNorm(1, C), which
normalises over all time steps: zero padding changes every frame of a padded item, so batch items
of equal length (P-TAPT crops each batch to its shortest item) or batch size 1 give exact results.

    model = Wav2Vec1.from_fairseq("wav2vec_large.pt")
    z = model.features(wav)   # (B, 512, T')
    c = model.context(wav)    # (B, 512, T')
"""

from __future__ import annotations

import argparse
import ast
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmser.models.safe_unpickle import safe_torch_load

logger = logging.getLogger(__name__)

ConvLayers = list[tuple[int, int, int]]  # [(dim, kernel_size, stride), ...]

# wav2vec_large's layer lists (fairseq examples/wav2vec/README.md training command, also the
# fairseq Wav2VecConfig defaults minus one (512, 1, 1) feature layer).
WAV2VEC_LARGE_FEATURE_LAYERS: ConvLayers = [
    (512, 10, 5), (512, 8, 4), (512, 4, 2), (512, 4, 2), (512, 4, 2), (512, 1, 1), (512, 1, 1)
]  # fmt: skip
WAV2VEC_LARGE_AGGREGATOR_LAYERS: ConvLayers = [(512, k, 1) for k in range(2, 14)]


@dataclass
class Wav2Vec1Config:
    """Architecture of a wav2vec 1.0 model; field names are fairseq's argument names.

    Defaults are wav2vec_large's (fairseq examples/wav2vec/README.md: --skip-connections-agg
    --residual-scale 0.5 --log-compression; the other flags at their argparse defaults).
    """

    conv_feature_layers: ConvLayers = field(
        default_factory=lambda: list(WAV2VEC_LARGE_FEATURE_LAYERS)
    )
    conv_aggregator_layers: ConvLayers = field(
        default_factory=lambda: list(WAV2VEC_LARGE_AGGREGATOR_LAYERS)
    )
    dropout: float = 0.0  # inside aggregator blocks (fairseq: --dropout)
    dropout_features: float = 0.0  # on z before the aggregator
    dropout_agg: float = 0.0  # on c
    skip_connections_feat: bool = False
    skip_connections_agg: bool = True
    residual_scale: float = 0.5  # residual sums are scaled by sqrt(residual_scale)
    log_compression: bool = True  # z = log(|x| + 1) after the last feature layer
    non_affine_group_norm: bool = False
    no_conv_bias: bool = False  # aggregator convs only; feature convs never have a bias
    agg_zero_pad: bool = False  # False: causal *replication* padding; True: causal zero padding
    activation: Literal["relu", "gelu"] = "relu"

    def __post_init__(self) -> None:
        for name in ("conv_feature_layers", "conv_aggregator_layers"):
            layers = getattr(self, name)
            if not layers or not all(
                len(t) == 3 and all(isinstance(v, int) and v > 0 for v in t) for t in layers
            ):
                raise ValueError(f"{name} must be a non-empty list of (dim, kernel, stride) ints")
            setattr(self, name, [tuple(t) for t in layers])
        if self.activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be 'relu' or 'gelu', got {self.activation!r}")


# --------------------------------------------------------------------------------------------
# Modules (names and Sequential indices match fairseq so state_dict keys line up)
# --------------------------------------------------------------------------------------------


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back (fairseq's Fp32GroupNorm), so the model
    behaves the same when run in half precision."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).type_as(x)


def _activation(name: str) -> nn.Module:
    return nn.ReLU() if name == "relu" else nn.GELU()


class ConvFeatureExtractionModel(nn.Module):
    """Waveform -> z. Block i = Sequential(Conv1d(no bias), Dropout(0), GroupNorm(1, C), act)."""

    def __init__(self, cfg: Wav2Vec1Config) -> None:
        super().__init__()
        self.conv_layers = nn.ModuleList()
        in_dim = 1
        for dim, k, stride in cfg.conv_feature_layers:
            self.conv_layers.append(
                nn.Sequential(
                    nn.Conv1d(in_dim, dim, k, stride=stride, bias=False),
                    nn.Dropout(0.0),  # fairseq builds the extractor with dropout=0.
                    GroupNorm32(1, dim, affine=not cfg.non_affine_group_norm),
                    _activation(cfg.activation),
                )
            )
            in_dim = dim
        self.log_compression = cfg.log_compression
        self.skip_connections = cfg.skip_connections_feat
        self.residual_scale = math.sqrt(cfg.residual_scale)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        x = wav.unsqueeze(1)  # (B, 1, T)
        for block in self.conv_layers:
            residual = x
            x = block(x)  # (B, C, T_i)
            if self.skip_connections and x.size(1) == residual.size(1):
                # strided residual: every (T_prev // T_i)-th step, cut to T_i
                t, r_t = x.size(2), residual.size(2)
                residual = residual[..., :: r_t // t][..., :t]
                x = (x + residual) * self.residual_scale
        if self.log_compression:
            x = torch.log1p(x.abs())
        return x  # (B, C, T')


class ConvAggregator(nn.Module):
    """z -> c. Block i = Sequential(causal pad k-1, Conv1d, Dropout, GroupNorm(1, C), act),
    with scaled residual connections (1x1 projection when the width changes).

    (fairseq spells the class `ConvAggegator`; the name does not appear in state_dict keys.)
    """

    def __init__(self, cfg: Wav2Vec1Config, in_dim: int) -> None:
        super().__init__()
        skip = cfg.skip_connections_agg
        blocks: list[nn.Module] = []
        self.residual_proj = nn.ModuleList()
        for dim, k, stride in cfg.conv_aggregator_layers:
            # Left padding k-1 keeps length (for stride 1) and makes each step causal.
            pad: nn.Module = (
                nn.ZeroPad1d((k - 1, 0)) if cfg.agg_zero_pad else nn.ReplicationPad1d((k - 1, 0))
            )
            blocks.append(
                nn.Sequential(
                    pad,
                    nn.Conv1d(in_dim, dim, k, stride=stride, bias=not cfg.no_conv_bias),
                    nn.Dropout(cfg.dropout),
                    GroupNorm32(1, dim, affine=not cfg.non_affine_group_norm),
                    _activation(cfg.activation),
                )
            )
            # ModuleList keeps None entries, so indices match fairseq's residual_proj.N keys.
            self.residual_proj.append(
                nn.Conv1d(in_dim, dim, 1, bias=False) if (skip and in_dim != dim) else None
            )
            in_dim = dim
        self.conv_layers = nn.Sequential(*blocks)
        self.skip_connections = skip
        self.residual_scale = math.sqrt(cfg.residual_scale)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = z  # (B, C_in, T')
        for proj, block in zip(self.residual_proj, self.conv_layers, strict=True):
            residual = x
            x = block(x)  # (B, C, T')
            if self.skip_connections:
                if proj is not None:
                    residual = proj(residual)
                x = (x + residual) * self.residual_scale
        return x  # (B, C, T')


class Wav2Vec1(nn.Module):
    """fairseq wav2vec 1.0 without the pre-training head: `features` (z) and `context` (c)."""

    def __init__(self, cfg: Wav2Vec1Config | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or Wav2Vec1Config()
        self.feature_extractor = ConvFeatureExtractionModel(cfg)
        self.dropout_feats = nn.Dropout(cfg.dropout_features)
        self.feature_aggregator = ConvAggregator(cfg, in_dim=cfg.conv_feature_layers[-1][0])
        self.dropout_agg = nn.Dropout(cfg.dropout_agg)

    @property
    def feature_dim(self) -> int:
        return self.cfg.conv_feature_layers[-1][0]

    @property
    def context_dim(self) -> int:
        return self.cfg.conv_aggregator_layers[-1][0]

    @staticmethod
    def _check_wav(wav: torch.Tensor) -> None:
        if wav.dim() != 2:
            raise ValueError(f"expected a waveform batch of shape (B, T), got {tuple(wav.shape)}")

    def features(self, wav: torch.Tensor) -> torch.Tensor:
        """Feature extractor output z: (B, T) waveform -> (B, C_feat, T')."""
        self._check_wav(wav)
        return self.feature_extractor(wav)  # (B, C_feat, T')

    def context(self, wav: torch.Tensor) -> torch.Tensor:
        """Aggregator output c: (B, T) waveform -> (B, C_agg, T'); dropouts act in training only."""
        z = self.dropout_feats(self.features(wav))  # (B, C_feat, T')
        return self.dropout_agg(self.feature_aggregator(z))  # (B, C_agg, T')

    forward = context

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        """Number of frames for input lengths (samples): floor((L - k) / s) + 1 per feature layer;
        the causally padded aggregator keeps the length for stride 1."""
        out = lengths.clone()
        for _, k, s in self.cfg.conv_feature_layers:
            out = torch.div(out - k, s, rounding_mode="floor") + 1
        for _, _k, s in self.cfg.conv_aggregator_layers:
            out = torch.div(out - 1, s, rounding_mode="floor") + 1  # padded by k-1
        return out.clamp(min=0)

    def encode(
        self, audio: torch.Tensor, audio_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch-contract view: (B, T) audio + (B, T) bool mask -> (frames (B, F, C), mask (B, F)).

        Padding is not hidden from GroupNorm (see the module docstring): padded items differ
        from the same items run alone.
        """
        c = self.context(audio).transpose(1, 2)  # (B, F, C)
        b, f = c.shape[:2]
        if audio_mask is None:
            return c, torch.ones(b, f, dtype=torch.bool, device=c.device)
        lengths = self.output_lengths(audio_mask.long().sum(-1))  # (B,)
        frame_mask = torch.arange(f, device=c.device)[None, :] < lengths[:, None]  # (B, F)
        return c, frame_mask

    def freeze_feature_extractor(self) -> None:
        """Stop gradients into the CNN feature extractor (P-TAPT step 1 trains the aggregator)."""
        for p in self.feature_extractor.parameters():
            p.requires_grad_(False)

    # ----------------------------------------------------------------------------------------
    # Loading fairseq checkpoints
    # ----------------------------------------------------------------------------------------

    @classmethod
    def from_fairseq(cls, path: str | Path) -> Wav2Vec1:
        """Build from a fairseq wav2vec 1.0 checkpoint (e.g. wav2vec_large.pt), in eval mode and
        float32 (the released weights are fp16). Loaded with a restricted unpickler: no fairseq
        import, no code from the file is run."""
        path = Path(path)
        ckpt = safe_torch_load(path)
        if not isinstance(ckpt, Mapping) or "model" not in ckpt:
            raise ValueError(f"{path}: not a fairseq checkpoint (expected a dict with 'model')")
        cfg = config_from_fairseq_args(_stored_args(ckpt, path), source=str(path))
        model = cls(cfg)
        state = _select_state(ckpt["model"], model, path)
        state = {k: v.float() for k, v in state.items()}
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            # torch's message spans several lines (one per mismatch); keep ours on one
            reason = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
            raise ValueError(
                f"{path}: weights do not fit the architecture in its args ({reason})"
            ) from e
        logger.info("loaded wav2vec 1.0 from %s (%d tensors)", path, len(state))
        return model.eval()


# --------------------------------------------------------------------------------------------
# fairseq args -> Wav2Vec1Config
# --------------------------------------------------------------------------------------------

# What fairseq fills in for wav2vec args a checkpoint lacks: the field defaults of `Wav2VecConfig`
# (fairseq/models/wav2vec/wav2vec.py). fairseq >= 0.12 (the first release with the audio_cpc
# rename below) reads a Namespace checkpoint through checkpoint_utils._upgrade_state_dict ->
# dataclass/utils.py convert_namespace_to_omegaconf -> `_override_attr`, which takes the dataclass
# default for every field the Namespace lacks. (`encoder` is no Wav2VecConfig field: the feature
# encoder is always the CNN; the Namespace-era `--encoder` only accepted "cnn".)
# The Namespace-era loader (fairseq <= 0.10: `Wav2VecModel.build_model` ->
# `base_wav2vec_architecture`) had other values for the layer lists, skip_connections_agg and
# log_compression, but a Namespace written by fairseq's trainer stores those (train.py ran that
# architecture function on the args before training): only fields added after a checkpoint was
# written can be missing, and for those (activation, vq_type) both eras agree.
_FAIRSEQ_ARCH_DEFAULTS: dict[str, Any] = {
    "conv_feature_layers": "[(512, 10, 5), (512, 8, 4), (512, 4, 2), (512, 4, 2), (512, 4, 2), "
    "(512, 1, 1), (512, 1, 1), (512, 1, 1)]",
    "conv_aggregator_layers": "[(512, 2, 1), (512, 3, 1), (512, 4, 1), (512, 5, 1), (512, 6, 1), "
    "(512, 7, 1), (512, 8, 1), (512, 9, 1), (512, 10, 1), (512, 11, 1), (512, 12, 1), "
    "(512, 13, 1)]",
    "dropout": 0.0,
    "dropout_features": 0.0,
    "dropout_agg": 0.0,
    "encoder": "cnn",
    "aggregator": "cnn",
    "skip_connections_feat": False,
    "skip_connections_agg": True,
    "residual_scale": 0.5,
    "no_conv_bias": False,
    "agg_zero_pad": False,
    "log_compression": True,
    "non_affine_group_norm": False,
    "activation": "relu",
    "vq_type": "none",
}

# Fields fairseq added after the wav2vec 1.0 release (vq-wav2vec, Feb 2020): the 2019
# wav2vec_large.pt lacks them by design, so filling them in is logged at INFO, not WARNING.
_FIELDS_NEWER_THAN_2019: frozenset[str] = frozenset({"activation", "vq_type"})

# fairseq/checkpoint_utils.py `_upgrade_state_dict`: renames of legacy values in a checkpoint's
# argparse.Namespace args (2019 wav2vec was trained as "audio_cpc" on "speech_pretraining").
_LEGACY_ARG_RENAMES: dict[str, dict[str, str]] = {
    "criterion": {"binary_cross_entropy": "wav2vec", "kd_binary_cross_entropy": "wav2vec"},
    "task": {"speech_pretraining": "audio_pretraining"},
    "arch": {"audio_cpc": "wav2vec"},
}


def upgrade_fairseq_args(args: Mapping[str, Any], source: str = "checkpoint") -> dict[str, Any]:
    """A copy of Namespace-era args with fairseq's legacy renames applied (criterion
    binary_cross_entropy / kd_binary_cross_entropy -> wav2vec, task speech_pretraining ->
    audio_pretraining, arch audio_cpc -> wav2vec), as `_upgrade_state_dict` does; other values
    are left alone (its remaining upgrades concern data/optimizer fields the model never reads)."""
    out = dict(args)
    for key, renames in _LEGACY_ARG_RENAMES.items():
        value = out.get(key)
        if isinstance(value, str) and value in renames:
            out[key] = renames[value]
            logger.info("%s: legacy args %s=%r read as %r", source, key, value, out[key])
    return out


def parse_layers(expr: str, where: str = "conv layers") -> ConvLayers:
    """Parse fairseq's layer expression ("[(512, 10, 5)] + [(512, 4, 2)] * 3").

    fairseq calls eval() on it; this accepts only list/tuple literals of ints combined with `+`
    and `list * int` (hand-written because ast.literal_eval refuses the operators)."""

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            items = [ev(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            left, right = ev(node.left), ev(node.right)
            if isinstance(left, list) and isinstance(right, list):
                return left + right
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
            left, right = ev(node.left), ev(node.right)
            if isinstance(left, list) and isinstance(right, int):
                return left * right
            if isinstance(left, int) and isinstance(right, list):
                return right * left
        raise ValueError(f"{where}: unsupported layer expression {expr!r}")

    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"{where}: layer expression does not parse: {expr!r}") from None
    layers = ev(tree.body)
    if not isinstance(layers, list) or not all(
        isinstance(t, tuple) and len(t) == 3 and all(isinstance(v, int) for v in t) for t in layers
    ):
        raise ValueError(f"{where}: expected a list of (dim, kernel, stride), got {expr!r}")
    return layers


def _stored_args(ckpt: Mapping, path: Path) -> Mapping[str, Any]:
    """The training args: checkpoint['args'] (argparse.Namespace, fairseq <= 0.10; upgraded like
    fairseq's `_upgrade_state_dict`, which only touches Namespace args) or a plain dict
    checkpoint['cfg']['model']."""
    args = ckpt.get("args")
    if isinstance(args, argparse.Namespace):
        return upgrade_fairseq_args(vars(args), source=str(path))
    cfg = ckpt.get("cfg")
    if isinstance(cfg, Mapping) and isinstance(cfg.get("model"), Mapping):
        return cfg["model"]
    raise ValueError(
        f"{path}: no model args found (expected checkpoint['args'] as argparse.Namespace or a "
        f"dict checkpoint['cfg']['model'])"
    )


def config_from_fairseq_args(args: Mapping[str, Any], source: str = "checkpoint") -> Wav2Vec1Config:
    """Map fairseq wav2vec args (a Namespace's vars after `upgrade_fairseq_args`, or a dict
    cfg['model']) to `Wav2Vec1Config`; missing fields take fairseq's `Wav2VecConfig` defaults."""
    arch = args.get("arch", args.get("_name", "wav2vec"))
    if arch != "wav2vec":
        raise ValueError(
            f"{source}: arch is {arch!r}, not 'wav2vec' (wav2vec 1.0, or 'audio_cpc' in 2019 "
            f"checkpoints); wav2vec 2.0 checkpoints load through the wav2vec2 encoder instead"
        )
    missing = sorted(k for k in _FAIRSEQ_ARCH_DEFAULTS if k not in args)
    newer = [k for k in missing if k in _FIELDS_NEWER_THAN_2019]
    other = [k for k in missing if k not in _FIELDS_NEWER_THAN_2019]
    if newer:
        logger.info("%s: args predate %s; using fairseq's defaults %s", source, newer,
                    {k: _FAIRSEQ_ARCH_DEFAULTS[k] for k in newer})  # fmt: skip
    if other:
        logger.warning("%s: args lack %s; using fairseq's Wav2VecConfig defaults", source, other)
    a = {k: args.get(k, default) for k, default in _FAIRSEQ_ARCH_DEFAULTS.items()}
    vq = a["vq_type"]
    if vq not in (None, "none"):
        raise ValueError(f"{source}: vq-wav2vec checkpoints (vq_type={vq!r}) are not supported")
    if a["encoder"] != "cnn" or a["aggregator"] != "cnn":
        raise ValueError(
            f"{source}: only the CNN encoder and aggregator are supported, got encoder="
            f"{a['encoder']!r}, aggregator={a['aggregator']!r}"
        )
    layers = {}
    for key in ("conv_feature_layers", "conv_aggregator_layers"):
        value = a[key]
        layers[key] = parse_layers(value, f"{source}: {key}") if isinstance(value, str) else value
    known = {f.name for f in fields(Wav2Vec1Config)}
    kwargs = {k: v for k, v in a.items() if k in known}
    kwargs.update(layers)
    return Wav2Vec1Config(**kwargs)


_UNUSED_PREFIXES = ("wav2vec_predictions.", "project_features.")


def _select_state(
    state: Mapping[str, torch.Tensor], model: Wav2Vec1, path: Path
) -> dict[str, torch.Tensor]:
    """Keep the feature extractor / aggregator tensors; drop pre-training-only ones; refuse
    anything else (a sign of a different architecture)."""
    if not isinstance(state, Mapping):
        kind = type(state).__name__
        raise ValueError(f"{path}: checkpoint['model'] is a {kind}, not a state_dict")
    expected = set(model.state_dict())
    kept, unknown = {}, []
    for key, value in state.items():
        if key in expected:
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"{path}: '{key}' is a {type(value).__name__}, not a tensor")
            kept[key] = value
        elif not key.startswith(_UNUSED_PREFIXES):
            unknown.append(key)
    missing = sorted(expected - set(kept))
    if unknown or missing:
        raise ValueError(
            f"{path}: state_dict does not match the wav2vec 1.0 architecture in its args "
            f"(unexpected: {unknown[:5]}{'...' if len(unknown) > 5 else ''}, "
            f"missing: {missing[:5]}{'...' if len(missing) > 5 else ''})"
        )
    dropped = len(state) - len(kept)
    if dropped:
        logger.info("%s: ignoring %d pre-training-only tensors", path, dropped)
    return kept
