"""Word error rate of ASR transcripts against IEMOCAP's gold transcriptions.

Both sides go through `normalize_text` first, so that WER counts words, not formatting:
IEMOCAP writes "[LAUGHTER]" and "--", Whisper writes "Okay." and "twenty-five". Alignment and
counting are jiwer's (`jiwer.process_words`); only the normalisation is ours.

Empty references are handled explicitly (see `wer`): a reference of None (no gold transcript) is
skipped; a reference that normalises to no words (e.g. "[LAUGHTER]") is kept, and every word the
ASR outputs for it counts as an insertion, as in NIST sclite.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jiwer

# Bracketed non-speech tokens: IEMOCAP's [LAUGHTER] [BREATHING] [GARBAGE] [LIPSMACK] ..., and the
# same kind of thing from Whisper: "[BLANK_AUDIO]", "(laughs)", "<unk>". Dropped with their content.
_NON_SPEECH = re.compile(r"\[[^\]]*\]|\([^)]*\)|<[^>]*>")
# Typographic apostrophes and quotes -> ASCII apostrophe, so "don’t" == "don't".
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'", "\u00b4": "'"})
# Anything that is not a letter, digit or apostrophe separates words. This splits hyphenated
# words ("twenty-five" -> "twenty five", "well--" -> "well") the same way on both sides, since
# transcribers and ASR hyphenate inconsistently.
_SEPARATOR = re.compile(r"[^\w']+|_+")
# Apostrophes only count inside a word ("don't", "o'clock"); leading/trailing ones are quotes
# ("'hello'" -> "hello", "students'" -> "students").
_EDGE_APOSTROPHES = re.compile(r"(?<!\w)'+|'+(?!\w)")


def normalize_text(s: str) -> str:
    """Lowercase, drop bracketed non-speech tokens, strip punctuation, collapse whitespace.

    Apostrophes inside words are kept ("Don't!" -> "don't"); hyphens split words
    ("well-known" -> "well known"). Numbers are left as written ("5" and "five" differ).

    >>> normalize_text("Excuse me. [LAUGHTER] I don't--  know-how!")
    "excuse me i don't know how"
    """
    if not isinstance(s, str):
        raise TypeError(f"normalize_text expects a str, got {type(s).__name__}")
    s = s.translate(_APOSTROPHES).lower()
    s = _NON_SPEECH.sub(" ", s)
    s = _SEPARATOR.sub(" ", s)
    s = _EDGE_APOSTROPHES.sub(" ", s)
    return " ".join(s.split())


def wer(refs: Sequence[str | None], hyps: Sequence[str | None]) -> dict:
    """Corpus-level WER of `hyps` against `refs` (paired by position), on normalised text.

    Returns a dict with
      wer: (substitutions + deletions + insertions) / ref_words, or None when there are no
           reference words at all (WER is undefined then);
      substitutions, deletions, insertions, hits, ref_words, hyp_words: word counts;
      utterances: pairs scored; skipped_no_ref: pairs skipped because the reference is None;
      empty_refs: scored pairs whose reference normalises to no words (their hypothesis words
           are insertions).
    A hypothesis of None counts as empty (every reference word deleted).
    """
    if len(refs) != len(hyps):
        raise ValueError(f"wer: {len(refs)} references but {len(hyps)} hypotheses")
    ref_texts: list[str] = []
    hyp_texts: list[str] = []
    skipped = 0
    for r, h in zip(refs, hyps, strict=True):
        if r is None:
            skipped += 1
            continue
        ref_texts.append(normalize_text(r))
        hyp_texts.append(normalize_text(h) if h is not None else "")
    out = {"wer": None, "substitutions": 0, "deletions": 0, "insertions": 0, "hits": 0,
           "ref_words": 0, "hyp_words": 0, "utterances": len(ref_texts), "skipped_no_ref": skipped,
           "empty_refs": sum(1 for r in ref_texts if not r)}
    if not ref_texts:
        return out
    m = jiwer.process_words(ref_texts, hyp_texts)
    out.update(substitutions=int(m.substitutions), deletions=int(m.deletions),
               insertions=int(m.insertions), hits=int(m.hits),
               ref_words=sum(len(r.split()) for r in ref_texts),
               hyp_words=sum(len(h.split()) for h in hyp_texts))
    if out["ref_words"] > 0:
        out["wer"] = (out["substitutions"] + out["deletions"] + out["insertions"]) / out["ref_words"]
    return out
