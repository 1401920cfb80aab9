"""The report's judgement sections (issue 27) on the full pipeline's manifests, scored with a
tiny model: per-copy facts under duplicates, the aesthetic histogram, tags that will overfit."""

import re

import pytest

from curate import manifest
from curate.common import overfit
from curate.report.html import build
from tests.report.conftest import invoke


@pytest.fixture
def scored(copy_manifests, tmp_path):
    """The shared manifests (tests/report/conftest.py: every stage run), copied, the cg one scored."""
    pytest.importorskip("transformers")
    from tests.dataset.test_score import make_model

    cg, reg = copy_manifests
    model = tmp_path / "scorer"
    model.mkdir()
    make_model(model)
    invoke("score", cg, "--model", model)
    return cg, reg


def test_report_shows_scores_sharpness_and_overfit_tags(scored, tmp_path):
    cg, reg = scored
    out = tmp_path / "report.html"
    build([cg, reg], out, workers=1)
    page = out.read_text()
    section = lambda sid: page.split(f'id="{sid}"')[1].split("</section>")[0]  # noqa: E731
    rows = manifest.read(cg)[0].to_pylist()
    kept = [r for r in rows if r["aesthetic"] is not None and not r["error"] and not r["dup_of"]]
    hist = section("aesthetic")
    assert "scored, median" in hist and len(kept) > 5
    assert sum(int(n) for n in re.findall(r'<span class="n">(\d+) \(', hist)) == len(kept)
    dups = section("duplicates")
    assert dups.count("sharpness ") >= dups.count('class="keeper"') > 0  # every keeper shows its facts
    assert "near copy" in dups or "exact copy" in dups
    info = overfit.report(cg, reg=reg)
    tags = section("overfit")
    assert info["base"] and ("no tag is over-represented" in tags if not info["flagged"]
                             else all(d["tag"] in tags for d in info["flagged"][:5]))
