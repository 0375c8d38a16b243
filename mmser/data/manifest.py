"""The prepared manifest (JSONL, one utterance per line) and leave-one-session-out folds.

No torch here. A fold is a pure function of the records and the data config:
fold k tests on every utterance of session k (both actors, improvised and scripted) and never
trains or validates on it. The validation policy is a config choice:
- "none" (the paper): no validation set; the last epoch is tested.
- "speaker": hold out one actor of the training sessions (default: the F actor of the session
  after the test session, wrapping 5 -> 1), so validation is speaker-independent too.
- "fraction": hold out a seeded random fraction of the training utterances (stratified by class).
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mmser.io import atomic_write_json
from mmser.labels import CLASSES

SESSIONS = (1, 2, 3, 4, 5)
REQUIRED_FIELDS = ("id", "path", "session", "speaker", "gender", "dialog", "scripted",
                   "emotion_code", "label", "transcript", "duration")


class ManifestError(ValueError):
    """A manifest that cannot be used: one line naming the file, the line number(s) and the
    problem (the first one found; `problems` lists them all)."""

    def __init__(self, path: str | Path, problems: list[str]):
        self.path = Path(path)
        self.problems = list(problems)
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        super().__init__(f"{path}:{problems[0]}{more}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def _nonempty_str(x) -> bool:
    return isinstance(x, str) and x != ""


def _opt_str(x) -> bool:
    return x is None or isinstance(x, str)


# field -> (check, what the field must be)
_FIELD_CHECKS = {
    "id": (_nonempty_str, "a non-empty string"),
    "path": (_nonempty_str, "a non-empty string"),
    "session": (lambda x: _is_int(x) and x in SESSIONS, f"an integer in {SESSIONS}"),
    "speaker": (_nonempty_str, "a non-empty string"),
    "gender": (_nonempty_str, "a non-empty string"),
    "dialog": (_nonempty_str, "a non-empty string"),
    "scripted": (lambda x: isinstance(x, bool), "true or false"),
    "emotion_code": (_opt_str, "a string or null"),
    "label": (lambda x: x is None or x in CLASSES, f"null or one of {list(CLASSES)}"),
    "transcript": (_opt_str, "a string or null"),
    "duration": (lambda x: _is_number(x) and x > 0, "a positive number of seconds"),
}
assert tuple(_FIELD_CHECKS) == REQUIRED_FIELDS


def _record_problems(r: dict) -> list[str]:
    """What is wrong with one record (empty when it is valid)."""
    missing = [k for k in REQUIRED_FIELDS if k not in r]
    if missing:
        return [f"lacks field(s) {', '.join(missing)}"]
    return [f"{k} is {_short_repr(r[k])}; expected {what}"
            for k, (ok, what) in _FIELD_CHECKS.items() if not ok(r[k])]


def _short_repr(x, limit: int = 60) -> str:
    text = repr(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_manifest(path: str | Path) -> list[dict]:
    """Read manifest.jsonl, validating it as it is loaded.

    Every record needs the fields of REQUIRED_FIELDS with the types of `_FIELD_CHECKS` (session in
    1..5, label null or one of CLASSES: null marks utterances outside the 4-class task), and ids
    are unique. A problem raises ManifestError (a ValueError) naming the file, the line number(s)
    and the problem, so a bad manifest stops here and not later inside a fold (where a duplicate
    id would surface as `Fold.check`'s "an utterance is in two splits").
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    records: list[dict] = []
    problems: list[str] = []
    first_line: dict[str, int] = {}  # id -> line of its first record
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                problems.append(f"{lineno}: not UTF-8 text (byte {e.start} of the line)")
                continue
            if not line:
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{lineno}: not valid JSON ({e.msg})")
                continue
            if not isinstance(r, dict):
                problems.append(f"{lineno}: expected a JSON object, got {type(r).__name__}")
                continue
            label = f" ({r['id']})" if isinstance(r.get("id"), str) else ""
            problems += [f"{lineno}: record{label} {p}" for p in _record_problems(r)]
            uid = r.get("id")
            if isinstance(uid, str):
                if uid in first_line:
                    problems.append(f"{lineno}: duplicate utterance id {uid!r} (first on line {first_line[uid]})")
                else:
                    first_line[uid] = lineno
            records.append(r)
    if problems:
        raise ManifestError(path, problems)
    return records


def task_records(records: list[dict]) -> list[dict]:
    """Only the utterances inside the 4-class task (label not null)."""
    return [r for r in records if r["label"] is not None]


@dataclass
class Fold:
    test_session: int
    train: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)
    test: list[dict] = field(default_factory=list)
    val_policy: str = "none"
    val_detail: str = ""

    def check(self) -> None:
        """Protocol integrity: the test session appears nowhere but in `test`; no overlap."""
        for name, part in (("train", self.train), ("val", self.val)):
            bad = [r["id"] for r in part if r["session"] == self.test_session]
            if bad:
                raise AssertionError(f"fold {self.test_session}: test-session utterances in {name}: {bad[:5]}")
        ids = [r["id"] for r in self.train + self.val + self.test]
        if len(ids) != len(set(ids)):
            raise AssertionError(f"fold {self.test_session}: an utterance is in two splits")
        if any(r["session"] != self.test_session for r in self.test):
            raise AssertionError(f"fold {self.test_session}: test holds another session")


def default_val_speaker(test_session: int) -> str:
    nxt = test_session % 5 + 1
    return f"Ses{nxt:02d}F"


def split_fold(records: list[dict], test_session: int, data_cfg=None) -> Fold:
    """Leave-one-session-out split of the 4-class records for `test_session`.

    `data_cfg` is a `mmser.config.DataConfig` (or None for the paper's default: no validation).
    """
    if test_session not in SESSIONS:
        raise ValueError(f"test session must be one of {SESSIONS}, got {test_session}")
    policy = getattr(data_cfg, "validation", "none") if data_cfg is not None else "none"
    recs = task_records(records)
    test = [r for r in recs if r["session"] == test_session]
    rest = [r for r in recs if r["session"] != test_session]
    if not test:
        raise ValueError(f"no 4-class utterances in test session {test_session}")
    fold = Fold(test_session=test_session, test=test, val_policy=policy)
    if policy == "none":
        fold.train = rest
    elif policy == "speaker":
        spk = getattr(data_cfg, "val_speaker", None) or default_val_speaker(test_session)
        if spk.startswith(f"Ses{test_session:02d}"):
            raise ValueError(f"validation speaker {spk} belongs to the test session {test_session}")
        fold.val = [r for r in rest if r["speaker"] == spk]
        fold.train = [r for r in rest if r["speaker"] != spk]
        if not fold.val:
            raise ValueError(f"validation speaker {spk} has no 4-class utterances")
        fold.val_detail = spk
    elif policy == "fraction":
        frac = float(data_cfg.val_fraction)
        if not 0.0 < frac < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {frac}")
        rng = random.Random(int(data_cfg.val_seed) * 1000 + test_session)
        val_ids: set[str] = set()
        for c in CLASSES:  # stratified by class
            ids = sorted(r["id"] for r in rest if r["label"] == c)
            rng.shuffle(ids)
            val_ids.update(ids[: round(len(ids) * frac)])
        fold.val = [r for r in rest if r["id"] in val_ids]
        fold.train = [r for r in rest if r["id"] not in val_ids]
        fold.val_detail = f"{frac:g} (seed {data_cfg.val_seed})"
    else:
        raise ValueError(f"unknown validation policy {policy!r}")
    fold.check()
    return fold


def class_counts(records: list[dict]) -> dict[str, int]:
    c = Counter(r["label"] for r in records)
    return {k: c.get(k, 0) for k in CLASSES}


def fold_table(records: list[dict], data_cfg=None) -> str:
    """Markdown table: per fold and split, per-class counts."""
    lines = ["| fold | split | n | " + " | ".join(CLASSES) + " | hours |",
             "|---|---|---|" + "---|" * len(CLASSES) + "---|"]
    sessions = sorted({r["session"] for r in task_records(records)})
    for s in sessions:
        fold = split_fold(records, s, data_cfg)
        for name, part in (("train", fold.train), ("val", fold.val), ("test", fold.test)):
            if name == "val" and fold.val_policy == "none":
                continue
            cc = class_counts(part)
            hours = sum(float(r["duration"]) for r in part) / 3600
            label = f"{name} ({fold.val_detail})" if name == "val" and fold.val_detail else name
            lines.append(f"| {s} | {label} | {len(part)} | " + " | ".join(str(cc[c]) for c in CLASSES)
                         + f" | {hours:.2f} |")
    return "\n".join(lines)


def write_fold_files(records: list[dict], folds_dir: str | Path, data_cfg=None) -> list[Path]:
    """Write `folds_dir/fold{k}.json` = {"test_session": k, "train": [ids], "test": [ids]}
    (plus "val" when the policy has one) for every session with 4-class utterances, s3prl-style:
    reviewable files beside the manifest. Ids are sorted. Returns the paths written."""
    folds_dir = Path(folds_dir)
    paths = []
    for s in sorted({r["session"] for r in task_records(records)}):
        fold = split_fold(records, s, data_cfg)
        obj: dict = {"test_session": s, "train": sorted(r["id"] for r in fold.train)}
        if fold.val_policy != "none":
            obj["val_policy"] = fold.val_policy
            obj["val"] = sorted(r["id"] for r in fold.val)
        obj["test"] = sorted(r["id"] for r in fold.test)
        path = folds_dir / f"fold{s}.json"
        atomic_write_json(path, obj)
        paths.append(path)
    return paths
