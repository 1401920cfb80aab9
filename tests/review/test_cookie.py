"""Issue 26.5: no host-wide cookie grants access to curate review. Cookies are scoped to the
host, not the port, so a token cookie for 127.0.0.1 reached every local service, and two
review servers in one browser overwrote each other's. The page keeps the token itself and
sends it (header for the API, query for images). Both cases in real headless Chromium.

Public reference: RFC 6265 section 8.5 "Weak Confidentiality" ("Cookies do not provide
isolation by port ... servers SHOULD NOT ... use cookies to store security sensitive
information"), the case Q&A threads on "Are HTTP cookies port specific?" report in practice."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("starlette", reason="the review extra: pip install -e '.[review]'")
pytest.importorskip("uvicorn", reason="the review extra: pip install -e '.[review]'")
from curate.common import decisions  # noqa: E402
from curate.review.server import Background  # noqa: E402
from tests.common.test_decisions_disk import tiny_manifest  # noqa: E402
from tests.report.test_html import chromium  # noqa: E402
from tests.review.test_browser import wait  # noqa: E402


class Recorder(BaseHTTPRequestHandler):
    seen: list = []

    def do_GET(self):  # noqa: N802
        Recorder.seen.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
        body = b"<html><body>another local service</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def images_loaded(browser) -> bool:
    return browser.execute_script(
        "const im = [...document.querySelectorAll('.card img')];"
        "return im.length > 0 && im.every(i => i.complete && i.naturalWidth > 0);")


def ready(browser) -> bool:
    return browser.execute_script("return document.body.dataset.ready") == "1"


@pytest.fixture
def browser(tmp_path):
    b = chromium(tmp_path / "profile")
    try:
        yield b
    finally:
        b.quit()


def test_another_port_on_the_same_host_never_receives_the_token(browser, tmp_path):
    m = tiny_manifest(tmp_path)
    other = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    Recorder.seen = []
    try:
        with Background([m]) as bg:
            browser.get(bg.review.url)
            wait(lambda: ready(browser), what="page ready")
            wait(lambda: images_loaded(browser), what="thumbnails")
            assert browser.get_cookies() == []
            browser.get(f"http://127.0.0.1:{other.server_address[1]}/anything")
            wait(lambda: Recorder.seen, what="the other service's request")
            token = bg.review.token
            assert all(token not in str(req) for req in Recorder.seen), Recorder.seen
            assert all("cookie" not in req for req in Recorder.seen), Recorder.seen
    finally:
        other.shutdown()


def test_two_review_servers_in_one_browser_both_keep_working(browser, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ma, mb = tiny_manifest(tmp_path / "a"), tiny_manifest(tmp_path / "b", sizes=((50, 30),))
    with Background([ma]) as a, Background([mb]) as b:
        browser.get(a.review.url)
        wait(lambda: ready(browser), what="first page ready")
        first = browser.current_window_handle
        browser.switch_to.new_window("tab")
        browser.get(b.review.url)
        wait(lambda: ready(browser), what="second page ready")
        wait(lambda: images_loaded(browser), what="second tab's thumbnails")
        browser.switch_to.window(first)
        # the first tab loads images again (fresh ones, not the cache) and still decides
        browser.execute_script("document.querySelectorAll('.card img').forEach(i => i.src = i.src + '&again=1')")
        time.sleep(0.2)
        wait(lambda: images_loaded(browser), what="first tab's thumbnails after the second server opened")
        browser.execute_script(
            "const c = [...document.querySelectorAll('.card')].find(c => c.querySelector('.k').textContent === 'i1.png');"
            "c.click();")
        wait(lambda: browser.find_element("id", "d-title").text == "i1.png", what="card opened")
        browser.find_element("id", "d-drop").click()
        wait(lambda: decisions.current(ma).dropped == {"k1": ""}, what="the first server's decision")
        assert decisions.current(mb).dropped == {}
