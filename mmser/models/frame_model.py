"""P-TAPT step 1: the frame-level emotion model whose frame features are clustered into pseudo-labels.

PAPER.md "P-TAPT" 1 (reference: FT-w2v2-ser modules/FeatureFuser.py `Wav2vecWrapper`,
pretrain/trainer.py `PretrainedEmoClassifier`, modules/NN.py):

    audio (B, T) --wav2vec 1.0 feature extractor (frozen)--> z (B, 512, T')   10 ms frames
        --SpecAugment on z (training only; masked values = 0)-->
        --aggregator (trainable)--> c (B, 512, T')
        --Conv1d(512, 512, kernel 4, stride 2) + ReLU--> x (B, F, 512)       20 ms frames = wav2vec 2.0's
    frame head:      Linear(512, 128)-Tanh-Linear(128, 4) on every frame       -> (B, F, 4)
    utterance head:  BiLSTM(512 -> 256 per direction) -> mean over valid time -> ReLU
                     -> Linear(512, 128)-Tanh-Linear(128, 4)                   -> (B, 4)
    loss = weighted CE(utterance logits) + weighted CE(every valid frame, utterance label broadcast)

`frame_features` = x (ReLU(conv(aggregator))) in eval mode is what step 2 clusters.

Backbone "wav2vec2" (a documented deviation for when no wav2vec 1.0 checkpoint exists): a wav2vec
2.0-style encoder (`mmser.models.wav2vec2.AudioEncoder`, CNN and feature projection frozen,
transformer trainable, SpecAugment inside HF as in V-FT). Its frames are 20 ms already, so the
stride-2 conv is replaced by Linear(H, 512) + ReLU.

Padding: the reference crops every batch to its shortest item, so it never pads; wav2vec 1.0's
GroupNorm runs over all time steps, so padded items differ from the same items alone. Here the
LSTM is packed and the mean, the frame loss and SpecAugment use valid frames only, so a padded
batch is handled correctly downstream of the backbone.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices

from mmser.config import Config, PtaptConfig
from mmser.labels import CLASSES
from mmser.models.heads import masked_mean
from mmser.models.wav2vec1 import Wav2Vec1, Wav2Vec1Config
from mmser.models.wav2vec2 import AudioEncoder, compute_time_mask

log = logging.getLogger(__name__)

# Widths (512 / 128 / 256 in the paper) come from PtaptConfig.frame_dim / frame_head_hidden /
# frame_lstm_hidden; the conv's kernel and stride are fixed by the 10 ms -> 20 ms frame ratio.
CONV_KERNEL, CONV_STRIDE = 4, 2  # 10 ms wav2vec 1.0 frames -> 20 ms wav2vec 2.0 frames

BackboneKind = Literal["wav2vec1", "wav2vec2"]


def _mlp_head(in_dim: int, hidden: int, out_dim: int) -> nn.Sequential:
    """Linear-Tanh-Linear (the reference's `LinearHead`)."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, out_dim))


def channel_mask(batch: int, channels: int, prob: float, length: int, min_masks: int,
                 device: torch.device) -> torch.Tensor:
    """SpecAugment channel spans per item (HF's span sampler): (B, C) bool, True = masked."""
    if prob <= 0:
        return torch.zeros(batch, channels, dtype=torch.bool, device=device)
    spans = _compute_mask_indices((batch, channels), mask_prob=prob, mask_length=length, min_masks=min_masks)
    return torch.from_numpy(np.asarray(spans)).to(device)


def frame_model_loss(utt_logits: torch.Tensor, frame_logits: torch.Tensor, frame_mask: torch.Tensor,
                     labels: torch.Tensor, class_weights: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Weighted CE on utterance logits + weighted CE on every valid frame (utterance label broadcast).

    utt_logits (B, C); frame_logits (B, F, C); frame_mask (B, F) bool; labels (B,).
    Each CE is PyTorch's weighted mean (sum of w_y * nll / sum of w_y), as the reference's
    `nn.CrossEntropyLoss(weight=...)`. Padding frames are excluded. Computed in float32.
    """
    utt = F.cross_entropy(utt_logits.float(), labels, weight=class_weights)
    frame_labels = labels[:, None].expand_as(frame_mask)  # (B, F)
    frame = F.cross_entropy(frame_logits.float()[frame_mask], frame_labels[frame_mask], weight=class_weights)
    return {"loss": utt + frame, "utterance": utt, "frame": frame}


class FrameEmotionModel(nn.Module):
    """Backbone + 20 ms frame features + frame and utterance heads.

    forward(batch) -> utterance logits (B, num_classes) (the batch contract);
    forward_all(audio, audio_mask) -> (utterance logits (B, C), frame logits (B, F, C), frame_mask (B, F));
    frame_features(audio, audio_mask) -> (features (B, F, D), frame_mask (B, F)), D = cfg.frame_dim (512).
    """

    def __init__(self, backbone: Wav2Vec1 | AudioEncoder, cfg: PtaptConfig | None = None,
                 num_classes: int = len(CLASSES)):
        super().__init__()
        cfg = cfg or PtaptConfig()
        self.backbone = backbone
        self.num_classes = num_classes
        self.frame_dim = dim = cfg.frame_dim
        if isinstance(backbone, Wav2Vec1):
            self.kind: BackboneKind = "wav2vec1"
            backbone.freeze_feature_extractor()  # PAPER.md P-TAPT 1: feature extractor frozen
            self.proj: nn.Module = nn.Conv1d(backbone.context_dim, dim, CONV_KERNEL, stride=CONV_STRIDE)
            feat_dim = backbone.feature_dim
            if cfg.frame_mask_feature_prob > 0 and cfg.frame_mask_feature_length > feat_dim:
                raise ValueError(f"ptapt.frame_mask_feature_length={cfg.frame_mask_feature_length} exceeds the "
                                 f"wav2vec 1.0 feature size {feat_dim}")
        elif isinstance(backbone, AudioEncoder):
            # Deviation: wav2vec 2.0 frames are 20 ms already; Linear(H, 512) + ReLU replaces the conv.
            self.kind = "wav2vec2"
            self.proj = nn.Linear(backbone.hidden_size, dim)
        else:
            raise TypeError("FrameEmotionModel: backbone must be Wav2Vec1 or AudioEncoder, "
                            f"got {type(backbone).__name__}")
        self.feature_dropouts = cfg.frame_feature_dropouts
        self.mask_time = (cfg.frame_mask_time_prob, cfg.frame_mask_time_length, cfg.frame_mask_time_min_masks)
        self.mask_feature = (cfg.frame_mask_feature_prob, cfg.frame_mask_feature_length,
                             cfg.frame_mask_feature_min_masks)
        self.frame_head = _mlp_head(dim, cfg.frame_head_hidden, num_classes)
        self.lstm = nn.LSTM(dim, cfg.frame_lstm_hidden, batch_first=True, bidirectional=True)
        self.utterance_head = _mlp_head(2 * cfg.frame_lstm_hidden, cfg.frame_head_hidden, num_classes)

    # -- frames -----------------------------------------------------------------------------------

    @property
    def hop_samples(self) -> int:
        """Samples between consecutive output frames (320 for both paper backbones at 16 kHz)."""
        if self.kind == "wav2vec1":
            stride = 1
            for _, _, s in self.backbone.cfg.conv_feature_layers + self.backbone.cfg.conv_aggregator_layers:
                stride *= s
            return stride * CONV_STRIDE
        return int(np.prod(self.backbone.model.config.conv_stride))

    def output_lengths(self, sample_lengths: torch.Tensor) -> torch.Tensor:
        """Number of output frames for waveform lengths (samples). (B,)"""
        if self.kind == "wav2vec1":
            n = self.backbone.output_lengths(sample_lengths)
            return (torch.div(n - CONV_KERNEL, CONV_STRIDE, rounding_mode="floor") + 1).clamp(min=0)
        return self.backbone.frame_lengths(sample_lengths)

    def _wav2vec1_frames(self, audio: torch.Tensor, audio_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w1 = self.backbone
        with torch.no_grad():  # frozen feature extractor
            z = w1.features(audio)  # (B, C, T')
        if self.training:
            b, c, t = z.shape
            z_lengths = audio_mask.long().sum(-1)  # valid samples -> valid z frames
            for _, k, s in w1.cfg.conv_feature_layers:
                z_lengths = torch.div(z_lengths - k, s, rounding_mode="floor") + 1
            z_mask = torch.arange(t, device=z.device)[None, :] < z_lengths[:, None]  # (B, T')
            p, span, min_masks = self.mask_time
            # the reference's sampler over the batch (cropped to its shortest item: no padding)
            time = compute_time_mask(z_mask, p, span, min_masks, policy="padded")  # (B, T')
            p, span, min_masks = self.mask_feature
            chan = channel_mask(b, c, p, span, min_masks, z.device)  # (B, C)
            keep = ~(time[:, None, :] | chan[:, :, None])  # (B, C, T')
            z = z * keep.to(z.dtype)  # masked values = 0
        if self.feature_dropouts:  # the checkpoint's dropout_features / dropout_agg (not the reference)
            c = w1.dropout_agg(w1.feature_aggregator(w1.dropout_feats(z)))  # (B, C, T')
        else:  # the reference: feature_aggregator(z) directly (FeatureFuser.py Wav2vecWrapper.forward)
            c = w1.feature_aggregator(z)  # (B, C, T')
        x = F.relu(self.proj(c)).transpose(1, 2)  # (B, F, D)
        lengths = self.output_lengths(audio_mask.long().sum(-1)).clamp(1, x.shape[1])
        frame_mask = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]  # (B, F)
        return x, frame_mask

    def frame_features(self, audio: torch.Tensor, audio_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """20 ms frame features ReLU(conv(aggregator)) (B, F, D = frame_dim) and frame_mask (B, F) bool.

        SpecAugment applies only in training mode; step 2 calls this in eval mode."""
        if audio.dim() != 2 or audio_mask.shape != audio.shape:
            raise ValueError(f"frame_features: expected audio (B, T) and a mask of the same shape, got "
                             f"{tuple(audio.shape)} and {tuple(audio_mask.shape)}")
        if self.kind == "wav2vec1":
            if int(self.output_lengths(torch.tensor(audio.shape[1]))) < 1:
                raise ValueError(f"frame_features: {audio.shape[1]} samples give no frame "
                                 "(clip shorter than the model's receptive field)")
            return self._wav2vec1_frames(audio, audio_mask)
        frames, frame_mask = self.backbone.encode(audio, audio_mask)  # (B, F, H), (B, F)
        return F.relu(self.proj(frames)), frame_mask  # (B, F, D)

    # -- heads ------------------------------------------------------------------------------------

    def forward_all(self, audio: torch.Tensor, audio_mask: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, frame_mask = self.frame_features(audio, audio_mask)  # (B, F, D), (B, F)
        frame_logits = self.frame_head(x)  # (B, F, C)
        lengths = frame_mask.sum(-1).clamp(min=1).cpu()  # (B,)
        # The LSTM runs in float32 (outside autocast): cheap next to the backbone, and no dependence on
        # half-precision RNN kernels. Packed, so padding frames never enter the recurrence.
        with torch.autocast(device_type=x.device.type, enabled=False):
            packed = pack_padded_sequence(x.float(), lengths, batch_first=True, enforce_sorted=False)
            h, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=x.shape[1])  # (B, F, 2L)
        pooled = F.relu(masked_mean(h, frame_mask))  # (B, 2L)
        return self.utterance_head(pooled), frame_logits, frame_mask  # (B, C), (B, F, C), (B, F)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.forward_all(batch["audio"], batch["audio_mask"])[0]  # (B, C)

    def loss(self, batch: dict, class_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`frame_model_loss` of one batch; also returns the logits for accuracy logging."""
        utt, frames, frame_mask = self.forward_all(batch["audio"], batch["audio_mask"])
        parts = frame_model_loss(utt, frames, frame_mask, batch["labels"], class_weights)
        parts.update(utterance_logits=utt.detach(), frame_logits=frames.detach(), frame_mask=frame_mask)
        return parts


def build_frame_model(cfg: Config, num_classes: int | None = None) -> FrameEmotionModel:
    """The step-1 model named by `cfg.ptapt.frame_model` (weights: pre-trained backbone, new heads),
    with `num_classes` outputs (default: IEMOCAP's 4)."""
    pc = cfg.ptapt
    n = {} if num_classes is None else {"num_classes": int(num_classes)}
    if pc.frame_model == "wav2vec1":
        if pc.wav2vec1_checkpoint is None:
            raise ValueError(
                "ptapt.wav2vec1_checkpoint is not set: P-TAPT's frame model (PAPER.md) starts from fairseq's "
                "wav2vec_large.pt; download it (fairseq examples/wav2vec) and set ptapt.wav2vec1_checkpoint=PATH, "
                "or set ptapt.frame_model=wav2vec2 (documented deviation: a wav2vec 2.0 backbone)")
        if pc.wav2vec1_checkpoint == "random":
            backbone = Wav2Vec1(Wav2Vec1Config(
                conv_feature_layers=[tuple(x) for x in pc.wav2vec1_feature_layers],
                conv_aggregator_layers=[tuple(x) for x in pc.wav2vec1_aggregator_layers]))
        else:
            backbone = Wav2Vec1.from_fairseq(pc.wav2vec1_checkpoint)
        backbone.train()
        return FrameEmotionModel(backbone, pc, **n)
    if pc.frame_model == "wav2vec2":
        # SpecAugment from ptapt.frame_mask_* (HF applies it: time spans -> masked_spec_embed, channels -> 0).
        # Channel masking is switched on after the build, once the hidden size is known.
        enc_cfg = dataclasses.replace(
            cfg.encoder, freeze_feature_encoder=True, freeze_feature_projection=True,
            mask_time_prob=pc.frame_mask_time_prob, mask_time_length=pc.frame_mask_time_length,
            mask_time_min_masks=pc.frame_mask_time_min_masks, mask_feature_prob=0.0)
        log.warning("P-TAPT frame model on a wav2vec 2.0 backbone (%s): a documented deviation from the "
                    "paper's wav2vec 1.0 large", cfg.encoder.name)
        encoder = AudioEncoder.from_config(enc_cfg)
        hc = encoder.model.config
        if pc.frame_mask_feature_prob > 0 and pc.frame_mask_feature_length > hc.hidden_size:
            raise ValueError(f"ptapt.frame_mask_feature_length={pc.frame_mask_feature_length} exceeds the encoder's "
                             f"hidden size {hc.hidden_size}: lower it (or set ptapt.frame_mask_feature_prob=0)")
        hc.mask_feature_prob = pc.frame_mask_feature_prob
        hc.mask_feature_length = pc.frame_mask_feature_length
        hc.mask_feature_min_masks = pc.frame_mask_feature_min_masks
        return FrameEmotionModel(encoder, pc, **n)
    raise ValueError(f"ptapt.frame_model must be wav2vec1 or wav2vec2, got {pc.frame_model!r}")
