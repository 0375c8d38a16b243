"""P-TAPT step (a): the frame-level emotion model, trained on the fold's training split.

PAPER.md "P-TAPT" (reference: FT-w2v2-ser run_pretrain.py): a frame-level emotion model
(`mmser.models.frame_model`) trained on the fold's training split, itself divided 90/10 (seed 58)
to keep the checkpoint of lowest validation loss; Adam 1e-4, batch 64 cropped to the batch's
shortest item, warm-up 500 / flat 500 / linear decay to 0 at 10,000 steps. Its frame features are
what step (b) clusters.

Validation batches (`ptapt.frame_val_batches`). The reference (pretrain/trainer.py
`PretrainedEmoClassifier.val_dataloader`) validates on DataLoader(valdata, batch_size=64,
shuffle=False, drop_last=False, collate_fn=truncCollate): batches of 64 in the order of its
random_split subset (a random permutation, the same at every validation: no reshuffle), each
cropped by `truncCollate` to its shortest item at a random start (np.random.randint(surplus): ~0.7 s
on IEMOCAP). Its loader workers are unseeded and fork numpy's state from the main process, which the
training steps' mask draws move on, so the crops are redrawn at every validation.
- "reference" (default): the same batches (split order, 64 at a time, random crop to the shortest
  item, start uniform in [0, surplus)), the crops drawn ONCE from ptapt.seed and identical at every
  validation, so that checkpoint selection compares like with like (README departures).
- "reference-redrawn": new crops at every validation (seeded: draw i of the stage uses (seed, i);
  the count restarts on resume), as the reference.
- "sorted-centre": mmser before: batches in ascending length, each cropped to its shortest item's
  centre window (~4 s, ~78% of the audio on IEMOCAP's durations).

Output folder (`train_frame_model`; DONE.json last):
    model.pt (best-validation weights), split.json, checkpoints/ (best, last: resume point), csv/, DONE.json
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset, Sampler

from mmser import tracking
from mmser.config import Config, PtaptConfig
from mmser.data.batching import BucketBatchSampler, _dist_info, collate_batch
from mmser.data.datamodule import class_weights as compute_class_weights
from mmser.data.dataset import UtteranceDataset
from mmser.data.manifest import Fold, fold_tag
from mmser.io import atomic_write_bytes, atomic_write_json, mark_stage_done
from mmser.models.frame_model import FrameEmotionModel, build_frame_model
from mmser.training.finite import FiniteGuard
from mmser.training.ptapt.common import check_no_test_session, stage_trainer
from mmser.training.schedule import make_scheduler
from mmser.training.step_rng import micro_batch_number, step_rng


def split_train_val(records: Sequence[dict], val_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded random 90/10 split (the reference's `random_split(..., manual_seed(58))`: the first
    int(n * (1 - val_fraction)) of a permutation train, the rest validate), over records sorted by id."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"ptapt.frame_val_fraction must be in (0, 1), got {val_fraction}")
    recs = sorted(records, key=lambda r: r["id"])
    n_train = int(len(recs) * (1.0 - val_fraction))
    if n_train < 1 or n_train >= len(recs):
        raise ValueError(f"P-TAPT step (a): {len(recs)} training utterances cannot be split "
                         f"{1 - val_fraction:.0%}/{val_fraction:.0%} into two non-empty parts")
    perm = torch.randperm(len(recs), generator=torch.Generator().manual_seed(seed)).tolist()
    return [recs[i] for i in perm[:n_train]], [recs[i] for i in perm[n_train:]]


class CropToShortest:
    """Collate that crops every item to the batch's shortest one (the reference's `truncCollate`):
    a random window in training (start uniform in [0, surplus), as its np.random.randint(surplus)),
    the centre window otherwise. An item carrying "crop_u" (a uniform draw in [0, 1) made by
    `ValidationBatches`) starts at floor(crop_u x surplus) instead."""

    def __init__(self, random_crop: bool):
        self.random_crop = random_crop

    def __call__(self, items: list[dict]) -> dict:
        n = min(int(it["audio"].shape[0]) for it in items)
        out = []
        for it in items:
            over = int(it["audio"].shape[0]) - n
            if "crop_u" in it:
                start = min(int(it["crop_u"] * over), max(over - 1, 0))
            elif self.random_crop:
                start = int(torch.randint(0, max(over, 1), ()).item())
            else:
                start = over // 2
            out.append({k: v for k, v in it.items() if k != "crop_u"} | {"audio": it["audio"][start:start + n]})
        return collate_batch(out)


FRAME_VAL_BATCHES = ("reference", "reference-redrawn", "sorted-centre")


class ValidationBatches(Sampler[list[tuple[int, float]]]):
    """Step (a)'s validation batches as the reference's loader makes them: the items in their order
    (the random split's) cut into batches of `batch_size` (the last one smaller), each item with a
    uniform crop draw (the collate crops it to the batch's shortest item from there). Yields lists
    of (index, crop_u) for `CropDraws`. Draw 0 at every pass (redraw=False) or draw i at the i-th
    pass (redraw=True); each a pure function of (seed, draw). Under several processes rank r takes
    batches r, r+W, ... (wrapped to a multiple of W, as `BucketBatchSampler`)."""

    def __init__(self, n_items: int, batch_size: int, seed: int, redraw: bool = False):
        if n_items < 1 or batch_size < 1:
            raise ValueError(f"ValidationBatches: need items and batch_size >= 1, got {n_items}, {batch_size}")
        self.n_items, self.batch_size, self.seed, self.redraw = n_items, batch_size, seed, redraw
        self.passes = 0

    def all_batches(self, draw: int) -> list[list[tuple[int, float]]]:
        crop_u = np.random.default_rng([self.seed, draw]).random(self.n_items)  # (N,) one draw per item
        return [[(j, float(crop_u[j])) for j in range(s, min(s + self.batch_size, self.n_items))]
                for s in range(0, self.n_items, self.batch_size)]

    def _mine(self, batches: list) -> list:
        w, rank = _dist_info(None, None)
        if w > 1 and len(batches) % w:
            batches = batches + batches[: w - len(batches) % w]
        return batches[rank::w]

    def __iter__(self) -> Iterator[list[tuple[int, float]]]:
        draw = self.passes if self.redraw else 0
        self.passes += 1
        yield from self._mine(self.all_batches(draw))

    def __len__(self) -> int:
        return len(self._mine(self.all_batches(0)))


class CropDraws(Dataset):
    """`dataset[i]` plus the crop draw: the items of `ValidationBatches`' (index, crop_u) keys."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, float]) -> dict:
        i, u = key
        return {**self.dataset[i], "crop_u": u}


def validation_loader(val_set: UtteranceDataset, pc: PtaptConfig, **kw) -> DataLoader:
    """Step (a)'s validation loader in `pc.frame_val_batches` (module docstring); `val_set` in the
    split's order (`split_train_val`)."""
    if pc.frame_val_batches == "sorted-centre":
        sampler = BucketBatchSampler(val_set.lengths, batch_size=pc.frame_batch_size, shuffle=False)
        return DataLoader(val_set, batch_sampler=sampler, collate_fn=CropToShortest(False), **kw)
    if pc.frame_val_batches not in FRAME_VAL_BATCHES:
        raise ValueError(f"ptapt.frame_val_batches must be one of {FRAME_VAL_BATCHES}, got {pc.frame_val_batches!r}")
    sampler = ValidationBatches(len(val_set), pc.frame_batch_size, seed=pc.seed,
                                redraw=pc.frame_val_batches == "reference-redrawn")
    return DataLoader(CropDraws(val_set), batch_sampler=sampler, collate_fn=CropToShortest(False), **kw)


class FrameModule(pl.LightningModule):
    """Step (a) training: `FrameEmotionModel.loss`, Adam over trainable parameters, paper schedule."""

    def __init__(self, model: FrameEmotionModel, class_weights: torch.Tensor | None, cfg: PtaptConfig):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.register_buffer("class_weights", class_weights, persistent=False)
        self.finite = FiniteGuard("P-TAPT frame model")

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        if stage == "train" and self._trainer is not None:
            # SpecAugment masks from a stream of this rank's own (mmser.training.step_rng)
            with step_rng(self.cfg.seed, self.global_rank, micro_batch_number(self)):
                parts = self.model.loss(batch, self.class_weights)
        else:
            parts = self.model.loss(batch, self.class_weights)
        bs = batch["labels"].shape[0]
        fm = parts["frame_mask"]  # (B, F)
        hits = (parts["frame_logits"].argmax(-1) == batch["labels"][:, None]) & fm  # (B, F)
        frame_acc = hits.sum() / fm.sum().clamp(min=1)  # mean over valid frames, no boolean selection (sync)
        utt_acc = (parts["utterance_logits"].argmax(-1) == batch["labels"]).float().mean()
        on_step = stage == "train"
        self.log_dict({f"{stage}/loss": parts["loss"].detach(), f"{stage}/utterance_ce": parts["utterance"].detach(),
                       f"{stage}/frame_ce": parts["frame"].detach(), f"{stage}/frame_acc": frame_acc,
                       f"{stage}/utterance_acc": utt_acc},
                      batch_size=bs, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step)
        return parts["loss"]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, "train")
        self.finite.update(loss, self.global_step, self.trainer.log_every_n_steps if self._trainer is not None else 1)
        return loss

    def on_train_end(self) -> None:
        self.finite.check(self.global_step)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=self.cfg.frame_lr)
        sched = make_scheduler(opt, self.cfg.frame_warmup_steps, self.cfg.frame_hold_steps, self.cfg.frame_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def train_frame_model(cfg: Config, fold: Fold, stage_dir: Path, fp: str) -> FrameEmotionModel:
    """Step (a) on `fold.train` into `stage_dir` (resuming from its last.ckpt): the folder of the
    module docstring, DONE.json (input fingerprint `fp`) last. Returns the best-validation model."""
    t0 = time.perf_counter()
    pc = cfg.ptapt
    train, val = split_train_val(fold.train, pc.frame_val_fraction, pc.frame_val_seed)
    check_no_test_session(train + val, fold, "step (a)")
    atomic_write_json(stage_dir / "split.json", {"train": sorted(r["id"] for r in train),
                                                  "val": sorted(r["id"] for r in val)})
    pl.seed_everything(pc.seed, workers=True)
    classes = fold.classes or None
    model = build_frame_model(cfg, num_classes=len(fold.classes) if fold.classes else None)
    # Class weights N / n_c from the whole training split, as the reference (before its 90/10 split).
    module = FrameModule(model, compute_class_weights(list(fold.train), classes), pc)
    sr = cfg.data.sample_rate
    train_set = UtteranceDataset(train, sr, None, classes=classes)
    val_set = UtteranceDataset(val, sr, None, classes=classes)
    train_sampler = BucketBatchSampler(train_set.lengths, batch_size=pc.frame_batch_size, num_buckets=1,
                                       shuffle=True, seed=pc.seed, drop_last=len(train) > pc.frame_batch_size)
    kw = {"num_workers": cfg.data.num_workers, "pin_memory": torch.cuda.is_available()}
    train_loader = DataLoader(train_set, batch_sampler=train_sampler, collate_fn=CropToShortest(True), **kw)
    val_loader = validation_loader(val_set, pc, **kw)
    ckpt_dir = stage_dir / "checkpoints"
    best_cb = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val/loss", mode="min", save_top_k=1,
                              save_last=True)
    name = f"{cfg.experiment}-ptapt-frame-{fold_tag(fold.test_session)}"
    # Validate once per epoch (the reference), or more often when the whole stage is shorter than
    # a few epochs, so that a best checkpoint always exists.
    every = min(len(train_sampler), max(1, pc.frame_steps // 4))
    trainer, loggers = stage_trainer(cfg, stage_dir, pc.frame_steps, [best_cb], name, "ptapt-frame", validate=True,
                                     test_session=fold.test_session,
                                     val_check_interval=every, check_val_every_n_epoch=None)
    resume = ckpt_dir / "last.ckpt"
    try:
        trainer.fit(module, train_loader, val_loader, ckpt_path=str(resume) if resume.is_file() else None)
    finally:
        tracking.finish(loggers)
    if not best_cb.best_model_path:
        raise RuntimeError(f"{stage_dir}: no validation checkpoint was saved (an earlier attempt may have "
                           f"reached ptapt.frame_steps without validating: delete {stage_dir} to redo step (a))")
    state = torch.load(best_cb.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    if trainer.is_global_zero:  # one writer under DDP; the others wait below
        atomic_write_bytes(stage_dir / "model.pt", _torch_bytes(model.state_dict()))
        mark_stage_done(stage_dir, fp, {"seconds": round(time.perf_counter() - t0, 3),
                                   "best_val_loss": float(best_cb.best_model_score),
                                   "best_checkpoint": Path(best_cb.best_model_path).name,
                                   "steps": int(trainer.global_step), "n_train": len(train), "n_val": len(val),
                                   "world_size": int(trainer.world_size)})
    trainer.strategy.barrier()
    return model


def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def load_frame_model(cfg: Config, stage_dir: Path, num_classes: int | None = None) -> FrameEmotionModel:
    """The step-(a) model with its best-validation weights (built from `cfg` with `num_classes`
    outputs, default IEMOCAP's 4; weights from model.pt)."""
    path = Path(stage_dir) / "model.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no frame model weights (P-TAPT step (a) has not finished)")
    model = build_frame_model(cfg, num_classes=num_classes)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()
