"""curate report: built from manifests the real stages made, opened in headless Chromium.

The manifests come from the demo's generators run through the CLI: a generated corpus
served over HTTP by the Danbooru look-alike (build-reg + download), and a generated CG
folder (ingest, dedupe --against the reg set, crop, tag with the demo's tiny tagger,
caption). The fixture `manifests` is in tests/report/conftest.py (built once per session).
"""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from curate import manifest
from curate.report.html import build

CURATE = str(Path(sys.executable).with_name("curate"))
SECTIONS = ["summary", "contact-sheets", "duplicates", "crops", "tags", "overfit", "aesthetic", "aspect", "captions"]


def curate(*args, env=None, check=True):
    r = subprocess.run([CURATE, *map(str, args)], capture_output=True, text=True, env=env)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_report_content(manifests, tmp_path):
    cg, reg = manifests
    out = tmp_path / "review" / "report.html"
    out.parent.mkdir()
    s = build([cg, reg], out, workers=1)
    page = out.read_text()
    assert s.sections == SECTIONS and all(f'id="{sid}"' in page for sid in SECTIONS)
    assert s.thumbs_made > 0 and s.thumbs_failed == 0
    rows = manifest.read(cg)[0].to_pylist()
    reg_rows = manifest.read(reg)[0].to_pylist()
    # every usable row has a lazy thumbnail on its contact sheet; every file the page names exists
    usable = [r for r in rows + reg_rows if not r["error"] and not r["dup_of"] and r["path"]]
    sheet = page.split('id="contact-sheets"')[1].split('id="duplicates"')[0]
    assert sheet.count('loading="lazy"') == len(usable) > 20
    for src in re.findall(r'src="([^"]+)"', page):
        assert (out.parent / src).is_file(), src
    # the broken file is a failure by reason; duplicates and crops show up
    assert "ingest: decode" in page and page.count('class="keeper"') == len({r["dup_of"] for r in rows if r["dup_of"]})
    trimmed = [r for r in rows if r["crop"] is not None and r["crop"] != [0, 0, r["width"], r["height"]]]
    assert page.count('class="box"') == len(trimmed) >= 3  # the bordered screenshots
    # a letterboxed screenshot of a CG is a duplicate of the clean CG (same content, no bars)
    letterboxed = [r for r in rows if r["source_path"].endswith("_letterbox.png")]
    assert letterboxed and all(r["dup_of"] and r["keeper_reason"] == "no bars" for r in letterboxed)
    # each cluster says what decided its keeper
    assert page.count('class="why"') == page.count('class="keeper"')
    assert "kept for: no bars" in page and "kept for: other manifest" in page
    # the repost of a reg image: its keeper lives in the reg manifest, shown beside it
    assert any(r["dup_of"] and r["dup_of"].startswith("danbooru/") for r in rows)
    # a second run reuses every thumbnail
    again = build([cg, reg], out, workers=1)
    assert again.thumbs_made == 0 and again.thumbs_reused == s.thumbs_made


def test_thousands_of_rows(manifests, tmp_path):
    """2000 rows (many pointing at the same files): all listed, thumbnails lazy, made once per file."""
    _, reg = manifests
    table, meta = manifest.read(reg)
    base = table.to_pylist()
    rows = []
    for i in range(2000):
        r = dict(base[i % len(base)])
        r["key"] = f"danbooru/{10_000_000 + i}"
        r["path"] = str((reg.parent / r["path"]).resolve())
        r["subset"] = ["horizontal", "vertical", "extra"][i % 3]
        rows.append(r)
    big = manifest.write(pa.Table.from_pylist(rows, schema=table.schema), tmp_path / "big.parquet", meta)
    s = build([big], tmp_path / "big.html", workers=1)
    page = (tmp_path / "big.html").read_text()
    assert s.rows == 2000 and s.thumbs_made == len({r["path"] for r in rows})
    sheet = page.split('id="contact-sheets"')[1].split('id="duplicates"')[0]
    assert sheet.count('loading="lazy"') == 2000
    assert all(f"{name}: {n} usable images</h3>" in sheet for name, n in (("horizontal", 667), ("vertical", 667), ("extra", 666)))


def test_unreadable_image_is_a_placeholder(manifests, tmp_path):
    """A file that went bad after its stage ran: the page says so instead of a broken image."""
    _, reg = manifests
    table, meta = manifest.read(reg)
    rows = table.to_pylist()[:2]
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    rows[0]["path"] = str(bad)
    rows[1]["path"] = str((reg.parent / rows[1]["path"]).resolve())
    m = manifest.write(pa.Table.from_pylist(rows, schema=table.schema), tmp_path / "m.parquet", meta)
    s = build([m], tmp_path / "r.html", workers=1)
    page = (tmp_path / "r.html").read_text()
    assert s.thumbs_failed == 1 and s.thumbs_made == 1
    assert "(no image)" in page
    for src in re.findall(r'src="([^"]+)"', page):
        assert (tmp_path / src).is_file(), src


def test_bad_input(tmp_path, manifests):
    r = curate("report", tmp_path / "missing.parquet", "--out", tmp_path / "r.html", check=False)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: manifest not found") and "Traceback" not in r.stderr
    r = curate("report", manifests[0], "--out", tmp_path / "r.txt", check=False)
    assert r.returncode == 2 and "--out must be an .html file" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "afile").write_text("a file where a folder should be")
    r = curate("report", manifests[0], "--out", tmp_path / "afile" / "r.html", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("error: cannot write the report's thumbnail folder")


# --- in a real browser ---------------------------------------------------------------------


def chromium(profile: Path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the test extra: pip install -e '.[test]'")
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("chromium and chromedriver not installed (Debian: apt-get install chromium chromium-driver; .ci/run does it)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                f"--user-data-dir={profile}", "--window-size=1400,1000"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_report_in_chromium(manifests, tmp_path):
    cg, reg = manifests
    out = tmp_path / "report.html"
    build([cg, reg], out, workers=1)
    browser = chromium(tmp_path / "profile")
    try:
        browser.get(out.as_uri())
        assert browser.title.startswith("curate report")
        for sid in SECTIONS:  # every section is there, titled, and filled (no scores here: tests/report/test_judgement.py)
            section = browser.find_element("id", sid)
            assert section.find_element("tag name", "h2").text
            assert sid in ("overfit", "aesthetic") or not section.find_elements("css selector", ".empty"), sid
        for sid in ("contact-sheets", "duplicates", "crops", "captions"):
            assert browser.find_element("id", sid).find_elements("tag name", "img"), sid
        for sid in ("tags", "aspect"):
            fills = browser.find_element("id", sid).find_elements("css selector", ".bar .fill")
            assert fills and all(f.size["width"] > 0 for f in fills), sid
        # lazy images load as they scroll into view
        images = browser.find_elements("tag name", "img")
        for img in images:
            browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", img)
        deadline = time.monotonic() + 30
        loaded = "return Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length"
        while browser.execute_script(loaded) < len(images) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert browser.execute_script(loaded) == len(images)
        # crop boxes sit inside their images
        box = browser.find_element("css selector", "#crops .box")
        img = box.find_element("xpath", "preceding-sibling::img")
        assert 0 < box.size["width"] <= img.size["width"] and 0 < box.size["height"] <= img.size["height"]
        browser.execute_script("window.scrollTo(0, 0)")
        height = browser.execute_script("return document.body.scrollHeight")
        browser.set_window_size(1400, min(height + 100, 6000))
        shot = Path(os.environ.get("CURATE_REPORT_SCREENSHOT") or tmp_path / "report.png")
        shot.parent.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        print(f"screenshot: {shot}")
    finally:
        browser.quit()


def test_report_leaves_other_files_in_its_thumbnail_folder(manifests, tmp_path):
    cg, reg = manifests
    out = tmp_path / "page.html"
    build([cg], out, workers=1)
    folder = tmp_path / "page_files"
    assert folder.is_dir()
    (folder / "saved_by_a_browser.jpg").write_bytes(b"not ours")
    build([reg], out, workers=1)  # other rows: the cg thumbnails go, the stranger stays
    assert (folder / "saved_by_a_browser.jpg").read_bytes() == b"not ours"


def test_killed_thumbnail_worker_keeps_finished_thumbnails(tmp_path, monkeypatch):
    from PIL import Image

    from curate import pool
    from curate.report.html import Summary, Thumbs

    srcs = []
    for i in range(24):
        p = tmp_path / f"img{i:02d}.png"
        Image.new("RGB", (64, 48), (i * 10, 100, 200 - i * 5)).save(p)
        srcs.append(p)
    folder = tmp_path / "thumbs"
    thumbs = Thumbs(folder, workers=2)
    for p in srcs:
        thumbs.want(p)
    monkeypatch.setenv(pool.KILL_ENV, "20")
    with pytest.raises(pool.PoolStopped, match="^thumbnails: a worker process was killed"):
        thumbs.make(Summary(out=tmp_path / "r.html"))
    made = len(list(folder.glob("*.jpg")))
    assert 0 < made < 24
    monkeypatch.delenv(pool.KILL_ENV)
    again = Thumbs(folder, workers=2)
    for p in srcs:
        again.want(p)
    s = Summary(out=tmp_path / "r.html")
    again.make(s)
    assert s.thumbs_reused == made and s.thumbs_made == 24 - made
