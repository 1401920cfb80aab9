"""Issue 26.2 and 21.6: a server that lies or stalls, and a host that cannot be reached.
Real sockets on 127.0.0.1: each case ends in one clean line naming the host, never a
traceback, a hang or memory out of bounds."""

from __future__ import annotations

import functools
import gzip
import socket
import threading
import time

import pytest
import requests

from curate import http


class Liar:
    """A raw TCP server: `handler(conn)` writes whatever bytes it likes."""

    def __init__(self, handler):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.handler, self.stopped = handler, threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn):
        try:
            conn.recv(65536)
            self.handler(conn, self.stopped)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.stopped.set()
        self.sock.close()


@pytest.fixture
def liar():
    made = []

    def make(handler):
        made.append(Liar(handler))
        return made[-1]

    yield make
    for s in made:
        s.close()


@functools.cache
def _bomb() -> bytes:
    return gzip.compress(b"\0" * (80 << 20), compresslevel=9)  # compressed once per process


def gzip_bomb(conn, stopped):
    """~80 KB on the wire, 80 MB decompressed: over the default 64 MiB cap."""
    body = _bomb()
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)


def endless(conn, stopped):
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (1 << 16, b"[" * (1 << 16))
    while not stopped.is_set():
        conn.sendall(chunk)


def drip_body(conn, stopped):
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n")
    while not stopped.is_set():
        conn.sendall(b" ")
        time.sleep(0.2)


def drip_headers(conn, stopped):
    for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10000:
        if stopped.is_set():
            return
        conn.sendall(bytes([byte]))
        time.sleep(0.2)


def test_a_gzip_bomb_is_refused_at_the_decompressed_cap(liar):
    srv = liar(gzip_bomb)
    with pytest.raises(http.ResponseRefused, match=r"^127\.0\.0\.1: response over the 64 MiB cap \(decompressed\)$"):
        http.session(retries=0).get(srv.url + "/posts.json")


def test_an_endless_body_is_refused_at_the_cap(liar):
    srv = liar(endless)
    with pytest.raises(http.ResponseRefused, match="over the 2 MiB cap"):
        http.session(retries=0, max_bytes=2 << 20).get(srv.url + "/posts.json")


# Public report: postmanlabs/httpbin #642 (requests with timeout=3 never times out against a
# server that throttles to a byte at a time: requests' timeout is per read, not per response).
@pytest.mark.parametrize("handler", [drip_body, drip_headers])
def test_a_server_dripping_a_byte_at_a_time_meets_the_deadline(liar, handler):
    """Each byte comes well inside the read timeout: only a total deadline ends it."""
    srv = liar(handler)
    s = http.session(retries=2, backoff=0.01, timeout=(2, 1.0), deadline=1.5)
    started = time.monotonic()
    with pytest.raises(http.ResponseRefused, match=r"^127\.0\.0\.1: no complete response within 1\.5 s"):
        s.get(srv.url + "/posts.json")
    assert time.monotonic() - started < 30  # ended, not hung (a bound, not a timing claim)


def test_a_streamed_index_is_bounded_by_read_body(liar):
    srv = liar(endless)
    r = http.session(retries=0).get(srv.url + "/data-0001.json", stream=True)
    with pytest.raises(http.ResponseRefused, match="over the 1 MiB cap"):
        http.read_body(r, max_bytes=1 << 20)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Public reports: mikf/gallery-dl #1520 ("Need proper timeout for connection issues": minutes of
# silent retries before one error) and #8238 (danbooru: ConnectTimeoutError retried 5 times).
def test_connection_refused_ends_after_a_short_bounded_retry(monkeypatch):
    monkeypatch.setattr(http, "CONNECT_WAITS", (0.05, 0.05))
    tries = []
    real = http.limiter("127.0.0.1").wait
    monkeypatch.setattr(http.limiter("127.0.0.1"), "wait", lambda: (tries.append(1), real()))
    with pytest.raises(http.HostUnreachable, match=r"^cannot reach 127\.0\.0\.1: connection refused \(3 tries"):
        http.session(retries=5).get(f"http://127.0.0.1:{free_port()}/posts.json")
    assert len(tries) == 3  # not urllib3's retries on top


def test_an_unresolvable_name_ends_with_one_line(monkeypatch):
    monkeypatch.setattr(http, "CONNECT_WAITS", (0.05, 0.05))
    with pytest.raises(http.HostUnreachable, match=r"cannot reach no-such-host\.invalid: (name does not resolve|cannot connect)"):
        http.session(retries=5).get("http://no-such-host.invalid/posts.json")


def test_a_tls_failure_ends_with_one_line(liar, monkeypatch):
    """https to a server that does not speak TLS."""
    monkeypatch.setattr(http, "CONNECT_WAITS", (0.05, 0.05))
    srv = liar(lambda conn, stopped: conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"))
    with pytest.raises(http.HostUnreachable, match=r"cannot reach 127\.0\.0\.1: TLS failed"):
        http.session(retries=2).get(f"https://127.0.0.1:{srv.port}/posts.json")


def test_a_host_silent_past_the_window_ends_callers_retries(liar, monkeypatch):
    """Read timeouts are the callers' to retry, but not forever: the session gives up on a
    host with no complete response for TROUBLE_WINDOW seconds."""
    monkeypatch.setattr(http, "TROUBLE_WINDOW", 0.5)
    srv = liar(lambda conn, stopped: stopped.wait(30))  # accepts, never answers
    s = http.session(retries=0, timeout=(2, 0.3))
    with pytest.raises(requests.exceptions.ConnectionError):
        s.get(srv.url + "/posts.json")
    time.sleep(0.3)
    with pytest.raises(http.HostUnreachable, match=r"^127\.0\.0\.1: no complete response for \d+ s"):
        s.get(srv.url + "/posts.json")


def test_429_and_5xx_keep_the_patient_policy(liar):
    hits = []

    def flaky(conn, stopped):
        hits.append(1)
        status = b"503 Service Unavailable" if len(hits) < 3 else b"200 OK"
        conn.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n[]")

    srv = liar(flaky)
    assert http.session(retries=3, backoff=0.01).get(srv.url + "/x").json() == []
    assert len(hits) == 3


# --- through the CLI: one line, exit 2, within the bounds ----------------------------
# (the command's entry point in this process: what it prints and its exit status)


@pytest.fixture
def own_rates(monkeypatch):
    """The in-process `curate fetch` sets 127.0.0.1's rate (the danbooru source's --rate):
    this test's own rule table and limiters, the process's back afterwards."""
    monkeypatch.setattr(http, "_rules", dict(http._rules))
    monkeypatch.setattr(http, "_limiters", {})


def _fetch(tmp_path, url, monkeypatch):
    """`curate fetch` through the CLI's entry point, in this process (tests/inproc.py)."""
    from tests.inproc import run_curate

    q = tmp_path / "q.toml"
    q.write_text('tags = ["1girl"]\n')
    monkeypatch.setenv("CURATE_DANBOORU_URL", url)
    return run_curate("fetch", q, "--source", "danbooru", "--no-images", "--out", tmp_path / "m.parquet")


def test_fetch_from_a_refused_port_is_one_line_naming_the_host(tmp_path, monkeypatch, own_rates):
    monkeypatch.setattr(http, "CONNECT_WAITS", (0.05, 0.05))  # the tries, not the ~8 s between them
    r = _fetch(tmp_path, f"http://127.0.0.1:{free_port()}", monkeypatch)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: cannot reach 127.0.0.1: connection refused")


def test_fetch_from_a_gzip_bomb_is_one_line_naming_the_host(tmp_path, liar, monkeypatch, own_rates):
    srv = liar(gzip_bomb)
    r = _fetch(tmp_path, srv.url, monkeypatch)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "error: 127.0.0.1: response over the 64 MiB cap (decompressed)"


def test_a_download_from_an_unreachable_cdn_ends_the_run_and_keeps_finished_rows(tmp_path, monkeypatch):
    """gallery-dl #8238 / #1520: each file retried against a host that never answers, for
    minutes, before anything names it. curate: three tries, one line, finished rows kept."""
    from curate.images.download import download_manifest
    from tests.images.test_download import (
        FAST,
        IMG,
        Server,
        post,
        rows_by_key,
        write_manifest,
    )

    monkeypatch.setattr(http, "CONNECT_WAITS", (0.05, 0.05))
    srv = Server()
    try:
        good = srv.add("/a.jpg", IMG["jpg"])
        dead = f"http://127.0.0.1:{free_port()}/b.jpg"
        m = write_manifest(tmp_path / "m.parquet", [post(1, IMG["jpg"], good), post(2, IMG["png"], dead)])
        with pytest.raises(http.HostUnreachable, match=r"^cannot reach 127\.0\.0\.1: connection refused"):
            download_manifest(m, tmp_path / "img", **{**FAST, "workers": 1})
        rows = rows_by_key(m)
        assert rows["danbooru/1"]["path"] and rows["danbooru/2"]["path"] is None
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()


def test_a_retry_after_wait_longer_than_the_deadline_is_no_stall(liar):
    """429/5xx keep the patient policy: the deadline counts each try, not the wait between."""
    hits = []

    def busy_then_ok(conn, stopped):
        hits.append(1)
        if len(hits) == 1:
            conn.sendall(b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 2\r\nContent-Length: 0\r\n"
                         b"Connection: close\r\n\r\n")
        else:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n[]")

    srv = liar(busy_then_ok)
    assert http.session(retries=2, backoff=0.01, deadline=1.0).get(srv.url + "/x").json() == []
    assert len(hits) == 2
