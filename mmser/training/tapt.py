"""TAPT: continue wav2vec 2.0's own pre-training objective on the fold's training audio.

PAPER.md "TAPT": contrastive loss over masked frames (cosine similarity, temperature 0.1,
100 negatives from the same utterance, 2 x 320 codevectors, dim 256) + 0.1 x diversity loss;
all parameters trainable (CNN and quantizer included); Adam 1e-4, warm-up 100, flat 1,000,
linear decay to 0 at 20,000 steps; dynamic ~250 s batches, random crops <= 10 s. A 250 s batch
needs ~27-30 GiB at wav2vec2-base size: `tapt.accumulate_grad_batches=k` makes each optimizer step
of k micro-batches of 250/k s (gradients summed; steps, schedule and checkpoints count optimizer
steps, so the 20,000-step schedule is unchanged).

The model is transformers' `Wav2Vec2ForPreTraining`; its forward gives the projected context and
quantized vectors, and this module computes the loss itself in float32 with autocast off. Under
fp16 AMP the reference's transformers 4.10 rounds the cosine-similarity logits to half precision
(`logits.type_as(target_features)`, modeling_wav2vec2.py line 1178) and then computes the summed
cross-entropy on them cast back to fp32 (line 1302); users report NaN losses. mmser keeps the
logits in fp32 throughout (README departures). By default the objective is the
reference's (its transformers 4.10 `Wav2Vec2ForPreTraining.forward`, modeling_wav2vec2.py, called
with `mask_time_indices` only, FT-w2v2-ser modules/FeatureFuser.py `Wav2vec2PretrainWrapper`):
- time masks from 4.10's sampler (span count from the batch's padded length, min 2 spans, padding
  excluded) on length-bucketed batches (`tapt.mask_time_policy=padded`);
- negatives from ALL frames of the same padded row, padding included (`tapt.negatives=all_frames`);
- loss = cross-entropy summed over masked frames + 0.1 x the unscaled diversity term
  (`tapt.loss_form=reference`), so the diversity term weighs far less than in fairseq's form;
- a constant Gumbel temperature of 1, 4.10's initial value, never annealed
  (`tapt.gumbel_schedule=constant`);
- no attention mask into the model (`tapt.attention_mask=never`);
- the whole model in train mode (the reference calls `.train()` in every forward).
fairseq's original objective is one switch each away (negatives=masked, loss_form=fairseq,
gumbel_schedule=fairseq).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only
from torch.utils.data import DataLoader
from transformers import Wav2Vec2ForPreTraining
from transformers.models.wav2vec2.modeling_wav2vec2 import _sample_negative_indices

from mmser import tracking
from mmser.config import Config, TaptConfig, save_config, to_dict
from mmser.data.batching import BucketBatchSampler, collate_batch, micro_batch_samples
from mmser.data.dataset import UtteranceDataset, read_audio
from mmser.data.manifest import Fold, fold_seed_offset, fold_sort_key, fold_tag
from mmser.io import fingerprint, hold_folder, mark_stage_done, stage_done
from mmser.models.wav2vec2 import (
    compute_time_mask,
    config_overrides,
    load_hf_pretrained,
    make_hf_config,
    set_gradient_checkpointing,
    uses_attention_mask,
)
from mmser.perf import add_audio_lengths, set_attention_implementation
from mmser.training.finite import FiniteGuard
from mmser.training.run import apply_speed_switches, make_trainer, throughput_monitor
from mmser.training.schedule import make_scheduler
from mmser.training.step_rng import micro_batch_number, step_rng

log = logging.getLogger(__name__)


def frame_lengths(model: Wav2Vec2ForPreTraining, audio_mask: torch.Tensor) -> torch.Tensor:
    """Valid frame count per item, from the valid sample count. (B,)"""
    return model._get_feat_extract_output_lengths(audio_mask.sum(-1)).long()


def reference_negative_indices(batch: int, frames: int, num_negatives: int) -> torch.Tensor:
    """Negatives as transformers 4.10's `_sample_negatives` drew them without an attention mask:
    for every frame of every row, `num_negatives` other frames of the same padded row, uniformly
    (padding included). Returns (B, F, K) indices into the flattened (B * F) frames."""
    if frames < 2:
        raise ValueError(f"negatives need at least 2 frames per row, got {frames}")
    idx = torch.randint(0, frames - 1, (batch, frames, num_negatives))  # (B, F, K)
    idx = idx + (idx >= torch.arange(frames)[None, :, None]).long()  # skip the frame itself
    return idx + (torch.arange(batch) * frames)[:, None, None]  # (B, F, K) flat


def tapt_masks(lengths: torch.Tensor, num_frames: int, cfg: TaptConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Time masks inside valid frames and negative indices: (B, F) bool and (B, F, K) flat int.

    Masks: `compute_time_mask` with `cfg.mask_time_policy`. Negatives: `cfg.negatives`
    ("all_frames": the reference; "masked": HF's current sampler, masked frames of the same item).
    """
    b = lengths.numel()
    frame_mask = torch.arange(num_frames)[None, :] < lengths.cpu()[:, None]  # (B, F) (lengths: CPU in training)
    if num_frames < cfg.mask_time_length:
        raise ValueError(f"batch of {num_frames} frames is shorter than the mask span "
                         f"{cfg.mask_time_length}; filter such clips out before TAPT")
    mask = compute_time_mask(frame_mask, cfg.mask_time_prob, cfg.mask_time_length,
                             cfg.mask_time_min_masks, policy=cfg.mask_time_policy)  # (B, F)
    if not mask.any():
        raise ValueError("TAPT: a batch got no masked frame (mask_time_prob too small for its length)")
    if cfg.negatives == "all_frames":
        return mask, reference_negative_indices(b, num_frames, cfg.num_negatives)
    # _sample_negative_indices needs >= 2 masked frames per item
    if (mask.sum(-1) < 2).any():
        raise ValueError("an utterance got fewer than 2 masked frames; with tapt.negatives=masked use "
                         "tapt.mask_time_policy=per_utterance (at least mask_time_min_masks spans each)")
    negatives = _sample_negative_indices((b, num_frames), cfg.num_negatives, mask.numpy())
    return mask, torch.from_numpy(negatives).long()


def contrastive_diversity_loss(model: Wav2Vec2ForPreTraining, out, mask: torch.Tensor,
                               negatives: torch.Tensor, cfg: TaptConfig,
                               masked_index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """wav2vec 2.0's loss in float32: the training loss ("loss", in `cfg.loss_form`) and its parts
    per masked frame for logging. masked_index (M,): the flat (B * F) indices of the masked frames,
    drawn on the CPU with the mask (`TaptModule.prepare_masks`); without it they are read from
    `mask` (a boolean selection: one host-device sync)."""
    with torch.autocast(device_type=out.projected_states.device.type, enabled=False):
        pred = out.projected_states.float()  # (B, F, D)
        q = out.projected_quantized_states.float()  # (B, F, D)
        b, f, d = q.shape
        neg = q.reshape(-1, d)[negatives.long().reshape(-1)].reshape(b, f, -1, d).permute(2, 0, 1, 3)  # (K, B, F, D)
        targets = torch.cat([q[None], neg], dim=0)  # (1+K, B, F, D)
        logits = F.cosine_similarity(pred[None], targets, dim=-1) / cfg.contrastive_temperature  # (1+K, B, F)
        neg_is_pos = (q[None] == neg).all(-1)  # (K, B, F): a negative identical to the positive
        logits = torch.cat([logits[:1], logits[1:].masked_fill(neg_is_pos, float("-inf"))], dim=0)
        flat = logits.permute(1, 2, 0).reshape(b * f, -1)  # (B * F, 1+K)
        if masked_index is None:
            masked_index = mask.reshape(-1).nonzero().squeeze(1)  # (M,)
        logits = flat.index_select(0, masked_index)  # (M, 1+K): masked frames only, row-major order
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        contrastive = F.cross_entropy(logits, target, reduction="sum")
        g, v = model.config.num_codevector_groups, model.config.num_codevectors_per_group
        n_masked = mask.sum()
        diversity = (g * v - out.codevector_perplexity.float()) / (g * v)  # unscaled, in [0, 1)
        if cfg.loss_form == "reference":  # transformers 4.10: sum + w x unscaled diversity
            loss = contrastive + cfg.diversity_loss_weight * diversity
        else:  # fairseq: (sum + w x diversity x M) / M
            loss = (contrastive + cfg.diversity_loss_weight * diversity * n_masked) / n_masked.clamp(min=1)
        with torch.no_grad():
            acc = (logits.argmax(-1) == 0).float().mean()
    return {"loss": loss, "contrastive_per_frame": contrastive.detach() / n_masked.clamp(min=1),
            "diversity": diversity.detach(), "n_masked": n_masked, "accuracy": acc,
            "perplexity": out.codevector_perplexity.detach()}


def gumbel_temperature(step: int, start: float = 2.0, end: float = 0.5, decay: float = 0.999995) -> float:
    """wav2vec 2.0's Gumbel-softmax temperature annealing (fairseq: max(2 * 0.999995^step, 0.5))."""
    return max(start * decay ** step, end)


class TaptModule(pl.LightningModule):
    """Lightning wrapper: one step = masks + negatives -> forward -> fp32 loss / masked frames.

    The masks, negatives and every count the step logs are drawn on the CPU batch before it moves
    to the device (`on_before_batch_transfer` -> `prepare_masks`): no host-device sync in the step.
    Their random stream is `step_rng(seed, global rank, micro-batch number)`: each rank draws its
    own masks (the global RNGs, seeded alike on every rank, gave every rank the same ones)."""

    def __init__(self, model: Wav2Vec2ForPreTraining, cfg: TaptConfig, sample_rate: int = 16000,
                 attention_mask: str = "never", seed: int = 0):
        super().__init__()
        if cfg.mask_time_prob <= 0:
            # transformers: a model built with mask_time_prob = 0 fails when given masks
            raise ValueError("tapt.mask_time_prob must be > 0")
        self.model = model
        self.cfg = cfg
        self.sample_rate = sample_rate
        self.seed = seed
        # tapt.attention_mask: "never" = the reference (no padding mask into the model).
        self.pass_attention_mask = uses_attention_mask(model.config, attention_mask)
        self.finite = FiniteGuard("TAPT")

    def prepare_masks(self, batch: dict, rank: int = 0, draw: int = 0) -> dict:
        """The batch (on the CPU) plus its time masks "mask_time_indices" (B, F), "negatives"
        (B, F, K), "masked_index" (M,) (flat indices of the masked frames) and "counts" (Python ints:
        masked frames, valid frames, valid samples), drawn from `step_rng(self.seed, rank, draw)`."""
        audio_mask = batch["audio_mask"]  # (B, T) on the CPU
        lengths = frame_lengths(self.model, audio_mask)  # (B,)
        num_frames = int(self.model._get_feat_extract_output_lengths(audio_mask.shape[1]))
        with step_rng(self.seed, rank, draw):
            mask, negatives = tapt_masks(lengths, num_frames, self.cfg)  # (B, F), (B, F, K)
        counts = {"masked": int(mask.sum()), "valid_frames": int(lengths.sum()), "samples": int(audio_mask.sum())}
        return {**batch, "mask_time_indices": mask, "negatives": negatives,
                "masked_index": mask.reshape(-1).nonzero().squeeze(1), "counts": counts}

    def on_before_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        if self._trainer is not None and self.trainer.training:
            batch = self.prepare_masks(batch, self.global_rank, micro_batch_number(self))
        return add_audio_lengths(batch)  # the ThroughputMonitor's lengths, read before the batch moves

    def training_step(self, batch, batch_idx):
        if "mask_time_indices" not in batch:  # called outside a Trainer's loop: draw here (syncs)
            device = batch["audio"].device
            cpu = self.prepare_masks({"audio_mask": batch["audio_mask"].cpu()})
            batch = {**batch, **{k: v.to(device) if torch.is_tensor(v) else v for k, v in cpu.items()}}
        audio, audio_mask = batch["audio"], batch["audio_mask"]
        c = self.cfg
        temperature = (c.gumbel_temperature if c.gumbel_schedule == "constant"
                       else gumbel_temperature(self.global_step))
        self.model.set_gumbel_temperature(temperature)
        mask = batch["mask_time_indices"]
        attn = audio_mask.long() if self.pass_attention_mask else None
        out = self.model(audio, attention_mask=attn, mask_time_indices=mask)
        parts = contrastive_diversity_loss(self.model, out, mask, batch["negatives"], c,
                                           masked_index=batch["masked_index"])
        loss = parts["loss"]
        self.finite.update(loss, self.global_step, self._check_every())
        n = batch["counts"]
        self.log_dict({"tapt/loss": loss.detach(),
                       "tapt/contrastive": parts["contrastive_per_frame"],
                       "tapt/diversity": parts["diversity"], "tapt/masked_frames": float(n["masked"]),
                       "tapt/masked_fraction": n["masked"] / max(n["valid_frames"], 1),
                       "tapt/gumbel_temperature": float(temperature),
                       "tapt/accuracy": parts["accuracy"], "tapt/perplexity": parts["perplexity"],
                       "tapt/audio_seconds": n["samples"] / self.sample_rate},
                      batch_size=audio.shape[0], on_step=True, prog_bar=False)
        return loss

    def _check_every(self) -> int:
        return self.trainer.log_every_n_steps if self._trainer is not None else 1

    def on_train_end(self) -> None:
        self.finite.check(self.global_step)

    def configure_optimizers(self):
        opt = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=self.cfg.lr)
        # interval "step": once per optimizer step, so accumulation leaves the schedule unchanged
        sched = make_scheduler(opt, self.cfg.warmup_steps, self.cfg.hold_steps, self.cfg.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def min_tapt_samples(model: Wav2Vec2ForPreTraining, cfg: TaptConfig) -> int:
    """Shortest clip (in samples) that yields >= 2 x mask span frames."""
    need = 2 * cfg.mask_time_length
    n = 400
    while int(model._get_feat_extract_output_lengths(n)) < need:
        n = math.ceil(n * 1.25)
    return n


# ------------------------------------------------------------------------------------------------
# Data: random crops <= crop_s (hop-aligned), length-bucketed dynamic batches
# ------------------------------------------------------------------------------------------------


def random_crop_bounds(n: int, max_len: int, hop: int, rng: np.random.Generator) -> tuple[int, int]:
    """A random window of at most `max_len` samples of an `n`-sample clip whose start is a
    multiple of `hop` (the encoder's frame hop, 320 for wav2vec 2.0), so frame-level targets
    (P-TAPT pseudo-labels) can be cropped in step: frames [start // hop, ...)."""
    if n <= max_len:
        return 0, n
    start = int(rng.integers(0, (n - max_len) // hop + 1)) * hop
    return start, start + max_len


class RandomCropDataset(UtteranceDataset):
    """UtteranceDataset whose training items are random windows of <= crop_s seconds."""

    def __init__(self, records, sample_rate: int, crop_s: float, hop: int = 320, seed: int = 0,
                 classes=None):
        # lengths = min(len, crop) for bucketing
        super().__init__(records, sample_rate, crop_s=crop_s, classes=classes)
        self.max_len = int(round(crop_s * sample_rate))
        self.hop = hop
        self.seed = seed
        self.epoch = 0

    def __getitem__(self, i: int) -> dict:
        r = self.records[i]
        wav = read_audio(r["path"], self.sample_rate)
        rng = np.random.default_rng([self.seed, self.epoch, i])
        a, b = random_crop_bounds(len(wav), self.max_len, self.hop, rng)
        return {"id": r["id"], "audio": torch.from_numpy(np.ascontiguousarray(wav[a:b])),
                "label": self.class_to_index[r["label"]], "crop_start": a}


class _CropEpoch(pl.Callback):
    """Tell the random-crop dataset the epoch, so each epoch draws new crops (still seeded)."""

    def on_train_epoch_start(self, trainer, pl_module):
        ds = trainer.train_dataloader.dataset
        if isinstance(ds, RandomCropDataset):
            ds.epoch = trainer.current_epoch


# ------------------------------------------------------------------------------------------------
# The stage: fold's training audio -> a wav2vec 2.0 folder V-FT loads by explicit path
# ------------------------------------------------------------------------------------------------


def build_pretraining_model(cfg: Config) -> Wav2Vec2ForPreTraining:
    """Wav2Vec2ForPreTraining from `cfg.encoder` (random, local dir or hub name), with TAPT's
    time masking in its config (mask_time_prob must be > 0; no channel masking in pre-training)
    and every parameter trainable (PAPER.md: CNN and quantizer included)."""
    enc = cfg.encoder
    if enc.kind != "wav2vec2":
        raise ValueError(f"TAPT continues wav2vec 2.0's contrastive objective: encoder.kind must be "
                         f"wav2vec2, got {enc.kind!r}")
    masking = {"mask_time_prob": cfg.tapt.mask_time_prob, "mask_time_length": cfg.tapt.mask_time_length,
               "mask_time_min_masks": cfg.tapt.mask_time_min_masks, "mask_feature_prob": 0.0,
               "apply_spec_augment": True, "num_negatives": cfg.tapt.num_negatives,
               "contrastive_logits_temperature": cfg.tapt.contrastive_temperature,
               "diversity_loss_weight": cfg.tapt.diversity_loss_weight}
    # The encoder's own overrides (e.g. dropout / LayerDrop), then TAPT's masking on top.
    overrides = {**config_overrides(enc), **masking}
    if enc.name == "random":
        hf = make_hf_config(enc)
        for k, v in overrides.items():
            setattr(hf, k, v)
        model = Wav2Vec2ForPreTraining(hf)
    else:
        model = load_hf_pretrained(Wav2Vec2ForPreTraining, enc, "TAPT (the model with its quantizer)",
                                   **overrides)
    for p in model.parameters():
        p.requires_grad = True
    set_gradient_checkpointing(model, enc.gradient_checkpointing)
    set_attention_implementation(model, enc.attn_implementation)
    return model


def run_tapt(cfg: Config, fold: Fold, out_dir: Path, seed: int = 0) -> Path:
    """TAPT on `fold.train` only (never the test session, nor the validation split). Idempotent:
    a finished stage (out_dir/done.json) returns at once; a killed one resumes from
    out_dir/checkpoints/last.ckpt. Returns out_dir/encoder (save_pretrained folder)."""
    out_dir = Path(out_dir)
    encoder_dir = out_dir / "encoder"
    tc = cfg.tapt
    if any(fold.is_test(r) for r in fold.train):
        raise AssertionError("TAPT: test-session audio in the training split")  # split_fold guarantees
    # Everything the encoder depends on: a finished stage made from other inputs is refused.
    # (the attention kernel is a speed switch, not an input: left out, so switching it reuses the stage)
    encoder_fp = {k: v for k, v in to_dict(cfg.encoder).items() if k != "attn_implementation"}
    fp = fingerprint([("tapt", to_dict(tc)), ("encoder", encoder_fp), ("seed", seed),
                      ("sample_rate", cfg.data.sample_rate),
                      ("train_ids", sorted(r["id"] for r in fold.train))])
    if stage_done(out_dir, fp) and (encoder_dir / "config.json").is_file():
        log.info("TAPT fold %s: complete (%s)", fold.test_session, encoder_dir)
        return encoder_dir
    # One process per stage folder; another live one holding it raises mmser.io.FolderHeld.
    with hold_folder(out_dir, enabled=rank_zero_only.rank == 0):
        if stage_done(out_dir, fp) and (encoder_dir / "config.json").is_file():  # done meanwhile
            log.info("TAPT fold %s: complete (%s)", fold.test_session, encoder_dir)
            return encoder_dir
        return _train_tapt(cfg, fold, out_dir, seed, fp)


def _train_tapt(cfg: Config, fold: Fold, out_dir: Path, seed: int, fp: str) -> Path:
    encoder_dir = out_dir / "encoder"
    tc = cfg.tapt
    stage_seed = seed + 1000 * fold_seed_offset(fold.test_session)
    pl.seed_everything(stage_seed, workers=True)
    model = build_pretraining_model(cfg)
    speed = apply_speed_switches(cfg, model)
    hop = int(np.prod(model.config.conv_stride))
    min_len = min_tapt_samples(model, tc)
    sr = cfg.data.sample_rate
    records = [r for r in fold.train if float(r["duration"]) * sr >= min_len]
    if len(records) < len(fold.train):
        log.warning("TAPT fold %s: %d clips shorter than %d samples (2 mask spans) left out",
                    fold.test_session, len(fold.train) - len(records), min_len)
    if not records:
        raise ValueError(f"TAPT fold {fold.test_session}: no training clip is long enough ({min_len} samples)")
    dataset = RandomCropDataset(records, sr, tc.crop_s, hop=hop, seed=seed, classes=fold.classes or None)
    # tapt.max_batch_seconds of audio per optimizer step, in accumulate_grad_batches micro-batches
    budget = micro_batch_samples(tc.max_batch_seconds, tc.accumulate_grad_batches, sr)
    sampler = BucketBatchSampler(dataset.lengths, max_batch_samples=budget,
                                 num_buckets=tc.num_buckets, shuffle=True, seed=seed)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_batch,
                        num_workers=cfg.data.num_workers, pin_memory=torch.cuda.is_available())
    module = TaptModule(model, tc, sample_rate=sr, attention_mask=tc.attention_mask, seed=stage_seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "config.yaml")
    loggers = tracking.make_loggers(cfg, out_dir, name=f"{cfg.experiment}-tapt-{fold_tag(fold.test_session)}",
                                    group=cfg.experiment, job_type="tapt",
                                    identity=tracking.run_identity(cfg, fold.test_session, stage="tapt"))
    ckpt_dir = out_dir / "checkpoints"
    last_cb = ModelCheckpoint(dirpath=ckpt_dir, filename="last", monitor=None, save_top_k=1,
                              every_n_train_steps=max(1, min(500, tc.total_steps // 4)),
                              enable_version_counter=False)
    trainer = make_trainer(cfg, max_steps=tc.total_steps, max_epochs=-1, logger=loggers,
                           callbacks=[last_cb, _CropEpoch()], default_root_dir=str(out_dir),
                           accumulate_grad_batches=tc.accumulate_grad_batches)
    exit_code = 1
    t0 = time.time()
    try:
        resume = ckpt_dir / "last.ckpt"
        trainer.fit(module, train_dataloaders=loader, ckpt_path=str(resume) if resume.is_file() else None)
        if trainer.is_global_zero:
            tmp = out_dir / ".encoder.tmp"
            if tmp.exists():
                shutil.rmtree(tmp)
            model.save_pretrained(str(tmp))
            if encoder_dir.exists():
                shutil.rmtree(encoder_dir)
            tmp.rename(encoder_dir)
            mark_stage_done(out_dir, fp, {
                "stage": "tapt", "test_session": fold.test_session, "steps": int(trainer.global_step),
                "train_utterances": len(records), "excluded_short": len(fold.train) - len(records),
                "train_sessions": sorted({r["session"] for r in records if r["session"] is not None},
                                         key=fold_sort_key),
                "final_loss": float(trainer.callback_metrics.get("tapt/loss", float("nan"))),
                "seconds": round(time.time() - t0, 1), "encoder": str(encoder_dir),
                "world_size": int(trainer.world_size),
                "perf": {**throughput_monitor(trainer).summary(), **speed}})
            if not cfg.finetune.keep_checkpoints:  # full model + Adam state: ~1 GB per fold at base size
                shutil.rmtree(ckpt_dir, ignore_errors=True)
            tracking.log_artifact(loggers, cfg, tracking.encoder_artifact(cfg.experiment, "tapt", fold.test_session),
                                  "encoder", encoder_dir, large=True,
                                  metadata={"stage": "tapt", "test_session": fold.test_session, "fingerprint": fp})
        trainer.strategy.barrier()  # other ranks return the folder only once rank 0 has written it
        exit_code = 0
    finally:
        tracking.finish(loggers, exit_code=exit_code)
    return encoder_dir
