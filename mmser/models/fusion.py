"""Audio+text fusion heads and the text-only classifier: pure nn.Modules (no Lightning, no wandb).

Inputs follow the batch contract:
    audio_frames (B, F, Ha), frame_mask (B, F) bool   from the audio encoder's encode()
    text_tokens  (B, L, Ht), text_mask  (B, L) bool   frozen token features, zero-padded
    text_pooled  (B, Ht)                              frozen utterance vector (optional)
Masks are True on real frames / tokens. Padded positions never influence an output: they are
zeroed on entry (so even non-finite garbage there cannot leak), excluded from every pooled mean and
from every attention softmax. A side with no valid position at all (an empty transcript) pools to
zeros and receives no cross-modal update, never NaN.

Heads (each forward(audio_frames, frame_mask, text_tokens, text_mask, text_pooled=None) -> (B, C)):
    ConcatFusion          late fusion of utterance embeddings: [audio ; text] -> MLP -> logits
    DecisionFusion        late fusion of decisions: the audio and text branch posteriors pooled
                          with learned per-class (or global) modality weights (weighted product
                          or weighted average); returns fused log-probabilities
    CrossAttentionFusion  audio frames attend to text tokens and text tokens attend to audio frames,
                          then [pool(audio) ; pool(text)] -> MLP -> logits
Wrappers (forward(batch) -> logits):
    TextClassifier        text-only baseline over frozen text features
    FusionClassifier      audio encoder (encode()) + one fusion head, optionally frozen audio side

    head = build_fusion_head(cfg.fusion, audio_dim=768, text_dim=384)
    model = FusionClassifier(audio_encoder, head, freeze_audio=cfg.fusion.freeze_audio)
    logits = model(batch)                                   # (B, 4)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from mmser.config import FusionConfig
from mmser.labels import CLASSES
from mmser.models.audio_encoders import encode_audio
from mmser.models.heads import masked_mean

TextPooling = Literal["mean", "pooled"]

__all__ = [
    "masked_mean",
    "TextClassifier",
    "ConcatFusion",
    "DecisionFusion",
    "CrossAttentionBlock",
    "CrossAttentionFusion",
    "FusionClassifier",
    "build_fusion_head",
    "build_text_classifier",
]


# --------------------------------------------------------------------------------------------
# Masking helpers
# --------------------------------------------------------------------------------------------


def _check_sequence(x: Tensor | None, mask: Tensor | None, name: str, who: str) -> None:
    """Clear errors for a missing or misshapen (features, mask) pair."""
    if x is None or mask is None:
        raise ValueError(
            f"{who}: needs {name} features and their mask (batch keys "
            f"{'audio/audio_mask' if name == 'audio' else 'text/text_mask'}); got None"
        )
    if x.dim() != 3:
        raise ValueError(f"{who}: {name} features must be (B, T, D), got shape {tuple(x.shape)}")
    if mask.dtype != torch.bool:
        raise ValueError(f"{who}: {name} mask must be a bool tensor (True = real), got {mask.dtype}")
    if mask.shape != x.shape[:2]:
        raise ValueError(
            f"{who}: {name} mask shape {tuple(mask.shape)} does not match features {tuple(x.shape)}"
        )


def _zero_padding(x: Tensor, mask: Tensor) -> Tensor:
    """Zero the padded positions of `x` (B, T, D) so that nothing in them can reach an output."""
    return x.masked_fill(~mask.unsqueeze(-1), 0.0)


def _at_least_one_position(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """A (B, 0, D) batch (every transcript empty) -> one all-padded position, so attention and
    pooling have something to index; the mask keeps it out of every result."""
    if x.shape[1] > 0:
        return x, mask
    return x.new_zeros(x.shape[0], 1, x.shape[2]), mask.new_zeros(mask.shape[0], 1)


def _text_embedding(
    pooling: TextPooling,
    text_tokens: Tensor | None,
    text_mask: Tensor | None,
    text_pooled: Tensor | None,
    who: str,
) -> Tensor:
    """Utterance-level text vector (B, Ht): masked mean of the tokens, or the encoder's pooled one."""
    if pooling == "pooled":
        if text_pooled is None:
            raise ValueError(
                f"{who}: text_pooling='pooled' needs the batch key 'text_pooled' (B, D); got None"
            )
        if text_pooled.dim() != 2:
            raise ValueError(f"{who}: text_pooled must be (B, D), got {tuple(text_pooled.shape)}")
        return text_pooled
    _check_sequence(text_tokens, text_mask, "text", who)
    return masked_mean(text_tokens, text_mask)  # (B, Ht)


def _mlp(in_dim: int, hidden: int, num_classes: int, dropout: float) -> nn.Sequential:
    """Dropout -> Linear -> ReLU -> Dropout -> Linear; hidden == 0 gives a linear probe."""
    if hidden <= 0:
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, num_classes))
    return nn.Sequential(
        nn.Dropout(dropout),
        nn.Linear(in_dim, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, num_classes),
    )


# --------------------------------------------------------------------------------------------
# Text-only baseline
# --------------------------------------------------------------------------------------------


class TextClassifier(nn.Module):
    """Text-only baseline over frozen text features: pool -> small MLP -> logits.

    A small MLP rather than the audio head's ReLU -> pool -> Linear: the text features are frozen,
    so a single Linear would be a linear probe, weaker than the MLP every fusion head has on top
    of the same features; the MLP keeps text-only vs fusion a like-for-like comparison
    (`hidden=0` gives the linear probe). No ReLU before pooling: frozen BERT-family features are
    signed and were not trained to be rectified (the audio head's ReLU follows an encoder that is
    fine-tuned through it).

    pooling="mean": masked mean of batch["text"] (B, L, D) over batch["text_mask"] (B, L);
    pooling="pooled": batch["text_pooled"] (B, D) as given by the text encoder.
    """

    def __init__(
        self,
        text_dim: int,
        num_classes: int = len(CLASSES),
        hidden: int = 256,
        dropout: float = 0.1,
        pooling: TextPooling = "mean",
    ) -> None:
        super().__init__()
        if pooling not in ("mean", "pooled"):
            raise ValueError(f"TextClassifier: pooling must be 'mean' or 'pooled', got {pooling!r}")
        self.init_args = dict(text_dim=text_dim, num_classes=num_classes, hidden=hidden, dropout=dropout,
                              pooling=pooling)  # config_dict(): rebuilds the architecture
        self.pooling = pooling
        self.mlp = _mlp(text_dim, hidden, num_classes, dropout)

    def classify(
        self, text_tokens: Tensor | None, text_mask: Tensor | None, text_pooled: Tensor | None = None
    ) -> Tensor:
        """Logits (B, C) from text features (the tensor API, used by DecisionFusion too)."""
        emb = _text_embedding(self.pooling, text_tokens, text_mask, text_pooled, type(self).__name__)
        return self.mlp(emb)  # (B, C)

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        return self.classify(batch.get("text"), batch.get("text_mask"), batch.get("text_pooled"))


# --------------------------------------------------------------------------------------------
# Late fusion
# --------------------------------------------------------------------------------------------


class ConcatFusion(nn.Module):
    """Late fusion (a): [audio utterance embedding ; text utterance embedding] -> MLP -> logits.

    Audio embedding = masked mean of ReLU(frames), the paper's audio head (PAPER.md V-FT: ReLU ->
    masked mean; its second ReLU is a no-op on a mean of non-negative values). Text embedding =
    masked mean of the token features, or text_pooled (`text_pooling="pooled"`).
    `normalize=True` puts each embedding through its own LayerNorm before the concatenation, so
    neither modality dominates by scale alone (wav2vec 2.0 and sentence-encoder features differ in
    magnitude by an order or more).
    """

    def __init__(
        self,
        audio_dim: int,
        text_dim: int,
        num_classes: int = len(CLASSES),
        hidden: int = 256,
        dropout: float = 0.1,
        text_pooling: TextPooling = "mean",
        normalize: bool = True,
    ) -> None:
        super().__init__()
        if text_pooling not in ("mean", "pooled"):
            raise ValueError(f"ConcatFusion: text_pooling must be 'mean' or 'pooled', got {text_pooling!r}")
        self.init_args = dict(audio_dim=audio_dim, text_dim=text_dim, num_classes=num_classes, hidden=hidden,
                              dropout=dropout, text_pooling=text_pooling, normalize=normalize)
        self.text_pooling = text_pooling
        self.audio_norm = nn.LayerNorm(audio_dim) if normalize else nn.Identity()
        self.text_norm = nn.LayerNorm(text_dim) if normalize else nn.Identity()
        self.mlp = _mlp(audio_dim + text_dim, hidden, num_classes, dropout)

    def forward(
        self,
        audio_frames: Tensor,
        frame_mask: Tensor,
        text_tokens: Tensor | None,
        text_mask: Tensor | None,
        text_pooled: Tensor | None = None,
    ) -> Tensor:
        who = type(self).__name__
        _check_sequence(audio_frames, frame_mask, "audio", who)
        audio = masked_mean(torch.relu(audio_frames), frame_mask)  # (B, Ha)
        text = _text_embedding(self.text_pooling, text_tokens, text_mask, text_pooled, who)  # (B, Ht)
        fused = torch.cat([self.audio_norm(audio), self.text_norm(text)], dim=-1)  # (B, Ha + Ht)
        return self.mlp(fused)  # (B, C)


class DecisionFusion(nn.Module):
    """Late fusion (b): the audio and text branches' class posteriors, pooled with learned weights.

    Audio branch: the paper's head, ReLU(frames) -> masked mean -> Dropout -> Linear(Ha, C).
    Text branch: a TextClassifier (pool -> MLP).
    Weights: (w_audio[c], w_text[c]) = softmax of two learned scalars, so they sum to 1; start at
    0.5 / 0.5. `weights="class"` (default) learns one pair per class (a modality can be trusted
    more for some emotions than for others: words tell happy from angry, prosody tells sad);
    `weights="global"` learns one pair for all classes.
    Pooling rule, followed by renormalisation over classes:
      rule="log_linear" (default): log p(c) ∝ w_audio[c] log p_audio(c) + w_text[c] log p_text(c),
          a weighted product of experts (with global weights: softmax of the weighted branch
          log-probabilities). A class must be plausible to both branches, so partial evidence
          from each modality combines: on the test suite's task where the class is 2a + b, bit a
          heard only in the audio and bit b only in the text, it reached 100 % (4 seeds).
      rule="linear": p(c) ∝ w_audio[c] p_audio(c) + w_text[c] p_text(c), the classic weighted
          average of posteriors (a linear opinion pool). It follows the more confident branch:
          good when one modality is uninformative for an utterance (noisy audio, empty
          transcript: 92-97 % on such a task), but on the 2a + b task it reached 64-91 % (4 seeds):
          a branch's arbitrary split between the classes it cannot tell apart decides the output.

    forward returns log p (B, C) computed in log space (logsumexp, no log(0)): a valid logit
    vector (softmax(log p) = p), so cross-entropy works on it unchanged. With `num_dims` > 0 (a
    dimensional or multitask task, mmser/tasks.py; `num_classes` then counts all C + K outputs)
    each branch also outputs K scaled dimensions after its C logits, and the fused output's last K
    columns are their weighted average with one learned (audio, text) weight pair per dimension
    (softmax, starting at 0.5 / 0.5): posteriors are pooled as probabilities, regression outputs as
    values. Output (B, C + K). After each forward the branch logits are in `last_branch_logits` =
    (audio (B, C), text (B, C)), for a loss that also supervises each branch; `branch_logits(...)`
    computes them directly.
    """

    def __init__(
        self,
        audio_dim: int,
        text_dim: int,
        num_classes: int = len(CLASSES),
        hidden: int = 256,
        dropout: float = 0.1,
        text_pooling: TextPooling = "mean",
        weights: Literal["class", "global"] = "class",
        rule: Literal["log_linear", "linear"] = "log_linear",
        num_dims: int = 0,
    ) -> None:
        super().__init__()
        if weights not in ("class", "global"):
            raise ValueError(f"DecisionFusion: weights must be 'class' or 'global', got {weights!r}")
        if rule not in ("log_linear", "linear"):
            raise ValueError(f"DecisionFusion: rule must be 'log_linear' or 'linear', got {rule!r}")
        self.init_args = dict(audio_dim=audio_dim, text_dim=text_dim, num_classes=num_classes, hidden=hidden,
                              dropout=dropout, text_pooling=text_pooling, weights=weights, rule=rule)
        if num_dims:
            self.init_args["num_dims"] = num_dims
        self.weights = weights
        self.rule = rule
        # num_classes counts every output (as every head's: what a saved config.json says); the
        # last num_dims of them are regression outputs
        if not 0 <= num_dims <= num_classes:
            raise ValueError(f"DecisionFusion: num_dims {num_dims} not in [0, num_classes {num_classes}]")
        outputs = num_classes
        num_classes -= num_dims
        self.num_classes, self.num_dims = num_classes, num_dims
        self.audio_head = nn.Sequential(nn.Dropout(dropout), nn.Linear(audio_dim, outputs))
        self.text_branch = TextClassifier(text_dim, outputs, hidden, dropout, text_pooling)
        # Row 0 = audio, row 1 = text; softmax over the rows (dim 0).
        self.weight_logits = nn.Parameter(torch.zeros(2, num_classes if weights == "class" else 1))
        # per dimension (audio, text) weights of the regression outputs (only with num_dims)
        self.dim_weight_logits = nn.Parameter(torch.zeros(2, num_dims)) if num_dims else None
        self.last_branch_logits: tuple[Tensor, Tensor] | None = None

    def modality_weights(self) -> Tensor:
        """Fusion weights (2, K): row 0 audio, row 1 text; each column sums to 1 (K = C or 1)."""
        return torch.softmax(self.weight_logits, dim=0)

    def weights_report(self, class_names: tuple[str, ...] = CLASSES) -> dict[str, dict[str, float]]:
        """{"audio": {class: w, ...}, "text": {...}} (key "all" for global weights), for logging."""
        w = self.modality_weights().detach().cpu()
        names = list(class_names) if self.weights == "class" else ["all"]
        if len(names) != w.shape[1]:
            raise ValueError(f"DecisionFusion: {len(names)} class names for {w.shape[1]} weights")
        return {m: {n: float(w[i, j]) for j, n in enumerate(names)} for i, m in enumerate(("audio", "text"))}

    def branch_logits(
        self,
        audio_frames: Tensor,
        frame_mask: Tensor,
        text_tokens: Tensor | None,
        text_mask: Tensor | None,
        text_pooled: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(audio logits (B, C), text logits (B, C)) of the two branches."""
        _check_sequence(audio_frames, frame_mask, "audio", type(self).__name__)
        audio = masked_mean(torch.relu(audio_frames), frame_mask)  # (B, Ha)
        return self.audio_head(audio), self.text_branch.classify(text_tokens, text_mask, text_pooled)

    def fuse(self, audio_logits: Tensor, text_logits: Tensor) -> Tensor:
        """Fused log-probabilities (B, C) from the two branches' logits (B, C); with num_dims, the
        branches' (B, C + K) outputs -> (B, C + K), the dimensions a weighted average."""
        if self.dim_weight_logits is None:
            return self._fuse_classes(audio_logits, text_logits)
        c = self.num_classes
        w = torch.softmax(self.dim_weight_logits, dim=0)  # (2, K)
        dims = w[0] * audio_logits[:, c:] + w[1] * text_logits[:, c:]  # (B, K)
        if c == 0:
            return dims
        return torch.cat([self._fuse_classes(audio_logits[:, :c], text_logits[:, :c]), dims], dim=-1)

    def _fuse_classes(self, audio_logits: Tensor, text_logits: Tensor) -> Tensor:
        branch_logp = torch.stack(
            [torch.log_softmax(audio_logits, dim=-1), torch.log_softmax(text_logits, dim=-1)], dim=0
        )  # (2, B, C)
        if self.rule == "log_linear":
            w = torch.softmax(self.weight_logits, dim=0).unsqueeze(1)  # (2, 1, K)
            pooled = (w * branch_logp).sum(dim=0)  # (B, C) log of the weighted product
        else:
            log_w = torch.log_softmax(self.weight_logits, dim=0).unsqueeze(1)  # (2, 1, K)
            pooled = torch.logsumexp(log_w + branch_logp, dim=0)  # (B, C) log of the weighted sum
        return torch.log_softmax(pooled, dim=-1)  # (B, C) renormalised over classes

    def forward(
        self,
        audio_frames: Tensor,
        frame_mask: Tensor,
        text_tokens: Tensor | None,
        text_mask: Tensor | None,
        text_pooled: Tensor | None = None,
    ) -> Tensor:
        audio_logits, text_logits = self.branch_logits(
            audio_frames, frame_mask, text_tokens, text_mask, text_pooled
        )
        self.last_branch_logits = (audio_logits, text_logits)
        return self.fuse(audio_logits, text_logits)  # (B, C)


# --------------------------------------------------------------------------------------------
# Cross-attention fusion
# --------------------------------------------------------------------------------------------


class CrossAttentionBlock(nn.Module):
    """Queries attend to a context sequence, post-norm transformer style:
    x = LN(x + Dropout(MHA(x, ctx, ctx))); then, with ffn, x = LN(x + Dropout(FFN(x))).

    A batch row whose context has no valid position (an empty transcript) would make every
    attention score -inf and the softmax NaN: for the attention call its first position is
    unmasked, and the attention output of that row is then replaced by zeros, so its queries get
    no cross-modal update and the residual path carries them through unchanged.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.1, ffn: bool = True) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = (
            nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * dim, dim))
            if ffn
            else None
        )
        self.norm2 = nn.LayerNorm(dim) if ffn else None

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor) -> Tensor:
        """x (B, Tq, D) queries; context (B, Tk, D) with context_mask (B, Tk) True = real."""
        has_context = context_mask.any(dim=1)  # (B,)
        key_padding = ~context_mask  # (B, Tk) True = ignore (nn.MultiheadAttention's convention)
        key_padding[:, 0] &= has_context  # empty rows: attend to position 0, zeroed just below
        attended, _ = self.attn(x, context, context, key_padding_mask=key_padding, need_weights=False)
        attended = attended.masked_fill(~has_context[:, None, None], 0.0)  # (B, Tq, D)
        x = self.norm1(x + self.dropout(attended))  # (B, Tq, D)
        if self.ffn is not None and self.norm2 is not None:
            x = self.norm2(x + self.dropout(self.ffn(x)))  # (B, Tq, D)
        return x


class CrossAttentionFusion(nn.Module):
    """Bidirectional cross-attention fusion.

    Both sides are projected to `hidden`; in each layer audio frames attend to text tokens and
    text tokens attend to audio frames, both from the previous layer's states (a symmetric,
    parallel update), with key padding masks on both sides, residual + LayerNorm and an optional
    FFN. Each side is then masked-mean pooled and [audio ; text] (B, 2*hidden) -> MLP -> logits.
    An utterance with an empty transcript pools its text side to zeros; its audio frames get no
    cross-modal update (see CrossAttentionBlock), so it is classified from audio alone.
    """

    def __init__(
        self,
        audio_dim: int,
        text_dim: int,
        num_classes: int = len(CLASSES),
        hidden: int = 256,
        num_heads: int = 4,
        dropout: float = 0.1,
        num_layers: int = 1,
        ffn: bool = True,
    ) -> None:
        super().__init__()
        if hidden % num_heads != 0:
            raise ValueError(
                f"CrossAttentionFusion: hidden {hidden} is not divisible by num_heads {num_heads}"
            )
        if num_layers < 1:
            raise ValueError(f"CrossAttentionFusion: num_layers must be >= 1, got {num_layers}")
        self.init_args = dict(audio_dim=audio_dim, text_dim=text_dim, num_classes=num_classes, hidden=hidden,
                              num_heads=num_heads, dropout=dropout, num_layers=num_layers, ffn=ffn)
        self.audio_proj = nn.Linear(audio_dim, hidden)
        self.text_proj = nn.Linear(text_dim, hidden)
        self.audio_to_text = nn.ModuleList(
            CrossAttentionBlock(hidden, num_heads, dropout, ffn) for _ in range(num_layers)
        )  # audio queries, text keys/values
        self.text_to_audio = nn.ModuleList(
            CrossAttentionBlock(hidden, num_heads, dropout, ffn) for _ in range(num_layers)
        )  # text queries, audio keys/values
        self.mlp = _mlp(2 * hidden, hidden, num_classes, dropout)

    def forward(
        self,
        audio_frames: Tensor,
        frame_mask: Tensor,
        text_tokens: Tensor | None,
        text_mask: Tensor | None,
        text_pooled: Tensor | None = None,
    ) -> Tensor:
        """text_pooled is accepted for a uniform signature and not used (attention needs tokens)."""
        who = type(self).__name__
        _check_sequence(audio_frames, frame_mask, "audio", who)
        _check_sequence(text_tokens, text_mask, "text", who)
        assert text_tokens is not None and text_mask is not None  # for the type checker
        audio_frames, frame_mask = _at_least_one_position(audio_frames, frame_mask)
        text_tokens, text_mask = _at_least_one_position(text_tokens, text_mask)
        a = self.audio_proj(_zero_padding(audio_frames, frame_mask))  # (B, F, H)
        t = self.text_proj(_zero_padding(text_tokens, text_mask))  # (B, L, H)
        for a2t, t2a in zip(self.audio_to_text, self.text_to_audio, strict=True):
            a, t = a2t(a, t, text_mask), t2a(t, a, frame_mask)  # (B, F, H), (B, L, H)
        pooled = torch.cat([masked_mean(a, frame_mask), masked_mean(t, text_mask)], dim=-1)  # (B, 2H)
        return self.mlp(pooled)  # (B, C)


# --------------------------------------------------------------------------------------------
# Wrapper and factories
# --------------------------------------------------------------------------------------------


class FusionClassifier(nn.Module):
    """Audio encoder + fusion head: forward(batch) -> logits (B, C).

    `audio_encoder` is any module with encode(audio (B, T), audio_mask (B, T)) -> (frames (B, F, H),
    frame_mask (B, F)). With freeze_audio=True its parameters get requires_grad=False, it runs
    without autograd, and it stays in eval mode even when the wrapper is put in train mode
    (frozen features are then deterministic: no dropout, no SpecAugment).
    """

    def __init__(self, audio_encoder: nn.Module, fusion: nn.Module, freeze_audio: bool = False,
                 branch_loss_weight: float = 0.0) -> None:
        super().__init__()
        self.branch_loss_weight = branch_loss_weight
        if not callable(getattr(audio_encoder, "encode", None)):
            raise TypeError(
                f"FusionClassifier: audio_encoder {type(audio_encoder).__name__} "
                "has no encode(audio, audio_mask)"
            )
        self.audio_encoder = audio_encoder
        self.fusion = fusion
        self.freeze_audio = freeze_audio
        if freeze_audio:
            self.audio_encoder.requires_grad_(False)
            self.audio_encoder.eval()

    def train(self, mode: bool = True) -> FusionClassifier:
        super().train(mode)
        if self.freeze_audio:
            self.audio_encoder.eval()
        return self

    def auxiliary_logits(self) -> list[tuple[float, Tensor]]:
        """(weight, logits) pairs the training loss adds a cross-entropy for, from the last forward:
        the audio and text branches of a DecisionFusion head (each branch stays a classifier)."""
        branches = getattr(self.fusion, "last_branch_logits", None)
        if not self.branch_loss_weight or branches is None:
            return []
        return [(self.branch_loss_weight, logits) for logits in branches]

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        for key in ("audio", "audio_mask"):
            if key not in batch:
                raise KeyError(f"FusionClassifier: batch has no '{key}' (keys: {sorted(batch)})")
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_audio):
            frames, frame_mask = encode_audio(self.audio_encoder, batch)  # cached Whisper frames too
        # (B, F, Ha), (B, F)
        return self.fusion(
            frames, frame_mask, batch.get("text"), batch.get("text_mask"), batch.get("text_pooled")
        )


def build_fusion_head(
    cfg: FusionConfig, audio_dim: int, text_dim: int, num_classes: int = len(CLASSES), num_dims: int = 0
) -> nn.Module:
    """The fusion head `cfg.head` names, sized for the given feature widths, with `num_classes`
    class logits then `num_dims` regression outputs (mmser/tasks.py: one final Linear of C + K
    outputs; decision fusion pools the two kinds differently, so it is told K)."""
    if cfg.head == "concat":
        return ConcatFusion(audio_dim, text_dim, num_classes + num_dims, cfg.hidden_size, cfg.dropout,
                            cfg.text_pooling)
    if cfg.head == "decision":
        return DecisionFusion(
            audio_dim, text_dim, num_classes + num_dims, cfg.hidden_size, cfg.dropout, cfg.text_pooling,
            cfg.decision_weights, cfg.decision_rule, num_dims=num_dims,
        )
    if cfg.head == "cross_attention":
        return CrossAttentionFusion(
            audio_dim, text_dim, num_classes + num_dims, cfg.hidden_size, cfg.num_heads, cfg.dropout,
            cfg.num_layers, cfg.ffn,
        )
    raise ValueError(
        f"fusion.head={cfg.head!r} builds no fusion head (choose concat, decision or cross_attention)"
    )


def build_text_classifier(
    cfg: FusionConfig, text_dim: int, num_classes: int = len(CLASSES)
) -> TextClassifier:
    """The text-only baseline, sized by the fusion section (same MLP width, dropout, pooling)."""
    return TextClassifier(text_dim, num_classes, cfg.hidden_size, cfg.dropout, cfg.text_pooling)
