"""curate review speed: a 10,000-row manifest opens fast, a decision is on disk at once.

Figures, measured in one run on the same generated manifest (rows with 20-40 tags each
from a 5,000-tag vocabulary, images cycling over a few real files):
  - open: time to the first page rendered with data in headless Chromium (navigation
    start to the grid built from /api/state: performance.now() when the page says so);
    target < 2 s. Baseline: `curate report` building its page for the same manifest
    (thumbnails made beforehand, so both skip image work).
  - decide: a drop clicked in the page until the answer comes back, by then fsync'd in
    the sidecar (median and worst of 30); target < 100 ms. Baseline: rewriting the
    manifest, what storing the decision in the Parquet file itself would cost.

    python benchmarks/bench_review.py [--rows 10000]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from curate import manifest
from curate.common import decisions
from curate.report import html as report
from curate.review.server import Background


def make_manifest(folder: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    files = []
    for i in range(12):
        p = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((640, 480)).save(p)
        files.append(p.name)
    vocab = [f"tag_{i}" for i in range(5000)]
    rows = {"key": [f"danbooru/{i}" for i in range(n)],
            "subset": [["horizontal", "vertical"][i % 2] for i in range(n)],
            "width": [640] * n, "height": [480] * n,
            "path": [files[i % len(files)] for i in range(n)],
            "tags_general": [[vocab[j] for j in rng.choice(5000, rng.integers(20, 40), replace=False)] for _ in range(n)],
            "caption": [f"1girl, solo, tag {i % 5000}" for i in range(n)],
            "crop": [[0, 0, 640, 480]] * n,
            "dup_of": [f"danbooru/{i - 1}" if i % 50 == 1 else None for i in range(n)]}
    return manifest.write(pa.table(rows), folder / "big.parquet", {"kind": "reg"})


def chromium(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                f"--user-data-dir={profile}", "--window-size=1400,1000"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_review_"))
    try:
        m = make_manifest(tmp, args.rows)
        report.build([m], tmp / "warm.html", workers=1)  # thumbnails made once, shared by nothing else
        t = time.perf_counter()
        report.build([m], tmp / "report.html", workers=1)
        report_s = time.perf_counter() - t

        browser = chromium(tmp / "profile")
        try:
            with Background([m]) as bg:
                opens = []
                for _ in range(3):
                    browser.get(bg.review.url)
                    deadline = time.monotonic() + 60
                    while browser.execute_script("return window.__firstRender") is None:
                        if time.monotonic() > deadline:
                            sys.exit("the page never rendered")
                        time.sleep(0.02)
                    opens.append(browser.execute_script("return window.__firstRender") / 1000)
                    cards = browser.execute_script("return document.querySelectorAll('.card').length")
                times = []
                for i in range(30):
                    key = f"danbooru/{i * 7}"
                    ms = browser.execute_async_script("""
                        const done = arguments[arguments.length - 1], t = performance.now();
                        fetch('/api/decide', {method: 'POST', headers: {'X-Curate-Token': new URLSearchParams(location.search).get('token'),
                              'Content-Type': 'application/json'}, body: JSON.stringify({m: 0, lines: [{key: arguments[0], action: 'drop'}]})})
                          .then(r => r.json()).then(() => done(performance.now() - t));""", key)
                    assert key in decisions.current(m).dropped  # on disk when the answer came
                    times.append(ms)
        finally:
            browser.quit()
        table, meta = manifest.read(m)
        t = time.perf_counter()
        for _ in range(5):
            manifest.write(table, m, meta)
        rewrite_ms = (time.perf_counter() - t) / 5 * 1000

        open_s = statistics.median(opens)
        print(f"rows: {args.rows}; cards in the first render: {cards}")
        print(f"open (first page with data, Chromium): median {open_s:.2f} s of {len(opens)} "
              f"(runs {', '.join(f'{x:.2f}' for x in opens)}); target < 2 s: {'ok' if open_s < 2 else 'MISSED'}")
        print(f"  baseline curate report build, same manifest: {report_s:.2f} s  "
              f"(report / review open = {report_s / open_s:.1f})")
        print(f"decide (click to fsync'd on disk): median {statistics.median(times):.1f} ms, worst {max(times):.1f} ms "
              f"of {len(times)}; target < 100 ms: {'ok' if max(times) < 100 else 'MISSED'}")
        print(f"  baseline rewriting the manifest once: {rewrite_ms:.1f} ms  "
              f"({rewrite_ms / statistics.median(times):.1f}x the decision)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
