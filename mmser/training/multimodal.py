"""Text-only and audio+text fusion runs: the same run dir, metrics and summaries as V-FT.

`run_task(cfg, test_session, seed, run_dir)` is what `mmser train` and `mmser cv` call for any
`cfg.task`:
- "audio": V-FT (mmser.training.run.run_one as it is);
- "text": the text-only baseline, an MLP over text features (`cfg.text`: gold transcripts or an
  ASR transcript file; a BERT-family / sentence-transformers encoder, frozen with cached features
  by default, or fine-tuned inside the model with text.freeze=false);
- "fusion": an audio encoder + a fusion head (`cfg.fusion.head`: concat / decision /
  cross_attention) over the same frozen text features. The audio side is a fresh encoder from
  `cfg.encoder` (a hub name, a local folder, or the fold's TAPT / P-TAPT output via `pretrain`), or
  the fine-tuned model of the matching (session, seed) run of `cfg.fusion.audio_runs`.

Frozen text features are computed once per (encoder, text source) over every task utterance
and cached on disk (mmser.text.embed), so folds, seeds and epochs reuse them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn
from transformers import PreTrainedModel

from mmser.config import Config, text_cache_dir
from mmser.data.dataset import TextFeatures
from mmser.data.manifest import FoldId, load_manifest, task_records
from mmser.models.audio_encoders import build_audio_encoder
from mmser.models.fusion import FusionClassifier, build_fusion_head, build_text_classifier
from mmser.models.text_encoder import TextEncoder, WithTextEncoder, tokenize
from mmser.models.wav2vec2 import AudioEncoder, apply_freezing, set_gradient_checkpointing
from mmser.tasks import num_dimension_outputs, record_filter, task_from_config
from mmser.training.run import data_inputs, finished_run, load_model, run_name, run_one

log = logging.getLogger(__name__)

_FEATURES: dict[tuple, dict[str, TextFeatures]] = {}  # per-process memo over the disk cache


def text_features_for(cfg: Config) -> dict[str, TextFeatures]:
    """Frozen text features of every task utterance of the manifest (label not null; a dimensional
    task: its dimensions not null) (cached on disk)."""
    from mmser.text.embed import TextEncoderSpec, text_features

    filt = record_filter(cfg)  # the task's utterances (a dimensional task: those with its dimensions)
    key = (str(cfg.data.manifest), str(cfg.text.source), cfg.text.encoder, cfg.text.pooling,
           cfg.text.max_length, str(text_cache_dir(cfg)), str(filt))
    if key not in _FEATURES:
        records = task_records(load_manifest(cfg.data.manifest), **filt)
        spec = TextEncoderSpec.from_config(cfg.text)
        _FEATURES[key] = text_features(records, cfg.text.source, spec, text_cache_dir(cfg))
    return _FEATURES[key]


def audio_run_model_dir(audio_runs: str | Path, test_session: FoldId, seed: int) -> Path:
    """The fine-tuned model of fold `test_session`, seed `seed` in an audio experiment folder."""
    d = Path(audio_runs) / run_name(test_session, seed)
    if not (d / "metrics.json").is_file() or not (d / "model" / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{d}: no finished audio run for session {test_session}, seed {seed} (fusion.audio_runs="
            f"{audio_runs}); run `mmser cv` for that audio experiment first, with the same sessions and seeds")
    return d / "model"


def _audio_encoder(cfg: Config, test_session: FoldId, seed: int) -> nn.Module:
    encoder = _first_audio_encoder(cfg, test_session, seed)
    if cfg.fusion.whisper_audio:  # + frozen Whisper frames beside the encoder's (wav2vec 2.0 + Whisper + text)
        from mmser.models.audio_encoders import PairedAudioEncoder, cached_whisper_spec
        from mmser.models.whisper import Ct2WhisperEncoder

        encoder = PairedAudioEncoder(encoder, Ct2WhisperEncoder(cached_whisper_spec(cfg)))
    return encoder


def _first_audio_encoder(cfg: Config, test_session: FoldId, seed: int) -> nn.Module:
    if cfg.fusion.audio_runs:
        classifier = load_model(audio_run_model_dir(cfg.fusion.audio_runs, test_session, seed))
        encoder = classifier.encoder
        # The rebuilt model is fully trainable: freeze what V-FT freezes (fusion.freeze_audio
        # freezes the rest), and honour gradient checkpointing.
        if isinstance(encoder, AudioEncoder):  # Whisper encoders keep their saved freeze setting
            apply_freezing(encoder.model, cfg.encoder)
        if isinstance(getattr(encoder, "model", None), PreTrainedModel):  # not the CTranslate2 Whisper
            set_gradient_checkpointing(encoder.model, cfg.encoder.gradient_checkpointing)
        encoder.train()
        return encoder
    return build_audio_encoder(cfg.encoder)  # any kind: wav2vec 2.0-style or Whisper


def run_task(cfg: Config, test_session: FoldId, seed: int, run_dir: str | Path) -> dict:
    """One run of any task (audio / text / fusion) -> run dir with metrics.json (see run_one)."""
    if cfg.task == "audio":
        return run_one(cfg, test_session=test_session, seed=seed, run_dir=run_dir)
    done = finished_run(cfg, Path(run_dir), data_inputs(cfg))  # as run_one would say, without text features
    if done is not None:
        return done
    if cfg.task not in ("text", "fusion"):
        raise ValueError(f"unknown task {cfg.task!r}")
    if cfg.task == "fusion" and cfg.fusion.head == "none":
        raise ValueError("task=fusion needs fusion.head (concat, decision or cross_attention)")
    task_from_config(cfg, load_manifest(cfg.data.manifest))  # the target fits the manifest, before any text feature
    feats = ids = None
    if cfg.text.freeze:  # cached features: the models read text / text_mask / text_pooled
        feats = text_features_for(cfg)
        text_dim = int(next(iter(feats.values())).pooled.shape[-1])
    else:  # a fine-tuned text encoder turns token ids into those keys inside the model
        from mmser.text.embed import TextEncoderSpec, build_text_model, texts_for

        spec = TextEncoderSpec.from_config(cfg.text)
        tokenizer, text_model = build_text_model(spec)
        ids = tokenize(texts_for(task_records(load_manifest(cfg.data.manifest), **record_filter(cfg)),
                                 cfg.text.source),
                       tokenizer, cfg.text.max_length)
        text_dim = int(text_model.config.hidden_size)

    def factory(c: Config, num_outputs: int) -> nn.Module:
        # num_outputs = classes + dimensions (mmser/tasks.py): one final Linear of that width
        if c.task == "text":
            model = build_text_classifier(c.fusion, text_dim, num_outputs)
        else:
            encoder = _audio_encoder(c, test_session, seed)
            k = num_dimension_outputs(c)
            head = build_fusion_head(c.fusion, encoder.hidden_size, text_dim, num_outputs - k, num_dims=k)
            model = FusionClassifier(encoder, head, freeze_audio=c.fusion.freeze_audio,
                                     branch_loss_weight=c.fusion.branch_loss_weight)
        if ids is None:
            return model
        text_model.train()
        return WithTextEncoder(model, TextEncoder(text_model, c.text.pooling), text_lr=c.text.lr)

    return run_one(cfg, test_session=test_session, seed=seed, run_dir=run_dir, model_factory=factory,
                   text_features=feats, text_ids=ids, job_type=cfg.task)
