"""One saved-model format for every task (audio V-FT / TAPT / P-TAPT, text-only, each fusion head).

    save_pretrained(model, "runs/x/s1-seed0/model", meta=...)  # model.safetensors + config.json + README.md
    saved = from_pretrained("runs/x/s1-seed0/model")           # or a Hub id "user/mmser-vft"
    saved.model, saved.classes, saved.sample_rate, saved.text  # eval-mode nn.Module + what inference needs
    push_to_hub("runs/x/s1-seed0/model", "user/mmser-vft")

A folder holds:
    model.safetensors  the state dict (safetensors: loading it cannot run code)
    config.json        JSON only: "model_type": "mmser", the format, the architecture (enough to rebuild
                       the module with random weights: encoder HF configs, head sizes), the label names
                       ("classes", in output order: as many as the head has outputs, checked on save
                       and load; IEMOCAP's 4 or any other corpus's),
                       the sample rate, the text side for text / fusion models (text encoder name or path,
                       pooling, max length, whether it was fine-tuned, the ASR system of training), and
                       the resolved training config (for the record; never needed to load)
    README.md          a Hub model card (mmser.models.card)

Why not `huggingface_hub.PyTorchModelHubMixin` or `PreTrainedModel` subclasses: the mixin serialises
a model's `__init__` arguments into config.json, and ours take built modules (an AudioEncoder, a fusion
head), so it would need a wrapper whose state-dict keys change ("net." prefix) and break every folder
saved so far; its `from_pretrained` also falls back to `pytorch_model.bin` through `torch.load`.
`PreTrainedModel` would need a PretrainedConfig subclass and AutoConfig registration per architecture,
five classes for one forward each. So the format is the Hub's convention (config.json with a
model_type, model.safetensors, README.md card) written by plain functions; the Hub's own client only
downloads (`snapshot_download`, two files allowed) and uploads (`HfApi.upload_folder`).

Nothing in a folder can run code at load: config.json is parsed as JSON and its "model" names are
looked up in a closed table of mmser classes (never imported by name), encoder configs go through the
HF config classes' `from_dict`, and weights are read only from model.safetensors (no pickle, no
`pytorch_model.bin`, no `trust_remote_code`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model
from torch import nn

from mmser.io import atomic_write_json, atomic_write_text, looks_like_path
from mmser.models.fusion import (
    ConcatFusion,
    CrossAttentionFusion,
    DecisionFusion,
    FusionClassifier,
    TextClassifier,
)
from mmser.models.heads import AudioClassifier
from mmser.models.text_encoder import TextEncoder, WithTextEncoder
from mmser.models.wav2vec2 import ENCODER_CLASSES, AudioEncoder

MODEL_FORMAT = "mmser-classifier/1"
MODEL_TYPE = "mmser"
WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"

# The closed set of classes a config.json may name (a name outside it is refused, never imported).
_HEADS: dict[str, type[nn.Module]] = {
    "TextClassifier": TextClassifier,
    "ConcatFusion": ConcatFusion,
    "DecisionFusion": DecisionFusion,
    "CrossAttentionFusion": CrossAttentionFusion,
}


class ModelFormatError(ValueError):
    """A folder that is not an mmser model, or one whose config cannot be rebuilt."""


# -- architecture <-> JSON --------------------------------------------------------------------------


def _audio_encoder_dict(encoder: AudioEncoder) -> dict:
    kind = next((k for k, (_, cls) in ENCODER_CLASSES.items() if isinstance(encoder.model, cls)), None)
    if kind is None:
        raise ModelFormatError(f"cannot save audio encoder {type(encoder.model).__name__} "
                               f"(savable: {sorted(ENCODER_CLASSES)})")
    return {"encoder_kind": kind, "encoder_attention_mask": encoder.attention_mask_policy,
            "encoder_config": encoder.model.config.to_dict()}


def _audio_encoder_from(d: dict, where: str) -> AudioEncoder:
    kind = d.get("encoder_kind")
    if kind not in ENCODER_CLASSES:
        raise ModelFormatError(f"{where}: unknown encoder kind {kind!r} (known: {sorted(ENCODER_CLASSES)})")
    config_cls, model_cls = ENCODER_CLASSES[kind]
    if not isinstance(d.get("encoder_config"), dict):
        raise ModelFormatError(f"{where}: encoder_config must be a JSON object")
    return AudioEncoder(model_cls(config_cls.from_dict(d["encoder_config"])),
                        attention_mask=d.get("encoder_attention_mask", "auto"))


def architecture_of(model: nn.Module) -> dict:
    """JSON description of `model`'s architecture (no weights) that `build_architecture` rebuilds."""
    if isinstance(model, AudioClassifier):
        return model.config_dict()
    if type(model).__name__ in _HEADS and isinstance(model, _HEADS[type(model).__name__]):
        return {"model": type(model).__name__, **model.init_args}
    if isinstance(model, FusionClassifier):
        return {"model": "FusionClassifier", "audio_encoder": _audio_encoder_dict(model.audio_encoder),
                "fusion": architecture_of(model.fusion), "freeze_audio": model.freeze_audio,
                "branch_loss_weight": model.branch_loss_weight}
    if isinstance(model, WithTextEncoder):
        te = model.text_encoder
        return {"model": "WithTextEncoder", "inner": architecture_of(model.inner), "text_lr": model.text_lr,
                "text_encoder": {"pooling": te.pooling, "model_type": te.model.config.model_type,
                                 "config": te.model.config.to_dict()}}
    raise ModelFormatError(f"cannot save a {type(model).__name__} (no mmser architecture)")


def build_architecture(d: dict, where: str = "config.json") -> nn.Module:
    """A randomly initialised module of the architecture `architecture_of` described."""
    if not isinstance(d, dict):
        raise ModelFormatError(f"{where}: architecture must be a JSON object, got {type(d).__name__}")
    name = d.get("model")
    if name == "AudioClassifier":
        if d.get("encoder_kind") not in ENCODER_CLASSES:
            raise ModelFormatError(f"{where}: unknown encoder kind {d.get('encoder_kind')!r}")
        return AudioClassifier.from_config_dict(d)
    if name in _HEADS:
        args = {k: v for k, v in d.items() if k != "model"}
        try:
            return _HEADS[name](**args)
        except TypeError as e:
            raise ModelFormatError(f"{where}: bad {name} arguments ({e})") from None
    if name == "FusionClassifier":
        return FusionClassifier(_audio_encoder_from(d.get("audio_encoder") or {}, where),
                                build_architecture(d.get("fusion"), where),
                                freeze_audio=bool(d.get("freeze_audio", False)),
                                branch_loss_weight=float(d.get("branch_loss_weight", 0.0)))
    if name == "WithTextEncoder":
        from transformers import AutoConfig, AutoModel

        te = d.get("text_encoder") or {}
        if not isinstance(te.get("config"), dict) or not isinstance(te.get("model_type"), str):
            raise ModelFormatError(f"{where}: text_encoder needs model_type and config")
        hf_config = AutoConfig.for_model(te["model_type"], **{k: v for k, v in te["config"].items()
                                                             if k != "model_type"})
        text_model = AutoModel.from_config(hf_config)  # built in code: never trust_remote_code
        return WithTextEncoder(build_architecture(d.get("inner"), where),
                               TextEncoder(text_model, te.get("pooling", "mean")), text_lr=d.get("text_lr"))
    raise ModelFormatError(f"{where}: cannot rebuild architecture {name!r} (not an mmser model class)")


def output_size(arch: dict) -> int | None:
    """How many classes an architecture description outputs (None when it does not say)."""
    if not isinstance(arch, dict):
        return None
    if "num_classes" in arch:
        try:
            return int(arch["num_classes"])
        except (TypeError, ValueError):
            return None
    for inner in ("fusion", "inner"):
        if isinstance(arch.get(inner), dict):
            return output_size(arch[inner])
    return None


def check_classes(classes, arch: dict, where: str) -> list[str]:
    """`classes` as a list of distinct non-empty names, one per output of `arch`, or ModelFormatError."""
    if not isinstance(classes, (list, tuple)) or not classes or \
            not all(isinstance(c, str) and c for c in classes):
        raise ModelFormatError(f"{where}: classes must be a non-empty list of class names, got {classes!r}")
    if len(set(classes)) != len(classes):
        raise ModelFormatError(f"{where}: classes has a name twice: {list(classes)}")
    n = output_size(arch)
    if n is not None and n != len(classes):
        raise ModelFormatError(f"{where}: {len(classes)} class names {list(classes)} for a model with {n} outputs")
    return list(classes)


# -- folders ------------------------------------------------------------------------------------------


@dataclass
class SavedModel:
    """A loaded model folder: the eval-mode module and what inference needs from config.json."""

    model: nn.Module
    classes: list[str]
    sample_rate: int
    task: str
    text: dict | None = None  # text / fusion: encoder, pooling, max_length, fine_tuned, asr
    meta: dict = field(default_factory=dict)  # the whole config.json
    path: Path | None = None

    @property
    def needs_text(self) -> bool:
        return self.task in ("text", "fusion")

    @property
    def needs_audio(self) -> bool:
        return self.task in ("audio", "fusion")


def save_pretrained(model: nn.Module, out_dir: str | Path, meta: dict, card: str | None = None) -> Path:
    """out_dir/model.safetensors + config.json (meta + architecture + model_type) [+ README.md card].

    `meta` needs "task", "classes", "sample_rate"; "text" for text and fusion models."""
    for key in ("task", "classes", "sample_rate"):
        if key not in meta:
            raise ValueError(f"save_pretrained: meta has no {key!r}")
    if meta["task"] in ("text", "fusion") and not meta.get("text"):
        raise ValueError(f"save_pretrained: a {meta['task']} model needs meta['text'] (its text side)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"model_type": MODEL_TYPE, "format": MODEL_FORMAT, **meta, "architecture": architecture_of(model)}
    check_classes(meta["classes"], config["architecture"], "save_pretrained")
    json.dumps(config)  # JSON only: fails here, before any file is written, on a non-JSON value
    tmp = out_dir / f".{WEIGHTS}.tmp"
    save_safetensors_model(model, str(tmp))  # handles shared tensors
    tmp.replace(out_dir / WEIGHTS)
    atomic_write_json(out_dir / CONFIG, config)
    if card is not None:
        atomic_write_text(out_dir / CARD, card)
    return out_dir


def _local_or_hub(name_or_path: str | Path) -> Path:
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    text = str(name_or_path)
    if path.exists() or looks_like_path(text) or text.count("/") != 1:  # a Hub id is exactly user/name
        raise FileNotFoundError(f"{text}: not a model folder (and not a Hub id user/name)")
    from huggingface_hub import snapshot_download

    try:  # only the two files a model needs: nothing else from the repo reaches the disk
        return Path(snapshot_download(text, allow_patterns=[WEIGHTS, CONFIG, CARD]))
    except Exception as e:  # noqa: BLE001 - offline, missing repo, auth: one message
        raise FileNotFoundError(f"{text}: not a local model folder, and the Hub download failed "
                                f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None


def read_config(model_dir: str | Path) -> dict:
    """config.json of a model folder, checked to be an mmser model."""
    cfg_path = Path(model_dir) / CONFIG
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: missing (not an mmser model folder)")
    try:
        meta = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{cfg_path}: not JSON ({e})") from None
    if isinstance(meta, dict) and "format" not in meta and ("architecture" in meta or "task" in meta):
        raise ModelFormatError(f"{cfg_path}: a model folder from before mmser's model format "
                               f"{MODEL_FORMAT!r} (no 'format' key): its architecture cannot be rebuilt; "
                               "train it again with this mmser, into a new output_dir (finished runs are skipped)")
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        raise ModelFormatError(f"{cfg_path}: unknown model format "
                               f"{meta.get('format') if isinstance(meta, dict) else None!r}")
    return meta


def from_pretrained(name_or_path: str | Path, device: str | torch.device = "cpu") -> SavedModel:
    """Load a model folder (or a Hub id) in eval mode; no training config or pretrained download."""
    model_dir = _local_or_hub(name_or_path)
    meta = read_config(model_dir)
    weights = model_dir / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing (mmser reads weights from safetensors only)")
    model = build_architecture(meta.get("architecture"), str(model_dir / CONFIG))
    try:
        load_safetensors_model(model, str(weights), strict=True, device=str(device))
    except RuntimeError as e:  # missing / unexpected keys, shape mismatch
        raise ModelFormatError(f"{weights}: does not match the architecture in config.json "
                               f"({' '.join(str(e).split())[:300]})") from None
    classes = check_classes(meta.get("classes"), meta.get("architecture"), str(model_dir / CONFIG))
    task = meta.get("task") or ("audio" if isinstance(model, AudioClassifier) else "fusion")
    return SavedModel(model=model.to(device).eval(), classes=list(classes),
                      sample_rate=int(meta.get("sample_rate") or meta.get("config", {}).get("data", {})
                                      .get("sample_rate", 16000)),
                      task=task, text=meta.get("text"), meta=meta, path=model_dir)


def push_to_hub(model_dir: str | Path, repo_id: str, private: bool = True, token: str | None = None) -> str:
    """Upload a model folder (weights, config.json, README.md) to the Hub; returns the commit URL."""
    from huggingface_hub import HfApi

    model_dir = Path(model_dir)
    read_config(model_dir)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(model_dir),
                             allow_patterns=[WEIGHTS, CONFIG, CARD])
    return str(info)
