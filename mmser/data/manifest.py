"""The prepared manifest (JSONL, one utterance per line) and its folds.

No torch here. A fold is a pure function of the records and the data config. Two protocols:

- **Leave-one-group-out** (IEMOCAP's leave-one-session-out, and `mmser prepare csv` with
  `--folds logo:COLUMN` or `--folds kfold:K`): every record has a `session`, the fold it is tested
  in (an integer >= 1, e.g. IEMOCAP's 1..5, or a fold name such as a speaker id). Fold k tests on
  every task utterance of session k and never trains or validates on it. The validation policy is
  a config choice:
  - "none" (the paper): no validation set; the last epoch is tested.
  - "speaker": hold out one speaker of the training folds (default on IEMOCAP: the F actor of the
    session after the test session, wrapping 5 -> 1; on other corpora: the first speaker, by name,
    of the next fold), so validation is speaker-independent too.
  - "fraction": hold out a seeded random fraction of the training utterances (stratified by class).
- **Predefined split** (`mmser prepare csv` with a split column, `mmser prepare msp-podcast`):
  every record has a `split`: "train", "dev", or the name of a test set ("test"; MSP-Podcast's
  "test1", "test2"). One fold per test set, named after it: it trains on "train", validates on
  "dev" (the dev split is the validation set; `data.validation` must stay "none" then) and tests on
  its test set; other test sets are not used by it. Without a dev split, data.validation may carve
  one out of "train" as above. Nothing is ever selected on a test set.

The task's class set: `data.classes` when the config sets it (its order is the class index
order; manifest labels outside it are left out of the task like null labels), else every label of
the manifest, sorted (IEMOCAP: angry, happy, neutral, sad). See `resolve_classes`.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mmser.io import atomic_write_json, file_sha256, safe_join

log = logging.getLogger(__name__)

SESSIONS = (1, 2, 3, 4, 5)  # IEMOCAP's sessions
REQUIRED_FIELDS = ("id", "path", "session", "speaker", "gender", "dialog", "scripted",
                   "emotion_code", "label", "transcript", "duration")
# Optional fields: "split" (predefined-split protocol, see the module docstring) and "corpus" (the
# corpus name, for reports and model cards; absent = IEMOCAP or its synthetic stand-in); the
# dimensional targets "arousal", "valence", "dominance" (a number on the corpus's own scale, or null:
# outside the dimensional task) with "dim_scales" {dimension: [low, high]}, the scale of each value
# given (IEMOCAP [1, 5], MSP-Podcast [1, 7], a CSV corpus's given or inferred one; mmser/tasks.py).
DIMENSION_FIELDS = ("arousal", "valence", "dominance")
OPTIONAL_FIELDS = ("split", "corpus", *DIMENSION_FIELDS, "dim_scales")
TRAIN_SPLIT, DEV_SPLIT = "train", "dev"
# A fold name (a string session, a test set's name): safe as part of a folder name, starts with a
# letter (so it never reads as a number on the command line).
FOLD_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")

FoldId = int | str


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


def is_fold_name(x) -> bool:
    return isinstance(x, str) and FOLD_NAME_RE.fullmatch(x) is not None


def _is_fold_id(x) -> bool:
    return (_is_int(x) and x >= 1) or is_fold_name(x)


_FOLD_WHAT = "an integer >= 1 or a fold name (a letter, then letters, digits, '.', '_' or '-')"

# field -> (check, what the field must be)
_FIELD_CHECKS = {
    "id": (_nonempty_str, "a non-empty string"),
    "path": (_nonempty_str, "a non-empty string"),
    "session": (_is_fold_id, _FOLD_WHAT),
    "speaker": (_nonempty_str, "a non-empty string"),
    "gender": (_opt_str, "a string or null"),
    "dialog": (_opt_str, "a string or null"),
    "scripted": (lambda x: x is None or isinstance(x, bool), "true, false or null (unknown)"),
    "emotion_code": (_opt_str, "a string or null"),
    "label": (lambda x: x is None or _nonempty_str(x), "null or a non-empty class name"),
    "transcript": (_opt_str, "a string or null"),
    "duration": (lambda x: _is_number(x) and x > 0, "a positive number of seconds"),
}
assert tuple(_FIELD_CHECKS) == REQUIRED_FIELDS


def _record_problems(r: dict) -> list[str]:
    """What is wrong with one record (empty when it is valid)."""
    missing = [k for k in REQUIRED_FIELDS if k not in r]
    if missing:
        return [f"lacks field(s) {', '.join(missing)}"]
    split = r.get("split")
    problems = []
    for k, (ok, what) in _FIELD_CHECKS.items():
        if k == "session" and r[k] is None and split is not None:
            continue  # predefined split: the session is not a fold
        if not ok(r[k]):
            problems.append(f"{k} is {_short_repr(r[k])}; expected {what}")
    if split is not None and not is_fold_name(split):
        problems.append(f"split is {_short_repr(split)}; expected null, '{TRAIN_SPLIT}', '{DEV_SPLIT}' or a test "
                        "set name (a letter, then letters, digits, '.', '_' or '-')")
    if "corpus" in r and not _opt_str(r["corpus"]):
        problems.append(f"corpus is {_short_repr(r['corpus'])}; expected a string or null")
    return problems + _dimension_problems(r)


def _dimension_problems(r: dict) -> list[str]:
    """A dimension value is a finite number on the scale its record's dim_scales gives, or null."""
    scales = r.get("dim_scales")
    if scales is not None and not (isinstance(scales, dict) and all(
            k in DIMENSION_FIELDS and isinstance(v, list) and len(v) == 2 and all(map(_is_number, v)) and v[0] < v[1]
            for k, v in scales.items())):
        return [f"dim_scales is {_short_repr(scales)}; expected {{dimension: [low, high]}} with low < high"]
    problems = []
    for d in DIMENSION_FIELDS:
        v = r.get(d)
        if v is None:
            continue
        if not _is_number(v):
            problems.append(f"{d} is {_short_repr(v)}; expected a number or null")
        elif not scales or d not in scales:
            problems.append(f"{d} is {v} but dim_scales gives no scale for it")
        elif not scales[d][0] <= v <= scales[d][1]:
            problems.append(f"{d} is {v}, outside its scale {scales[d]}")
    return problems


def _short_repr(x, limit: int = 60) -> str:
    text = repr(x)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_manifest(path: str | Path) -> list[dict]:
    """Read manifest.jsonl, validating it as it is loaded.

    Every record needs the fields of REQUIRED_FIELDS with the types of `_FIELD_CHECKS` (session an
    integer >= 1 or a fold name, or null in a predefined split; label null or a class name: null
    marks utterances outside the task), optionally OPTIONAL_FIELDS, and ids are unique. A problem
    raises ManifestError (a ValueError) naming the file, the line number(s) and the problem, so a
    bad manifest stops here and not later inside a fold (where a duplicate id would surface as
    `Fold.check`'s "an utterance is in two splits").
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


def task_records(records: Iterable[dict], classes: Sequence[str] | None = None, *,
                 dimensions: Sequence[str] | None = None, categorical: bool = True) -> list[dict]:
    """Only the utterances inside the task: label not null (and, given `classes`, one of them);
    with `dimensions`, also a value for each of them; `categorical=False` (the dimensional task):
    the label does not matter (mmser.tasks.record_filter gives these keywords for a config)."""
    out = [r for r in records if all(r.get(d) is not None for d in dimensions)] if dimensions else list(records)
    if not categorical:
        return out
    if classes is None:
        return [r for r in out if r["label"] is not None]
    keep = set(classes)
    return [r for r in out if r["label"] in keep]


def manifest_labels(records: Iterable[dict]) -> list[str]:
    """Every non-null label of the records, sorted."""
    return sorted({r["label"] for r in records if r["label"] is not None})


def resolve_classes(records: Sequence[dict], declared: Sequence[str] | None = None,
                    where: str = "the manifest") -> tuple[str, ...]:
    """The task's class names in class-index order.

    `declared` (the config's `data.classes`) when given: every one of them must label at least one
    utterance (a typo would otherwise train a class without examples); labels of the manifest
    outside it are left out of the task. Otherwise every label of the manifest, sorted: IEMOCAP's
    manifests give ("angry", "happy", "neutral", "sad"), mmser.labels.CLASSES.
    """
    present = manifest_labels(records)
    if declared is not None:
        declared = [str(c) for c in declared]
        dup = sorted(c for c, n in Counter(declared).items() if n > 1)
        if dup:
            raise ValueError(f"data.classes: {', '.join(dup)} given twice")
        missing = [c for c in declared if c not in present]
        if missing:
            raise ValueError(f"data.classes: class(es) {', '.join(missing)} label no utterance of {where} "
                             f"(its labels: {', '.join(present) or 'none'})")
        if len(declared) < 2:
            raise ValueError(f"data.classes: a classifier needs at least 2 classes, got {declared}")
        return tuple(declared)
    if len(present) < 2:
        raise ValueError(f"{where}: a classifier needs at least 2 classes; its labels: {', '.join(present) or 'none'}")
    return tuple(present)


def classes_for(records: Sequence[dict], data_cfg=None) -> tuple[str, ...]:
    """`resolve_classes` with the declared classes of a DataConfig (None = from the manifest)."""
    declared = getattr(data_cfg, "classes", None) if data_cfg is not None else None
    where = str(getattr(data_cfg, "manifest", "the manifest")) if data_cfg is not None else "the manifest"
    return resolve_classes(records, declared, where)


# --------------------------------------------------------------------------------------------
# Fold ids
# --------------------------------------------------------------------------------------------


def protocol(records: Iterable[dict]) -> str:
    """"split" when any record has a predefined split, else "session" (leave-one-group-out)."""
    return "split" if any(r.get("split") is not None for r in records) else "session"


def fold_sort_key(fold: FoldId) -> tuple:
    """Integers first, in order, then names: a sort key for mixed fold ids."""
    return (0, fold, "") if isinstance(fold, int) else (1, 0, str(fold))


def fold_tag(fold: FoldId) -> str:
    """The fold's part of folder and run names: `s3` for session 3 (IEMOCAP's `s3-seed0`), the
    name itself for a named fold (`test1-seed0`)."""
    return f"s{fold}" if isinstance(fold, int) else str(fold)


def fold_label(fold: FoldId) -> str:
    """Column heading of a fold in tables: `S3` for session 3, the name for a named fold."""
    return f"S{fold}" if isinstance(fold, int) else str(fold)


def fold_of(record: dict) -> FoldId | None:
    """The fold whose test set holds this record (None for a train / dev record of a predefined
    split)."""
    split = record.get("split")
    if split is not None:
        return None if split in (TRAIN_SPLIT, DEV_SPLIT) else split
    return record["session"]


def fold_ids(records: Iterable[dict], classes: Sequence[str] | None = None, *,
             dimensions: Sequence[str] | None = None, categorical: bool = True) -> list[FoldId]:
    """Every fold of the manifest (one with task utterances to test on), in order."""
    recs = task_records(records, classes, dimensions=dimensions, categorical=categorical)
    proto = protocol(recs)
    ids = {fold_of(r) for r in recs if proto == "session" or r.get("split") is not None}
    ids.discard(None)
    return sorted(ids, key=fold_sort_key)


def resolve_folds(records: Sequence[dict], requested: Sequence | None, where: str = "the manifest",
                  classes: Sequence[str] | None = None, **task_filter) -> list[FoldId]:
    """The manifest's folds named by `requested` (ints or strings: `3`, `"3"`, `"test1"`, matched
    by their text), in the order given; None = every fold. An unknown one is a ValueError.
    `task_filter`: task_records' `dimensions` / `categorical`."""
    present = fold_ids(records, classes, **task_filter)
    if requested is None:
        return present
    by_text = {str(f): f for f in present}
    missing = [str(f) for f in requested if str(f) not in by_text]
    if missing:
        raise ValueError(f"sessions {', '.join(missing)}: not in {where} (its sessions with task utterances: "
                         f"{', '.join(map(str, present)) or 'none'})")
    out = list(dict.fromkeys(by_text[str(f)] for f in requested))
    tags = Counter(fold_tag(f) for f in present)
    clash = sorted(t for t, n in tags.items() if n > 1)
    if clash:
        raise ValueError(f"{where}: folds {', '.join(clash)} would share a run folder name")
    return out


def fold_seed_offset(fold: FoldId) -> int:
    """An integer per fold for seeding (the session number itself for IEMOCAP's folds)."""
    return fold if isinstance(fold, int) else zlib.crc32(str(fold).encode()) % 100_000


# --------------------------------------------------------------------------------------------
# Folds
# --------------------------------------------------------------------------------------------


@dataclass
class Fold:
    test_session: FoldId  # the fold id: a session (int or name) or a predefined test set's name
    train: list[dict] = field(default_factory=list)
    val: list[dict] = field(default_factory=list)
    test: list[dict] = field(default_factory=list)
    val_policy: str = "none"
    val_detail: str = ""
    protocol: str = "session"
    classes: tuple[str, ...] = ()  # the task's classes, in class-index order (resolve_classes)
    dimensions: tuple[str, ...] = ()  # a dimensional / multitask task's dimensions (its records have them)

    def is_test(self, r: dict) -> bool:
        """Whether record r belongs to this fold's test set (the guard every stage applies)."""
        if self.protocol == "split":
            return r.get("split") == self.test_session
        return r["session"] == self.test_session

    def check(self) -> None:
        """Protocol integrity: the test set appears nowhere but in `test`; no overlap; a predefined
        split trains on "train" only and validates on "dev" only (when it has one)."""
        t = self.test_session
        for name, part in (("train", self.train), ("val", self.val)):
            bad = [r["id"] for r in part if self.is_test(r)]
            if bad:
                raise AssertionError(f"fold {t}: test-session utterances in {name}: {bad[:5]}")
        ids = [r["id"] for r in self.train + self.val + self.test]
        if len(ids) != len(set(ids)):
            raise AssertionError(f"fold {t}: an utterance is in two splits")
        if not all(self.is_test(r) for r in self.test):
            raise AssertionError(f"fold {t}: test holds another session")
        if self.protocol == "split":
            bad = [r["id"] for r in self.train if r.get("split") != TRAIN_SPLIT]
            if bad:
                raise AssertionError(f"fold {t}: non-train utterances in train: {bad[:5]}")
            if self.val_policy == "split":
                bad = [r["id"] for r in self.val if r.get("split") != DEV_SPLIT]
                if bad:
                    raise AssertionError(f"fold {t}: non-dev utterances in val: {bad[:5]}")


def default_val_speaker(test_session: FoldId, records: Sequence[dict] | None = None) -> str:
    """IEMOCAP: the F actor of the session after the test one (5 wraps to 1). Other corpora (given
    the training records): the first speaker, by name, of the next fold in order (wrapping)."""
    if isinstance(test_session, int) and test_session in SESSIONS:
        iemocap = f"Ses{test_session % 5 + 1:02d}F"
        if records is None or any(r["speaker"] == iemocap for r in records):
            return iemocap
    if not records:
        raise ValueError(f"fold {test_session}: no training utterances to pick a validation speaker from")
    folds = sorted({r["session"] for r in records if r["session"] is not None} | {test_session},
                   key=fold_sort_key)
    order = folds[folds.index(test_session) + 1:] + folds[: folds.index(test_session)]
    for f in order:
        speakers = sorted({r["speaker"] for r in records if r["session"] == f})
        if speakers:
            return speakers[0]
    return sorted({r["speaker"] for r in records})[0]


def split_fold(records: list[dict], test_session: FoldId, data_cfg=None,
               classes: Sequence[str] | None = None, *, dimensions: Sequence[str] | None = None,
               categorical: bool = True) -> Fold:
    """The fold `test_session` of the task records (see the module docstring for both protocols).

    `data_cfg` is a `mmser.config.DataConfig` (or None for the paper's default: no validation).
    `classes` (default: `classes_for(records, data_cfg)`) is the task's class set. `dimensions` /
    `categorical`: a dimensional or multitask task's records (task_records); the dimensional task
    (categorical=False) has no classes (Fold.classes is empty, the fraction split is not stratified).
    """
    if not categorical:
        classes = ()
    elif classes is None:
        classes = classes_for(records, data_cfg) if data_cfg is not None else None
    policy = getattr(data_cfg, "validation", "none") if data_cfg is not None else "none"
    filt = {"dimensions": dimensions, "categorical": categorical}
    recs = task_records(records, classes, **filt)
    proto = protocol(records)
    present = fold_ids(records, classes, **filt)
    by_text = {str(f): f for f in present}
    if str(test_session) not in by_text:
        raise ValueError(f"test session must be one of {tuple(present)}, got {test_session!r}")
    test_session = by_text[str(test_session)]
    fold = Fold(test_session=test_session, val_policy=policy, protocol=proto,
                classes=tuple(classes) if classes is not None else tuple(manifest_labels(recs)))
    fold.dimensions = tuple(dimensions or ())
    fold.test = [r for r in recs if fold.is_test(r)]
    if not fold.test:
        raise ValueError(f"no task utterances in test session {test_session}")
    if proto == "split":
        rest = [r for r in recs if r.get("split") == TRAIN_SPLIT]
        dev = [r for r in recs if r.get("split") == DEV_SPLIT]
        if dev:
            if policy != "none":
                raise ValueError(f"data.validation={policy}: this manifest has a predefined split whose dev part "
                                 "is the validation set; leave data.validation at none")
            fold.train, fold.val = rest, dev
            fold.val_policy, fold.val_detail = "split", DEV_SPLIT
            fold.check()
            return fold
    else:
        rest = [r for r in recs if not fold.is_test(r)]
    if not rest:
        raise ValueError(f"fold {test_session}: no training utterances")
    if policy == "none":
        fold.train = rest
    elif policy == "speaker":
        spk = getattr(data_cfg, "val_speaker", None) or default_val_speaker(test_session, rest)
        if any(r["speaker"] == spk for r in fold.test) or (
                isinstance(test_session, int) and spk.startswith(f"Ses{test_session:02d}")):
            raise ValueError(f"validation speaker {spk} belongs to the test session {test_session}")
        fold.val = [r for r in rest if r["speaker"] == spk]
        fold.train = [r for r in rest if r["speaker"] != spk]
        if not fold.val:
            raise ValueError(f"validation speaker {spk} has no task utterances")
        if not fold.train:
            raise ValueError(f"fold {test_session}: validation speaker {spk} leaves no training utterances")
        fold.val_detail = spk
    elif policy == "fraction":
        frac = float(data_cfg.val_fraction)
        if not 0.0 < frac < 1.0:
            raise ValueError(f"data.val_fraction must be in (0, 1), got {frac}")
        rng = random.Random(int(data_cfg.val_seed) * 1000 + fold_seed_offset(test_session))
        val_ids: set[str] = set()
        strata = [[r for r in rest if r["label"] == c] for c in (classes if classes is not None
                                                                   else manifest_labels(rest))]
        for group in strata if categorical else [rest]:  # stratified by class (a dimensional task: not)
            ids = sorted(r["id"] for r in group)
            rng.shuffle(ids)
            val_ids.update(ids[: round(len(ids) * frac)])
        fold.val = [r for r in rest if r["id"] in val_ids]
        fold.train = [r for r in rest if r["id"] not in val_ids]
        fold.val_detail = f"{frac:g} (seed {data_cfg.val_seed})"
    else:
        raise ValueError(f"unknown validation policy {policy!r}")
    fold.check()
    return fold


def class_counts(records: Iterable[dict], classes: Sequence[str] | None = None) -> dict[str, int]:
    """Utterances per class, in `classes` order (default: the records' labels, sorted)."""
    records = list(records)
    c = Counter(r["label"] for r in records)
    return {k: c.get(k, 0) for k in (classes if classes is not None else manifest_labels(records))}


def _listed_classes(records: Sequence[dict], data_cfg) -> tuple[str, ...]:
    """The classes to list in tables and fold files: data.classes, else every label (no minimum:
    a manifest prepared from a partial tree still gets its tables)."""
    if getattr(data_cfg, "classes", None) is not None:
        return classes_for(records, data_cfg)
    return tuple(manifest_labels(records))


def fold_table(records: list[dict], data_cfg=None, classes: Sequence[str] | None = None) -> str:
    """Markdown table: per fold and split, per-class counts."""
    if classes is None:
        classes = _listed_classes(records, data_cfg)
    lines = ["| fold | split | n | " + " | ".join(classes) + " | hours |",
             "|---|---|---|" + "---|" * len(classes) + "---|"]
    for s in fold_ids(records, classes):
        fold = split_fold(records, s, data_cfg, classes)
        for name, part in (("train", fold.train), ("val", fold.val), ("test", fold.test)):
            if name == "val" and fold.val_policy == "none":
                continue
            cc = class_counts(part, classes)
            hours = sum(float(r["duration"]) for r in part) / 3600
            label = f"{name} ({fold.val_detail})" if name == "val" and fold.val_detail else name
            lines.append(f"| {s} | {label} | {len(part)} | " + " | ".join(str(cc[c]) for c in classes)
                         + f" | {hours:.2f} |")
    return "\n".join(lines)


def fold_file_name(fold: FoldId) -> str:
    """`fold3.json` for session 3, `fold-test1.json` for a named fold."""
    return f"fold{fold}.json" if isinstance(fold, int) else f"fold-{fold}.json"


def fold_file_paths(records: list[dict], folds_dir: str | Path, data_cfg=None) -> list[Path]:
    """The files `write_fold_files` writes (to check them against a stage's inputs beforehand)."""
    return [safe_join(folds_dir, fold_file_name(s), what="fold name")
            for s in fold_ids(records, _listed_classes(records, data_cfg))]


def write_fold_files(records: list[dict], folds_dir: str | Path, data_cfg=None) -> list[Path]:
    """Write `folds_dir/fold{k}.json` = {"test_session": k, "train": [ids], "test": [ids]}
    (plus "val" when the fold has a validation set) for every fold with task utterances,
    s3prl-style: reviewable files beside the manifest. Ids are sorted. Returns the paths written."""
    folds_dir = Path(folds_dir)
    classes = _listed_classes(records, data_cfg)
    paths = []
    for s in fold_ids(records, classes):
        fold = split_fold(records, s, data_cfg, classes)
        obj: dict = {"test_session": s, "train": sorted(r["id"] for r in fold.train)}
        if fold.val_policy != "none":
            obj["val_policy"] = fold.val_policy
            obj["val"] = sorted(r["id"] for r in fold.val)
        obj["test"] = sorted(r["id"] for r in fold.test)
        path = safe_join(folds_dir, fold_file_name(s), what="fold name")  # a fold name comes from data
        atomic_write_json(path, obj)
        paths.append(path)
    return paths


def same_audio(records: Sequence[dict], path_of=None) -> list[tuple[list[dict], bool]]:
    """Groups of task records (label not null) whose audio is one file or the same bytes
    (mmser.io.same_audio_groups), each with whether it spans folds or splits: the same audio in two
    folds (or in train and dev) is leakage, a fold would test on what it trained on. `path_of(r)`:
    the file to compare (default r["path"])."""
    from mmser.io import same_audio_groups

    task = [r for r in records if r["label"] is not None]
    groups = same_audio_groups([(path_of or (lambda r: r["path"]))(r) for r in task])
    out = []
    for g in groups:
        recs = [task[i] for i in g]
        places = {(r.get("split"), None if r.get("split") is not None else r["session"]) for r in recs}
        out.append((recs, len(places) > 1))
    return out


def _place(r: dict) -> str:
    return f"split {r['split']}" if r.get("split") is not None else f"fold {r['session']}"


def describe_same_audio(recs: Sequence[dict], where=None) -> str:
    """"ids A (WHERE, fold 1) and B (WHERE, fold 2) are the same audio (PATH)"."""
    ids = " and ".join(f"{r['id']} ({where(r) + ', ' if where else ''}{_place(r)})" for r in recs[:4])
    more = f" and {len(recs) - 4} more" if len(recs) > 4 else ""
    return f"ids {ids}{more} are the same audio ({recs[0]['path']})"


def reuse_prepared(out_dir: Path, fp: str, manifest_name: str = "manifest.jsonl",
                   report_name: str = "prepare_report.json") -> dict | None:
    """A prepare stage's previous report if its outputs are intact and were built from the same
    inputs (report fingerprint `fp`, manifest sha256, fold files present), else None."""
    report_path, manifest = out_dir / report_name, out_dir / manifest_name
    if not (report_path.is_file() and manifest.is_file()):
        return None
    try:
        report = json.loads(report_path.read_text())
    except (ValueError, OSError):
        return None
    if not isinstance(report, dict) or report.get("fingerprint") != fp:
        return None
    if report.get("manifest_sha256") != file_sha256(manifest):
        log.info("%s changed since it was written; rebuilding", manifest)
        return None
    if not all((out_dir / f).is_file() for f in report.get("fold_files", [None])):
        return None
    return report
