"""P-TAPT: pseudo-label task-adaptive pre-training, the paper's three steps on one fold.

PAPER.md "P-TAPT" (reference: FT-w2v2-ser run_pretrain.py, cluster.py, run_second.py), a module a step:
    frame_training     (a) a frame-level emotion model (wav2vec 1.0, or 2.0) trained on the fold's training split
    clustering         (b) its 20 ms frame features, clustered by k-means into per-frame pseudo-labels
    masked_prediction  (c) wav2vec 2.0 trained to predict the pseudo-labels of time-masked frames
    driver             `run_ptapt`: (a) -> (b) -> (c) into one folder, each stage skipped once done
    common             the test-session guard and the trainer the stages share

The names the rest of mmser and the tests use are importable from here.
"""

from mmser.training.ptapt.clustering import cluster_frames
from mmser.training.ptapt.driver import run_ptapt
from mmser.training.ptapt.frame_training import (
                                                 CropToShortest,
                                                 FrameModule,
                                                 load_frame_model,
                                                 split_train_val,
                                                 train_frame_model,
)
from mmser.training.ptapt.masked_prediction import (
                                                 IGNORE_INDEX,
                                                 PseudoLabelDataset,
                                                 PtaptModule,
                                                 align_labels,
                                                 build_ptapt_encoder,
                                                 collate_pseudo,
                                                 conv_frames,
                                                 crop_with_labels,
                                                 ptapt_loss,
                                                 train_encoder,
)

__all__ = [
    "CropToShortest", "FrameModule", "IGNORE_INDEX", "PseudoLabelDataset", "PtaptModule", "align_labels",
    "build_ptapt_encoder", "cluster_frames", "collate_pseudo", "conv_frames", "crop_with_labels",
    "load_frame_model", "ptapt_loss", "run_ptapt", "split_train_val", "train_encoder", "train_frame_model",
]
