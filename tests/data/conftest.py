"""Fixtures for the data tests: MedQuAD parsed once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedpit.data import load_medquad
from fedpit.types import Example


@pytest.fixture(scope="session")
def medquad(data_dir: Path) -> list[Example]:
    """Parsing takes ~1.5 s, so the real-data tests share one copy (treat it as read-only)."""
    return load_medquad(data_dir)
