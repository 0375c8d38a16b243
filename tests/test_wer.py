"""WER normalisation and counting, on hand-made cases with hand-computed results."""

from __future__ import annotations

import pytest

from mmser.text.wer import normalize_text, wer


@pytest.mark.parametrize("raw, expected", [
    ("Excuse me.", "excuse me"),
    ("[LAUGHTER] Oh my God! [BREATHING]", "oh my god"),
    ("[GARBAGE]", ""),
    ("yeah[LAUGHTER]okay", "yeah okay"),  # a bracket glued to words still separates them
    ("I don't know.", "i don't know"),  # apostrophes inside words stay
    ("Don\u2019t", "don't"),  # typographic apostrophe == ASCII
    ("'Hello,' she said.", "hello she said"),  # quotes at word edges go
    ("twenty-five well-known", "twenty five well known"),  # hyphens split words
    ("I was going to--   you know", "i was going to you know"),  # IEMOCAP's "--" interruptions
    ("  Multiple\tspaces\nand lines ", "multiple spaces and lines"),
    ("(laughs) [BLANK_AUDIO] <unk> fine", "fine"),  # Whisper's non-speech markers
    ("It's 5 o'clock; rock'n'roll!", "it's 5 o'clock rock'n'roll"),
    ("", ""),
])
def test_normalize_text(raw: str, expected: str) -> None:
    assert normalize_text(raw) == expected


def test_normalize_text_rejects_non_strings() -> None:
    with pytest.raises(TypeError, match="expects a str"):
        normalize_text(None)  # type: ignore[arg-type]


def test_wer_substitution_and_deletion() -> None:
    # ref 6 words; "sat"->"sit" is 1 substitution, the second "the" is deleted: 2 / 6.
    m = wer(["The cat sat on the mat."], ["the cat sit on mat"])
    assert (m["substitutions"], m["deletions"], m["insertions"], m["hits"]) == (1, 1, 0, 4)
    assert m["ref_words"] == 6 and m["hyp_words"] == 5
    assert m["wer"] == pytest.approx(2 / 6)


def test_wer_insertion() -> None:
    m = wer(["hello world"], ["Hello, big world!"])
    assert (m["substitutions"], m["deletions"], m["insertions"]) == (0, 0, 1)
    assert m["wer"] == pytest.approx(1 / 2)


def test_wer_is_zero_after_normalisation() -> None:
    m = wer(["Excuse me. [LAUGHTER] I don't--know."], ["excuse me, I don't know"])
    assert m["wer"] == 0.0 and m["hits"] == 5


def test_wer_is_corpus_level_not_mean_of_utterances() -> None:
    # 1 error over 5 reference words = 0.2 (a mean of per-utterance WERs would give 0.5).
    m = wer(["a b c d", "e"], ["a b c d", ""])
    assert m["wer"] == pytest.approx(0.2)
    assert m["deletions"] == 1 and m["utterances"] == 2


def test_wer_empty_reference_counts_insertions() -> None:
    # "[LAUGHTER]" normalises to no words; the 2 hypothesis words there are insertions.
    m = wer(["[LAUGHTER]", "yes"], ["ha ha", "yes"])
    assert m["empty_refs"] == 1
    assert m["insertions"] == 2 and m["ref_words"] == 1
    assert m["wer"] == pytest.approx(2.0)


def test_wer_none_reference_is_skipped_and_none_hypothesis_is_empty() -> None:
    m = wer([None, "one two three"], ["whatever", None])
    assert m["skipped_no_ref"] == 1 and m["utterances"] == 1
    assert m["deletions"] == 3 and m["wer"] == pytest.approx(1.0)


def test_wer_undefined_without_reference_words() -> None:
    m = wer(["[BREATHING]", None], ["", "x"])
    assert m["wer"] is None and m["ref_words"] == 0
    assert wer([], [])["wer"] is None


def test_wer_length_mismatch() -> None:
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        wer(["a", "b"], ["a"])
