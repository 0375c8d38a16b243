"""Hub model cards (README.md) for saved model folders: YAML metadata block + what the model is.

    card = model_card(meta, metrics)   # meta = the folder's config.json content; metrics = metrics.json

The metadata block follows the Hub's model-card format (pipeline_tag, tags, datasets, metrics and a
model-index with the test session's UA/WA when known); the body gives the task, labels, text side,
the caveat for the synthetic corpus or a random encoder, the resolved config and the paper citation.
The corpus is the one the manifest names (meta["corpus"], e.g. "MSP-Podcast" or a prepared CSV
corpus); a manifest without a name is IEMOCAP, or the synthetic corpus by its path.
"""

from __future__ import annotations

import yaml

CITATION = """@article{chen2021exploring,
  title   = {Exploring Wav2vec 2.0 Fine-Tuning for Improved Speech Emotion Recognition},
  author  = {Chen, Li-Wei and Rudnicky, Alexander},
  journal = {arXiv preprint arXiv:2110.06309},
  year    = {2021}
}"""

_TASKS = {"audio": "audio-only (audio encoder + pooled linear head)",
          "text": "text-only (text encoder features + MLP)",
          "fusion": "audio + text fusion"}


def _caveats(cfg: dict) -> list[str]:
    out = []
    manifest = str(cfg.get("data", {}).get("manifest", ""))
    if "synth" in manifest.lower() or "demo" in manifest.lower() or "toy" in manifest.lower():
        out.append(f"Trained on a synthetic corpus ({manifest}), not on IEMOCAP: its predictions on real "
                   "speech mean nothing. It exists to test the pipeline.")
    enc = cfg.get("encoder", {})
    if cfg.get("task") != "text" and str(enc.get("name", "")).lower() == "random":
        out.append("The audio encoder was randomly initialised (no self-supervised pre-training): "
                   "a pipeline test model, not a usable emotion recogniser.")
    return out


def _whisper_audio(cfg: dict) -> str | None:
    """How a Whisper audio branch (README "Whisper as the audio branch") was used, or None."""
    enc, fusion = cfg.get("encoder", {}), cfg.get("fusion", {})
    if enc.get("kind") == "whisper":
        if enc.get("backend") == "ctranslate2":
            return f"`{enc.get('name')}` (CTranslate2, frozen encoder frames, {enc.get('pooling', 'mean')} pooling)"
        return f"`{enc.get('name')}` ({'frozen' if enc.get('freeze') else 'fine-tuned'} encoder)"
    if cfg.get("task") == "fusion" and fusion.get("whisper_audio"):
        return f"`{fusion['whisper_audio']}` (CTranslate2, frozen frames) beside the {enc.get('kind')} encoder"
    return None


def _audio_tag(cfg: dict) -> str:
    return "whisper" if cfg.get("encoder", {}).get("kind") == "whisper" else "wav2vec2"


def model_card(meta: dict, metrics: dict | None = None, command: str | None = None) -> str:
    """README.md text for a model folder whose config.json holds `meta`."""
    cfg = meta.get("config") or {}
    task = meta.get("task", "audio")
    classes = list(meta.get("classes") or [])
    experiment = cfg.get("experiment", "mmser-model")
    test = (metrics or {}).get("test")
    session = (metrics or {}).get("test_session")
    corpus = meta.get("corpus")
    synthetic = bool(_caveats(cfg)) and "synthetic" in " ".join(_caveats(cfg))
    dataset = "synthetic (mmser synth)" if synthetic else (corpus or "IEMOCAP")
    dataset_type = "synthetic" if synthetic else "iemocap" if dataset == "IEMOCAP" else \
        "".join(ch if ch.isalnum() else "-" for ch in dataset.lower()).strip("-")
    where = f"session {session}" if isinstance(session, int) else f"test set {session}"
    header: dict = {
        "library_name": "mmser",
        "pipeline_tag": "audio-classification" if task != "text" else "text-classification",
        "tags": ["speech-emotion-recognition", _audio_tag(cfg), "mmser", task],
        "datasets": [] if synthetic else [dataset_type],
        "metrics": ["unweighted_accuracy", "weighted_accuracy"],
    }
    if test and test.get("ua") is not None:  # a dimensional run's card lists no UA (issue 19 item 4)
        name = f"{'synthetic' if synthetic else dataset} {where}"
        header["model-index"] = [{"name": experiment, "results": [{
            "task": {"type": "audio-classification", "name": "Speech emotion recognition"},
            "dataset": {"type": dataset_type, "name": name},
            "metrics": [{"type": "unweighted_accuracy", "name": "UA", "value": round(float(test["ua"]), 4)},
                        {"type": "weighted_accuracy", "name": "WA", "value": round(float(test["wa"]), 4)}],
        }]}]
    lines = ["---", yaml.safe_dump(header, sort_keys=False).rstrip(), "---", "",
             f"# {experiment}", "",
             f"Speech emotion recognition, {_TASKS.get(task, task)}, trained with "
             "[mmser](https://arxiv.org/abs/2110.06309) (Chen & Rudnicky, 2021).", "",
             f"- Labels: {', '.join(classes)}",
             f"- Sample rate: {meta.get('sample_rate', 16000)} Hz (any input rate is resampled; stereo is "
             "down-mixed)"]
    if task != "text" and _whisper_audio(cfg):
        lines.append(f"- Audio encoder: Whisper {_whisper_audio(cfg)}")
    text = meta.get("text")
    if text:
        lines.append(f"- Text side: encoder `{text.get('encoder')}`, pooling {text.get('pooling')}, "
                     f"{'fine-tuned' if text.get('fine_tuned') else 'frozen'}; training text: "
                     f"{'gold transcripts' if text.get('source') == 'gold' else 'ASR ' + str(text.get('asr'))}")
    if test and test.get("ua") is not None:  # a dimensional run's card lists no UA (issue 19 item 4)
        protocol = ("predefined split" if not isinstance(session, int) else "leave-one-session-out"
                    if synthetic or dataset == "IEMOCAP" else "leave-one-fold-out")
        lines.append(f"- {'Test session' if isinstance(session, int) else 'Test set'} {session}"
                     f"{'' if synthetic or dataset == 'IEMOCAP' else ' of ' + dataset}: UA {test['ua']:.4f}, "
                     f"WA {test['wa']:.4f} ({test.get('n', '?')} utterances; {protocol})")
    caveats = _caveats(cfg)
    if caveats:
        lines += ["", "## Caveat", ""] + [f"- {c}" for c in caveats]
    lines += ["", "## Use", "", "```python", "import mmser",
              'clf = mmser.EmotionClassifier.from_pretrained("path/or/hub-id")',
              'print(clf.classify_file("speech.wav"))' if task == "audio" else
              'print(clf.classify_file("speech.wav", text="what was said"))', "```", "",
              "```", "mmser predict MODEL speech.wav --out preds.csv" + ("" if task == "audio" else
                                                                      ' --text "what was said"'), "```"]
    if command:
        lines += ["", "Trained with:", "", "```", command, "```"]
    if cfg:
        lines += ["", "## Resolved training config", "", "```yaml", yaml.safe_dump(cfg, sort_keys=False).rstrip(),
                  "```"]
    lines += ["", "## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)


CV_HEADING = "## Cross-validation of this experiment"


def with_cross_validation(card: str, tables: str, command: str | None = None) -> str:
    """`card` with a "Cross-validation of this experiment" section (the per-session UA/WA tables of the
    whole leave-one-session-out run this model is one fold of, and the cv command) before "## Use";
    an earlier such section is replaced, so re-summarising a resumed cross-validation stays one section."""
    lines = card.split("\n")
    if CV_HEADING in lines:  # drop the old section: up to the next "## " heading
        i = lines.index(CV_HEADING)
        j = next((k for k in range(i + 1, len(lines)) if lines[k].startswith("## ")), len(lines))
        lines = lines[:i] + lines[j:]
    section = [CV_HEADING, "", "Each fold's model (this is one of them) is tested on the session it never saw; "
               "values in %, mean ± std over seeds per session (ddof 0), avg = mean of the session means.", "",
               tables.strip(), ""]
    if command:
        section += ["Cross-validation command:", "", "```", command, "```", ""]
    at = lines.index("## Use") if "## Use" in lines else len(lines)
    return "\n".join(lines[:at] + section + lines[at:])
