"""The review tests' manifest (tests/common/test_decisions.py: real images ingested, deduped,
cropped, captioned), made once per session and copied for each test or module that uses it:
the server and the person's decisions change it."""

import shutil
from pathlib import Path

import pytest

from tests.common.test_decisions import make_manifest


def copy_of(template: Path, where: Path) -> Path:
    """The manifest and the image folders beside it, under where (the paths in it are relative)."""
    root = template.parent.parent
    shutil.copytree(root, where, symlinks=True)
    return where / template.relative_to(root)


@pytest.fixture(scope="session")
def staged_manifest(tmp_path_factory) -> Path:
    """make_manifest(): do not change it, copy it (copy_of)."""
    return make_manifest(tmp_path_factory.mktemp("review-staged"))


@pytest.fixture(scope="session")
def ingested_manifest(tmp_path_factory) -> Path:
    """make_manifest(run_stages=False): do not change it, copy it (copy_of)."""
    return make_manifest(tmp_path_factory.mktemp("review-ingested"), run_stages=False)
