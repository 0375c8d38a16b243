"""Small file helpers: atomic writes (write to a temp file in the same folder, then rename),
JSONL reading with errors that name the file and line, input fingerprints for idempotence, and the
record of the data a folder was made from (inputs.json)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; a missing or broken file raises an error that names it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def write_jsonl(path: str | Path, records: Iterable[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def iter_jsonl(path: str | Path) -> Iterator[dict]:
    """Yield one dict per non-empty line; a bad line raises ValueError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield obj


def read_jsonl(path: str | Path) -> list[dict]:
    return list(iter_jsonl(path))


def fingerprint(items: Iterable[tuple[str, Any]]) -> str:
    """A short stable hash of (name, value) pairs, e.g. (path, size, mtime_ns) of input files."""
    h = hashlib.sha256()
    for name, value in items:
        h.update(json.dumps([name, value], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


DONE_FILE = "DONE.json"


def stage_done(stage_dir: str | Path, fp: str) -> bool:
    """True when the stage in `stage_dir` finished from inputs with fingerprint `fp`; a folder made
    from other inputs is refused (never silently reused)."""
    marker = Path(stage_dir) / DONE_FILE
    if not marker.is_file():
        return False
    try:
        saved = json.loads(marker.read_text()).get("fingerprint")
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{marker}: unreadable done marker ({e}); delete {stage_dir} to redo the stage") from None
    if saved != fp:
        raise ValueError(f"{stage_dir} was made from other inputs (fingerprint {saved} != {fp}): "
                         "delete it, or use another output folder")
    return True


def mark_stage_done(stage_dir: str | Path, fp: str, info: dict) -> None:
    """Write the stage's done marker (last, atomically) with its input fingerprint."""
    atomic_write_json(Path(stage_dir) / DONE_FILE, {"fingerprint": fp, **info})


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (hex); a missing file raises FileNotFoundError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# -- what a folder was made from ------------------------------------------------------------------
#
# A folder's inputs.json records the data it was made from: {name: {"path": ..., "sha256": ...}}
# (e.g. the manifest, an ASR transcript file). Only the hashes are compared: the same content at
# another path is the same data; other content at the same path (a corpus prepared again from
# another tree into the same folder) is not.

INPUTS_FILE = "inputs.json"


def inputs_differ(saved: dict, current: dict) -> list[str]:
    """'name: sha256 <saved> -> <current> (path)' for every input whose content differs."""
    out = []
    for name in sorted(set(saved) | set(current)):
        old, new = (saved.get(name) or {}).get("sha256"), (current.get(name) or {}).get("sha256")
        if old != new:
            where = (current.get(name) or saved.get(name) or {}).get("path")
            out.append(f"{name} {str(old)[:12]} -> {str(new)[:12]}" + (f" ({where})" if where else ""))
    return out


def check_inputs(folder: str | Path, current: dict, what: str) -> bool:
    """Compare `current` with folder/inputs.json: True when it matches, False when there is none;
    a folder made from other data raises ValueError naming the folder and what differs."""
    path = Path(folder) / INPUTS_FILE
    if not path.is_file():
        return False
    diff = inputs_differ(read_json(path), current)
    if diff:
        raise ValueError(f"{folder}: {what} was made from other data ({'; '.join(diff)} sha256). Use another "
                         "output folder or experiment name, or delete the old one.")
    return True


def write_inputs(folder: str | Path, current: dict) -> None:
    atomic_write_json(Path(folder) / INPUTS_FILE, current)

