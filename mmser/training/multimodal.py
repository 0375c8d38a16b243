"""Text-only and audio+text fusion runs: the same run dir, metrics and summaries as V-FT.

`run_task(cfg, test_session, seed, run_dir)` is what `mmser train` and `mmser cv` call for any
`cfg.task`:
- "audio": V-FT (mmser.training.run.run_one as it is);
- "text": the text-only baseline, an MLP over frozen text features (`cfg.text`: gold transcripts
  or an ASR transcript file; a BERT-family / sentence-transformers encoder);
- "fusion": an audio encoder + a fusion head (`cfg.fusion.head`: concat / decision /
  cross_attention) over the same frozen text features. The audio side is a fresh encoder from
  `cfg.encoder` (a hub name, a local folder, or the fold's TAPT / P-TAPT output via `pretrain`), or
  the fine-tuned model of the matching (session, seed) run of `cfg.fusion.audio_runs`.

Text features are computed once per (encoder, text source) over every 4-class utterance and
cached on disk (mmser.text.embed), so folds, seeds and epochs reuse them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from mmser.config import Config, check_same_config
from mmser.data.dataset import TextFeatures
from mmser.data.manifest import load_manifest, task_records
from mmser.io import read_json
from mmser.models.fusion import FusionClassifier, build_fusion_head, build_text_classifier
from mmser.models.wav2vec2 import AudioEncoder, apply_freezing
from mmser.training.run import load_model, run_one

log = logging.getLogger(__name__)

_FEATURES: dict[tuple, dict[str, TextFeatures]] = {}  # per-process memo over the disk cache


def text_features_for(cfg: Config) -> dict[str, TextFeatures]:
    """Frozen text features of every 4-class utterance of the manifest (cached on disk)."""
    from mmser.text.embed import TextEncoderSpec, text_features

    if not cfg.text.freeze:
        raise NotImplementedError(
            "text.freeze=false (fine-tuning the text encoder inside fusion) is not built yet; "
            "text features are frozen and cached")
    key = (str(cfg.data.manifest), str(cfg.text.source), cfg.text.encoder, cfg.text.pooling,
           cfg.text.max_length, str(cfg.text.cache_dir))
    if key not in _FEATURES:
        records = task_records(load_manifest(cfg.data.manifest))
        spec = TextEncoderSpec.from_config(cfg.text)
        _FEATURES[key] = text_features(records, cfg.text.source, spec, cfg.text.cache_dir)
    return _FEATURES[key]


def audio_run_model_dir(audio_runs: str | Path, test_session: int, seed: int) -> Path:
    """The fine-tuned model of fold `test_session`, seed `seed` in an audio experiment folder."""
    d = Path(audio_runs) / f"s{test_session}-seed{seed}"
    if not (d / "metrics.json").is_file() or not (d / "model" / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{d}: no finished audio run for session {test_session}, seed {seed} (fusion.audio_runs="
            f"{audio_runs}); run `mmser cv` for that audio experiment first, with the same sessions and seeds")
    return d / "model"


def _audio_encoder(cfg: Config, test_session: int, seed: int) -> AudioEncoder:
    if cfg.fusion.audio_runs:
        classifier = load_model(audio_run_model_dir(cfg.fusion.audio_runs, test_session, seed))
        encoder = classifier.encoder
        # The rebuilt model is fully trainable: freeze what V-FT freezes (fusion.freeze_audio
        # freezes the rest), and honour gradient checkpointing.
        apply_freezing(encoder.model, cfg.encoder)
        if cfg.encoder.gradient_checkpointing:
            encoder.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        encoder.train()
        return encoder
    return AudioEncoder.from_config(cfg.encoder)


def run_task(cfg: Config, test_session: int, seed: int, run_dir: str | Path) -> dict:
    """One run of any task (audio / text / fusion) -> run dir with metrics.json (see run_one)."""
    if cfg.task == "audio":
        return run_one(cfg, test_session=test_session, seed=seed, run_dir=run_dir)
    metrics_path = Path(run_dir) / "metrics.json"
    if metrics_path.is_file():  # complete (as run_one would say), without loading text features
        if (Path(run_dir) / "config.yaml").is_file():
            check_same_config(Path(run_dir) / "config.yaml", cfg, "this run folder")
        return read_json(metrics_path)
    feats = text_features_for(cfg)
    text_dim = int(next(iter(feats.values())).pooled.shape[-1])
    if cfg.task == "text":
        def factory(c: Config) -> nn.Module:
            return build_text_classifier(c.fusion, text_dim)
    elif cfg.task == "fusion":
        if cfg.fusion.head == "none":
            raise ValueError("task=fusion needs fusion.head (concat, decision or cross_attention)")

        def factory(c: Config) -> nn.Module:
            encoder = _audio_encoder(c, test_session, seed)
            head = build_fusion_head(c.fusion, encoder.hidden_size, text_dim)
            return FusionClassifier(encoder, head, freeze_audio=c.fusion.freeze_audio,
                                    branch_loss_weight=c.fusion.branch_loss_weight)
    else:
        raise ValueError(f"unknown task {cfg.task!r}")
    return run_one(cfg, test_session=test_session, seed=seed, run_dir=run_dir, model_factory=factory,
                   text_features=feats, job_type=cfg.task)
