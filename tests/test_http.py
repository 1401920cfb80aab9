"""curate.http against a real HTTP server on 127.0.0.1; rate limiter with a fake clock."""

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from curate import __version__, http


class Server:
    """Serves /ok, /status/<a>,<b>,...: one status per request, then 200; /slow stalls."""

    def __init__(self):
        self.hits, self.agents = {}, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                n = server.hits[self.path] = server.hits.get(self.path, 0) + 1
                server.agents.append(self.headers.get("User-Agent"))
                status = 200
                if self.path.startswith("/status/"):
                    seq = [int(s) for s in self.path.rsplit("/", 1)[1].split(",")]
                    status = seq[n - 1] if n <= len(seq) else 200
                if self.path == "/slow":
                    time.sleep(1.0)
                body = b"ok" if status == 200 else b"no"
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                if status in (429, 503):
                    self.send_header("Retry-After", "0")
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def test_danbooru_hosts_default_to_2_per_second_others_unlimited():
    assert http.limiter("danbooru.donmai.us").rate == 2
    assert http.limiter("cdn.donmai.us").rate == 2
    assert http.limiter("donmai.us").rate == 2
    assert http.limiter("notdonmai.us").rate is None
    assert http.limiter("example.org").rate is None
    assert http.limiter("cdn.donmai.us") is http.limiter("CDN.donmai.us")  # one per host


def test_set_rate_exact_host_beats_pattern_and_updates_existing_limiters():
    lim = http.limiter("a.test-curate.example")
    assert lim.rate is None
    try:
        http.set_rate("*.test-curate.example", 5)
        assert lim.rate == 5 and http.limiter("b.test-curate.example").rate == 5
        http.set_rate("a.test-curate.example", 1)
        assert lim.rate == 1 and http.limiter("b.test-curate.example").rate == 5
    finally:
        http.set_rate("*.test-curate.example", None)
        http.set_rate("a.test-curate.example", None)
    assert lim.rate is None
    with pytest.raises(ValueError):
        http.set_rate("x.example", 0)


def test_rate_limiter_spaces_slots_evenly():
    now, sleeps = [100.0], []
    lim = http.RateLimiter(2, clock=lambda: now[0], sleep=sleeps.append)
    for _ in range(3):
        lim.wait()
    assert sleeps == [0.5, 1.0]  # first slot immediate, then 1/rate apart
    now[0] += 10  # idle for a while: no debt, no burst credit
    lim.wait()
    lim.wait()
    assert sleeps == [0.5, 1.0, 0.5] and lim.count == 5


def test_rate_limiter_shared_by_threads_hands_out_distinct_slots():
    booked, lock = [], threading.Lock()
    lim = http.RateLimiter(10, clock=lambda: 0.0, sleep=lambda s: (lock.acquire(), booked.append(s), lock.release()))
    threads = [threading.Thread(target=lambda: [lim.wait() for _ in range(5)]) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(round(s, 6) for s in booked) == [round(0.1 * i, 6) for i in range(1, 40)]


def test_unlimited_limiter_never_sleeps():
    lim = http.RateLimiter(None, sleep=lambda s: pytest.fail("slept"))
    for _ in range(100):
        lim.wait()
    assert lim.count == 100


def test_session_sends_curate_user_agent(server, monkeypatch):
    http.session().get(server.url + "/ok")
    assert server.agents[-1] == f"curate/{__version__}"
    http.session(user_agent="mybot/1.0 (me@example.org)").get(server.url + "/ok")
    assert server.agents[-1] == "mybot/1.0 (me@example.org)"
    monkeypatch.setenv("CURATE_USER_AGENT", "envbot/2")
    http.session().get(server.url + "/ok")
    assert server.agents[-1] == "envbot/2"


def test_session_retries_5xx_and_429_then_succeeds(server):
    lim = http.limiter("127.0.0.1")
    before = lim.count
    r = http.session(retries=3, backoff=0.01).get(server.url + "/status/503,429,500")
    assert r.status_code == 200 and r.text == "ok"
    assert server.hits["/status/503,429,500"] == 4
    assert lim.count - before == 4  # every try, retries included, went through the host's limiter


def test_session_does_not_retry_404_and_returns_last_5xx(server):
    s = http.session(retries=2, backoff=0.01)
    assert s.get(server.url + "/status/404").status_code == 404
    assert server.hits["/status/404"] == 1
    assert s.get(server.url + "/status/500,500,500,500").status_code == 500
    assert server.hits["/status/500,500,500,500"] == 3  # 1 + 2 retries


def test_session_applies_default_timeout(server):
    s = http.session(retries=0, timeout=(2, 0.2))
    with pytest.raises(requests.exceptions.ConnectionError, match="timed out"):
        s.get(server.url + "/slow")
