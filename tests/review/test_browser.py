"""curate review in real headless Chromium: a person drops, picks a keeper, drags a crop and
edits a caption; then dedupe, crop, caption and export run again and follow every decision."""

import json
import os
import time
from pathlib import Path

import pytest
from PIL import Image

from curate.common import decisions
from curate.dataset import caption, crop, dedupe, export

pytest.importorskip("starlette", reason="the review extra: pip install -e '.[review]'")
pytest.importorskip("uvicorn", reason="the review extra: pip install -e '.[review]'")
from curate.review.server import Background  # noqa: E402
from tests.common.test_decisions import HOSTILE, rows
from tests.report.test_html import chromium
from tests.review.conftest import copy_of


def wait(fn, timeout=20, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def open_card(browser, name):
    browser.execute_script(
        "const c = [...document.querySelectorAll('.card')].find(c => c.querySelector('.k').textContent === arguments[0]);"
        "c.scrollIntoView(); c.click();", name)
    wait(lambda: browser.find_element("id", "d-title").text == name, what=f"{name} opened")


def last(m, action):
    return wait(lambda: [r for r in decisions.current(m).log if r["action"] == action], what=action)[-1]


@pytest.fixture
def session(tmp_path, staged_manifest):
    m = copy_of(staged_manifest, tmp_path / "built")  # make_manifest(), made once per session
    browser = chromium(tmp_path / "profile")
    with Background([m]) as bg:
        try:
            browser.get(bg.review.url)
            wait(lambda: browser.execute_script("return document.body.dataset.ready") == "1", what="page ready")
            yield m, browser, bg
        finally:
            browser.quit()


def test_the_review_loop(session, tmp_path):
    m, browser, bg = session
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    r = rows(m)
    assert len(browser.find_elements("css selector", ".card")) == len(r)
    assert "6 rows in 1 manifest(s)" in browser.find_element("id", "counts").text

    # drop an image, with a reason
    open_card(browser, "c.png")
    browser.find_element("id", "d-reason").send_keys("off model")
    browser.find_element("id", "d-drop").click()
    assert last(m, "drop")["reason"] == "off model" and last(m, "drop")["key"] == r["c"]["key"]

    # choose another keeper in the duplicate cluster
    open_card(browser, "a_small.png")
    cluster = browser.find_element("id", "d-cluster")
    assert "KEEP a_big.png" in cluster.text
    assert f"kept for: {r['a_big']['keeper_reason']}" in cluster.text  # the manifest's reason, not a fixed label
    cluster.find_element("xpath", ".//div[div[text()='dup a_small.png']]/button[text()='Make keeper']").click()
    assert last(m, "keeper")["key"] == r["a_small"]["key"]
    wait(lambda: "KEEP a_small.png" in browser.find_element("id", "d-cluster").text, what="new keeper shown")

    # drag the crop box's left edge to the right, and its top edge down
    open_card(browser, "b_letterbox.png")
    img = browser.find_element("id", "d-img")
    wait(lambda: browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img), what="original")
    assert browser.find_element("id", "c-l").get_attribute("value") == "0"
    k = img.size["width"] / 480
    left = browser.find_element("css selector", "#d-box .l")
    ActionChains(browser).click_and_hold(left).move_by_offset(int(60 * k), 0).release().perform()
    box = last(m, "crop")["box"]
    assert 50 <= box[0] <= 70 and box[1:] == [40, 480, 360]
    top = browser.find_element("css selector", "#d-box .t")
    ActionChains(browser).click_and_hold(top).move_by_offset(0, int(30 * k)).release().perform()
    box = wait(lambda: (b := last(m, "crop")["box"])[1] > 40 and b, what="second drag")
    assert 60 <= box[1] <= 80
    size = f"{box[2] - box[0]}x{box[3] - box[1]}"
    wait(lambda: browser.find_element("id", "c-size").text == size, what="size shown")
    wait(lambda: browser.find_element("id", "c-bucket").text == bg.review.bucket(box[2] - box[0], box[3] - box[1]),
         what="live bucket")
    # typed numbers work too
    right = browser.find_element("id", "c-r")
    right.send_keys(Keys.CONTROL, "a")
    right.send_keys("460", Keys.TAB)
    box = wait(lambda: (b := last(m, "crop")["box"])[2] == 460 and b, what="typed box")

    # edit the caption: remove the first tag, add one from the vocabulary, save
    open_card(browser, "d_tall.png")
    chips = browser.find_elements("css selector", "#chips .chip")
    assert [c.find_element("tag name", "span").text for c in chips][:2] == ["1girl", "solo"]
    assert HOSTILE in browser.find_element("id", "chips").text  # a hostile tag shows as text
    chips[0].find_element("xpath", ".//button[@title='remove']").click()
    browser.find_element("id", "chip-add").send_keys("c_pattern")
    browser.find_element("id", "chip-add-go").click()
    edited = browser.find_element("id", "d-caption").get_attribute("value")
    assert edited.startswith("solo, ") and edited.endswith(", c pattern")
    browser.find_element("id", "cap-save").click()
    assert last(m, "caption")["text"] == edited

    # keyboard triage: next, keep
    browser.find_element("tag name", "body").send_keys("j")
    nxt = browser.find_element("id", "d-title").text
    browser.find_element("tag name", "body").send_keys("a")
    assert last(m, "seen")["key"] == rows(m)[Path(nxt).stem]["key"]

    # nothing hostile ran
    assert browser.title == "curate review"
    assert not browser.execute_script("return document.querySelectorAll('img[src=\"x\"]').length")
    assert browser.execute_script("return window.__errors") == []

    # the history shows every decision and reverses the last one
    browser.find_element("css selector", "nav button[data-view=history]").click()
    hist = browser.find_element("id", "history")
    assert len(hist.find_elements("css selector", "tr")) == len(decisions.current(m).log)
    hist.find_elements("xpath", ".//button[text()='Undo']")[0].click()
    seen = last(m, "seen")
    undo = wait(lambda: (u := decisions.current(m).log[-1])["action"] == "undo" and u, what="undo")
    assert undo["of"] == seen["id"] and undo["set"] == seen["prev"]

    shot = os.environ.get("CURATE_REVIEW_SCREENSHOT")
    if shot:  # the README's picture: `CURATE_REVIEW_SCREENSHOT=docs/review.png pytest tests/review/test_browser.py`
        browser.find_element("css selector", "nav button[data-view=images]").click()
        open_card(browser, "b_letterbox.png")
        browser.set_window_size(1400, 900)
        browser.execute_script("window.scrollTo(0, 0); document.getElementById('toast').style.display = 'none'")
        time.sleep(0.5)
        assert browser.save_screenshot(shot)

    # the stages run again and follow every decision
    dedupe.run(m, workers=1)
    crop.run(m, workers=1)
    caption.run(m)
    r = rows(m)
    assert r["a_small"]["dup_of"] is None and r["a_big"]["dup_of"] == r["a_small"]["key"]
    assert r["a_mid"]["dup_of"] == r["a_small"]["key"]
    assert r["b_letterbox"]["crop"] == box
    assert Image.open(m.parent / r["b_letterbox"]["path"]).size == (box[2] - box[0], box[3] - box[1])
    assert r["d_tall"]["caption"] == edited
    s = export.run([m], tmp_path / "kohya")
    metadata = json.loads((tmp_path / "kohya" / "metadata.json").read_text())
    exported = {Path(p).stem: v["caption"] for p, v in metadata.items()}
    safe = lambda k: k.replace("/", "_")  # noqa: E731
    assert safe(r["c"]["key"]) not in exported and s.skipped["dropped in review"] == 1
    assert safe(r["a_small"]["key"]) in exported and safe(r["a_big"]["key"]) not in exported
    assert exported[safe(r["d_tall"]["key"])] == edited
    assert (tmp_path / "kohya" / "cg" / "cg" / (safe(r["d_tall"]["key"]) + ".txt")).read_text() == edited


def test_many_at_once_filters_and_charts(session):
    m, browser, bg = session
    from selenium.webdriver.common.keys import Keys

    r = rows(m)
    cards = {c.find_element("css selector", ".k").text: c for c in browser.find_elements("css selector", ".card")}
    # select two with Ctrl-click and drop them together, with one reason
    for name in ("c.png", "d_tall.png"):
        from selenium.webdriver.common.action_chains import ActionChains
        ActionChains(browser).key_down(Keys.CONTROL).click(cards[name]).key_up(Keys.CONTROL).perform()
    assert browser.find_element("id", "selected").text == "2 selected"
    browser.find_element("id", "sel-reason").send_keys("not the style")
    browser.find_element("id", "sel-drop").click()
    wait(lambda: len(decisions.current(m).dropped) == 2, what="two drops")
    assert decisions.current(m).dropped == {r["c"]["key"]: "not the style", r["d_tall"]["key"]: "not the style"}
    # filters: dropped, not looked at, a tag
    def shown(**boxes):
        for box in ("f-error", "f-dups", "f-trimmed", "f-changed", "f-unseen", "f-dropped"):
            el = browser.find_element("id", box)
            if el.is_selected() != boxes.get(box, False):
                el.click()
        return int(browser.find_element("id", "shown").text.split()[0])
    assert shown(**{"f-dropped": True}) == 2
    assert shown(**{"f-unseen": True}) == 4
    assert shown(**{"f-dups": True}) == 3  # the cluster: keeper and its two duplicates
    assert shown(**{"f-trimmed": True}) == 1  # the letterboxed one, its box drawn on the card
    box = browser.find_element("css selector", ".card .cbox")
    k = min(150 / 480, 120 / 400)  # the 480x400 original, contained in the 150x120 thumbnail box
    assert box.size["width"] == pytest.approx(480 * k, abs=1) and box.size["height"] == pytest.approx(320 * k, abs=1)
    shown()
    # drop every image with a tag (the page asks first)
    browser.find_element("id", "tag-drop").send_keys("b pattern")
    browser.find_element("id", "tag-drop-go").click()
    alert = browser.switch_to.alert
    assert alert.text == "Drop 1 images tagged b pattern?"
    alert.accept()
    wait(lambda: r["b_letterbox"]["key"] in decisions.current(m).dropped, what="tag drop")
    assert decisions.current(m).dropped[r["b_letterbox"]["key"]] == "tag b pattern"
    # the tags and buckets view counts only what training will see: 6 rows - 3 dropped - 2 duplicates
    browser.find_element("css selector", "nav button[data-view=charts]").click()
    charts = browser.find_element("id", "charts")
    assert "Top tags (1 kept images" in charts.text and charts.find_elements("css selector", ".bar .fill")
    assert HOSTILE in charts.text and browser.title == "curate review"
    assert browser.execute_script("return window.__errors") == []
