"""The report's judgement sections (issue 27) on the full pipeline's manifests, scored with a
tiny model: per-copy facts under duplicates, the aesthetic histogram, tags that will overfit."""

import re
import subprocess
import sys

import pytest

from curate import manifest
from curate.common import overfit
from curate.report.html import build
from tests.report.test_html import manifests  # noqa: F401  (the fixture: every stage run)


@pytest.fixture(scope="module")
def scored(manifests, tmp_path_factory):  # noqa: F811
    pytest.importorskip("transformers")
    from tests.dataset.test_score import make_model

    cg, reg = manifests
    model = tmp_path_factory.mktemp("scorer")
    make_model(model)
    r = subprocess.run([sys.executable, "-m", "curate", "score", cg, "--model", model], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
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
