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

Nor can a crafted folder exhaust memory or give silent garbage: `from_pretrained` checks everything
before the model is built (`check_config`, `check_sizes`, `check_shapes`), each refusal one
ModelFormatError naming the file and the key or tensor.
- config.json: at most 16 MiB; "model_type" "mmser"; "task" audio / text / fusion and the one its
  architecture implies; "sample_rate" an integer in [1000, 192000]; the text side's pooling and
  max_length; the audio head's pooling and the encoder's attention-mask policy; a CTranslate2
  Whisper encoder given as a folder must exist, and a Whisper encoder needs 16 kHz.
- Sizes are bounded by the weights actually present, read from model.safetensors' header (shapes
  only, no tensor data): a layer count may not exceed the number of tensors, and no integer in the
  architecture the number of weights in the file; then the module is built on PyTorch's "meta"
  device (no storage) and every tensor's shape compared with the header's. Only a folder whose
  shapes all match is built for real, so what it allocates is what the weights file holds (plus
  constructor temporaries no larger than the integers bounded above).
- After loading, every floating-point tensor must be finite: a NaN/Inf weight is refused, naming it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_model as save_safetensors_model
from torch import nn

from mmser.io import atomic_write_json, atomic_write_text, looks_like_path, publish_temp
from mmser.models.audio_encoders import AUDIO_KINDS, audio_encoder_dict, audio_encoder_from_dict
from mmser.models.fusion import (
    ConcatFusion,
    CrossAttentionFusion,
    DecisionFusion,
    FusionClassifier,
    TextClassifier,
)
from mmser.models.heads import AudioClassifier
from mmser.models.text_encoder import TextEncoder, WithTextEncoder
from mmser.models.whisper import SAMPLE_RATE as WHISPER_SAMPLE_RATE

MODEL_FORMAT = "mmser-classifier/1"
MODEL_TYPE = "mmser"
WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
TASKS = ("audio", "text", "fusion")
SAMPLE_RATE_RANGE = (1000, 192000)  # Hz: telephone 8 kHz .. studio 192 kHz (and a little below)
MAX_CONFIG_BYTES = 16 * 2**20  # a real config.json (architecture + resolved training config): kilobytes
ATTENTION_MASK_POLICIES = ("auto", "always", "never")  # wav2vec2.uses_attention_mask
AUDIO_POOLINGS = ("mean", "attentive")  # heads.AudioClassifier
TEXT_POOLINGS = ("cls", "mean", "sentence")  # text_encoder.TextEncoder / text.embed.TextEncoderSpec
WHISPER_KINDS = {"whisper", "whisper-ct2"}  # audio_encoders.AUDIO_KINDS read through Whisper's frontend

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


def _audio_encoder_dict(encoder: nn.Module) -> dict:
    try:
        return audio_encoder_dict(encoder)
    except ValueError as e:
        raise ModelFormatError(str(e)) from None


def _audio_encoder_from(d: dict, where: str) -> nn.Module:
    try:
        return audio_encoder_from_dict(d, where)
    except ValueError as e:
        raise ModelFormatError(str(e)) from None


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
        if d.get("encoder_kind") not in AUDIO_KINDS:
            raise ModelFormatError(f"{where}: unknown encoder kind {d.get('encoder_kind')!r}")
        return AudioClassifier(_audio_encoder_from(d, where), num_classes=int(d["num_classes"]),
                               pooling=d.get("pooling", "mean"))
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


# -- checks before anything is built (see the module docstring) -----------------------------------------

# An HF config's own label count (unused by mmser's encoders) builds an id2label dict of that size:
# 10**6 took 30 s and 600 MB in transformers 5. mmser's saved configs carry id2label, never num_labels.
MAX_HF_LABELS = 1024
# Integers in an architecture no weight file could justify: above the file's weight count and 2**20
# (token ids of 51,865-token vocabularies and similar constants stay far below).
_MIN_INT_BOUND = 2**20


def weight_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    """name -> shape of every tensor in a safetensors file, from its header only (no tensor data)."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            return {name: tuple(int(n) for n in f.get_slice(name).get_shape()) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelFormatError(f"{weights}: not a readable safetensors file "
                               f"({' '.join(str(e).split())[:200]})") from None


def task_of_architecture(arch) -> str | None:
    """The task an architecture description implies (None for a bare head)."""
    name = arch.get("model") if isinstance(arch, dict) else None
    if name == "WithTextEncoder":
        return task_of_architecture(arch.get("inner"))
    return {"AudioClassifier": "audio", "TextClassifier": "text", "FusionClassifier": "fusion"}.get(name)


def _integer(value) -> int | None:
    """`value` as an int when it is a JSON integer (or an integral number), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _walk(d, path: str):
    """(dotted key, value) of every entry of nested JSON objects / lists."""
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, d


def check_config(meta: dict, cfg_path: Path | str) -> tuple[str, int]:
    """(task, sample rate) of a model folder's config.json, or ModelFormatError naming the key."""
    where = str(cfg_path)
    if meta.get("model_type") != MODEL_TYPE:
        raise ModelFormatError(f"{where}: model_type {meta.get('model_type')!r} is not {MODEL_TYPE!r} "
                               "(not an mmser model)")
    arch = meta.get("architecture")
    if not isinstance(arch, dict):
        raise ModelFormatError(f"{where}: architecture must be a JSON object, got {type(arch).__name__}")
    implied = task_of_architecture(arch)
    task = meta.get("task", implied)
    if task not in TASKS:
        raise ModelFormatError(f"{where}: task {task!r} is not one of {', '.join(TASKS)}")
    if implied is not None and task != implied:
        raise ModelFormatError(f"{where}: task {task!r} but the architecture ({arch.get('model')}) is for "
                               f"task {implied!r}")
    key, value = "sample_rate", meta.get("sample_rate")
    if value is None:  # folders that keep it only in the resolved training config
        key, value = "config.data.sample_rate", ((meta.get("config") or {}).get("data") or {}).get("sample_rate", 16000)
    sample_rate = _integer(value)
    if sample_rate is None or not SAMPLE_RATE_RANGE[0] <= sample_rate <= SAMPLE_RATE_RANGE[1]:
        raise ModelFormatError(f"{where}: {key} must be an integer number of Hz in "
                               f"[{SAMPLE_RATE_RANGE[0]}, {SAMPLE_RATE_RANGE[1]}], got {value!r}")
    whisper = sorted({v for k, v in _walk(arch, "architecture") if k.endswith(".encoder_kind")} & WHISPER_KINDS)
    if whisper and sample_rate != WHISPER_SAMPLE_RATE:  # Whisper's log-mel frontend reads 16 kHz only
        raise ModelFormatError(f"{where}: {key} {sample_rate} for a Whisper encoder ({whisper[0]}), which reads "
                               f"{WHISPER_SAMPLE_RATE} Hz audio only")
    if task in ("text", "fusion"):
        side = meta.get("text")
        if not isinstance(side, dict) or not isinstance(side.get("encoder"), str) or not side["encoder"]:
            raise ModelFormatError(f"{where}: a {task} model needs text.encoder (its text encoder's name or "
                                   f"folder), got text={side!r}")
        if side.get("pooling", "mean") not in TEXT_POOLINGS:
            raise ModelFormatError(f"{where}: text.pooling must be one of {', '.join(TEXT_POOLINGS)}, "
                                   f"got {side.get('pooling')!r}")
        max_length = _integer(side.get("max_length", 64))
        if max_length is None or not 1 <= max_length <= 2**16:
            raise ModelFormatError(f"{where}: text.max_length must be an integer in [1, 65536], "
                                   f"got {side.get('max_length')!r}")
    _check_architecture_values(arch, "architecture", where)
    return task, sample_rate


def _check_architecture_values(d: dict, path: str, where: str) -> None:
    """The enumerated values of an architecture description, each named by its key."""
    if not isinstance(d, dict):
        return
    if "num_classes" in d and ((n := _integer(d["num_classes"])) is None or n < 1):
        raise ModelFormatError(f"{where}: {path}.num_classes must be a positive integer, got {d['num_classes']!r}")
    if "encoder_attention_mask" in d and d["encoder_attention_mask"] not in ATTENTION_MASK_POLICIES:
        raise ModelFormatError(f"{where}: {path}.encoder_attention_mask must be one of "
                               f"{', '.join(ATTENTION_MASK_POLICIES)}, got {d['encoder_attention_mask']!r}")
    if d.get("model") == "AudioClassifier" and d.get("pooling", "mean") not in AUDIO_POOLINGS:
        raise ModelFormatError(f"{where}: {path}.pooling must be one of {', '.join(AUDIO_POOLINGS)}, "
                               f"got {d.get('pooling')!r}")
    if d.get("model") == "WithTextEncoder" and isinstance(d.get("text_encoder"), dict) and \
            d["text_encoder"].get("pooling", "mean") not in TEXT_POOLINGS:
        raise ModelFormatError(f"{where}: {path}.text_encoder.pooling must be one of {', '.join(TEXT_POOLINGS)}, "
                               f"got {d['text_encoder'].get('pooling')!r}")
    if d.get("encoder_kind") == "whisper-ct2":
        _check_ct2_encoder(d, path, where)
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("encoder_config", "config"):  # HF configs: checked by sizes
            _check_architecture_values(v, f"{path}.{k}", where)


def _check_ct2_encoder(d: dict, path: str, where: str) -> None:
    """A CTranslate2 Whisper encoder named by a folder: the folder must hold a CTranslate2 model (checked
    here, at load, rather than on the first recording)."""
    from mmser.io import looks_like_path
    from mmser.models.whisper import OFFLINE_TINY_EN

    name = d.get("encoder_model")
    if not isinstance(name, str) or not name:
        raise ModelFormatError(f"{where}: {path}.encoder_model must name a CTranslate2 Whisper model, got {name!r}")
    if name == OFFLINE_TINY_EN:
        from mmser.models.whisper import resolve_ct2_model

        try:
            folder = Path(resolve_ct2_model(name))
        except Exception as e:  # noqa: BLE001 - a missing optional package: one message
            reason = " ".join(str(e).split())[:200]
            raise ModelFormatError(f"{where}: {path}.encoder_model {name!r}: {reason}") from None
    elif looks_like_path(name):
        folder = Path(name).expanduser()
    else:
        return  # a Hub name (e.g. "tiny.en"): faster-whisper downloads it on first use
    if not (folder / "model.bin").is_file():
        raise ModelFormatError(f"{where}: {path}.encoder_model: CTranslate2 Whisper folder {folder} not found "
                               "(no model.bin)")


def check_sizes(arch: dict, shapes: dict[str, tuple[int, ...]], where: str, weights: Path | str) -> None:
    """Bound every integer of an architecture by the weights present (before any module is built)."""
    n_tensors = len(shapes)
    n_weights = sum(math.prod(s) for s in shapes.values())
    bound = max(n_weights, _MIN_INT_BOUND)
    for key, value in _walk(arch, "architecture"):
        v = _integer(value)
        if v is None:
            continue
        leaf = key.rsplit(".", 1)[-1].split("[", 1)[0]
        if leaf.endswith("layers") and not 0 <= v <= n_tensors:
            raise ModelFormatError(f"{where}: {key} = {v} layers, but {weights} holds {n_tensors} tensors")
        if leaf == "num_labels" and not 0 <= v <= MAX_HF_LABELS:
            raise ModelFormatError(f"{where}: {key} = {v} (more than {MAX_HF_LABELS} encoder labels)")
        if abs(v) > bound:
            raise ModelFormatError(f"{where}: {key} = {v} is larger than the {n_weights} weights in {weights}")


def check_shapes(skeleton: nn.Module, shapes: dict[str, tuple[int, ...]], where: str, weights: Path | str) -> None:
    """Every tensor of `skeleton` (built on the meta device) in the file with the same shape, and no
    other tensor there. Tensors shared under several names (stored once) need one of the names."""
    tensors = skeleton.state_dict(keep_vars=True)
    unexpected = sorted(set(shapes) - set(tensors))
    if unexpected:
        raise ModelFormatError(f"{weights}: tensor {unexpected[0]} is not in the architecture of {where} "
                               f"({len(unexpected)} such tensors)")
    groups: dict[int, list[str]] = {}
    for name, t in tensors.items():
        groups.setdefault(id(t), []).append(name)
    for names in groups.values():
        present = [n for n in names if n in shapes]
        if not present:
            raise ModelFormatError(f"{weights}: no tensor {names[0]} (the architecture in {where} has it)")
        for n in present:
            want = tuple(tensors[n].shape)
            if shapes[n] != want:
                raise ModelFormatError(f"{where}: tensor {n} is {list(want)} in the architecture but "
                                       f"{list(shapes[n])} in {weights}")


def check_finite(model: nn.Module, weights: Path | str) -> None:
    """Every floating-point tensor of a loaded model finite, or ModelFormatError naming the first one."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ModelFormatError(f"{weights}: tensor {name} has {bad} non-finite values (NaN/Inf) of {t.numel()}")


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
    tmp = out_dir / f".{WEIGHTS}.tmp-{os.getpid()}"
    try:
        save_safetensors_model(model, str(tmp))  # handles shared tensors
        publish_temp(tmp, out_dir / WEIGHTS)  # fsync, the umask's mode, rename, folder fsync
    finally:
        tmp.unlink(missing_ok=True)
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
    size = cfg_path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ModelFormatError(f"{cfg_path}: {size} bytes, more than a model config's {MAX_CONFIG_BYTES}")
    try:
        meta = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{cfg_path}: not JSON ({e})") from None
    except RecursionError:
        raise ModelFormatError(f"{cfg_path}: JSON nested too deeply to be a model config") from None
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
    where = str(model_dir / CONFIG)
    weights = model_dir / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing (mmser reads weights from safetensors only)")
    task, sample_rate = check_config(meta, where)
    arch = meta["architecture"]
    classes = check_classes(meta.get("classes"), arch, where)
    shapes = weight_shapes(weights)
    check_sizes(arch, shapes, where, weights)
    with torch.device("meta"):  # shapes only, no storage: compared with the file before the real build
        skeleton = _build_checked(arch, where)
    check_shapes(skeleton, shapes, where, weights)
    del skeleton
    model = _build_checked(arch, where)
    try:
        load_safetensors_model(model, str(weights), strict=True, device=str(device))
    except (RuntimeError, SafetensorError) as e:  # missing / unexpected keys, shape or dtype mismatch
        raise ModelFormatError(f"{weights}: does not match the architecture in config.json "
                               f"({' '.join(str(e).split())[:300]})") from None
    check_finite(model, weights)
    return SavedModel(model=model.to(device).eval(), classes=list(classes), sample_rate=sample_rate,
                      task=task, text=meta.get("text"), meta=meta, path=model_dir)


def _build_checked(arch: dict, where: str) -> nn.Module:
    """build_architecture with the constructors' own refusals (a bad HF config value, a head size that
    does not divide) as one ModelFormatError naming config.json."""
    try:
        return build_architecture(arch, where)
    except ModelFormatError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError, OverflowError) as e:
        raise ModelFormatError(f"{where}: cannot build its architecture ({type(e).__name__}: "
                               f"{' '.join(str(e).split())[:300]})") from None


def push_to_hub(model_dir: str | Path, repo_id: str, private: bool = True, token: str | None = None) -> str:
    """Upload a model folder (weights, config.json, README.md) to the Hub; returns the commit URL."""
    from huggingface_hub import HfApi

    model_dir = Path(model_dir)
    check_config(read_config(model_dir), model_dir / CONFIG)  # a folder that would not load is not uploaded
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(model_dir),
                             allow_patterns=[WEIGHTS, CONFIG, CARD])
    return str(info)
