"""What produced an output: the mmser version, the git commit (and whether the tree was dirty) when
run from a clone, and the versions of the libraries behind the numbers.

Recorded in every run's metrics.json ("provenance") and in the W&B run config, so a number can be
traced to the code and libraries that made it. Never fails: no git, not a clone or a package that is
not installed give None.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import mmser

# Distribution names (as pip knows them) whose versions are recorded; None when not installed.
LIBRARIES = ("torch", "transformers", "pytorch-lightning", "faster-whisper", "openai-whisper",
             "sentence-transformers")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_state(root: Path) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the clone at `root`; (None, None) when git or the clone is missing."""
    git = shutil.which("git")
    if git is None or not (root / ".git").exists():
        return None, None
    try:
        def run(*args: str) -> str:
            return subprocess.run([git, "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()

        commit = run("rev-parse", "HEAD")
        dirty = bool(run("status", "--porcelain", "--untracked-files=no"))
        return commit or None, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


_COMMAND: list[str] | None = None


def record_command(argv: list[str]) -> None:
    """Remember the mmser command line this process runs (set by the CLI), for model cards."""
    global _COMMAND
    _COMMAND = ["mmser", *argv]


def command() -> str | None:
    """The mmser command line of this process, shell-quoted, or None when not run from the CLI."""
    import shlex

    return shlex.join(_COMMAND) if _COMMAND else None


@functools.lru_cache(maxsize=1)
def provenance() -> dict:
    """{"mmser": version, "git_commit": sha or None, "git_dirty": bool or None, "libraries": {...}}.

    Computed once per process (the git call takes a few ms; the tree does not change under a run
    in a way worth a second call)."""
    # A clone has the package folder directly under the repository root; an installed wheel does not.
    commit, dirty = git_state(Path(mmser.__file__).resolve().parents[1])
    return {"mmser": mmser.__version__, "git_commit": commit, "git_dirty": dirty,
            "libraries": {name: _version(name) for name in LIBRARIES}}
