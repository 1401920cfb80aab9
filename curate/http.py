"""The shared HTTP layer: every request curate makes (Danbooru API, images, tar shards).

API (small on purpose):

    session(user_agent=None, retries=3, backoff=0.5, timeout=(10, 60), pool_size=10)
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
"""

from __future__ import annotations

import os
import threading
import time
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from curate import __version__

DEFAULT_TIMEOUT = (10.0, 60.0)  # connect, read (seconds between bytes)
RETRY_STATUSES = (429, 500, 502, 503, 504)

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
        super().sleep(response)
        host = getattr(self, "_host", None)
        if host:
            limiter(host).wait()


class _LimitedAdapter(HTTPAdapter):
    def __init__(self, timeout, **kw):
        self._default_timeout = timeout
        super().__init__(**kw)

    def send(self, request, **kw):
        if kw.get("timeout") is None:
            kw["timeout"] = self._default_timeout
        limiter(urlsplit(request.url).hostname or "").wait()
        return super().send(request, **kw)


def session(
    user_agent: str | None = None,
    retries: int = 3,
    backoff: float = 0.5,
    timeout: tuple[float, float] | float = DEFAULT_TIMEOUT,
    pool_size: int = 10,
) -> requests.Session:
    retry = _LimitedRetry(
        total=retries,
        connect=retries,
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
    adapter = _LimitedAdapter(timeout, max_retries=retry, pool_connections=pool_size, pool_maxsize=pool_size)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    s.headers["User-Agent"] = user_agent or default_user_agent()
    return s
