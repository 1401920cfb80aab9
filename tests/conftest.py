"""Shared fixtures. Real third-party samples are in tests/fixtures (see its README)."""

from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real third-party samples: danbooru/ (API responses of every era) and wd-tagger/
    (label lists), copied into the repository so no test skips on a clean clone."""
    return FIXTURES
