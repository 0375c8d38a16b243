"""P-TAPT step (a): the frame-level emotion model, trained on the fold's training split.

PAPER.md "P-TAPT" (reference: FT-w2v2-ser run_pretrain.py): a frame-level emotion model
(`mmser.models.frame_model`) trained on the fold's training split, itself divided 90/10 (seed 58)
to keep the checkpoint of lowest validation loss; Adam 1e-4, batch 64 cropped to the batch's
shortest item, warm-up 500 / flat 500 / linear decay to 0 at 10,000 steps. Its frame features are
what step (b) clusters.

Output folder (`train_frame_model`; DONE.json last):
    model.pt (best-validation weights), split.json, checkpoints/ (best, last: resume point), csv/, DONE.json
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from mmser import tracking
from mmser.config import Config, PtaptConfig
from mmser.data.batching import BucketBatchSampler, collate_batch
from mmser.data.datamodule import class_weights as compute_class_weights
from mmser.data.dataset import UtteranceDataset
from mmser.data.manifest import Fold, fold_tag
from mmser.io import atomic_write_bytes, atomic_write_json, mark_stage_done
from mmser.models.frame_model import FrameEmotionModel, build_frame_model
from mmser.training.ptapt.common import check_no_test_session, stage_trainer
from mmser.training.schedule import make_scheduler


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
    a random window in training, the centre window otherwise (a stable validation loss)."""

    def __init__(self, random_crop: bool):
        self.random_crop = random_crop

    def __call__(self, items: list[dict]) -> dict:
        n = min(int(it["audio"].shape[0]) for it in items)
        out = []
        for it in items:
            over = int(it["audio"].shape[0]) - n
            start = int(torch.randint(0, over + 1, ()).item()) if self.random_crop else over // 2
            out.append({**it, "audio": it["audio"][start:start + n]})
        return collate_batch(out)


class FrameModule(pl.LightningModule):
    """Step (a) training: `FrameEmotionModel.loss`, Adam over trainable parameters, paper schedule."""

    def __init__(self, model: FrameEmotionModel, class_weights: torch.Tensor | None, cfg: PtaptConfig):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.register_buffer("class_weights", class_weights, persistent=False)

    def _step(self, batch: dict, stage: str) -> torch.Tensor:
        parts = self.model.loss(batch, self.class_weights)
        bs = batch["labels"].shape[0]
        fm = parts["frame_mask"]
        frame_acc = (parts["frame_logits"].argmax(-1) == batch["labels"][:, None])[fm].float().mean()
        utt_acc = (parts["utterance_logits"].argmax(-1) == batch["labels"]).float().mean()
        on_step = stage == "train"
        self.log_dict({f"{stage}/loss": parts["loss"].detach(), f"{stage}/utterance_ce": parts["utterance"].detach(),
                       f"{stage}/frame_ce": parts["frame"].detach(), f"{stage}/frame_acc": frame_acc,
                       f"{stage}/utterance_acc": utt_acc},
                      batch_size=bs, on_step=on_step, on_epoch=not on_step, sync_dist=not on_step)
        return parts["loss"]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, "train")
        if not torch.isfinite(loss):
            raise FloatingPointError(f"P-TAPT frame model loss is not finite at step {self.global_step}")
        return loss

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
    val_sampler = BucketBatchSampler(val_set.lengths, batch_size=pc.frame_batch_size, shuffle=False)
    kw = {"num_workers": cfg.data.num_workers, "pin_memory": torch.cuda.is_available()}
    train_loader = DataLoader(train_set, batch_sampler=train_sampler, collate_fn=CropToShortest(True), **kw)
    val_loader = DataLoader(val_set, batch_sampler=val_sampler, collate_fn=CropToShortest(False), **kw)
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
