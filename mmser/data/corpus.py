"""Bring your own corpus: a table of utterances (CSV / TSV / JSONL) -> the manifest contract.

    mmser prepare csv labels.csv --audio-root /data/corpus --out Dataset/MyCorpus \
        --labels neu,hap,sad,ang,fea,dis --map exc=hap --folds kfold:5

writes, like `mmser prepare iemocap` (mmser.data.iemocap), atomically:
- `OUT/manifest.jsonl`: one record per table row with the fields of
  mmser.data.manifest.REQUIRED_FIELDS (+ "split" for a predefined split, + "corpus"), so train, cv,
  compare, transcribe and predict work on it unchanged;
- `OUT/prepare_report.json`: counts per fold / class / raw label, skipped rows, clips under
  MIN_DURATION_S, warnings, the spec, the input fingerprint and the manifest's sha256;
- `OUT/folds/fold{k}.json` (`fold-{name}.json` for a named fold): the ids of each fold.

Columns (roles; rename with `--column ROLE=NAME` or a spec file's `columns:`): `path` (audio file,
relative to --audio-root unless absolute), `label`, `speaker` (required); `id` (default: the path
relative to the audio root, without its suffix), `session`, `fold`, `split`, `transcript`,
`gender`, and the dimensional targets `arousal`, `valence`, `dominance` (optional). Every value is
read as text (JSONL numbers too).

Dimensions (issue 19): a number per row on the corpus's scale, or empty (outside the dimensional
task, counted in the report's `counts.dimensional`). The scale is `--scale LOW,HIGH` (a spec's
`scale: [1, 7]`; values outside it are errors) or, without one, each dimension's min and max in the
table (reported as inferred). Records get the values and `dim_scales` {dimension: [low, high]}.

Labels: spellings that differ only in case (`ang`, `ANG`, ` Ang `) are one label, in lower case
(listed in the report's `label_case_merged` and a warning). `--map RAW=CLASS` renames raw labels
first (`--map xxx=` drops one: label null), then `--labels a,b,c` is the class set: rows whose
label is outside it (or empty) stay in the manifest with `label: null` (their raw label in
`emotion_code`), outside the task, like IEMOCAP's other codes.
Without --labels every mapped label is a class. A class of --labels that labels no row is an error.
The class index order of a run is the sorted class names, or `data.classes` (mmser.data.manifest).

Folds (`--folds`; default: `split` when there is a split column, else `logo:fold`, `logo:session`,
then `kfold:5`):
- `split`: the predefined split column: train / dev / test values (aliases: training, devel,
  development, val, valid, validation; test*, eval; `--split-map RAW=train|dev|test` for others).
  One fold per test set, named after it (`test`, or `test1`, `test2`, ...): it trains on train,
  validates on dev and tests on that test set.
- `logo:COLUMN`: leave-one-group-out by any column (a role name or a column of the table): one fold
  per distinct value. Values that are all integers >= 1 (no leading zeros) stay numbers (folds 1, 2,
  ...: run folders `s1-seed0`); others become fold names (characters other than letters, digits,
  '.', '_' and '-' turned into '_'; a value not starting with a letter gets a `g` in front).
- `kfold:K`: K folds by speaker, no speaker in two folds: speakers in decreasing order of task
  utterances (then by name), each into the fold with the fewest task utterances so far (then the
  lowest number). Deterministic; K <= number of speakers.

Audio: every file is checked with mmser.audio.audio_info (header only): missing, unreadable or empty
files, files holding NaN or Inf samples (float WAVs are read whole for that; integer PCM cannot hold
them) and files that are not `sample_rate` Hz mono are errors naming the table's file:line. With
`--resample`, files at another rate or with several channels are read with mmser.audio.load_audio
(down-mixed, resampled) and written as 16-bit PCM WAV copies under OUT/audio/ (the manifest points
at the copies). With `--skip-bad-audio`, missing / unreadable / empty files are skipped and listed
in the report instead (row, path, reason), NaN / Inf files among them. Durations come from the
headers (of the copies when resampled).

Every problem with a row (missing value, unknown split value, duplicate id, bad audio) is collected
and raised once as a ValueError whose first line is `FILE:LINE: problem`, with the count and more
of them after it. Idempotent like IEMOCAP's prepare: unchanged inputs (table bytes, spec, audio
files' sizes and mtimes) reuse the outputs; `force=True` rebuilds.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mmser.audio import audio_info, check_finite_file, load_audio
from mmser.data.manifest import (
    DEV_SPLIT,
    TRAIN_SPLIT,
    FoldId,
    describe_same_audio,
    fold_file_paths,
    fold_ids,
    fold_sort_key,
    is_fold_name,
    load_manifest,
    reuse_prepared,
    same_audio,
    split_fold,
    write_fold_files,
)
from mmser.io import (
    UnsafePathError,
    atomic_write_bytes,
    atomic_write_json,
    check_not_inputs,
    file_sha256,
    fingerprint,
    remove_stale_temps,
    safe_join,
    write_jsonl,
)

log = logging.getLogger(__name__)

# Bump when the outputs for the same inputs change (a folder of an older version is rebuilt). 2: labels
# differing only in case merged, NaN / Inf audio refused, the same audio across folds refused.
# 3: dimensional targets (arousal / valence / dominance columns, dim_scales, counts.dimensional).
CORPUS_FORMAT_VERSION = 3
MANIFEST_NAME = "manifest.jsonl"
REPORT_NAME = "prepare_report.json"
FOLDS_DIR = "folds"
AUDIO_DIR = "audio"  # resampled copies (--resample)
MIN_DURATION_S = 0.1  # as IEMOCAP's prepare: shorter clips are kept and reported
_MAX_LISTED = 20

DIMENSION_ROLES = ("arousal", "valence", "dominance")  # numbers on the corpus's scale (mmser/tasks.py)
ROLES = ("id", "path", "label", "speaker", "session", "fold", "split", "transcript", "gender", *DIMENSION_ROLES)
REQUIRED_ROLES = ("path", "label", "speaker")
SPLIT_ALIASES = {
    "train": TRAIN_SPLIT, "training": TRAIN_SPLIT, "trn": TRAIN_SPLIT,
    "dev": DEV_SPLIT, "devel": DEV_SPLIT, "development": DEV_SPLIT, "val": DEV_SPLIT, "valid": DEV_SPLIT,
    "validation": DEV_SPLIT,
    "eval": "test", "evaluation": "test",
}
_INT_RE = re.compile(r"[1-9][0-9]*")


class CorpusError(ValueError):
    """Problems with the table's rows: the first as `FILE:LINE: problem`, then how many more."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        shown = "; ".join(problems[1:6])
        more = ""
        if len(problems) > 1:
            more = f" (and {len(problems) - 1} more problem(s): {shown}{'; ...' if len(problems) > 6 else ''})"
        super().__init__(f"{problems[0]}{more}")


@dataclass
class CorpusSpec:
    """How a table maps onto the manifest (CLI options, or a YAML spec file with the same keys)."""

    name: str | None = None  # the corpus's name (reports, model cards); default: the output folder's
    columns: dict[str, str] = field(default_factory=dict)  # role -> column name (default: the role)
    labels: list[str] | None = None  # the class set (after `map`); None = every label
    map: dict[str, str] = field(default_factory=dict)  # raw label -> class ("" = outside the task)
    folds: str | None = None  # "split", "logo:COLUMN", "kfold:K"; None = automatic (module docstring)
    split_map: dict[str, str] = field(default_factory=dict)  # raw split value -> train / dev / test name
    sample_rate: int = 16000
    resample: bool = False
    skip_bad_audio: bool = False
    # [low, high] of the dimension columns (arousal / valence / dominance), e.g. [1, 7]; None = each
    # dimension's min and max in the table (reported as inferred in counts.dimensional)
    scale: list[float] | None = None

    def column(self, role: str) -> str:
        return self.columns.get(role, role)

    @classmethod
    def from_yaml(cls, path: str | Path) -> CorpusSpec:
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a readable YAML spec ({' '.join(str(e).split())})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a spec is a mapping (name, columns, labels, map, folds, ...)")
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        spec = cls()
        for key, value in data.items():
            setattr(spec, key, value)
        spec.check(str(path))
        return spec

    def check(self, where: str = "spec") -> None:
        for key in ("columns", "map", "split_map"):
            value = getattr(self, key)
            if not isinstance(value, dict):
                raise ValueError(f"{where}: {key} must be a mapping, got {value!r}")
            setattr(self, key, {str(k): "" if v is None else str(v) for k, v in value.items()})
        bad_roles = sorted(set(self.columns) - set(ROLES))
        if bad_roles:
            raise ValueError(f"{where}: unknown column role(s) {', '.join(bad_roles)} (roles: {', '.join(ROLES)})")
        if self.labels is not None:
            if isinstance(self.labels, str):
                self.labels = split_list(self.labels)
            if not isinstance(self.labels, list) or not self.labels:
                raise ValueError(f"{where}: labels must be a non-empty list of class names")
            self.labels = [str(c) for c in self.labels]
            dup = sorted(c for c, n in Counter(self.labels).items() if n > 1)
            if dup:
                raise ValueError(f"{where}: labels: {', '.join(dup)} given twice")
        for raw, target in self.split_map.items():
            if target not in (TRAIN_SPLIT, DEV_SPLIT) and not (is_fold_name(target) and target.startswith("test")):
                raise ValueError(f"{where}: split_map {raw}={target}: the target must be train, dev or a test set "
                                 "name starting with 'test'")
        parse_folds_option(self.folds, where)
        if self.scale is not None:
            if isinstance(self.scale, str):
                self.scale = split_list(self.scale)
            try:
                lo, hi = (float(x) for x in self.scale)
            except (TypeError, ValueError):
                raise ValueError(f"{where}: scale must be two numbers LOW,HIGH (e.g. 1,7), "
                                 f"got {self.scale!r}") from None
            if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
                raise ValueError(f"{where}: scale {self.scale!r}: LOW must be below HIGH")
            self.scale = [lo, hi]
        if not isinstance(self.sample_rate, int) or self.sample_rate < 1:
            raise ValueError(f"{where}: sample_rate must be a positive integer, got {self.sample_rate!r}")


def split_list(text: str) -> list[str]:
    """'a,b, c' -> ['a', 'b', 'c'] (empty items dropped)."""
    return [x.strip() for x in str(text).split(",") if x.strip()]


def parse_pairs(items: Sequence[str], what: str) -> dict[str, str]:
    """['a=b', 'c=d,e=f'] -> {'a': 'b', 'c': 'd', 'e': 'f'} ('x=' maps to '')."""
    out: dict[str, str] = {}
    for item in items:
        for pair in str(item).split(","):
            if not pair.strip():
                continue
            if "=" not in pair:
                raise ValueError(f"{what} {pair!r}: expected KEY=VALUE")
            k, v = pair.split("=", 1)
            out[k.strip()] = v.strip()
    return out


def parse_folds_option(folds: str | None, where: str = "--folds") -> tuple[str, str | int | None] | None:
    """'split' -> ('split', None); 'logo:speaker' -> ('logo', 'speaker'); 'kfold:5' -> ('kfold', 5)."""
    if folds is None:
        return None
    kind, _, arg = str(folds).partition(":")
    kind = kind.strip().lower()
    if kind == "split" and not arg:
        return "split", None
    if kind == "logo":
        return "logo", arg.strip() or "session"
    if kind == "kfold":
        try:
            k = int(arg) if arg else 5
        except ValueError:
            k = 0
        if k < 2:
            raise ValueError(f"{where}: kfold needs K >= 2 (kfold:5), got {folds!r}")
        return "kfold", k
    raise ValueError(f"{where}: {folds!r}: expected split, logo[:COLUMN] or kfold[:K]")


# --------------------------------------------------------------------------------------------
# Reading the table
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One table row: where it is (file, line) and its values by column name (text or None)."""

    source: str
    line: int
    values: dict[str, str | None]

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def _text(v) -> str | None:
    if v is None:
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    s = str(v).strip()
    return s or None


def read_table(path: str | Path, fmt: str | None = None, delimiter: str | None = None) -> tuple[list[str], list[Row]]:
    """(column names, rows) of a CSV / TSV (header line first) or JSONL (one object a line) file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    fmt = fmt or ("jsonl" if path.suffix.lower() in (".jsonl", ".json", ".ndjson") else "csv")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {e.start})") from None
    rows: list[Row] = []
    if fmt == "jsonl":
        columns: dict[str, None] = {}
        problems = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{lineno}: not valid JSON ({e.msg})")
                continue
            if not isinstance(obj, dict):
                problems.append(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                continue
            columns.update(dict.fromkeys(obj))
            rows.append(Row(str(path), lineno, {str(k): _text(v) for k, v in obj.items()}))
        if problems:
            raise CorpusError(problems)
        return list(columns), rows
    if fmt != "csv":
        raise ValueError(f"{path}: unknown table format {fmt!r} (csv or jsonl)")
    if delimiter is None:
        delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise ValueError(f"{path}: empty file (expected a header line)") from None
    header = [h.strip() for h in header]
    dup = sorted(h for h, n in Counter(header).items() if n > 1)
    if dup:
        raise ValueError(f"{path}:1: column(s) {', '.join(dup)} appear twice in the header")
    problems = []
    start = reader.line_num + 1
    for values in reader:
        lineno, start = start, reader.line_num + 1
        if not any(v.strip() for v in values):
            continue
        if reader.line_num > lineno:  # a quoted field over several lines: rows swallowed by a stray quote?
            swallowed = [x for v in values for x in v.split("\n")[1:] if x.count(delimiter) >= len(header) - 1]
            if swallowed:
                problems.append(f"{path}:{lineno}: a quoted field runs on to line {reader.line_num} and holds "
                                f"{len(swallowed)} line(s) shaped like rows (an unterminated quote?); close the "
                                "quote, or double a quote inside a quoted field")
                continue
        if len(values) != len(header):
            problems.append(f"{path}:{lineno}: {len(values)} fields, the header has {len(header)}")
            continue
        rows.append(Row(str(path), lineno, {h: _text(v) for h, v in zip(header, values, strict=True)}))
    if problems:
        raise CorpusError(problems)
    return header, rows


# --------------------------------------------------------------------------------------------
# Rows -> records
# --------------------------------------------------------------------------------------------


def normalize_split(raw: str, split_map: dict[str, str]) -> str | None:
    """A split value -> "train", "dev" or a test set name ("test", "test1", ...); None if unknown."""
    if raw in split_map:
        return split_map[raw]
    low = raw.strip().lower()
    if low in SPLIT_ALIASES:
        return SPLIT_ALIASES[low]
    if low.startswith("test") and is_fold_name(low):
        return low
    return None


def group_fold_ids(values: Sequence[str], column: str) -> dict[str, FoldId]:
    """Group values -> fold ids (see the module docstring: integers stay numbers, others names)."""
    distinct = sorted(set(values))
    if all(_INT_RE.fullmatch(v) for v in distinct):
        return {v: int(v) for v in distinct}
    out: dict[str, FoldId] = {}
    for v in distinct:
        name = re.sub(r"[^A-Za-z0-9._-]", "_", v)
        if not name[:1].isalpha():
            name = "g" + name
        out[v] = name
    clash = [n for n, c in Counter(out.values()).items() if c > 1]
    if clash:
        same = sorted(v for v in distinct if out[v] in clash)
        raise ValueError(f"--folds logo:{column}: values {', '.join(map(repr, same))} give the same fold name "
                         f"{clash[0]!r}; rename them")
    return out


def kfold_by_speaker(counts: dict[str, int], k: int) -> dict[str, int]:
    """Speaker -> fold 1..k, balanced by utterance count (see the module docstring)."""
    if len(counts) < k:
        raise ValueError(f"--folds kfold:{k}: only {len(counts)} speaker(s) with task utterances; "
                         f"use kfold:{max(2, len(counts))} or leave-one-speaker-out (logo:speaker)")
    load = [0] * k
    out: dict[str, int] = {}
    for spk in sorted(counts, key=lambda s: (-counts[s], s)):
        i = min(range(k), key=lambda j: (load[j], j))
        out[spk] = i + 1
        load[i] += counts[spk]
    return out


@dataclass
class _Build:
    records: list[dict]
    skipped: list[dict]
    warnings: list[str]
    to_resample: dict[str, tuple[Path, Path]]  # id -> (source, copy)
    fold_mode: str
    fold_assignment: dict[str, FoldId] = field(default_factory=dict)
    label_case_merged: dict[str, str] = field(default_factory=dict)  # raw spelling -> the label it became
    sources: list[Path] = field(default_factory=list)  # every row's audio file (the stage's inputs)


def _default_folds(columns: Sequence[str], spec: CorpusSpec) -> str:
    if spec.column("split") in columns:
        return "split"
    if spec.column("fold") in columns:
        return "logo:fold"
    if spec.column("session") in columns:
        return "logo:session"
    return "kfold:5"


def build_records(columns: Sequence[str], rows: Sequence[Row], spec: CorpusSpec, audio_root: Path,
                  out_dir: Path, corpus: str, source: str) -> _Build:
    """Manifest records (sorted by id) of the table's rows; every problem raised at once."""
    problems: list[str] = []
    missing = [spec.column(r) for r in REQUIRED_ROLES if spec.column(r) not in columns]
    if missing:
        raise ValueError(f"{source}: no column(s) {', '.join(missing)} (columns: {', '.join(columns) or 'none'}); "
                         "name them with --column ROLE=NAME (roles: path, label, speaker, id, session, fold, "
                         "split, transcript, gender)")
    fold_mode = spec.folds or _default_folds(columns, spec)
    kind, arg = parse_folds_option(fold_mode)
    group_col = None
    if kind == "split" and spec.column("split") not in columns:
        raise ValueError(f"{source}: --folds split needs a split column ({spec.column('split')!r} is not one of "
                         f"{', '.join(columns)}); name it with --column split=NAME")
    if kind == "logo":
        group_col = spec.column(str(arg)) if str(arg) in ROLES else str(arg)
        if group_col not in columns:
            raise ValueError(f"{source}: --folds {fold_mode}: no column {group_col!r} (columns: {', '.join(columns)})")

    def get(row: Row, role: str) -> str | None:
        return row.values.get(spec.column(role))

    classes = set(spec.labels) if spec.labels is not None else None
    # Labels that differ only in case ("ang", "ANG", "Ang"; spaces around are stripped on reading)
    # are one label, spelled in lower case: the spellings merged are in the report and a warning.
    spellings: dict[str, set[str]] = {}
    for row in rows:
        raw = get(row, "label")
        if raw is not None:
            spellings.setdefault(raw.lower(), set()).add(raw)
    case_merged = {raw: key for key, spelled in spellings.items() if len(spelled) > 1 for raw in sorted(spelled)
                   if raw != key}
    map_by_key = {k.strip().lower(): v for k, v in spec.map.items()}
    records: list[dict] = []
    rows_of: dict[str, Row] = {}
    skipped: list[dict] = []
    to_resample: dict[str, tuple[Path, Path]] = {}
    groups: dict[str, str] = {}
    sources: list[Path] = []
    for row in rows:
        bad = []
        raw_path, speaker = get(row, "path"), get(row, "speaker")
        if raw_path is None:
            bad.append(f"empty {spec.column('path')}")
        if speaker is None:
            bad.append(f"empty {spec.column('speaker')}")
        split = None
        if kind == "split":
            raw_split = get(row, "split")
            split = normalize_split(raw_split, spec.split_map) if raw_split is not None else None
            if raw_split is None:
                bad.append(f"empty {spec.column('split')}")
            elif split is None:
                bad.append(f"unknown split value {raw_split!r} (expected train, dev / validation, test or "
                           f"test<name>; or map it with --split-map {raw_split}=dev)")
        if group_col is not None and row.values.get(group_col) is None:
            bad.append(f"empty {group_col} (the fold column)")
        dims: dict[str, float | None] = {}
        for d in DIMENSION_ROLES:
            raw = get(row, d)
            try:
                dims[d] = None if raw is None else float(raw)
            except ValueError:
                bad.append(f"{spec.column(d)} {raw!r} is not a number")
                continue
            if dims[d] is not None and not np.isfinite(dims[d]):
                bad.append(f"{spec.column(d)} {raw!r} is not a finite number")
            elif dims[d] is not None and spec.scale is not None and not spec.scale[0] <= dims[d] <= spec.scale[1]:
                bad.append(f"{spec.column(d)} {raw!r} is outside the scale {spec.scale}")
        if bad:
            problems += [f"{row.where}: {b}" for b in bad]
            continue
        path = Path(raw_path).expanduser()
        if not path.is_absolute():
            path = audio_root / path
        path = Path(os.path.abspath(path))
        sources.append(path)
        uid = get(row, "id")
        if uid is None:
            try:
                rel = path.relative_to(audio_root)
            except ValueError:
                rel = Path(path.name)
            uid = rel.with_suffix("").as_posix()
        if uid in rows_of:
            problems.append(f"{row.where}: duplicate id {uid!r} (first on line {rows_of[uid].line})")
            continue
        rows_of[uid] = row
        raw_label = get(row, "label")
        mapped = None
        if raw_label is not None:
            name = case_merged.get(raw_label, raw_label)
            mapped = spec.map.get(raw_label, spec.map.get(name, map_by_key.get(name.lower(), name)))
        mapped = mapped or None
        label = mapped if mapped is not None and (classes is None or mapped in classes) else None
        # the audio: exists, readable, not empty, the expected rate and channels
        try:
            info = audio_info(path)
            frames, sr, channels = info.frames, info.samplerate, info.channels
            if frames <= 0:
                raise ValueError(f"{path}: no audio samples")
            check_finite_file(path, info)  # NaN / Inf samples (float-coded files only: read whole)
        except (FileNotFoundError, ValueError) as e:
            message = f"{row.where}: {' '.join(str(e).split())}"
            if spec.skip_bad_audio:
                skipped.append({"row": row.where, "path": str(path), "reason": ' '.join(str(e).split())})
            else:
                problems.append(message + " (or pass --skip-bad-audio to skip such rows)")
            continue
        duration = frames / sr
        if sr != spec.sample_rate or channels != 1:
            if not spec.resample:
                problems.append(f"{row.where}: {path}: {sr} Hz, {channels} channel(s); expected {spec.sample_rate} Hz "
                                "mono (convert the corpus, or pass --resample to write 16-bit mono copies at "
                                f"{spec.sample_rate} Hz under {out_dir / AUDIO_DIR})")
                continue
            try:  # the id names the copy: it must stay under OUT/audio (ids like "../../x" are refused)
                copy = Path(os.path.abspath(safe_join(out_dir / AUDIO_DIR, uid, what="utterance id", where=row.where)))
                copy = copy.with_name(copy.name + ".wav")
            except UnsafePathError as e:
                problems.append(str(e))
                continue
            to_resample[uid] = (path, copy)
            path = copy
            duration = round(duration * spec.sample_rate) / spec.sample_rate  # refined after writing
        if group_col is not None:
            groups[uid] = row.values[group_col]
        records.append({
            "id": uid, "path": str(path), "session": None, "speaker": speaker, "gender": get(row, "gender"),
            "dialog": None, "scripted": None, "emotion_code": raw_label, "label": label,
            "transcript": get(row, "transcript"), "duration": duration,
            **({"split": split} if kind == "split" else {}), "corpus": corpus,
            **({d: dims[d] for d in DIMENSION_ROLES} if any(spec.column(d) in columns for d in DIMENSION_ROLES)
               else {}),
        })
    if problems:
        raise CorpusError(problems)
    if not records:
        raise ValueError(f"{source}: no usable rows")
    if spec.labels is not None:
        present = {r["label"] for r in records if r["label"] is not None}
        absent = [c for c in spec.labels if c not in present]
        if absent:
            found = sorted({str(r["emotion_code"]) for r in records if r["emotion_code"] is not None})
            raise ValueError(f"{source}: --labels: class(es) {', '.join(absent)} label no row (raw labels: "
                             f"{', '.join(found) or 'none'}; rename with --map RAW=CLASS)")
    # folds
    assignment: dict[str, FoldId] = {}
    if kind == "logo":
        ids = group_fold_ids(list(groups.values()), group_col)
        for r in records:
            r["session"] = ids[groups[r["id"]]]
        assignment = {v: f for v, f in sorted(ids.items())}
    elif kind == "kfold":
        counts = Counter(r["speaker"] for r in records if r["label"] is not None)
        by_speaker = kfold_by_speaker(dict(counts), int(arg))
        for r in records:
            # a speaker without task utterances tests in fold 1 (nothing of theirs is in the task)
            r["session"] = by_speaker.get(r["speaker"], 1)
        assignment = dict(sorted(by_speaker.items()))
    records.sort(key=lambda r: r["id"])
    scales = _dimension_scales(records, spec)
    for r in records:
        if scales:
            r["dim_scales"] = scales
    # the same audio under two ids: refused across folds / splits (leakage), a warning within one
    source_of = {uid: src for uid, (src, _) in to_resample.items()}
    warnings = []
    if case_merged:
        warnings.append("labels differing only in case merged (one class each, lower case): "
                        + ", ".join(f"{raw!r} -> {key!r}" for raw, key in sorted(case_merged.items())))
    for recs, leaks in same_audio(records, lambda r: source_of.get(r["id"], r["path"])):
        text = describe_same_audio(recs, lambda r: rows_of[r["id"]].where)
        if leaks:
            problems.append(f"{rows_of[recs[0]['id']].where}: {text} in different folds or splits: a fold would "
                            "test (or select) on audio it trains on; remove the duplicate rows")
        else:
            warnings.append(f"{text} within one fold (kept: no leakage, but the clip counts twice)")
    if problems:
        raise CorpusError(problems)
    return _Build(records=records, skipped=skipped, warnings=warnings, to_resample=to_resample, fold_mode=fold_mode,
                  fold_assignment=assignment, sources=sources, label_case_merged=case_merged)


def _dimension_scales(records: list[dict], spec: CorpusSpec) -> dict[str, list[float]]:
    """{dimension: [low, high]} of the dimension columns with any value: spec.scale, else each
    dimension's min and max over the table (a constant column: [v - 0.5, v + 0.5])."""
    out = {}
    for d in DIMENSION_ROLES:
        values = [r[d] for r in records if r.get(d) is not None]
        if not values:
            continue
        if spec.scale is not None:
            out[d] = list(spec.scale)
        else:
            lo, hi = min(values), max(values)
            out[d] = [lo, hi] if lo < hi else [lo - 0.5, hi + 0.5]
    return out


def dimensional_counts(records: list[dict], scale_source: str | None) -> dict | None:
    """counts.dimensional of a prepare report: the scale of each dimension and where it comes from
    (given, inferred from the data's min / max, or the corpus's own), and the utterances with and
    without a value of each (those without are outside the dimensional task); None without any."""
    scales = {}
    for r in records:
        scales.update(r.get("dim_scales") or {})
    dims = [d for d in DIMENSION_ROLES if any(r.get(d) is not None for r in records)]
    if not dims:
        return None
    with_values = {d: sum(r.get(d) is not None for r in records) for d in dims}
    return {"scales": {d: scales[d] for d in dims}, "scale_source": scale_source, "with_values": with_values,
            "without_values": {d: len(records) - n for d, n in with_values.items()}}


def _write_copies(build: _Build, sample_rate: int) -> None:
    """Resampled 16-bit mono copies (mmser.audio.load_audio), durations from the copies."""
    import soundfile as sf

    by_id = {r["id"]: r for r in build.records}
    for folder in sorted({dst.parent for _, dst in build.to_resample.values()}):
        remove_stale_temps(folder)  # left by a killed prepare
    for uid, (src, dst) in build.to_resample.items():
        wav = load_audio(src, sample_rate)
        # encoded in memory (one clip), then written atomically: a write error (a full disk) then
        # surfaces as an OSError naming the copy, not as soundfile's callback AssertionError
        buf = io.BytesIO()
        sf.write(buf, np.clip(wav, -1.0, 1.0), sample_rate, subtype="PCM_16", format="WAV")
        atomic_write_bytes(dst, buf.getvalue())
        by_id[uid]["duration"] = len(wav) / sample_rate


def fold_warnings(records: list[dict]) -> list[str]:
    """Folds whose training split lacks a class (training would refuse that fold), or whose test
    set lacks one (its UA then averages over fewer classes)."""
    from mmser.data.manifest import classes_for

    out = []
    classes = classes_for(records)
    for f in fold_ids(records):
        fold = split_fold(records, f, None, classes)
        train = {r["label"] for r in fold.train}
        test = {r["label"] for r in fold.test}
        no_train = [c for c in classes if c not in train]
        no_test = [c for c in classes if c not in test]
        if no_train:
            out.append(f"fold {f}: no training utterance of class(es) {', '.join(no_train)}; training on this "
                       "fold will refuse (class weights need every class)")
        if no_test:
            out.append(f"fold {f}: no test utterance of class(es) {', '.join(no_test)}")
    return out


# --------------------------------------------------------------------------------------------
# prepare: table -> manifest + report + fold files, idempotent
# --------------------------------------------------------------------------------------------


@dataclass
class CorpusPrepareResult:
    """What `prepare_corpus` produced (or found up to date)."""

    name: str
    manifest: Path
    report: Path
    folds: list[Path]
    counts: dict
    skipped: list[dict]
    warnings: list[str]
    reused: bool
    too_short: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        c = self.counts
        per_class = " / ".join(f"{k} {v}" for k, v in c["per_class"].items())
        head = "inputs unchanged, reused" if self.reused else "wrote"
        folds = ", ".join(str(f) for f in c["folds"])
        lines = [f"{self.name}: {head} {self.manifest}: {c['utterances']} utterances, {c['task']} in the task "
                 f"({len(c['per_class'])} classes: {per_class}), {c['task_hours']:.2f} h",
                 f"  folds ({c['fold_mode']}): {folds}",
                 f"  skipped {len(self.skipped)} row(s), {len(self.too_short)} too short (< {MIN_DURATION_S:g} s, "
                 f"kept), {len(self.warnings)} warning(s); details in {self.report}"]
        if c.get("outside_task"):
            lines.append("  outside the task (label null): "
                         + ", ".join(f"{k} {v}" for k, v in c["outside_task"].items()))
        lines += [f"  skipped {x['row']}: {x['reason']}" for x in self.skipped[:_MAX_LISTED]]
        lines += [f"  warning: {w}" for w in self.warnings[:_MAX_LISTED]]
        if len(self.warnings) > _MAX_LISTED:
            lines.append(f"  ... and {len(self.warnings) - _MAX_LISTED} more warning(s) in {self.report}")
        return "\n".join(lines)


def corpus_counts(records: list[dict], fold_mode: str, scale_source: str | None = None) -> dict:
    from mmser.data.manifest import fold_of, manifest_labels

    task = [r for r in records if r["label"] is not None]
    classes = manifest_labels(task)
    cc = Counter(r["label"] for r in task)
    per_fold = {}
    folds = fold_ids(records)
    for f in folds:
        frecs = [r for r in records if fold_of(r) == f]
        ftask = [r for r in frecs if r["label"] is not None]
        fc = Counter(r["label"] for r in ftask)
        per_fold[str(f)] = {**{k: fc.get(k, 0) for k in classes}, "task": len(ftask), "utterances": len(frecs),
                            "task_hours": round(sum(r["duration"] for r in ftask) / 3600, 4)}
    per_split = None
    if any(r.get("split") is not None for r in records):
        per_split = {}
        for s in sorted({r["split"] for r in records}, key=lambda x: (x != TRAIN_SPLIT, x != DEV_SPLIT, x)):
            srecs = [r for r in records if r["split"] == s]
            sc = Counter(r["label"] for r in srecs if r["label"] is not None)
            per_split[s] = {**{k: sc.get(k, 0) for k in classes}, "task": sum(sc.values()), "utterances": len(srecs)}
    outside = Counter(r["emotion_code"] or "none" for r in records if r["label"] is None)
    return {
        "utterances": len(records),
        "task": len(task),
        "task_hours": round(sum(r["duration"] for r in task) / 3600, 4),
        "classes": classes,
        "per_class": {k: cc.get(k, 0) for k in classes},
        "fold_mode": fold_mode,
        "folds": folds,
        "per_fold": per_fold,
        **({"per_split": per_split} if per_split is not None else {}),
        "speakers": len({r["speaker"] for r in task}),
        "outside_task": dict(sorted(outside.items())),
        **({"dimensional": dim} if (dim := dimensional_counts(records, scale_source)) else {}),
    }


def _fingerprint(table: Path, rows: Sequence[Row], spec: CorpusSpec, audio_root: Path, corpus: str,
                 extra: Sequence[Path]) -> str:
    def items():
        yield "format_version", CORPUS_FORMAT_VERSION
        yield "table", [str(table), file_sha256(table)]
        yield "spec", asdict(spec)
        yield "audio_root", str(audio_root)
        yield "corpus", corpus
        seen = set()
        for row in rows:
            raw = row.values.get(spec.column("path"))
            if raw is None:
                continue
            p = Path(raw).expanduser()
            p = p if p.is_absolute() else audio_root / p
            if p in seen:
                continue
            seen.add(p)
            try:
                st = p.stat()
                yield str(p), [st.st_size, st.st_mtime_ns]
            except OSError:
                yield str(p), None
        for p in extra:
            try:
                st = p.stat()
                yield str(p), [st.st_size, st.st_mtime_ns]
            except OSError:
                yield str(p), None

    return fingerprint(items())


def prepare_rows(columns: Sequence[str], rows: Sequence[Row], spec: CorpusSpec, audio_root: str | Path,
                 out_dir: str | Path, source: str | Path, corpus: str | None = None, force: bool = False,
                 extra_inputs: Sequence[Path] = (), report_extra: dict | None = None,
                 warnings: Sequence[str] = ()) -> CorpusPrepareResult:
    """Rows of a table (or of a corpus layout read into rows) -> OUT/manifest.jsonl + report + folds.
    `warnings`: the reader's own (e.g. undecodable transcripts), reported with prepare's."""
    read_warnings = list(warnings)
    spec.check()
    out_dir = Path(out_dir)
    audio_root = Path(os.path.abspath(audio_root))
    source = Path(source)
    corpus = corpus or spec.name or Path(os.path.abspath(out_dir)).name
    if not audio_root.is_dir():
        raise FileNotFoundError(f"--audio-root {audio_root}: no such folder")
    fp = _fingerprint(source, rows, spec, audio_root, corpus, extra_inputs)
    report = None if force else reuse_prepared(out_dir, fp, MANIFEST_NAME, REPORT_NAME)
    if report is not None:
        log.info("%s: inputs unchanged (fingerprint %s): reusing %s", corpus, fp, out_dir / MANIFEST_NAME)
        for w in report["warnings"]:
            log.warning("%s", w)
        return CorpusPrepareResult(name=corpus, manifest=out_dir / MANIFEST_NAME, report=out_dir / REPORT_NAME,
                                   folds=[out_dir / f for f in report["fold_files"]], counts=report["counts"],
                                   skipped=report["skipped"], warnings=report["warnings"], reused=True,
                                   too_short=report["too_short"]["clips"])
    build = build_records(columns, rows, spec, audio_root, out_dir, corpus, str(source))
    # nothing is written over what this stage reads (before the first write)
    outputs = [out_dir / MANIFEST_NAME, out_dir / REPORT_NAME, *fold_file_paths(build.records, out_dir / FOLDS_DIR),
               *(dst for _, dst in build.to_resample.values())]
    check_not_inputs(outputs, [source, *extra_inputs, *build.sources])
    if build.to_resample:
        log.info("%s: writing %d resampled copies under %s", corpus, len(build.to_resample), out_dir / AUDIO_DIR)
        _write_copies(build, spec.sample_rate)
    records = build.records
    if not fold_ids(records):
        raise ValueError(f"{source}: no fold has task utterances to test on (check --labels / --map and the "
                         "split or fold column)")
    from mmser.data.manifest import manifest_labels

    if len(manifest_labels(records)) < 2:
        raise ValueError(f"{source}: the task needs at least 2 classes; labels in it: "
                         f"{', '.join(manifest_labels(records)) or 'none'}")
    warnings = read_warnings + list(build.warnings) + fold_warnings(records)
    too_short = [{"id": r["id"], "path": r["path"], "duration": r["duration"]} for r in records
                 if r["duration"] < MIN_DURATION_S]
    if too_short:
        listed = ", ".join(f"{x['id']} ({x['duration']:.4f} s)" for x in too_short[:_MAX_LISTED])
        warnings.append(f"{len(too_short)} clip(s) shorter than {MIN_DURATION_S:g} s, kept in the manifest "
                        f"(training skips clips too short for the encoder): {listed}")
    for x in build.skipped:
        log.warning("skipped %s: %s", x["row"], x["reason"])
    for w in warnings:
        log.warning("%s", w)
    for folder in (out_dir, out_dir / FOLDS_DIR):
        remove_stale_temps(folder)  # left by a killed prepare
    fold_paths = write_fold_files(records, out_dir / FOLDS_DIR)
    manifest = out_dir / MANIFEST_NAME
    write_jsonl(manifest, records)
    load_manifest(manifest)  # the contract every stage relies on (raises on a bug here, not later)
    counts = corpus_counts(records, build.fold_mode, "given" if spec.scale is not None else "inferred (min, max)")
    report = {
        "format_version": CORPUS_FORMAT_VERSION,
        "corpus": corpus,
        "source": str(source),
        "audio_root": str(audio_root),
        "spec": asdict(spec),
        "fingerprint": fp,
        "manifest_sha256": file_sha256(manifest),
        "counts": counts,
        "fold_assignment": {k: v for k, v in sorted(build.fold_assignment.items(), key=lambda kv: (
            fold_sort_key(kv[1]), kv[0]))},
        "resampled": len(build.to_resample),
        "label_case_merged": build.label_case_merged,
        "skipped": build.skipped,
        "too_short": {"min_duration_s": MIN_DURATION_S, "count": len(too_short), "clips": too_short},
        "warnings": warnings,
        "fold_files": [str(p.relative_to(out_dir)) for p in fold_paths],
        **(report_extra or {}),
    }
    atomic_write_json(out_dir / REPORT_NAME, report)  # last: its fingerprint marks the outputs complete
    return CorpusPrepareResult(name=corpus, manifest=manifest, report=out_dir / REPORT_NAME, folds=fold_paths,
                               counts=counts, skipped=build.skipped, warnings=warnings, reused=False,
                               too_short=too_short)


def prepare_corpus(table: str | Path, out_dir: str | Path, audio_root: str | Path | None = None,
                   spec: CorpusSpec | None = None, fmt: str | None = None, delimiter: str | None = None,
                   force: bool = False) -> CorpusPrepareResult:
    """`mmser prepare csv`: a CSV / TSV / JSONL table (read only) -> `out_dir` (module docstring)."""
    table = Path(table)
    spec = spec or CorpusSpec()
    columns, rows = read_table(table, fmt, delimiter)
    if not rows:
        raise ValueError(f"{table}: no rows")
    root = Path(audio_root) if audio_root is not None else table.resolve().parent
    return prepare_rows(columns, rows, spec, root, out_dir, table, force=force)
