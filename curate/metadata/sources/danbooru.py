"""`danbooru` — the live Danbooru API as a source.

Exactness: every crawl asks the server for a *superset* of a subset's eligible
posts (only filters the server applies exactly or more loosely are pushed down),
and the selection engine's `eligible()` always runs on what comes back. So the
manifest equals a dump of the same posts, random order with a quota included
(the keyed-hash ranking is local).

Request strategy (`batches_for`):
- Per subset, one search: free metatags (favcount score rating ratio width height
  mpixels date filetype status) for every rule that has one, plus as many plain
  terms as the account's tag limit allows: required tags first (the rarest, by
  /counts/posts.json, when they do not all fit), then `-excluded` tags (not ones
  the site aliases: `-old` would also drop posts tagged with the new name), then
  `~any` tags when all of them fit. The rest is filtered locally.
- Artist lists: one crawl per artist (artist + base terms) or one crawl of the
  base search filtered locally, whichever needs fewer requests; estimated with
  /counts/posts.json, counting the estimate's own requests.
- Pages by `page=b<id>` cursor (id descending), `limit` 200; stop on an empty page
  (a short page is not the end). Posts are deduplicated by id across subsets.
- Errors: 429 waits (Retry-After, else 5 s); 500 (a database timeout) retries
  with half the `limit`; other 5xx, timeouts, resets and truncated bodies retry
  with bounded exponential backoff; 401/403/410/422 stop with a one-line reason.
  Every request goes through curate.http's per-host limiter (`rate`, default 2/s).

Sync (`batches()` with `store=`): an incremental mirror by `page=a<id>` cursor
from the store's max post id (or `since_id`). Each page is written to
STORE/spool-danbooru/page-<max id>.jsonl (temp file, fsync, rename) before it is
yielded. A run first yields the pages an interrupted run left there (read by
the dump source), then resumes the cursor after the highest spooled id; the
store's merge keeps one row per post id. `committed()` (called by `curate sync`
once the new generation is live) records the highest id read in
STORE/danbooru-cursor.json (hidden posts are above the store's max id at times)
and empties the spool. A kill -9 anywhere thus loses nothing and stores nothing
twice; at worst a few pages are read again.

The API key travels only in the Authorization header: never in URLs, logs,
errors, `describe()` or provenance.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

from curate.errors import CurateError
from curate.metadata.sources.posts import normalize, rows_to_table, to_int

log = logging.getLogger("curate.danbooru")

DEFAULT_URL = "https://danbooru.donmai.us"
MAX_LIMIT, MIN_LIMIT = 200, 20
SPOOL = "spool-danbooru"
CURSORS = "danbooru-cursor.json"  # base URL -> highest post id mirrored
# Prefixes Danbooru reads as metatags: a tag spelled like one is filtered locally.
METATAGS = {
    "user", "approver", "commenter", "comm", "noter", "noteupdater", "artcomm", "flagger",
    "appealer", "upvote", "downvote", "fav", "ordfav", "favgroup", "ordfavgroup", "pool",
    "ordpool", "note", "comment", "id", "rating", "locked", "source", "status", "filetype",
    "disapproved", "parent", "child", "search", "embedded", "md5", "width", "height",
    "mpixels", "ratio", "score", "upvotes", "downvotes", "favcount", "filesize", "date",
    "age", "order", "limit", "tagcount", "pixiv", "pixiv_id", "unaliased", "exif", "ai",
    "is", "has", "duration", "gentags", "arttags", "chartags", "copytags", "metatags",
}


class _GaveUp(CurateError):
    """Transient failures outlasted the retries."""


class DanbooruSource:
    def __init__(self, base_url: str | None = None, rate: float | None = None, user_agent: str | None = None,
                 tag_limit: int | None = None, since_id: int | None = None, store=None,
                 page_limit: int = MAX_LIMIT, timeout=None, retries: int = 6, backoff: float = 1.0,
                 wait_429: float = 5.0):
        from curate import http

        self.base_url = (base_url or os.environ.get("CURATE_DANBOORU_URL") or DEFAULT_URL).rstrip("/")
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CurateError(f"bad Danbooru URL {self.base_url!r} (use https://host)")
        if parts.username or parts.password:  # it would end up in provenance
            raise CurateError("put credentials in DANBOORU_LOGIN and DANBOORU_API_KEY, not in the Danbooru URL")
        if rate is not None and rate <= 0:
            raise CurateError("--rate must be > 0 requests per second")
        if tag_limit is not None and tag_limit < 0:
            raise CurateError("--tag-limit must be >= 0 (0: no limit)")
        http.set_rate(parts.hostname, rate or 2.0)
        self.http = http.session(user_agent=user_agent, retries=0)  # retries are ours: see _get
        self.timeout = timeout or http.DEFAULT_TIMEOUT
        login, key = os.environ.get("DANBOORU_LOGIN"), os.environ.get("DANBOORU_API_KEY")
        if bool(login) != bool(key):
            raise CurateError("set both DANBOORU_LOGIN and DANBOORU_API_KEY, or neither")
        if login:
            self.http.auth = (login, key)
        self._tag_limit = None if tag_limit == 0 else tag_limit
        self._tag_limit_known = tag_limit is not None
        self.since_id, self.store = since_id, Path(store) if store else None
        self.page_limit = max(1, min(page_limit, MAX_LIMIT))
        self.retries, self.backoff, self.wait_429 = retries, backoff, wait_429
        self.skipped: Counter = Counter()
        self.requests = 0
        self._aliased: dict[str, str | bool] = {}  # name -> consequent, True (unknown), False
        self._high: int | None = None

    def describe(self) -> str:
        return f"danbooru:{self.base_url}"

    # --- HTTP ---------------------------------------------------------------------

    def _get(self, path: str, params: dict | None = None):
        """GET JSON with the retry policy of the module docstring. A 500 halves
        params['limit'] in place, so the caller's crawl keeps the smaller pages."""
        import requests

        params = params if params is not None else {}
        url, tries, waits = self.base_url + path, 0, 0
        while True:
            self.requests += 1
            try:
                r = self.http.get(url, params=params, timeout=self.timeout)
            except requests.RequestException as exc:  # timeout, reset, truncated body
                problem = type(exc).__name__
            else:
                if r.status_code == 200:
                    try:
                        return r.json()
                    except ValueError:
                        problem = "truncated or malformed JSON"
                elif r.status_code == 429:
                    waits += 1
                    if waits > 50:
                        raise _GaveUp(f"{path}: still rate limited (HTTP 429) after {waits - 1} waits; lower --rate")
                    wait = _retry_after(r, self.wait_429)
                    log.warning("%s: HTTP 429, waiting %.1fs", path, wait)
                    time.sleep(wait)
                    continue
                elif r.status_code == 500 and params.get("limit", 0) > MIN_LIMIT:
                    params["limit"] = max(MIN_LIMIT, params["limit"] // 2)
                    log.warning("%s: HTTP 500 (database timeout?), retrying with limit=%d", path, params["limit"])
                    continue
                elif 400 <= r.status_code < 500:
                    raise CurateError(self._explain(r, path))
                else:
                    problem = f"HTTP {r.status_code}"
            tries += 1
            if tries > self.retries:
                raise _GaveUp(f"{path}: giving up after {tries} tries ({problem}); is {self.base_url} up?")
            wait = min(self.backoff * 2 ** (tries - 1), 60.0)
            log.warning("%s %s: %s, retry %d/%d in %.1fs", path, params.get("tags", ""), problem, tries, self.retries, wait)
            time.sleep(wait)

    def _explain(self, r, path: str) -> str:
        try:
            body = r.json()
            message = (body.get("message") or body.get("error") or "") if isinstance(body, dict) else ""
        except ValueError:
            body, message = None, ""
        message = " ".join(str(message).split())[:200]
        code = r.status_code
        if code == 401:
            return ("Danbooru rejected DANBOORU_LOGIN / DANBOORU_API_KEY (HTTP 401): check the login name "
                    f"and the API key at {self.base_url}/profile")
        if code == 403 and body is None and "html" in r.headers.get("Content-Type", "html"):
            return ("Danbooru answered with an HTML page (HTTP 403, a Cloudflare challenge): set a unique "
                    "User-Agent with --user-agent 'yourname-curate/1.0' (or env CURATE_USER_AGENT)")
        if code == 403:
            return f"Danbooru refused {path} (HTTP 403: {message or 'forbidden'}): your account level may not allow it"
        if code == 410:
            return f"Danbooru refused {path} (HTTP 410: {message or 'gone'}): numbered pages end at 1000; this is a curate bug, please report it"
        if code == 422:
            return (f"Danbooru rejected the search (HTTP 422: {message or 'unprocessable'}); "
                    "if it is the tag limit, pass --tag-limit with your account's limit")
        return f"Danbooru refused {path} (HTTP {code}: {message or r.reason})"

    def tag_limit(self) -> int | None:
        """Plain search terms per request: --tag-limit, else /profile.json, else 2."""
        if not self._tag_limit_known:
            self._tag_limit_known = True
            self._tag_limit = 2
            if self.http.auth:
                profile = self._get("/profile.json")
                level = to_int(profile.get("level")) if isinstance(profile, dict) else None
                limit = to_int(profile.get("tag_query_limit")) if isinstance(profile, dict) else None
                if limit is not None:
                    self._tag_limit = limit if limit < 1000 else None
                elif level is not None:  # Member 2, Gold 6, Platinum and above: none
                    self._tag_limit = None if level >= 31 else 6 if level >= 30 else 2
        return self._tag_limit

    def _count(self, terms: list[str]) -> int | None:
        try:
            body = self._get("/counts/posts.json", {"tags": " ".join(terms)})
        except _GaveUp:
            return None
        counts = body.get("counts") if isinstance(body, dict) else None
        return to_int(counts.get("posts")) if isinstance(counts, dict) else None

    def _active_aliases(self, names: list[str]) -> set[str]:
        """Which of `names` the site aliases to another tag (antecedents); cached."""
        self.aliases_for(names)
        return {n for n in names if self._aliased.get(n, False) is not False}

    def aliases_for(self, names) -> dict[str, str]:
        """The site's active aliases of `names`: antecedent -> consequent (a renamed
        artist's old tag -> the new one). Asked 100 names a request, cached."""
        ask = [n for n in dict.fromkeys(names) if n not in self._aliased and plain_ok(n)]
        for i in range(0, len(ask), 100):
            part = ask[i:i + 100]
            try:
                body = self._get("/tag_aliases.json", {"search[antecedent_name_comma]": ",".join(part),
                                                        "search[status]": "active", "limit": 1000})
            except _GaveUp:  # unknown: filter those exclusions locally, which is always exact
                body = None
            if not isinstance(body, list):
                self._aliased.update((n, True) for n in part)  # aliased, consequent unknown
                continue
            found = {a.get("antecedent_name"): a.get("consequent_name") for a in body if isinstance(a, dict)}
            self._aliased.update((n, found[n] if isinstance(found.get(n), str) and found[n] else
                                  (True if n in found else False)) for n in part)
        return {n: self._aliased[n] for n in names if isinstance(self._aliased.get(n), str)}

    # --- query translation --------------------------------------------------------

    def plan(self, s) -> list[tuple[str, ...]]:
        """The searches whose union is a superset of subset `s`'s eligible posts."""
        limit = self.tag_limit()
        meta = free_metatags(s)
        required = [t for t in s.tags if plain_ok(t)]
        if limit is not None and len(required) > limit:  # keep the rarest
            counts = {t: self._count([t]) for t in required}
            required.sort(key=lambda t: (counts[t] is None, counts[t] or 0))
        excluded = [t for t in s.exclude_tags if plain_ok(t)]
        if limit is not None:
            excluded = excluded[:max(0, limit - len(required))]
        aliased = self._active_aliases(excluded)
        # Term groups, most useful first; a group goes in whole or not at all
        # (half an OR group would narrow the search below the subset).
        groups = [[t] for t in required] + [["-" + t] for t in excluded if t not in aliased]
        if s.any_tags and all(plain_ok(t) for t in s.any_tags):
            groups.append(["~" + t for t in s.any_tags] if len(s.any_tags) > 1 else list(s.any_tags))
        base = _fit(groups, limit)
        if not s.artists or not all(plain_ok(a) for a in s.artists) or limit == 0:
            return [tuple(base + meta)]
        # Artists: one crawl per artist (artist + what else fits) or one crawl of
        # the base search filtered locally, whichever takes fewer requests.
        per_artist = _fit(groups, None if limit is None else limit - 1)
        single = _pages(self._count(base + meta), self.page_limit)
        if single is not None and 2 * len(s.artists) >= single:
            return [tuple(base + meta)]  # each artist costs a count and a page at least
        spent = 0
        for artist in s.artists:
            n = self._count([artist] + per_artist + meta)
            spent += 1 + (_pages(n, self.page_limit) or 10**9)
            if single is not None and spent >= single:
                return [tuple(base + meta)]
        return [tuple([a] + per_artist + meta) for a in s.artists]

    # --- crawling -------------------------------------------------------------------

    def pages(self, terms, cursor: str = "b") -> Iterator[list]:
        """Raw post pages of a search, by id cursor: 'b' walks down from the newest,
        'a<id>' walks up from id. Ends on an empty page."""
        params = {"tags": " ".join(terms), "limit": self.page_limit}
        page = None if cursor == "b" else cursor
        while True:
            if page:
                params["page"] = page
            body = self._get("/posts.json", params)
            if isinstance(body, dict) and isinstance(body.get("posts"), list):
                body = body["posts"]
            if not isinstance(body, list):
                raise CurateError(f"/posts.json answered with something that is not a list of posts ({type(body).__name__})")
            if not body:
                return
            ids = [i for i in (to_int(p.get("id")) for p in body if isinstance(p, dict)) if i is not None and i > 0]
            if not ids:
                raise CurateError("/posts.json returned a page without post ids; cannot continue the cursor")
            if page and not (min(ids) < int(page[1:]) if page.startswith("b") else max(ids) > int(page[1:])):
                # a server that ignores the cursor would send this page forever
                raise CurateError(f"/posts.json ignored the id cursor (page={page} brought no post past it); "
                                  "stopped the crawl")
            yield body
            page = f"b{min(ids)}" if page is None or page.startswith("b") else f"a{max(ids)}"

    def batches_for(self, query) -> Iterator:
        searches = list(dict.fromkeys(terms for s in query.subsets for terms in self.plan(s)))
        seen: set[int] = set()
        for terms in searches:
            log.info("crawling %r", " ".join(terms))
            for page in self.pages(terms):
                table = self._rows(page, seen)
                if table is not None:
                    yield table

    def _rows(self, page: list, seen: set[int] | None):
        rows = []
        for post in page:
            pid = to_int(post.get("id")) if isinstance(post, dict) else None
            if seen is not None and pid is not None:
                if pid in seen:
                    continue
                seen.add(pid)
            row, reason = normalize(post)
            if row is None:
                self.skipped[reason] += 1
            else:
                rows.append(row)
        return rows_to_table(rows) if rows else None

    # --- mirror (curate sync) ---------------------------------------------------------

    def batches(self) -> Iterator:
        if self.store is None:
            for page in self.pages(["status:any"], f"a{self.since_id or 0}"):
                table = self._rows(page, None)
                if table is not None:
                    yield table
            return
        spool = self.store / SPOOL
        spool.mkdir(parents=True, exist_ok=True)
        for tmp in spool.glob("*.tmp"):  # a page half-written when a run was killed
            tmp.unlink()
        spooled = sorted(int(p.stem[5:]) for p in spool.glob("page-*.jsonl") if p.stem[5:].isdigit())
        if spooled:
            from curate.metadata.sources.dump import DumpSource

            log.info("resuming: %d spooled pages up to post %d", len(spooled), spooled[-1])
            dump = DumpSource(str(spool), rating_scale="new")  # pages of the live site
            yield from dump.batches()
            self.skipped.update(dump.skipped)
            start = spooled[-1]
        else:
            start = self.since_id if self.since_id is not None else max(
                store_max_id(self.store) or 0, self._cursors().get(self.base_url, 0))
        self._high = start
        for page in self.pages(["status:any"], f"a{start}"):
            top = max(i for i in (to_int(p.get("id")) for p in page if isinstance(p, dict)) if i is not None and i > 0)
            _write_atomic(spool / f"page-{top:012d}.jsonl", "".join(json.dumps(p) + "\n" for p in page))
            self._high = max(self._high, top)
            table = self._rows(page, None)
            if table is not None:
                yield table

    def committed(self) -> None:
        """The store now holds every spooled page: note the cursor, drop the spool."""
        if self.store is None:
            return
        cursors = self._cursors()
        if self._high is not None and self._high > cursors.get(self.base_url, 0):
            # the highest id read, hidden posts included (the store's max skips those)
            _write_atomic(self.store / CURSORS, json.dumps({**cursors, self.base_url: self._high}, indent=1))
        shutil.rmtree(self.store / SPOOL, ignore_errors=True)

    def _cursors(self) -> dict:
        try:
            data = json.loads((self.store / CURSORS).read_text())
        except (OSError, ValueError):
            return {}
        return {k: v for k, v in data.items() if isinstance(v, int)} if isinstance(data, dict) else {}


# --- helpers ------------------------------------------------------------------------


def plain_ok(tag: str) -> bool:
    """Can `tag` go to the server as a plain tag and mean exactly that tag?"""
    if not tag or tag[0] in "-~(" or "*" in tag or any(c.isspace() for c in tag):
        return False
    prefix, colon, _ = tag.partition(":")
    return not (colon and prefix.lower() in METATAGS)


def free_metatags(s) -> list[str]:
    """Metatags (free of the tag limit) that pass every eligible post of `s`."""
    out = []
    if s.fav_count is not None:
        out.append("favcount:" + s.fav_count.danbooru())
    if s.score is not None:
        out.append("score:" + s.score.danbooru())
    if s.rating:
        out.append("rating:" + ",".join(sorted(set(s.rating))))
    # ratio is width/height rounded to 2 decimals: >=1 / <=1 keep every w>h / h>w post.
    out += {"horizontal": ["ratio:>=1"], "vertical": ["ratio:<=1"], "square": ["ratio:1"]}.get(s.orientation, [])
    if s.min_width:
        out.append(f"width:>={s.min_width}")
    if s.min_height:
        out.append(f"height:>={s.min_height}")
    if s.min_pixels and s.min_pixels >= 10_000:
        out.append(f"mpixels:>={math.floor(s.min_pixels / 10_000) / 100:g}")
    # date: is read in the site's (or account's) time zone: widen by a day each side.
    lo = (s.created_after - timedelta(days=1)).date().isoformat() if s.created_after else None
    hi = (s.created_before + timedelta(days=1)).date().isoformat() if s.created_before else None
    if lo or hi:
        out.append(f"date:{lo}..{hi}" if lo and hi else f"date:>={lo}" if lo else f"date:<={hi}")
    out.append("filetype:" + ",".join(e for e in dict.fromkeys(s.exts) if e != "jpeg"))
    if s.include_deleted:
        out.append("status:any")  # the site hides deleted posts by default
    return out


def _fit(groups: list[list[str]], limit: int | None) -> list[str]:
    """Whole groups, in order, while they fit in `limit` plain terms."""
    out = []
    for g in groups:
        if limit is None or len(out) + len(g) <= limit:
            out += g
    return out


def _pages(n: int | None, limit: int) -> int | None:
    """Requests a cursor crawl of n posts needs (the last one reads the empty page)."""
    return None if n is None else math.ceil(n / limit) + 1


def _retry_after(r, default: float) -> float:
    value = r.headers.get("Retry-After", "")
    try:
        return min(max(float(value), 0.0), 600.0)
    except ValueError:
        return default


def store_max_id(root: Path) -> int | None:
    """The store's highest post id (meta.json of the live generation), if any."""
    try:
        gen = (root / "CURRENT").read_text().strip()
        return to_int(json.loads((root / gen / "meta.json").read_text()).get("max_post_id"))
    except (OSError, ValueError, AttributeError):
        return None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
