"""`mmser export RUN --format onnx --out DIR`: a saved model as one ONNX graph for onnxruntime.

    export_onnx("runs/vft/s1-seed0", "exported/vft")     # run folder or model folder
    -> DIR/model.onnx        the graph, its metadata_props["mmser"] = what a predictor needs (JSON)
       DIR/mmser_onnx.json   the same metadata, readable without onnx
       DIR/tokenizer.json    text and fusion models: the text encoder's tokenizer (`tokenizers` reads it)
       DIR/README.md         a short model card
    mmser.onnx.OnnxClassifier(DIR).classify_file("call.wav")   # onnxruntime, numpy, soundfile: no torch

The graph (all inputs with dynamic batch and length axes):
    audio          (B, T) float32    audio and fusion models: B windows of one length, no padding
    input_ids      (B, L) int64      text and fusion models: token ids of the text encoder's tokenizer
    attention_mask (B, L) int64      1 on real tokens
 -> probs          (B, C) float32    softmax of the logits, classes in metadata order
    utterance_embedding (B, D)       the pooled vector that feeds the classifier (inference.head_layers)

Text: the text encoder is exported inside the graph, and the graph takes token ids, not text
features. A frozen-text model (the default) reads features of a BERT-family encoder that is not in
the model folder (text.encoder, e.g. all-MiniLM-L6-v2): a graph taking features would need that
encoder, i.e. transformers and torch, at every prediction, which is what an ONNX export is for
avoiding. With the encoder inside, the predictor needs only the tokenizer, and the `tokenizers`
package (Rust, no torch) reads its tokenizer.json. The encoder is the same pooled pipeline the model
was trained on (mmser.models.text_encoder.TextEncoder: cls / mean / sentence = mean + L2 norm,
checked against the sentence-transformers model's modules.json); a fine-tuned text encoder is the
model's own.

Audio: the single-recording path of `EmotionClassifier`, exported as is: a batch holds windows of
one recording, all of one length (mmser.prediction.window_spans), so no padding and no padding mask
enters the graph (group-norm wav2vec 2.0 encoders are not padding-invariant: STYLE.md); the graph
passes no attention mask to the encoder (all-ones, a no-op for an unpadded batch: the parity tests
measure it on a layer-norm encoder, which EmotionClassifier gives the all-ones mask). A predictor
must not pad: mmser.onnx batches only windows of one recording.

transformers' Whisper encoder: its whole front end is in the graph (cut into 30 s windows, the last
zero-padded, torch's log-mel, the encoder, the valid frames joined), as WhisperAudioEncoder.encode.

Refused, one line each (ValueError): dimensional and multitask models (target.kind; as
EmotionClassifier, which does not predict dimensions yet), CTranslate2 Whisper encoders (not a torch
module), paired audio encoders, a text encoder without a fast tokenizer (no tokenizer.json), a sentence-transformers
pipeline other than Transformer -> mean Pooling [-> Normalize]. After export the graph is checked
against PyTorch on a random input (max abs difference of probabilities <= 1e-4, else refused): what
is written is known to agree.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmser.extras import require
from mmser.inference import EmbeddingCapture, encoder_min_samples, resolve_model_dir
from mmser.io import atomic_write_json, atomic_write_text, publish_temp
from mmser.models.pretrained import SavedModel, from_pretrained
from mmser.models.text_encoder import TextEncoder, WithTextEncoder

log = logging.getLogger(__name__)

ONNX_FORMAT = "mmser-onnx/1"
GRAPH, METADATA, TOKENIZER, CARD = "model.onnx", "mmser_onnx.json", "tokenizer.json", "README.md"
OPSET = 18
# Output names: not "embedding", which the exporter gives BERT's embedding-lookup node (a clash
# onnxruntime refuses as a duplicate name).
OUTPUTS = ["probs", "utterance_embedding"]
PARITY_TOLERANCE = 1e-4  # max abs difference of probabilities, onnxruntime vs PyTorch, checked on export
EXPORTABLE_AUDIO = ("wav2vec2", "hubert", "wavlm", "whisper")


class ExportError(ValueError):
    """A model this exporter cannot turn into an ONNX graph (one line: what and why)."""


# -- what can be exported ------------------------------------------------------------------------


def _audio_kinds(arch) -> list[str]:
    out = []
    if isinstance(arch, dict):
        if isinstance(arch.get("encoder_kind"), str):
            out.append(arch["encoder_kind"])
        for v in arch.values():
            out += _audio_kinds(v)
    return out


def check_exportable(saved: SavedModel) -> None:
    """ExportError naming the first part of `saved` the exporter cannot export."""
    where = saved.path
    kind = (saved.meta.get("target") or {}).get("kind", "categorical")
    if kind != "categorical":  # as EmotionClassifier: dimensions are not predicted yet (issue 19 item 4)
        raise ExportError(f"{where}: a {kind} model (target.kind): ONNX export covers categorical models "
                          "(the graph outputs class probabilities)")
    for kind in _audio_kinds(saved.meta.get("architecture")):
        if kind == "whisper-ct2":
            raise ExportError(f"{where}: its audio encoder is a CTranslate2 Whisper (faster-whisper), not a torch "
                              "module: ONNX export covers wav2vec 2.0 / HuBERT / WavLM and transformers' Whisper "
                              "encoders")
        if kind == "paired":
            raise ExportError(f"{where}: a paired audio encoder (fusion.whisper_audio) is not exported: "
                              "ONNX export covers one wav2vec 2.0 / HuBERT / WavLM encoder")
        if kind not in EXPORTABLE_AUDIO:
            raise ExportError(f"{where}: audio encoder kind {kind!r} is not exported "
                              f"(exported: {', '.join(EXPORTABLE_AUDIO)})")


def _check_sentence_pipeline(path: str, encoder: str) -> None:
    """A sentence-transformers folder whose pipeline TextEncoder(pooling="sentence") reproduces:
    Transformer -> Pooling (mean tokens only) -> Normalize; anything else is an ExportError."""
    folder = Path(path)
    try:
        modules = json.loads((folder / "modules.json").read_text())
        kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
        pooling = next(m for m in modules if m["type"].endswith("Pooling"))
        pcfg = json.loads((folder / pooling["path"] / "config.json").read_text())
    except (OSError, ValueError, KeyError, StopIteration, TypeError) as e:
        raise ExportError(f"text encoder {encoder!r}: cannot read its sentence-transformers pipeline "
                          f"({type(e).__name__}: {e})") from None
    modes = sorted(k for k, v in pcfg.items() if k.startswith("pooling_mode") and v)
    if kinds not in (["Transformer", "Pooling", "Normalize"], ["Transformer", "Pooling"]) or \
            modes != ["pooling_mode_mean_tokens"]:
        raise ExportError(f"text encoder {encoder!r}: sentence-transformers pipeline {kinds} with {modes}: "
                          "only Transformer -> mean Pooling [-> Normalize] is exported")
    if kinds[-1] != "Normalize":
        raise ExportError(f"text encoder {encoder!r}: a sentence pipeline without Normalize: export it with "
                          "text.pooling=mean")


def text_side(saved: SavedModel) -> tuple[TextEncoder, object, int]:
    """(the text encoder as in training, its fast tokenizer, max_length) of a text or fusion model."""
    from transformers import AutoTokenizer

    from mmser.text.embed import TextEncoderSpec, build_text_model, resolve_encoder

    side = saved.text or {}
    max_length = int(side.get("max_length", 64))
    path = resolve_encoder(side["encoder"])
    if isinstance(saved.model, WithTextEncoder):  # fine-tuned: the model's own encoder
        te = saved.model.text_encoder
        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        pooling = side.get("pooling", "mean")
        if pooling == "sentence":
            _check_sentence_pipeline(path, side["encoder"])
        tokenizer, hf_model = build_text_model(TextEncoderSpec(encoder=side["encoder"], pooling=pooling,
                                                               max_length=max_length))
        te = TextEncoder(hf_model.eval(), pooling)
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ExportError(f"text encoder {side['encoder']!r}: no fast tokenizer (tokenizer.json), which the "
                          "torch-free predictor needs")
    return te.eval(), tokenizer, max_length


# -- the graph -----------------------------------------------------------------------------------


class _Unpadded(nn.Module):
    """An AudioEncoder's HF model on an unpadded batch (see the module docstring): frames (B, F, H)
    and an all-true frame mask, through `encode_batch` (which `encode_audio` prefers)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.model = encoder.model
        self.hidden_size = encoder.hidden_size

    def encode_batch(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        frames = self.model(batch["audio"]).last_hidden_state  # (B, F, H)
        return frames, torch.ones(frames.shape[:2], dtype=torch.bool, device=frames.device)  # (B, F)

    def encode(self, audio: torch.Tensor, audio_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_batch({"audio": audio, "audio_mask": audio_mask})


class _UnpaddedWhisper(nn.Module):
    """A WhisperAudioEncoder on an unpadded batch, as its `encode`: the recording cut into windows
    of `window_samples` (30 s for real Whisper), the last zero-padded, log-mel per window, the
    encoder, and the valid frames of the windows joined: every window but the last is full, so they
    are the first ceil(ceil(T / 160) / 2) frames of the joined output."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.hidden_size = encoder.hidden_size

    def encode_batch(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        from mmser.models.whisper import HOP, encoder_frames

        audio = batch["audio"]  # (B, T)
        window = self.encoder.window_samples
        b, t = audio.shape
        waves = nn.functional.pad(audio.float(), (0, (-t) % window)).reshape(-1, window)  # (B k, W)
        out = self.encoder.model(self.encoder.log_mel(waves)).last_hidden_state  # (B k, W / 320, H)
        frames = out.reshape(b, -1, out.shape[-1])[:, :encoder_frames((t + HOP - 1) // HOP)]  # (B, F, H)
        return frames, torch.ones(frames.shape[:2], dtype=torch.bool, device=frames.device)  # (B, F)

    def encode(self, audio: torch.Tensor, audio_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_batch({"audio": audio, "audio_mask": audio_mask})


class _Graph(nn.Module):
    """The exported function: (audio?, input_ids?, attention_mask?) -> (probs (B, C), embedding (B, D))."""

    def __init__(self, model: nn.Module, text_encoder: TextEncoder | None):
        super().__init__()
        self.model = model.inner if isinstance(model, WithTextEncoder) else model
        for attr in ("encoder", "audio_encoder"):  # AudioClassifier, FusionClassifier
            encoder = getattr(self.model, attr, None)
            if isinstance(encoder, nn.Module):
                from mmser.models.whisper import WhisperAudioEncoder

                setattr(self.model, attr, (_UnpaddedWhisper if isinstance(encoder, WhisperAudioEncoder)
                                           else _Unpadded)(encoder))
        self.text_encoder = text_encoder
        self.capture = EmbeddingCapture(self.model).__enter__()  # hooks live as long as the graph

    def run(self, audio: torch.Tensor | None, ids: torch.Tensor | None, mask: torch.Tensor | None):
        batch: dict[str, torch.Tensor] = {}
        if audio is not None:
            batch.update(audio=audio, audio_mask=torch.ones_like(audio, dtype=torch.bool))
        if ids is not None and self.text_encoder is not None:
            tokens, tmask, pooled = self.text_encoder(ids, mask)  # (B, L, D), (B, L), (B, D)
            batch.update(text=tokens, text_mask=tmask, text_pooled=pooled)
        logits = self.model(batch)  # (B, C)
        return torch.softmax(logits.float(), dim=-1), self.capture.pop()  # (B, C), (B, D)


class _AudioGraph(_Graph):
    def forward(self, audio):
        return self.run(audio, None, None)


class _TextGraph(_Graph):
    def forward(self, input_ids, attention_mask):
        return self.run(None, input_ids, attention_mask)


class _FusionGraph(_Graph):
    def forward(self, audio, input_ids, attention_mask):
        return self.run(audio, input_ids, attention_mask)


def _example_inputs(task: str, sample_rate: int, min_samples: int, tokenizer) -> dict[str, torch.Tensor]:
    """Inputs of batch 2 (no 0/1 specialisation) and an odd length, for tracing and the check."""
    g = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    if task in ("audio", "fusion"):
        n = max(sample_rate // 2 + 37, 2 * min_samples + 37)
        out["audio"] = 0.1 * torch.randn(2, n, generator=g)  # (2, T)
    if task in ("text", "fusion"):
        ids = tokenizer(["the words of an example sentence"] * 2, return_tensors="pt")["input_ids"]  # (2, L)
        out["input_ids"] = ids.long()
        out["attention_mask"] = torch.ones_like(ids, dtype=torch.long)
    return out


def _export_graph(graph: nn.Module, inputs: dict[str, torch.Tensor], path: Path) -> None:
    require("onnxscript", "onnx", "ONNX export (torch.onnx's exporter)")
    batch, tokens = torch.export.Dim("batch", min=1), torch.export.Dim("tokens", min=1)
    shapes = {"audio": {0: batch, 1: torch.export.Dim("samples", min=1)},
              "input_ids": {0: batch, 1: tokens}, "attention_mask": {0: batch, 1: tokens}}
    names = list(inputs)
    with torch.no_grad():
        program = torch.onnx.export(graph, tuple(inputs[k] for k in names), dynamo=True, opset_version=OPSET,
                                    input_names=names, output_names=OUTPUTS,
                                    dynamic_shapes={k: shapes[k] for k in names}, external_data=False,
                                    verbose=False)
    program.save(str(path), external_data=False)


def _max_diff(graph_file: Path, graph: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(probs, embedding) max abs difference of onnxruntime vs PyTorch on `inputs`."""
    ort = require("onnxruntime", "onnx", "checking the ONNX graph")
    sess = ort.InferenceSession(str(graph_file), providers=["CPUExecutionProvider"])
    got = sess.run(OUTPUTS, {k: v.numpy() for k, v in inputs.items()})
    with torch.no_grad():
        want = graph(*inputs.values())
    return tuple(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want, strict=True))


def _card(meta: dict) -> str:
    inputs = ", ".join(f"`{k}` {v}" for k, v in meta["inputs"].items())
    return f"""# mmser ONNX export: {meta['task']} model

Exported by `mmser export` from `{meta['source']}` (mmser {meta['mmser_version']}, opset {meta['opset']}).

- task: {meta['task']}; classes (output order): {', '.join(meta['classes'])}
- sample rate: {meta['sample_rate']} Hz mono; windows of {meta['window_s']} s overlapping by {meta['overlap_s']} s,
  the recording's probabilities = the length-weighted mean of its windows'
- inputs: {inputs}
- outputs: `probs` (B, C) softmax; `utterance_embedding` (B, {meta['embedding_dim']}): {meta['embedding']}
- parity on export: max abs difference of probabilities, onnxruntime vs PyTorch, {meta['parity']['probs']:.2e}
{'- text: tokenizer.json of ' + repr(meta['text']['encoder']) + f", at most {meta['text']['max_length']} tokens"
 if meta.get('text') else ''}

```python
from mmser.onnx import OnnxClassifier          # onnxruntime + numpy + soundfile (+ tokenizers): no torch
clf = OnnxClassifier("{meta['folder']}")
clf.classify_file("speech.wav"{', text="the words"' if meta.get('text') else ''}).label
```
"""


EMBEDDING_DOC = {
    "audio": "the pooled audio frames that feed the linear head",
    "text": "the pooled text vector that feeds the MLP",
    "fusion": "the fused vector that feeds the fusion head's classifier (inference.head_layers)",
}


def export_onnx(model: str | Path, out_dir: str | Path, window_s: float = 10.0, overlap_s: float = 2.0) -> Path:
    """Export a run or model folder to out_dir (see the module docstring); returns out_dir/model.onnx.
    ExportError for a model that cannot be exported; re-running overwrites the folder's files."""
    import mmser
    from mmser.prediction import window_samples

    require("onnx", "onnx", "mmser export --format onnx")
    import onnx

    model_dir = resolve_model_dir(model)
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"{model}: no such run or model folder")
    saved = from_pretrained(model_dir)
    check_exportable(saved)
    window, _ = window_samples(window_s, overlap_s, saved.sample_rate)
    min_samples = encoder_min_samples(saved.model) if saved.needs_audio else 1
    if window < min_samples:
        raise ExportError(f"window_s {window_s}: windows of {window} samples are shorter than the encoder's "
                          f"{min_samples}")
    text_encoder, tokenizer, max_length = text_side(saved) if saved.needs_text else (None, None, 0)
    cls = {"audio": _AudioGraph, "text": _TextGraph, "fusion": _FusionGraph}[saved.task]
    graph = cls(saved.model, text_encoder).eval()
    inputs = _example_inputs(saved.task, saved.sample_rate, min_samples, tokenizer)
    with torch.no_grad():
        embedding = graph(*inputs.values())[1]
    if embedding is None:
        raise ExportError(f"{model_dir}: its head ({type(saved.model).__name__}) has no known embedding "
                          "(mmser.inference.head_layers): not exported")
    embedding_dim = int(embedding.shape[1])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{GRAPH}.tmp-{os.getpid()}"
    try:
        _export_graph(graph, inputs, tmp)
        diff_probs, diff_emb = _max_diff(tmp, graph, inputs)
        if not diff_probs <= PARITY_TOLERANCE:
            raise ExportError(f"{model_dir}: the exported graph's probabilities differ from PyTorch's by "
                              f"{diff_probs:.2e} (> {PARITY_TOLERANCE}): not written")
        spec_inputs = {k: ("(B, T) float32" if k == "audio" else "(B, L) int64") for k in inputs}
        meta = {"format": ONNX_FORMAT, "task": saved.task, "classes": list(saved.classes),
                "sample_rate": int(saved.sample_rate), "window_s": float(window_s), "overlap_s": float(overlap_s),
                "min_samples": int(min_samples), "inputs": spec_inputs, "outputs": OUTPUTS,
                "embedding_dim": embedding_dim, "embedding": EMBEDDING_DOC[saved.task],
                "text": ({"encoder": saved.text["encoder"], "pooling": saved.text.get("pooling", "mean"),
                          "max_length": max_length, "tokenizer": TOKENIZER} if saved.needs_text else None),
                "padding": "none: a batch holds windows of one recording, all of one length",
                "parity": {"probs": diff_probs, "embedding": diff_emb, "inputs": {k: list(v.shape)
                                                                                   for k, v in inputs.items()}},
                "opset": OPSET, "mmser_version": mmser.__version__, "source": str(model_dir),
                "folder": str(out)}
        proto = onnx.load(str(tmp))
        del proto.metadata_props[:]
        entry = proto.metadata_props.add()
        entry.key, entry.value = "mmser", json.dumps(meta)
        for key in ("task", "classes", "sample_rate"):  # also one key each, for generic ONNX tools
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, json.dumps(meta[key]) if key == "classes" else str(meta[key])
        onnx.save(proto, str(tmp))
        publish_temp(tmp, out / GRAPH)
    finally:
        tmp.unlink(missing_ok=True)
    if tokenizer is not None:
        tok_tmp = out / f".{TOKENIZER}.tmp-{os.getpid()}"
        try:
            tokenizer.backend_tokenizer.save(str(tok_tmp))
            publish_temp(tok_tmp, out / TOKENIZER)
        finally:
            tok_tmp.unlink(missing_ok=True)
    atomic_write_json(out / METADATA, meta)
    atomic_write_text(out / CARD, _card(meta))
    log.info("exported %s -> %s (probs parity %.2e)", model_dir, out / GRAPH, diff_probs)
    return out / GRAPH
