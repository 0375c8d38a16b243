"""Small file helpers: atomic writes (write to a temp file in the same folder, then rename),
JSONL reading with errors that name the file and line, input fingerprints for idempotence, the
record of the data a folder was made from (inputs.json), and a per-folder lock between processes."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def looks_like_path(name: str) -> bool:
    """Whether a model name is a filesystem path rather than a Hub id ("org/name"): it starts with
    "." or "~", is absolute, or has more than one "/". The one rule for every loader that takes
    either (audio encoders, text encoders, Whisper models, saved mmser models)."""
    return name.startswith((".", "~")) or os.path.isabs(name) or name.count("/") > 1

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


# -- one process per folder ------------------------------------------------------------------------

LOCK_FILE = ".lock"
OWNER_FILE = ".lock-owner.json"


class FolderHeld(BlockingIOError):
    """Another live process holds the folder's lock (the folder is skipped, not failed)."""

    def __init__(self, folder: Path, owner: dict | None):
        owner = owner or {}
        who = f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}"
        since = f" (held since {owner['since']})" if owner.get("since") else ""
        super().__init__(errno.EWOULDBLOCK, f"held by {who}, skipped{since}", str(folder))
        self.folder, self.owner, self.holder = folder, owner, who

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


def _read_owner(folder: Path) -> dict | None:
    try:
        return json.loads((folder / OWNER_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _current_owner(folder: Path, tries: int = 20) -> dict | None:
    """The holder's record; a holder that has just taken the lock may not have written it yet (or
    the file may still name the dead holder it is taking over from): wait up to ~1 s for it."""
    owner = None
    for _ in range(tries):
        owner = _read_owner(folder)
        here = owner is not None and owner.get("host") == socket.gethostname()
        if owner is not None and not (here and not _pid_alive(int(owner.get("pid", 0)))):
            return owner
        time.sleep(0.05)
    return owner


@contextmanager
def hold_folder(folder: str | Path, enabled: bool = True) -> Iterator[None]:
    """Hold `folder` for this process (creating it), or raise FolderHeld at once if another live
    process holds it. `enabled=False` is a no-op (ranks > 0 of a distributed run: their rank 0
    holds the folder).

    The lock is `filelock.FileLock` on folder/.lock: flock(2), which the kernel releases when the
    holder dies (SIGKILL, out of memory, a lost node on NFS), so a dead holder never leaves a
    stale lock behind and two processes can never both take over the same stale lock (an O_EXCL
    pid file needs a liveness check and a race-free takeover for that). filelock is already
    installed with torch and huggingface_hub, and falls back to its own pid-checked lock file on
    file systems without flock. Who holds the folder (pid, host, since) is kept in
    folder/.lock-owner.json for the message a second process logs; one left by a dead holder is
    taken over and logged.
    """
    if not enabled:
        yield
        return
    from filelock import FileLock, Timeout

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / LOCK_FILE), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise FolderHeld(folder, _current_owner(folder)) from None
    try:
        previous = _read_owner(folder)
        if previous:  # its holder died without releasing (the kernel did): take over
            log.warning("%s: taking over the lock of pid %s on host %s (no longer running)", folder,
                        previous.get("pid"), previous.get("host"))
        atomic_write_json(folder / OWNER_FILE, {
            "pid": os.getpid(), "host": socket.gethostname(),
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        yield
    finally:
        try:
            (folder / OWNER_FILE).unlink(missing_ok=True)
        finally:
            lock.release()
