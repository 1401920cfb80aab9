"""Shared fixtures. Real third-party samples live in ../shared/data (optional)."""

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not present (only in the development checkout)")
    return SHARED_DATA
