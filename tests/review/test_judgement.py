"""The review app's judgement (issue 27): scores, sharpness and how a copy matched in the
state, and in real headless Chromium a sort and a threshold by score, the facts in the
detail panel, the tags that will overfit beside the charts."""

import pytest
import requests

from curate import manifest

pytest.importorskip("starlette", reason="the review extra: pip install -e '.[review]'")
pytest.importorskip("uvicorn", reason="the review extra: pip install -e '.[review]'")
from curate.review.server import Background  # noqa: E402
from tests.review.conftest import copy_of  # noqa: E402
from tests.review.test_browser import wait  # noqa: E402


@pytest.fixture(scope="module")
def m(tmp_path_factory, staged_manifest):
    """The review test manifest, with scores (a stand-in column: the score stage has its own
    test) and a reg manifest of plain 1girl/solo posts, so the other tags are over-represented."""
    root = tmp_path_factory.mktemp("judge-review")
    m = copy_of(staged_manifest, root / "built")  # make_manifest(), made once per session
    table, meta = manifest.read(m)
    n = table.num_rows
    table = manifest.with_column(table, "aesthetic", [float(k) / 2 for k in range(n)])
    manifest.write(table, m, meta)
    reg = m.parent / "reg.parquet"
    import pyarrow as pa

    rt = pa.table({"key": [f"danbooru/{k}" for k in range(40)], "subset": ["reg"] * 40,
                   "tags_general": [["1girl", "solo"]] * 40})
    manifest.write(manifest.conform(rt), reg, manifest.new_provenance(kind="reg"))
    return m, reg


def test_state_carries_the_judgement(m):
    cg, reg = m
    with Background([cg, reg]) as bg:
        data = requests.get(bg.review.url.replace("/?", "/api/state?"), timeout=30).json()
    j = data["judgement"][0]
    table = manifest.read(cg)[0]
    assert j["aesthetic"] == table.column("aesthetic").to_pylist()
    assert j["sharpness"] == table.column("sharpness").to_pylist() and any(v for v in j["sharpness"])
    assert j["dup_reason"] == table.column("dup_reason").to_pylist()
    flagged = {d["tag"] for d in data["overfit"][0]}
    assert flagged and not flagged & {"1girl", "solo"} and data["overfit"][1] == []  # on every reg post too


def test_sort_and_threshold_by_score_in_the_browser(m, tmp_path):
    from tests.report.test_html import chromium

    cg, reg = m
    browser = chromium(tmp_path / "profile")
    with Background([cg, reg]) as bg:
        try:
            browser.get(bg.review.url)
            wait(lambda: browser.execute_script("return document.body.dataset.ready") == "1", what="page ready")
            wait(lambda: browser.execute_script("return document.body.dataset.judged") == "1", what="judgement")
            browser.execute_script("const s = document.getElementById('f-sort'); s.value = 'aesthetic';"
                                   "s.dispatchEvent(new Event('change'));")
            scores = {r["key"]: r["aesthetic"] for r in manifest.read(cg)[0].to_pylist()}
            keys = browser.execute_script("return S.filtered.map(r => r.key)")
            cg_keys = [k for k in keys if k in scores]
            assert cg_keys == sorted(cg_keys, key=lambda k: -scores[k])  # best first, reg rows (no score) last
            browser.execute_script("const i = document.getElementById('f-min-aesthetic'); i.value = '1.5';"
                                   "i.dispatchEvent(new Event('change'));")
            keys = browser.execute_script("return S.filtered.map(r => r.key)")
            assert keys and all(scores.get(k, -1) >= 1.5 for k in keys)
            assert len(browser.find_elements("css selector", ".card")) == len(keys)
            browser.execute_script("openDetail(0)")
            assert "aesthetic" in wait(lambda: browser.find_element("css selector", "#d-meta .judge").text)
            browser.execute_script("show('charts')")
            assert "Tags that will overfit" in wait(lambda: browser.find_element("id", "charts").text)
            assert browser.execute_script("return window.__errors") == []
        finally:
            browser.quit()
