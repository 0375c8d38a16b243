"""Shared pytest fixtures (keep small and generic; add yours below)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

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
