"""IEMOCAP's 4-class label set, as the paper's reference preparation keeps it.

These are IEMOCAP's constants (its prepare and its synthetic stand-in use them), not the class set
of every run: a run's classes come from its manifest or `data.classes`
(mmser.data.manifest.resolve_classes), and a saved model records its own.
"""

from __future__ import annotations

# Class index order = sorted class names, as in the reference code (`anger, happy, neutral, sad`).
CLASSES: tuple[str, ...] = ("angry", "happy", "neutral", "sad")
CLASS_TO_INDEX: dict[str, int] = {c: i for i, c in enumerate(CLASSES)}

# Consensus codes kept by the reference preparation; `exc` (excited) merges into happy.
# Every other code (fru, sur, fea, oth, dis, xxx) is outside the 4-class task.
CODE_TO_LABEL: dict[str, str] = {
    "neu": "neutral",
    "hap": "happy",
    "exc": "happy",
    "ang": "angry",
    "sad": "sad",
}


def label_of_code(code: str | None) -> str | None:
    """4-class label of a consensus code, or None when the code is outside the task."""
    if code is None:
        return None
    return CODE_TO_LABEL.get(code)
