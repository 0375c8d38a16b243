"""One run = (config, test session, seed) -> a run dir. The stage function behind `mmser train`.

The test session is any fold of the manifest: IEMOCAP's sessions 1..5, a group or k-fold number or
name, or a predefined split's test set (`test`, MSP-Podcast's `test1`). The class set is the
manifest's (or data.classes): it sizes the model, orders predictions.csv and metrics.json, and is
saved with the model.

    run_dir/config.yaml          resolved config
    run_dir/inputs.json          the data it was made from (sha256 of the manifest and, for text and
                                 fusion, of an ASR transcript file): a run of other data is refused
    run_dir/checkpoints/last.ckpt  saved every epoch; a killed run resumes from it (deleted once the
                                   run is complete unless finetune.keep_checkpoints)
    run_dir/csv/metrics.csv      per-step / per-epoch logs, every epoch once across resumes (plus
                                 run_dir/wandb/ when W&B is on)
    run_dir/.lock                held by the process training the run (another one skips it)
    run_dir/predictions.csv      id, true, pred, one probability column per class (test set); a
                                 dimensional task (target.kind): id, true_<dim>, pred_<dim> per
                                 dimension on the corpus's scale (multitask: the class columns too)
    run_dir/model/               model.safetensors + config.json (rebuild with `load_model`)
    run_dir/metrics.json         written LAST, atomically: its presence means "complete"

The tested weights are those of the last epoch ("last", the paper) or of the best validation
epoch ("best_val", needs a validation set: a predefined split's dev part, or data.validation), by
validation UA (the mean CCC for a dimensional task: mmser.tasks.Task.monitor).
Nothing is ever selected on the test set.

Everything that can be checked is checked before anything is written (the fold, the audio files,
the trainer settings, the model), so a failed start never leaves a config behind that refuses the
corrected rerun. A folder without a finished run takes a new config (its checkpoints are deleted);
one with a finished run, or any run of other data, is refused.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import platform
import re
import shutil
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only
from torch import nn

import mmser
from mmser import tracking
from mmser.audio import UnreadableAudio, audio_info
from mmser.config import (
    Config,
    TrainerConfig,
    check_same_config,
    config_diff,
    save_config,
    strategy_problem,
    to_dict,
)
from mmser.data.datamodule import SERDataModule
from mmser.data.dataset import TextFeatures
from mmser.data.manifest import Fold, FoldId, classes_for, fold_tag, load_manifest, split_fold
from mmser.io import (
    atomic_write_json,
    atomic_write_text,
    check_inputs,
    file_sha256,
    hold_folder,
    read_json,
    safe_join,
    write_inputs,
)
from mmser.labels import CLASSES
from mmser.metrics import classification_report
from mmser.models.audio_encoders import build_audio_encoder, cached_whisper_spec
from mmser.models.heads import AudioClassifier
from mmser.models.pretrained import MODEL_FORMAT, from_pretrained, save_pretrained  # noqa: F401 (MODEL_FORMAT re-exported)
from mmser.models.wav2vec2 import encoder_provenance
from mmser.perf import (
    ThroughputMonitor,
    attention_implementation,
    compile_transformer_layers,
    find_hf_encoder,
    native_bf16,
)
from mmser.provenance import provenance
from mmser.tasks import Task, headline, record_filter, task_from_config
from mmser.training.checkpoint_io import AtomicCheckpointIO
from mmser.training.finetune import ClassifierModule
from mmser.training.progress import BatchArithmetic, EpochLog

log = logging.getLogger(__name__)


def run_name(session: FoldId, seed: int) -> str:
    """The run folder's name: `s3-seed0` for session 3, `test1-seed0` for a named fold."""
    return f"{fold_tag(session)}-seed{seed}"


def default_run_dir(cfg: Config, session: FoldId, seed: int) -> Path:
    """output_dir/experiment/s{session}-seed{seed} (a named fold: output_dir/experiment/{name}-seed{seed});
    in a W&B sweep trial (`wandb agent` sets WANDB_SWEEP_ID and WANDB_RUN_ID)
    output_dir/experiment/sweep-{sweep id}/{run id}: one folder per trial, and the same trial started
    again by the agent (same run id) resumes its own folder."""
    trial = tracking.sweep_trial()
    if trial is not None:
        return safe_join(cfg.output_dir, cfg.experiment, f"sweep-{trial[0]}", trial[1], what="experiment / sweep run")
    return safe_join(cfg.output_dir, cfg.experiment, run_name(session, seed), what="experiment / run name")


def run_inputs(cfg: Config, test_session: int, seed: int) -> list[tuple[str, str]]:
    """The W&B artifacts (name, type) a run starts from: the fold's TAPT / P-TAPT encoder, or the
    fine-tuned audio model of `fusion.audio_runs` that a fusion run starts from."""
    inputs = []
    if cfg.task != "text" and cfg.pretrain != "none" and not (cfg.task == "fusion" and cfg.fusion.audio_runs):
        inputs.append((tracking.encoder_artifact(cfg.experiment, cfg.pretrain, test_session), "encoder"))
    if cfg.task == "fusion" and cfg.fusion.audio_runs:
        run = Path(cfg.fusion.audio_runs) / f"s{test_session}-seed{seed}"
        try:
            audio_experiment = read_json(run / "metrics.json").get("experiment") or Path(cfg.fusion.audio_runs).name
        except (OSError, ValueError):
            audio_experiment = Path(cfg.fusion.audio_runs).name
        inputs.append((tracking.model_artifact(audio_experiment, test_session, seed), "model"))
    return inputs


def _uses_cuda(trainer_cfg: TrainerConfig) -> bool:
    return trainer_cfg.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def resolve_precision(trainer_cfg: TrainerConfig) -> str:
    """The Lightning precision of `trainer.precision`. "auto" = the reference's: 16-mixed (fp16 AMP)
    on a CUDA GPU, 32-true on CPU. "auto-bf16" = bf16-mixed on a GPU with native bf16
    (`mmser.perf.native_bf16`: compute capability >= 8.0), 16-mixed on older GPUs (V100, T4: bf16 is
    emulated there, without cuDNN convolution engines or memory-efficient attention), 32-true on CPU.
    Any other value is Lightning's own."""
    if trainer_cfg.precision not in ("auto", "auto-bf16"):
        return trainer_cfg.precision
    if not _uses_cuda(trainer_cfg):
        return "32-true"
    if trainer_cfg.precision == "auto-bf16" and native_bf16():
        return "bf16-mixed"
    return "16-mixed"


def _devices(value: int | str) -> int | str:
    if isinstance(value, int):
        return value
    return int(value) if value.strip().lstrip("-").isdigit() else value


def devices_per_node(trainer_cfg: TrainerConfig) -> int:
    """How many processes Lightning starts on each node for `trainer.devices`: a count, a list of
    device indices ("0,1"), or "auto" / -1 = every visible GPU (one process on a CPU)."""
    devices = _devices(trainer_cfg.devices)
    if isinstance(devices, int) and devices != -1:
        return devices
    if devices in (-1, "auto"):
        return max(torch.cuda.device_count(), 1) if _uses_cuda(trainer_cfg) else 1
    return max(len([d for d in str(devices).strip("[] ").split(",") if d.strip()]), 1)


def world_size(trainer_cfg: TrainerConfig) -> int:
    """Training processes in all: devices per node x nodes."""
    return devices_per_node(trainer_cfg) * trainer_cfg.num_nodes


def trainer_kwargs(cfg: Config) -> dict:
    """The pl.Trainer arguments every stage shares (fine-tuning, TAPT, P-TAPT): hardware, strategy,
    precision, determinism, logging cadence. Our BucketBatchSampler shards by rank itself, so
    Lightning's distributed sampler is off."""
    tc = cfg.trainer
    return dict(
        accelerator=tc.accelerator, devices=_devices(tc.devices), num_nodes=tc.num_nodes,
        # "warn": deterministic kernels wherever torch has them, a warning (not a crash) where it has
        # none (e.g. some CUDA scatter/NLL kernels).
        strategy=resolve_strategy(tc), precision=resolve_precision(tc),
        deterministic="warn" if tc.deterministic else False,
        log_every_n_steps=tc.log_every_n_steps, gradient_clip_val=tc.gradient_clip_val,
        enable_progress_bar=(sys.stderr.isatty() if tc.enable_progress_bar is None else tc.enable_progress_bar),
        enable_model_summary=False,
        num_sanity_val_steps=0, use_distributed_sampler=False,
        plugins=[AtomicCheckpointIO()],  # checkpoints atomic in their own folder (kill -9 keeps last.ckpt)
    )


class TrainMode(Callback):
    """Put the whole LightningModule in train mode when training starts and at every epoch start.

    Hugging Face's `from_pretrained` returns models in eval mode, and Lightning 2.x does not switch
    submodules back (it only warns "Found N module(s) in eval mode at the start of training"), so an
    encoder loaded from a folder (facebook/wav2vec2-base, a TAPT / P-TAPT output) would train with
    dropout, LayerDrop and HF's channel masking off, and TAPT's quantizer would take its argmax path
    (no Gumbel softmax, no gradient to the codebooks). The reference's Lightning 1.4 called
    `model.train()` on the whole module at the start of training, frozen parts included (e.g. the
    frozen feature projection's dropout stays active in V-FT): so does this. Modules that must stay
    in eval mode override `train()` (e.g. a frozen audio branch in fusion). Lightning's evaluation
    loops put the module in eval mode for validation / test and restore the mode afterwards.
    """

    def on_fit_start(self, trainer, pl_module):  # before Lightning's eval-mode check and training
        pl_module.train()

    def on_train_epoch_start(self, trainer, pl_module):
        pl_module.train()


def make_trainer(cfg: Config, *, callbacks: Sequence[Callback] = (), **kwargs) -> pl.Trainer:
    """The one Trainer factory of every training stage (fine-tuning, text, fusion, TAPT, P-TAPT):
    `trainer_kwargs(cfg)` plus `TrainMode` and a `ThroughputMonitor` (seconds, audio s/s, MFU per
    epoch: `throughput_monitor(trainer)`) ahead of the stage's own callbacks; with more than one
    process, `BatchArithmetic` logs the global batch."""
    monitor = ThroughputMonitor(resolve_precision(cfg.trainer), cfg.data.sample_rate, cfg.trainer.peak_tflops)
    return pl.Trainer(**trainer_kwargs(cfg), callbacks=[TrainMode(), EpochLog(), BatchArithmetic(cfg.data.sample_rate),
                                                        monitor, *callbacks], **kwargs)


def throughput_monitor(trainer: pl.Trainer) -> ThroughputMonitor | None:
    """The `ThroughputMonitor` that `make_trainer` put on `trainer`."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, ThroughputMonitor)), None)


def apply_speed_switches(cfg: Config, model: nn.Module) -> dict:
    """The GPU-path switches that do not change the objective, on the audio encoder inside `model`:
    `trainer.compile` (torch.compile of each transformer layer). Returns what is in use, for
    metrics.json: the attention kernel (set by `encoder.attn_implementation` when the encoder is
    built) and the number of compiled layers."""
    hf = find_hf_encoder(model)
    if hf is None:
        return {"attention": None, "compiled_layers": 0}
    compiled = compile_transformer_layers(hf) if cfg.trainer.compile else 0
    return {"attention": attention_implementation(hf), "compiled_layers": compiled}


def resolve_strategy(trainer_cfg: TrainerConfig) -> str:
    """Lightning strategy name. Every multi-process DDP finds unused parameters: wav2vec 2.0's
    LayerDrop (0.1 by default) skips random transformer layers in training, differently on each rank,
    so a step can leave trained parameters without a gradient, which plain DDP rejects ("parameters
    that were not used") or, on gloo, hangs on. So "ddp", and "auto" with more than one process (where
    Lightning would pick plain DDP), become "ddp_find_unused_parameters_true"; "auto" on one process
    stays Lightning's single-device strategy. Spawn / fork strategies and DDP without unused-parameter
    search are refused (`mmser.config.strategy_problem`)."""
    strategy = trainer_cfg.strategy
    problem = strategy_problem(strategy)
    if problem is not None:
        raise ValueError(problem)
    if strategy == "ddp" or (strategy == "auto" and world_size(trainer_cfg) > 1):
        return "ddp_find_unused_parameters_true"
    return strategy


def build_audio_model(cfg: Config, num_classes: int = len(CLASSES)) -> AudioClassifier:
    """The paper's V-FT classifier: encoder from `cfg.encoder` + the mean-pool linear head with
    `num_classes` outputs (a run passes its class count; `encoder.pooling=attentive`: attentive
    pooling instead; any encoder kind, Whisper included)."""
    return AudioClassifier(build_audio_encoder(cfg.encoder), num_classes=num_classes, pooling=cfg.encoder.pooling)


_AUDIO_FEATURES: dict[tuple, dict[str, torch.Tensor]] = {}  # per-process memo over the disk cache


def audio_features_for(cfg: Config) -> dict[str, torch.Tensor] | None:
    """Cached frozen Whisper frames of every 4-class utterance of the manifest when the run reads
    them (the CTranslate2 Whisper as the audio encoder, or fusion.whisper_audio), else None."""
    spec = cached_whisper_spec(cfg)
    if spec is None:
        return None
    from mmser.data.manifest import task_records
    from mmser.models.whisper import whisper_features

    filt = record_filter(cfg)
    key = (str(Path(cfg.data.manifest).resolve()), file_sha256(cfg.data.manifest), spec,
           str(cfg.encoder.feature_cache_dir), str(filt))
    if key not in _AUDIO_FEATURES:
        _AUDIO_FEATURES[key] = whisper_features(task_records(load_manifest(cfg.data.manifest), **filt), spec,
                                                cfg.encoder.feature_cache_dir)
    return _AUDIO_FEATURES[key]


# -- saved models ---------------------------------------------------------------------------------


def text_side(cfg: Config) -> dict | None:
    """What a text or fusion model needs at inference about its text: the encoder (name or path),
    pooling, max length, whether it was fine-tuned, and the training text (gold, or the ASR system
    of the transcript file: backend, model, beam size, language)."""
    if cfg.task not in ("text", "fusion"):
        return None
    source = str(cfg.text.source)
    asr = None
    if source != "gold" and Path(source).is_file():
        from mmser.text.transcribe import SYSTEM_FIELDS

        with open(source) as f:
            first = f.readline()
        try:
            entry = json.loads(first) if first.strip() else {}
        except json.JSONDecodeError:
            entry = {}
        asr = {k: entry.get(k) for k in SYSTEM_FIELDS} if entry else None
    return {"encoder": cfg.text.encoder, "pooling": cfg.text.pooling, "max_length": cfg.text.max_length,
            "fine_tuned": not cfg.text.freeze, "source": "gold" if source == "gold" else "asr", "asr": asr}


def save_model(model: nn.Module, cfg: Config, out_dir: str | Path, metrics: dict | None = None,
               classes: Sequence[str] = CLASSES, corpus: str | None = None, task: Task | None = None) -> None:
    """out_dir/model.safetensors + config.json (architecture, labels `classes` in output order,
    sample rate, text side, corpus name, resolved config) + README.md (model card), in
    mmser.models.pretrained's format. A dimensional or multitask `task`: "classes" names every
    output (the classes, then the dimensions) and "target" says which are which (kind, classes,
    dimensions, their corpus scales); inference does not read dimensions yet (issue 19 item 4)."""
    from mmser.card import model_card
    from mmser.provenance import command

    outputs = list(classes)
    if task is not None and task.kind != "categorical":
        outputs = list(task.classes) + list(task.dimensions)
    meta = {"mmser_version": mmser.__version__, "task": cfg.task, "classes": outputs,
            "sample_rate": cfg.data.sample_rate, "text": text_side(cfg), "config": to_dict(cfg)}
    if task is not None and task.kind != "categorical":
        meta["target"] = task.describe()
    if corpus is not None:
        meta["corpus"] = corpus
    save_pretrained(model, out_dir, meta, card=model_card(meta, metrics, command=command()))


def load_model(model_dir: str | Path) -> nn.Module:
    """Rebuild a model saved by `save_model` (no pretrained download needed) in eval mode."""
    return from_pretrained(model_dir).model


@torch.no_grad()
def check_saved_model(model: nn.Module, model_dir: Path, batch: Mapping) -> None:
    """The saved folder loads back and gives the trained model's outputs on `batch` (eval mode),
    or a RuntimeError: a run never finishes with a model that cannot be used. The raw outputs are
    compared: class logits and, for a dimensional or multitask task, the scaled dimensions.

    Eager, whatever `trainer.compile` compiled: Lightning hands the model back on the CPU after
    testing, where the compiled layers would compile again for the CPU (a C++ compiler, tens of
    seconds, or a failure after the whole training). torch.compiler's "force_eager" stance runs
    every compiled module's own forward (the same weights and code: the check stays exact)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        reloaded = from_pretrained(model_dir, device=device).model
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with torch.compiler.set_stance("force_eager"):
            expected, got = model(moved).float(), reloaded(moved).float()
    finally:
        model.train(was_training)
    if not torch.allclose(expected, got, atol=1e-4, rtol=1e-4):
        raise RuntimeError(f"{model_dir}: the saved model does not reproduce the trained model's outputs "
                           f"(max diff {(expected - got).abs().max():.3g})")


# -- outputs ----------------------------------------------------------------------------------------


def predictions_csv(rows: Sequence[dict], class_names: Sequence[str] = CLASSES, task: Task | None = None) -> str:
    """id, true, pred, prob_<class> per class; a dimensional task: id, then true_<dim>, pred_<dim>
    per dimension (the corpus's scale); multitask: the class columns, then the dimension columns."""
    categorical = task is None or task.categorical
    dims = list(task.dimensions) if task is not None and task.dimensional else []
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = ["id"] + (["true", "pred"] + [f"prob_{c}" for c in class_names] if categorical else [])
    w.writerow(head + [x for d in dims for x in (f"true_{d}", f"pred_{d}")])
    for r in rows:
        row = [r["id"]]
        if categorical:
            row += [class_names[r["true"]], class_names[r["pred"]]] + [f"{p:.6f}" for p in r["probs"]]
        row += [f"{r[k][d]:.6f}" for d in dims for k in ("true_dims", "pred_dims")]
        w.writerow(row)
    return buf.getvalue()


def _report(rows: Sequence[dict], classes: Sequence[str] = CLASSES, task: Task | None = None) -> dict | None:
    """The test report of `rows` over the whole set: UA / WA / macro-F1 and / or CCC, Pearson r,
    MAE per dimension and the mean CCC (mmser.metrics)."""
    if not rows:
        return None
    from mmser.metrics import dimensional_report

    report: dict = {}
    if task is None or task.categorical:
        report.update(classification_report([r["true"] for r in rows], [r["pred"] for r in rows], classes))
    if task is not None and task.dimensional:
        dims = task.dimensions
        report.update({k: v for k, v in dimensional_report(
            {d: [r["true_dims"][d] for r in rows] for d in dims},
            {d: [r["pred_dims"][d] for r in rows] for d in dims}).items() if k != "n" or "n" not in report})
    return report


def corpus_name(records: Sequence[dict]) -> str | None:
    """The manifest's corpus name (its records' "corpus"; None for IEMOCAP manifests, which have none)."""
    names = sorted({str(r["corpus"]) for r in records if r.get("corpus")})
    return names[0] if len(names) == 1 else (" + ".join(names) if names else None)


def _hardware() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu": platform.processor() or None}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
    return info


# -- checks before a run ----------------------------------------------------------------------------


def data_inputs(cfg: Config) -> dict:
    """What a run is made from besides its config, for its inputs.json: the manifest's content and,
    for text and fusion tasks whose `text.source` is an ASR transcript file, that file's ("gold"
    transcripts are inside the manifest). Paths are kept for the messages; only hashes count."""
    manifest = Path(cfg.data.manifest)
    inputs = {"manifest": {"path": str(manifest.resolve()), "sha256": file_sha256(manifest)}}
    if cfg.task in ("text", "fusion") and str(cfg.text.source) != "gold":
        source = Path(cfg.text.source)
        inputs["text_source"] = {"path": str(source.resolve()), "sha256": file_sha256(source)}
    return inputs


def check_audio_files(records: Sequence[dict], sample_rate: int, what: str, show: int = 5) -> None:
    """Every record's audio file exists and soundfile reads its header as `sample_rate` Hz mono, or
    one ValueError naming the first `show` bad files and the count (seconds, not a whole training,
    before a deleted test wav is noticed)."""
    paths = sorted({str(r["path"]) for r in records})
    bad = []
    for path in paths:
        try:
            info = audio_info(path)  # the one reader's header check (mmser.audio)
        except FileNotFoundError:
            bad.append(f"{path} (missing)")
            continue
        except UnreadableAudio as e:
            bad.append(f"{path} (unreadable: {e.reason})")
            continue
        if info.samplerate != sample_rate or info.channels != 1:
            bad.append(f"{path} ({info.samplerate} Hz, {info.channels} channels; expected {sample_rate} Hz mono)")
    if bad:
        more = f"; ... {len(bad) - show} more" if len(bad) > show else ""
        raise ValueError(f"{what}: {len(bad)} of {len(paths)} audio files missing or unreadable: "
                         f"{'; '.join(bad[:show])}{more}")


def build_fold(cfg: Config, records: list[dict], test_session: FoldId, check_audio: bool = True) -> Fold:
    """The run's fold, checked: test_checkpoint=best_val has a validation set, and (check_audio)
    every train / val / test audio file is there and readable. The fold's utterances are the task's
    (target.kind: a dimensional task's are those with its dimensions, mmser.tasks.record_filter)."""
    filt = record_filter(cfg)
    classes = classes_for(records, cfg.data) if filt["categorical"] else ()
    fold = split_fold(records, test_session, cfg.data, classes, **filt)
    if cfg.finetune.test_checkpoint == "best_val" and not fold.val:
        raise ValueError("finetune.test_checkpoint=best_val needs a validation set "
                         "(data.validation=speaker or fraction, or a predefined split's dev part); "
                         "the test session is never used to select")
    if check_audio:
        check_audio_files(fold.train + fold.val + fold.test, cfg.data.sample_rate,
                          f"fold {test_session} ({cfg.data.manifest})")
    return fold


def finished_run(cfg: Config, run_dir: Path, inputs: dict) -> dict | None:
    """metrics.json of a finished run of this config and data, None when there is none; a finished
    run of another config or other data is refused."""
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        return None
    if (run_dir / "config.yaml").is_file():
        check_same_config(run_dir / "config.yaml", cfg, "this run folder")
    if not check_inputs(run_dir, inputs, "this run"):
        log.warning("%s: finished before runs recorded their data (inputs.json); its data cannot be checked", run_dir)
    log.info("%s: complete (metrics.json exists), not retraining", run_dir)
    return read_json(metrics_path)


def _claim_run_dir(cfg: Config, run_dir: Path, inputs: dict) -> None:
    """Write config.yaml and inputs.json into a held run folder without a finished run whose data
    is this run's (run_one checked: resuming a run of other data would mix them). A config that
    differs replaces the old one and the old checkpoints go, so a resume never mixes configs."""
    if not (run_dir / "inputs.json").is_file() and (run_dir / "config.yaml").is_file():
        log.warning("%s: unfinished run from before runs recorded their data (inputs.json); "
                    "resumed as this data's", run_dir)
    cfg_path = run_dir / "config.yaml"
    if cfg_path.is_file():
        try:
            diff = config_diff(yaml.safe_load(cfg_path.read_text()) or {}, to_dict(cfg))
        except yaml.YAMLError:
            diff = ["config.yaml: unreadable"]
        if diff:
            log.warning("%s: unfinished run of another config (%s%s): reused with this config, its checkpoints "
                        "deleted", run_dir, "; ".join(diff[:6]), "; ..." if len(diff) > 6 else "")
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    save_config(cfg, cfg_path)
    write_inputs(run_dir, inputs)


class CheckpointError(ValueError):
    """A resume checkpoint that cannot be read safely (not a torch zip file, refused globals, no step)."""


def checkpoint_step(path: Path) -> int:
    """Optimizer steps done at a Lightning checkpoint (memory-mapped: the weights are not read).

    Loaded with weights_only=True: a crafted pickle is refused, never run. Anything unreadable is a
    CheckpointError naming the file (delete it to start the run afresh)."""
    try:
        return int(torch.load(path, map_location="cpu", mmap=True, weights_only=True)["global_step"])
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError / UnpicklingError / KeyError / ...
        text = str(e).strip()
        first = text.splitlines()[0][:160] if text else type(e).__name__
        # what weights_only refused ("Unsupported global: GLOBAL x.y" / "unsupported GLOBAL x.y whose ...")
        refused = re.search(r"(?i)unsupported (?:global: )?GLOBAL ([\w.]+)", text)
        why = f"; refused global {refused.group(1)}" if refused else ""
        raise CheckpointError(f"{path}: not a resumable Lightning checkpoint ({type(e).__name__}: "
                              f"{first}{why}); delete it to start this run afresh") from None


# -- the run ------------------------------------------------------------------------------------------


def run_one(
    cfg: Config,
    test_session: FoldId,
    seed: int,
    run_dir: str | Path,
    *,
    model_factory: Callable[[Config, int], nn.Module] | None = None,
    text_features: Mapping[str, TextFeatures] | None = None,
    text_ids: Mapping[str, torch.Tensor] | None = None,
    callbacks: Sequence[Callback] = (),
    job_type: str = "finetune",
) -> dict:
    """Train on the fold's training sessions, test on session `test_session`; return metrics.json.

    A run dir with metrics.json is complete: it is returned without training. A run dir with
    checkpoints/last.ckpt (a killed run) resumes from it. `model_factory(cfg, num_classes)` builds
    the classifier (default: the audio V-FT model; fusion passes its own) and `text_features` (id -> (tokens, pooled))
    adds text to the batches (or `text_ids`, id -> token ids, for a fine-tuned text encoder).
    `callbacks` are extra Lightning callbacks. A run folder another live process holds raises
    mmser.io.FolderHeld (cv counts it as skipped).
    """
    run_dir = Path(run_dir)
    inputs = data_inputs(cfg)
    done = finished_run(cfg, run_dir, inputs)
    if done is not None:
        return done
    if model_factory is None:
        if cfg.task != "audio":
            raise ValueError(f"run_one: task={cfg.task!r} needs a model_factory (the default builds audio models)")
        model_factory = build_audio_model
    # Every check before anything is written: a failed start leaves nothing that refuses the rerun.
    records = load_manifest(cfg.data.manifest)
    task = task_from_config(cfg, records)  # classes, dimensions and their scales: the manifest's
    fold = build_fold(cfg, records, test_session)
    trainer_kwargs(cfg)  # strategy, devices, precision
    with hold_folder(run_dir, enabled=rank_zero_only.rank == 0):
        done = finished_run(cfg, run_dir, inputs)  # finished by another process in the meantime
        if done is not None:
            return done
        check_inputs(run_dir, inputs, "this unfinished run")  # never resume a run of other data
        return _train(cfg, fold, fold.test_session, seed, run_dir, inputs, model_factory=model_factory,
                      text_features=text_features, text_ids=text_ids, callbacks=callbacks, job_type=job_type,
                      corpus=corpus_name(records), task=task)


def _train(cfg: Config, fold: Fold, test_session: FoldId, seed: int, run_dir: Path, inputs: dict, *,
           model_factory: Callable[[Config, int], nn.Module], text_features: Mapping[str, TextFeatures] | None,
           text_ids: Mapping[str, torch.Tensor] | None, callbacks: Sequence[Callback], job_type: str,
           corpus: str | None = None, task: Task | None = None) -> dict:
    metrics_path = run_dir / "metrics.json"
    if task is None:
        task = Task(kind="categorical", classes=tuple(fold.classes) or CLASSES)
    pl.seed_everything(seed, workers=True)
    dm = SERDataModule(fold, cfg.data, seed=seed, text_features=text_features, text_ids=text_ids,
                       audio_features=audio_features_for(cfg), task=task)
    classes = dm.classes
    model = model_factory(cfg, task.num_outputs)  # classes + dimensions (mmser/tasks.py)
    speed = apply_speed_switches(cfg, model)
    weighted = cfg.finetune.class_weighted_loss and task.categorical
    module = ClassifierModule(model, dm.class_weights if weighted else None,
                              lr=cfg.finetune.lr, class_names=classes, sample_rate=cfg.data.sample_rate, task=task)

    if rank_zero_only.rank == 0:
        _claim_run_dir(cfg, run_dir, inputs)
    ckpt_dir = run_dir / "checkpoints"
    resume = ckpt_dir / "last.ckpt"
    name = f"{cfg.experiment}-{run_name(test_session, seed)}"
    side = text_side(cfg)
    asr = (side or {}).get("asr") or {}
    identity = tracking.run_identity(cfg, test_session, seed, stage=job_type,
                                     text_source=f"{asr.get('backend')}:{asr.get('model')}" if asr else None)
    trial = tracking.sweep_trial()  # a sweep trial's own folder is logged under the agent's run id
    wandb_id = trial[1] if trial and run_dir.resolve() == default_run_dir(cfg, test_session, seed).resolve() else None
    loggers = tracking.make_loggers(cfg, run_dir, name=name, group=cfg.experiment, job_type=job_type,
                                    resume_step=checkpoint_step(resume) if resume.is_file() else None,
                                    identity=identity, run_id=wandb_id, inputs=run_inputs(cfg, test_session, seed))
    # checkpoints/last.ckpt, overwritten at the end of every epoch (monitor=None + top_k=1 keeps
    # only the newest). Not save_last: with save_top_k=0 Lightning writes it only when training ends.
    last_cb = ModelCheckpoint(dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1,
                              every_n_epochs=1, save_on_train_epoch_end=True, enable_version_counter=False)
    cbs: list[Callback] = [last_cb]
    best_cb = None
    if fold.val:
        best_cb = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=task.monitor, mode="max",
                                  save_top_k=1, every_n_epochs=1, enable_version_counter=False)
        cbs.append(best_cb)
    precision = resolve_precision(cfg.trainer)
    trainer = make_trainer(
        cfg, max_epochs=cfg.finetune.epochs, max_steps=cfg.finetune.max_steps,
        logger=loggers, callbacks=cbs + list(callbacks), default_root_dir=str(run_dir),
        limit_val_batches=None if fold.val else 0,
    )
    exit_code = 1
    try:
        if resume.is_file():
            log.info("%s: resuming from %s", run_dir, resume)
        trainer.fit(module, datamodule=dm, ckpt_path=str(resume) if resume.is_file() else None)
        epochs_trained = int(trainer.current_epoch)
        test_ckpt = None
        if cfg.finetune.test_checkpoint == "best_val":
            assert best_cb is not None
            if not best_cb.best_model_path:
                raise RuntimeError(f"{run_dir}: no best validation checkpoint was saved")
            test_ckpt = best_cb.best_model_path
        val_report = None
        if fold.val:
            trainer.validate(module, datamodule=dm, ckpt_path=test_ckpt, verbose=False)
            val_report = module.val_report
        trainer.test(module, datamodule=dm, ckpt_path=test_ckpt, verbose=False)
        rows = module.test_predictions
        # Every test utterance the datamodule kept (clips too short for the encoder are skipped and
        # counted in counts()["skipped_too_short"]), each exactly once.
        by_id = {r["id"]: r for r in dm.test_records}
        if sorted(r["id"] for r in rows) != sorted(by_id):
            raise RuntimeError(f"{run_dir}: test predictions do not cover the test session exactly")
        # Improvised-only metrics where the manifest knows each test utterance's kind (IEMOCAP);
        # None where it does not (scripted: null, as in prepared CSV corpora).
        known = all(by_id[r["id"]].get("scripted") is not None for r in rows)
        improvised = [r for r in rows if by_id[r["id"]].get("scripted") is False] if known else []
        summary = module.training_summary()
        metrics = {
            "test": _report(rows, classes, task),
            "test_improvised": _report(improvised, classes, task),
            "val": val_report,
            "counts": dm.counts(),
            # what the model predicts: kind, classes, dimensions and their corpus scales (mmser/tasks.py)
            "target": task.describe(),
            # the CE weights used (None = unweighted loss)
            "class_weights": ({c: float(w) for c, w in zip(classes, dm.class_weights, strict=True)}
                              if weighted else None),
            "experiment": cfg.experiment,
            "test_session": test_session,
            "seed": seed,
            "classes": list(classes),
            "corpus": corpus,
            "test_checkpoint": cfg.finetune.test_checkpoint,
            "epochs_trained": epochs_trained,
            "padding_efficiency": summary["padding_efficiency"],
            "train_seconds": summary["train_seconds"],
            "throughput": summary["throughput"],  # training audio seconds per wall second (per process)
            "train_steps": summary["train_steps"],
            "precision": precision,
            # per epoch: seconds, audio s/s, padding efficiency, training TFLOPs (real frames), MFU
            # (null without a known peak: CPU, unknown GPU), peak memory; of this process (mmser.perf)
            "perf": {**throughput_monitor(trainer).summary(), **speed},
            # the audio encoder's origin: name or folder, requested hub revision, resolved commit
            "encoder": encoder_provenance(module.model),
            "world_size": trainer.world_size,
            "hardware": _hardware(),
            "provenance": provenance(),  # mmser version, git commit + dirty flag, library versions
        }
        if trainer.is_global_zero:
            atomic_write_text(run_dir / "predictions.csv", predictions_csv(rows, classes, task))
            save_model(module.model, cfg, run_dir / "model", metrics, classes=classes, corpus=corpus, task=task)
            check_saved_model(module.model, run_dir / "model", next(iter(dm.test_dataloader())))
            tracking.log_final(loggers, metrics, [r["true"] for r in rows] if task.categorical else [],
                               [r["pred"] for r in rows] if task.categorical else [], classes)
            tracking.log_artifact(loggers, cfg, tracking.predictions_artifact(cfg.experiment, test_session, seed),
                                  "predictions", run_dir / "predictions.csv", large=False,
                                  metadata={"test_session": test_session, "seed": seed})
            tracking.log_artifact(loggers, cfg, tracking.model_artifact(cfg.experiment, test_session, seed), "model",
                                  run_dir / "model", large=True,
                                  metadata={"test_session": test_session, "seed": seed, "method": identity["method"],
                                            "test_ua": metrics["test"].get("ua"),
                                            "test_ccc_mean": metrics["test"].get("ccc_mean")})
            atomic_write_json(metrics_path, metrics)  # last: marks the run complete
            if not cfg.finetune.keep_checkpoints:
                shutil.rmtree(ckpt_dir, ignore_errors=True)  # only needed to resume an unfinished run
        log.info("%s: test %s (%d utterances)", run_dir, headline(metrics["test"]), metrics["test"]["n"])
        exit_code = 0
        return metrics
    finally:
        tracking.finish(loggers, exit_code=exit_code)
