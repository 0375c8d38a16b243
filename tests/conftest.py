"""Shared pytest fixtures (keep small and generic; add yours below)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

# Tests never reach for a model hub: every model is tiny and built from a config, or ships in an
# installed package (MiniLM, Whisper tiny.en). Set before transformers / huggingface_hub import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest
from fake_iemocap import make_fake_iemocap


@pytest.fixture
def fake_iemocap(tmp_path: Path) -> Path:
    """A fresh fake IEMOCAP_full_release tree (tests/fake_iemocap.py, default options)."""
    return make_fake_iemocap(tmp_path / "corpus")


@pytest.fixture
def fake_iemocap_factory(tmp_path: Path) -> Callable[..., Path]:
    """Build fake trees with options: `fake_iemocap_factory(corrupt_wav=True)`; each call gets
    its own folder."""
    count = 0

    def make(**options) -> Path:
        nonlocal count
        count += 1
        return make_fake_iemocap(tmp_path / f"corpus{count}", **options)

    return make


CATALOGUE_KEY = pytest.StashKey[list]()


@pytest.fixture
def catalogue(request):
    """`catalogue(case, outcome)`: one row of the reliability catalogue table (any test module)."""
    rows = request.config.stash.setdefault(CATALOGUE_KEY, [])

    def record(case: str, outcome: str) -> None:
        rows.append((case, outcome))

    return record


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print the reliability catalogue (tests/test_reliability_catalogue*.py) as a `case | outcome` table."""
    rows = config.stash.get(CATALOGUE_KEY, [])
    if rows:
        terminalreporter.section("reliability catalogue")
        terminalreporter.write_line("| case | outcome |")
        terminalreporter.write_line("|---|---|")
        for case, outcome in rows:
            terminalreporter.write_line(f"| {case} | {outcome.replace('|', '/')} |")
