"""The shared HTTP layer: every request curate makes (Danbooru API, images, tar shards).

API (small on purpose):

    session(user_agent=None, retries=3, backoff=0.5, timeout=(10, 60), pool_size=10,
            max_bytes=MAX_BODY, deadline=DEADLINE)
        -> requests.Session. Before every request it sends -- redirects and urllib3's
        own retries included -- it waits for the host's rate limiter. urllib3 retries
        connection errors, read errors before the response, and 429/500/502/503/504
        (GET/HEAD only) with exponential backoff, honouring Retry-After; after the last
        try the final response is returned, not raised. A request without `timeout=`
        gets the default (connect, read) seconds. User-Agent: `curate/<version>`,
        overridden by `user_agent=` or the env variable CURATE_USER_AGENT.
    set_rate(host, per_second)
        Requests per second for `host` ("cdn.donmai.us") or a pattern ("*.donmai.us",
        which also covers "donmai.us"); None = unlimited. Applies to limiters that
        already exist too. Defaults: 2/s for each Danbooru host, unlimited elsewhere.
    limiter(host) -> RateLimiter
        The one process-wide limiter for a host, shared by all sessions and threads,
        so the API client and the image downloader together stay under the rate.
    default_user_agent() -> "curate/<version>" (or CURATE_USER_AGENT)
    RateLimiter(per_second).wait()
        Blocks until the caller's slot; slots are 1/per_second apart (no bursts).
        `.count` is the number of slots handed out.

Sessions are cheap; use one per thread (requests.Session is not documented as
thread-safe). Rate limits are per process: two curate processes each get the rate.

Bounds (a server that lies or stalls ends the run with one line naming the host, never a
traceback, a hang or unbounded memory; docs/safety.md lists them):
    - A response read whole (no `stream=True`) may hold at most `max_bytes` (MAX_BODY)
      decompressed bytes, and must arrive, headers and body, within `deadline` seconds
      (DEADLINE): a watchdog shuts the socket when it passes, so a byte every few seconds
      cannot hold curate. A streamed response gets the deadline up to its headers; its
      body is the caller's to bound (images, archive members: their own size and time
      caps; `read_body` for the rest). Breaking either raises ResponseRefused.
    - Connection-level failures (refused, unresolvable name, connect timeout, TLS) are
      tried CONNECT_TRIES times over about ten seconds, then raise HostUnreachable.
      429 and 5xx keep the patient policy above (they are answers, not silence).
    - A host that gives no complete response (read timeouts, cut connections) for
      TROUBLE_WINDOW seconds in a row raises HostUnreachable at its next failure, so
      callers' own retries end within five minutes too.
All three are CurateError (the CLI prints the line), not requests exceptions: no
caller's retry loop retries them.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from curate import __version__
from curate.errors import CurateError

DEFAULT_TIMEOUT = (10.0, 60.0)  # connect, read (seconds between bytes)
RETRY_STATUSES = (429, 500, 502, 503, 504)
MAX_BODY = 64 << 20      # bytes, decompressed, of a response read whole (an API page is < 1 MB)
DEADLINE = 90.0          # seconds for one response, first byte sent to last byte read
CONNECT_TRIES = 3        # connection-level failures: tries, with CONNECT_WAITS between them
CONNECT_WAITS = (2.0, 6.0)
TROUBLE_WINDOW = 150.0   # seconds without a complete response from a host before giving up


class ResponseRefused(CurateError):
    """A response over the size cap or past the deadline."""


class HostUnreachable(CurateError):
    """Connection-level failures after the short retry, or a host silent too long."""

_rules: dict[str, float | None] = {"*.donmai.us": 2.0}
_limiters: dict[str, "RateLimiter"] = {}
_registry_lock = threading.Lock()


class RateLimiter:
    """Evenly spaced slots, thread-safe. `clock`/`sleep` are injectable for tests."""

    def __init__(self, per_second: float | None, clock=time.monotonic, sleep=time.sleep):
        self.rate = per_second
        self.count = 0
        self._clock, self._sleep = clock, sleep
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            self.count += 1
            if not self.rate:
                return
            now = self._clock()
            slot = max(now, self._next)
            self._next = slot + 1.0 / self.rate
        if slot > now:  # sleep outside the lock so other threads can book later slots
            self._sleep(slot - now)


def _rule_for(host: str) -> float | None:
    if host in _rules:
        return _rules[host]
    parts = host.split(".")
    for i in range(len(parts)):  # "*.a.b" covers a.b and x.a.b; most specific wins
        pattern = "*." + ".".join(parts[i:])
        if pattern in _rules:
            return _rules[pattern]
    return None


def _matches(host: str, pattern: str) -> bool:
    if pattern.startswith("*."):
        return host == pattern[2:] or host.endswith(pattern[1:])
    return host == pattern


def limiter(host: str) -> RateLimiter:
    host = (host or "").lower()
    with _registry_lock:
        lim = _limiters.get(host)
        if lim is None:
            lim = _limiters[host] = RateLimiter(_rule_for(host))
        return lim


def set_rate(host: str, per_second: float | None) -> None:
    if per_second is not None and per_second <= 0:
        raise ValueError("rate must be > 0 requests per second (or None for no limit)")
    host = host.lower()
    with _registry_lock:
        _rules[host] = per_second
        for name, lim in _limiters.items():
            if _matches(name, host):
                lim.rate = _rule_for(name)


def default_user_agent() -> str:
    return os.environ.get("CURATE_USER_AGENT") or f"curate/{__version__}"


class _LimitedRetry(Retry):
    """urllib3 Retry that also waits for the host's limiter before each retry."""

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None):
        new = super().increment(method, url, response, error, _pool, _stacktrace)
        new._host = getattr(_pool, "host", None) or getattr(self, "_host", None)
        return new

    def sleep(self, response=None) -> None:
        watch = getattr(_watching, "watch", None)
        if watch is not None:
            watch.waiting = True
        try:
            super().sleep(response)
            host = getattr(self, "_host", None)
            if host:
                limiter(host).wait()
        finally:
            if watch is not None:  # the deadline is per try: a patient 429 wait is no stall
                watch.waiting = False
                watch.rearm()


_watching = threading.local()  # the _Watch of this thread's request in flight


class _Watch:
    """Shuts the sockets of one request when its deadline passes (a slow drip of bytes
    never trips a per-read timeout). Re-armed before each of urllib3's own retries."""

    def __init__(self, seconds: float):
        self.seconds, self.fired, self.conns = seconds, False, []
        self.entry, self.waiting = None, False
        _dog.arm(self)

    def fire(self) -> None:
        if self.waiting:  # in a patient 429/5xx wait, no socket in use: the next try gets its own deadline
            return
        self.fired = True
        for conn in list(self.conns):
            sock = getattr(conn, "sock", None)
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def rearm(self) -> None:
        if not self.fired:
            self.conns = []
            _dog.arm(self)

    def stop(self) -> None:
        if self.entry is not None:
            self.entry[2] = None  # the watchdog skips it


class _Watchdog:
    """One thread for every watch of the process: a heap of deadlines."""

    def __init__(self):
        self.cv = threading.Condition()
        self.heap: list = []
        self.pid = None
        self.n = 0

    def arm(self, watch: _Watch) -> None:
        import heapq

        with self.cv:
            if watch.entry is not None:
                watch.entry[2] = None
            self.n += 1
            watch.entry = [time.monotonic() + watch.seconds, self.n, watch]
            heapq.heappush(self.heap, watch.entry)
            if self.pid != os.getpid():  # first use, or a forked child (threads do not survive fork)
                self.pid = os.getpid()
                threading.Thread(target=self._run, name="curate-http-deadline", daemon=True).start()
            self.cv.notify()

    def _run(self) -> None:
        import heapq

        while True:
            with self.cv:
                while self.heap and self.heap[0][2] is None:
                    heapq.heappop(self.heap)
                if not self.heap:
                    self.cv.wait()
                    continue
                wait = self.heap[0][0] - time.monotonic()
                if wait > 0:
                    self.cv.wait(wait)
                    continue
                watch = heapq.heappop(self.heap)[2]
            watch.fire()


_dog = _Watchdog()


class _WatchedPool:
    """A connection pool that lets the thread's watch see the connection it hands out."""

    def _get_conn(self, timeout=None):
        watch = getattr(_watching, "watch", None)
        if watch is not None and watch.fired:  # (urllib3 retrying after the deadline)
            raise ResponseRefused(f"{self.host}: no complete response within {watch.seconds:g} s "
                                  "(a stalled or dripping server)")
        conn = super()._get_conn(timeout)
        if watch is not None:
            watch.conns.append(conn)
        return conn


def _watched_pools():
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    return {"http": type("WatchedHTTPPool", (_WatchedPool, HTTPConnectionPool), {}),
            "https": type("WatchedHTTPSPool", (_WatchedPool, HTTPSConnectionPool), {})}


def _connection_problem(exc) -> str | None:
    """What failed when `exc` is a connection-level failure (no server answered), else None."""
    from urllib3 import exceptions as u3

    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS failed"
    if not isinstance(exc, requests.exceptions.ConnectionError):
        return None
    reason = getattr(exc.args[0], "reason", exc.args[0]) if exc.args else None
    if isinstance(reason, u3.NameResolutionError):
        return "name does not resolve"
    if isinstance(reason, u3.NewConnectionError):
        refused = isinstance(getattr(reason, "__context__", None), ConnectionRefusedError) or "refused" in str(reason)
        return "connection refused" if refused else "cannot connect"
    if isinstance(reason, u3.ConnectTimeoutError) or isinstance(exc, requests.exceptions.ConnectTimeout):
        return "connect timed out"
    if isinstance(reason, u3.SSLError):
        return "TLS failed"
    return None


def _mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB"


class _LimitedAdapter(HTTPAdapter):
    def __init__(self, timeout, max_bytes=MAX_BODY, deadline=DEADLINE, **kw):
        self._default_timeout = timeout
        self.max_bytes, self.deadline = max_bytes, deadline
        self._trouble: dict[str, float] = {}  # host -> when its run of failures began
        super().__init__(**kw)

    def init_poolmanager(self, *args, **kw):
        super().init_poolmanager(*args, **kw)
        self.poolmanager.pool_classes_by_scheme = _watched_pools()

    def send(self, request, **kw):
        if kw.get("timeout") is None:
            kw["timeout"] = self._default_timeout
        host = urlsplit(request.url).hostname or ""
        for attempt in range(CONNECT_TRIES):
            limiter(host).wait()
            started = time.monotonic()
            watch = _watching.watch = _Watch(self.deadline)
            try:
                resp = super().send(request, **kw)
            except requests.exceptions.RequestException as exc:
                watch.stop()
                if watch.fired:
                    raise ResponseRefused(f"{host}: no complete response within {self.deadline:g} s "
                                          "(a stalled or dripping server)") from None
                problem = _connection_problem(exc)
                if problem is None:
                    self._failed(host, started, type(exc).__name__)
                    raise
                if attempt + 1 == CONNECT_TRIES:
                    raise HostUnreachable(f"cannot reach {host}: {problem} ({CONNECT_TRIES} tries over "
                                          f"{sum(CONNECT_WAITS):g} s); check the address and the network, "
                                          "then re-run: finished work is kept") from None
                time.sleep(CONNECT_WAITS[min(attempt, len(CONNECT_WAITS) - 1)])
                continue
            finally:
                _watching.watch = None
            break
        if kw.get("stream"):
            watch.stop()  # the caller reads the body and bounds it (see read_body)
        else:
            self._guard(resp, host, watch)
        self._trouble.pop(host, None)
        return resp

    def _failed(self, host: str, started: float, what: str) -> None:
        since = self._trouble.setdefault(host, started)
        if time.monotonic() - since >= TROUBLE_WINDOW:
            self._trouble.pop(host, None)
            raise HostUnreachable(f"{host}: no complete response for {time.monotonic() - since:.0f} s "
                                  f"(last: {what}); giving up, re-run later: finished work is kept")

    def _guard(self, resp, host: str, watch: _Watch) -> None:
        """Bound the body requests is about to read whole: size (decompressed) and deadline."""
        length = resp.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            watch.stop()
            resp.close()
            raise ResponseRefused(f"{host}: response of {_mib(int(length))} is over the {_mib(self.max_bytes)} cap")
        raw, cap, deadline = resp.raw, self.max_bytes, self.deadline
        stream = raw.stream

        def bounded(*args, **kwargs):
            size = 0
            try:
                for chunk in stream(*args, **kwargs):
                    size += len(chunk)
                    if size > cap:
                        raw.close()
                        raise ResponseRefused(f"{host}: response over the {_mib(cap)} cap (decompressed)")
                    yield chunk
            except ResponseRefused:
                raise
            except Exception:
                if watch.fired:
                    raise ResponseRefused(f"{host}: no complete response within {deadline:g} s "
                                          "(a stalled or dripping server)") from None
                raise
            finally:
                watch.stop()
            if watch.fired:
                raise ResponseRefused(f"{host}: no complete response within {deadline:g} s "
                                      "(a stalled or dripping server)")

        raw.stream = bounded


def read_body(resp, max_bytes: int = MAX_BODY, deadline: float = DEADLINE) -> bytes:
    """The whole body of a streamed response, bounded as a non-streamed one is."""
    host = urlsplit(resp.url or "").hostname or ""
    length = resp.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise ResponseRefused(f"{host}: response of {_mib(int(length))} is over the {_mib(max_bytes)} cap")
    end = time.monotonic() + deadline
    parts, size = [], 0
    for chunk in resp.iter_content(1 << 16):
        size += len(chunk)
        if size > max_bytes:
            resp.close()
            raise ResponseRefused(f"{host}: response over the {_mib(max_bytes)} cap (decompressed)")
        if time.monotonic() > end:
            resp.close()
            raise ResponseRefused(f"{host}: no complete response within {deadline:g} s")
        parts.append(chunk)
    return b"".join(parts)


def session(
    user_agent: str | None = None,
    retries: int = 3,
    backoff: float = 0.5,
    timeout: tuple[float, float] | float = DEFAULT_TIMEOUT,
    pool_size: int = 10,
    max_bytes: int = MAX_BODY,
    deadline: float = DEADLINE,
) -> requests.Session:
    retry = _LimitedRetry(
        total=retries,
        connect=0,  # connection-level failures: the adapter's short bounded retry
        read=retries,
        status=retries,
        other=0,
        redirect=5,
        backoff_factor=backoff,
        backoff_max=30,
        status_forcelist=RETRY_STATUSES,
        allowed_methods=("GET", "HEAD"),
        respect_retry_after_header=True,
        raise_on_status=False,
    )
    s = requests.Session()
    adapter = _LimitedAdapter(timeout, max_bytes, deadline, max_retries=retry, pool_connections=pool_size,
                              pool_maxsize=pool_size)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    s.headers["User-Agent"] = user_agent or default_user_agent()
    return s
