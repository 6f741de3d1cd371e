"""Fixtures for the data tests: the shared real data folder and MedQuAD parsed once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedpit.data import load_medquad
from fedpit.types import Example

# The repo is /work/main and the data /work/shared/data: three levels up from this file is /work.
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ.get("FEDPIT_DATA_DIR") or DEFAULT_DATA_DIR).expanduser().resolve()
    assert path.is_dir(), f"real data folder {path} not found; export FEDPIT_DATA_DIR=PATH"
    return path


@pytest.fixture(scope="session")
def medquad(data_dir: Path) -> list[Example]:
    """Parsing takes ~1.5 s, so the real-data tests share one copy (treat it as read-only)."""
    return load_medquad(data_dir)
