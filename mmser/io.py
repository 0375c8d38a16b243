"""Small file helpers: atomic writes (write to a temp file in the same folder, then rename),
JSONL reading with errors that name the file and line, input fingerprints for idempotence, the
record of the data a folder was made from (inputs.json), and a per-folder lock between processes."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)


def looks_like_path(name: str) -> bool:
    """Whether a model name is a filesystem path rather than a Hub id ("org/name"): it starts with
    "." or "~", is absolute, or has more than one "/". The one rule for every loader that takes
    either (audio encoders, text encoders, Whisper models, saved mmser models)."""
    return name.startswith((".", "~")) or os.path.isabs(name) or name.count("/") > 1

# -- paths made from data ----------------------------------------------------------------------------
#
# A file name made from data (an utterance id, a file name from a table, an experiment, fold or run
# name) goes through `safe_join`, the one checked join: "../../x", "/etc/x", "a/../../b" or a NUL
# would otherwise write outside the output folder. Subfolders ("spk1/utt3") are allowed; the check
# is on the names (lexical), so an output folder that is itself a symlink keeps working.


class UnsafePathError(ValueError):
    """A name from data that would put a file outside its output folder."""


def safe_join(root: str | Path, *parts: str | os.PathLike, what: str = "name", where: str | None = None) -> Path:
    """root / parts..., refusing a part that is empty, absolute, has a '..' component or a NUL byte:
    UnsafePathError "WHERE: WHAT '../x' has a '..' component: it would write outside ROOT"."""
    root = Path(root)
    out = root
    for part in parts:
        text = os.fspath(part)
        problem = None
        if not text:
            problem = "is empty"
        elif "\x00" in text:
            problem = "contains a NUL byte"
        elif os.path.isabs(text):
            problem = "is an absolute path"
        elif ".." in Path(text).parts:
            problem = "has a '..' component"
        elif not [c for c in Path(text).parts if c != "."]:
            problem = "names no file"
        if problem:
            head = f"{where}: " if where else ""
            tail = f"it would write outside {root}" if "absolute" in problem or ".." in problem else \
                f"not a file name under {root}"
            raise UnsafePathError(f"{head}{what} {text!r} {problem}: {tail}")
        out = out / text
    return out


# -- a stage never overwrites its inputs ----------------------------------------------------------


def check_not_inputs(outputs: Iterable[str | Path], inputs: Iterable[str | Path], option: str = "--out") -> None:
    """Refuse (ValueError naming both) when an output file would be one of the inputs: the same
    real path (symlinks resolved) or the same file (a hard link, a bind mount). Call it before the
    stage writes anything: e.g. `--out` = the audio root with resampled copies named like their
    sources, or an input table named OUT/manifest.jsonl."""
    by_real: dict[str, Path] = {}
    by_inode: dict[tuple[int, int], Path] = {}
    for p in inputs:
        p = Path(p)
        try:
            st = p.stat()
        except OSError:
            continue  # a missing input cannot be overwritten (the stage reports it itself)
        by_real.setdefault(os.path.realpath(p), p)
        by_inode.setdefault((st.st_dev, st.st_ino), p)
    for out in outputs:
        out = Path(out)
        hit = by_real.get(os.path.realpath(out))
        if hit is None:
            try:
                st = out.stat()
                hit = by_inode.get((st.st_dev, st.st_ino))
            except OSError:
                pass
        if hit is not None:
            raise ValueError(f"{out}: this output would overwrite the input {hit}; choose another {option} "
                             "(a stage never writes over what it reads)")


# -- atomic writes ---------------------------------------------------------------------------------
#
# Every output is written to a temp file IN ITS DESTINATION FOLDER (never TMPDIR: a rename across
# file systems is a copy, and a kill during that copy truncates the destination in place), fsynced,
# given the mode a plain open() would give it (mkstemp creates 0600; the umask's 0644 is what users
# and their group tools expect), renamed over the destination with os.replace (atomic on POSIX) and
# the folder fsynced, so a kill -9 or a power cut leaves either the old file or the new one. The temp
# name `.NAME.tmp-PID.XXXXXX` carries the writer's pid: `remove_stale_temps` deletes those of dead
# writers. An OSError names the DESTINATION (never the temp name): "OUT/manifest.jsonl: No space
# left on device", "OUT/x: Is a directory", "OUT: its folder F is a file, not a folder".

_UMASK_LOCK = threading.Lock()
TEMP_MARK = ".tmp-"


def file_mode() -> int:
    """0o666 & ~umask: the mode open() gives a new file (0644 under umask 022)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:  # Linux: read without changing it
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def _blocking_file(folder: Path) -> Path | None:
    """The first ancestor of `folder` (itself included) that exists and is not a folder."""
    for p in [folder, *folder.parents]:
        if p.exists() or p.is_symlink():
            return None if p.is_dir() else p
    return None


def named_os_error(e: OSError, path: str | Path) -> OSError:
    """The same error (errno, reason) naming `path`, the file the caller was writing; a folder that
    cannot be made because an ancestor is a file says which."""
    path = Path(path)
    reason = e.strerror or " ".join(str(e).split()) or type(e).__name__
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        blocker = _blocking_file(path.parent)
        if blocker is not None:
            reason = f"cannot create its folder: {blocker} is a file, not a folder"
    if e.errno == errno.EISDIR or (e.errno in (errno.EEXIST, errno.ENOTEMPTY) and path.is_dir()):
        reason = "is a folder; expected a file there"
    out = OSError(e.errno, reason, str(path))  # errno picks the subclass (PermissionError, ...)
    return out


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; the rename is done either way
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """`with atomic_open(path) as f: f.write(...)`: `path` appears complete or not at all (see the
    section comment). Errors, the body's included, name `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}{os.getpid()}.", dir=path.parent)
    except OSError as e:
        raise named_os_error(e, path) from e
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and not isinstance(e, FolderHeld):
            raise named_os_error(e, path) from e
        raise
    _fsync_dir(path.parent)


def publish_temp(tmp: str | Path, path: str | Path) -> None:
    """Finish a write that a library made into `tmp` (a file in `path`'s folder, e.g. safetensors'
    or matplotlib's own writer): fsync it, give it the umask's mode, rename it onto `path`, fsync the
    folder. The same guarantees as `atomic_open`, for writers that want a file name."""
    tmp, path = Path(tmp), Path(path)
    try:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except OSError as e:
        raise named_os_error(e, path) from e
    _fsync_dir(path.parent)


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temp files of `atomic_open` in `folder` whose writer is dead (a kill -9 during a
    write); returns them. A live writer's temp file (another process writing there) is kept."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    pattern = re.compile(r"^\..+" + re.escape(TEMP_MARK) + r"(\d+)\.[^.]+$")
    for p in folder.iterdir():
        m = pattern.match(p.name)
        if m is None or not p.is_file() or _pid_alive(int(m[1])):
            continue
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            continue
    if removed:
        log.info("%s: removed %d temp file(s) of interrupted writes", folder, len(removed))
    return removed


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


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


def same_audio_groups(paths: Iterable[str | Path]) -> list[list[int]]:
    """Indexes into `paths` that are one file under several names (same inode, symlinks resolved)
    or hold the same bytes: groups of 2+, each sorted, in order of their first index. Cheap on a
    large corpus: only files of equal size are sampled (8 KiB from the middle), and only equal
    samples are hashed whole (sha256). Missing files are left out."""
    paths = [Path(p) for p in paths]
    by_inode: dict[tuple[int, int], list[int]] = {}
    sizes: dict[tuple[int, int], int] = {}
    for i, p in enumerate(paths):
        try:
            st = p.stat()
        except OSError:
            continue
        by_inode.setdefault((st.st_dev, st.st_ino), []).append(i)
        sizes[(st.st_dev, st.st_ino)] = st.st_size
    files = list(by_inode.values())  # one entry per distinct file: the indexes naming it

    def sample(i: int, size: int) -> bytes:
        with paths[i].open("rb") as f:
            f.seek(max(0, size // 2 - 4096))
            return f.read(8192)

    def split(groups: list[list[list[int]]], key) -> list[list[list[int]]]:
        out = []
        for g in groups:
            if len(g) < 2:
                continue
            buckets: dict[object, list[list[int]]] = {}
            for f in g:
                buckets.setdefault(key(f), []).append(f)
            out += [b for b in buckets.values() if len(b) > 1]
        return out

    size_of = {tuple(f): sizes[k] for k, f in by_inode.items()}
    same = split([files], lambda f: size_of[tuple(f)])
    same = split(same, lambda f: sample(f[0], size_of[tuple(f)]))
    same = split(same, lambda f: file_sha256(paths[f[0]]))
    groups = [sorted(i for f in g for i in f) for g in same]
    grouped = {i for g in groups for i in g}
    groups += [sorted(f) for f in files if len(f) > 1 and f[0] not in grouped]  # one file, several names
    return sorted(groups)


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
