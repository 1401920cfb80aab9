"""A small real Danbooru look-alike on 127.0.0.1: the live source's tests and the
offline demo (`make demo`) talk to it over real HTTP.

Implements what curate uses: /posts.json (plain tags, -tag, ~tag, the free
metatags, numbered pages with the 1000-page 410, b/a id cursors, limit <= 200,
tag-limit 422), /counts/posts.json, /profile.json (HTTP basic), /tag_aliases.json,
JSON error bodies. Faults are injected per request on the search endpoints,
either from `queue` (in order, /posts.json only) or at random with `rates` (seeded): 429, 500
(only while limit > 20, like a statement timeout on a big page), 503, reset,
slow, truncate, short (half a page), html403.

Every request is logged (arrival time, path, params, status, plain terms) so
tests can check rates and tag counts on the server side.

With `files=DIR` it also serves image files (GET /original/..., /sample/...) from
DIR, and the posts it returns point their file URLs at itself, as the site's point
at its CDN. Run by hand: `python -m curate.demo.devserver POSTS.jsonl --files DIR`.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import random
import re
import socket
import struct
import threading
import time
from datetime import date, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from curate.metadata.sources.posts import normalize

SITE_TZ = timezone(timedelta(hours=-5))  # date: is read in the site's zone, not UTC
FREE = {"favcount", "score", "rating", "ratio", "width", "height", "mpixels", "date", "age",
        "filetype", "status", "id"}
LEVELS = {"member": 20, "gold": 30, "platinum": 31}
FAULTS = ("429", "500", "503", "reset", "slow", "truncate", "short", "html403")


class Post:
    """A raw API post plus the fields search reads (the site's current view)."""

    def __init__(self, raw: dict):
        self.raw = raw
        view = dict(raw, md5=raw.get("md5") or "0" * 32, file_url=raw.get("file_url") or "x")
        row, _ = normalize(view)
        self.id = row["post_id"]
        self.tags = {t for c in ("general", "character", "copyright", "artist", "meta") for t in row[f"tags_{c}"]}
        self.row = row


class DanbooruServer:
    def __init__(self, posts: list[dict], tag_limits=None, users=None, aliases=None, seed=0,
                 files=None, port: int = 0):
        self.posts = []
        self.files = Path(files).resolve() if files else None
        self.set_posts(posts)
        self.tag_limits = {"anonymous": 2, "member": 2, "gold": 6, "platinum": None, **(tag_limits or {})}
        self.users = users or {}  # login -> (api key, level name)
        self.aliases = aliases or {}
        self.queue: list[str] = []
        self.rates: dict[str, float] = {}
        self.slow_s = 0.5
        self.retry_after: str | None = "0"
        self.ignore_cursor = False  # True: answer every page with the first (a server that ignores the cursor)
        self.log: list[dict] = []
        self.lock = threading.Lock()
        self.random = random.Random(seed)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def set_posts(self, posts: list[dict]) -> None:
        indexed = [Post(p) for p in posts if isinstance(p, dict) and isinstance(p.get("id"), int) and p["id"] > 0]
        self.posts = sorted(indexed, key=lambda p: -p.id)

    def start(self) -> "DanbooruServer":
        # stop() waits for the loop's next poll: 50 ms, not serve_forever's default half second
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def requests(self, path: str = "/posts.json") -> list[dict]:
        with self.lock:
            return [e for e in self.log if e["path"] == path]

    def public(self, raw: dict) -> dict:
        """The post as served: with `files`, its file URLs point at this server."""
        if self.files is None:
            return raw
        out = dict(raw)
        for key in ("file_url", "large_file_url", "preview_file_url"):
            if out.get(key):
                out[key] = self.url + urlsplit(out[key]).path
        return out

    def file(self, path: str):
        """(bytes, content type) of a served file, or None (404). Never outside `files`."""
        if self.files is None:
            return None
        target = (self.files / path.lstrip("/")).resolve()
        if self.files not in target.parents or not target.is_file():
            return None
        kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        return target.read_bytes(), kind

    def next_fault(self, path: str) -> str | None:
        with self.lock:
            if self.queue and path == "/posts.json":
                return self.queue.pop(0)
            for name, p in self.rates.items():
                if self.random.random() < p:
                    return name
        return None

    # --- search ---------------------------------------------------------------------

    def search(self, query: str, limit_for: int | None):
        """-> (matching posts newest first, plain term count) or raises _Reply."""
        terms = query.split()
        plain = sum(1 for t in terms if not _meta_name(t) or _meta_name(t) == "order")
        if limit_for is not None and plain > limit_for:
            raise _Reply(422, {"success": False, "error": "PostQuery::TagLimitError",
                               "message": f"You cannot search for more than {limit_for} tags at a time."})
        tests, status = [], None
        for term in terms:
            neg = term.startswith("-")
            body = term[1:] if neg or term.startswith("~") else term
            name = _meta_name(body)
            if name == "status":
                status = body.split(":", 1)[1].lower()
                continue
            if name in FREE:
                try:
                    test = _metatag(name, body.split(":", 1)[1])
                except (ValueError, ZeroDivisionError):  # id:abc, date:someday, ratio:1:0
                    raise _Reply(422, {"success": False, "error": "PostQuery::Error",
                                       "message": f"invalid value in {body}"}) from None
            else:
                tag = self.aliases.get(body.lower(), body.lower())
                test = (lambda p, tag=tag: tag in p.tags)
            tests.append(("~" if term.startswith("~") else "-" if neg else "+", test))
        ors = [t for k, t in tests if k == "~"]

        def keep(p: Post) -> bool:
            r = p.row
            if status in (None, "active") and r["is_deleted"]:
                return False
            if status == "deleted" and not r["is_deleted"] or status == "banned" and not r["is_banned"]:
                return False
            if ors and not any(t(p) for t in ors):
                return False
            return all(t(p) if k == "+" else not t(p) for k, t in tests if k != "~")

        return [p for p in self.posts if keep(p)], plain


class _Reply(Exception):
    def __init__(self, status: int, body, headers=None):
        self.status, self.body, self.headers = status, body, headers or {}


def _meta_name(term: str) -> str | None:
    name, colon, _ = term.partition(":")
    return name.lower() if colon and name.lower() in FREE | {"order"} else None


def _range(text: str, parse):
    """Danbooru range syntax -> predicate on a value."""
    if ".." in text:
        lo, hi = text.split("..", 1)
        lo = parse(lo) if lo else None
        hi = parse(hi) if hi else None
        return lambda v: v is not None and (lo is None or v >= lo) and (hi is None or v <= hi)
    m = re.match(r"^(>=|<=|>|<)?(.+)$", text)
    op, x = m.group(1), parse(m.group(2))
    return {
        None: lambda v: v == x, ">": lambda v: v is not None and v > x, ">=": lambda v: v is not None and v >= x,
        "<": lambda v: v is not None and v < x, "<=": lambda v: v is not None and v <= x,
    }[op]


def _metatag(name: str, value: str):
    value = value.lower()
    r = lambda p: p.row  # noqa: E731
    if name in ("favcount", "score", "width", "height", "id"):
        col = {"favcount": "fav_count", "width": "width", "height": "height", "score": "score", "id": "post_id"}[name]
        test = _range(value, int)
        return lambda p: test(r(p)[col])
    if name == "rating":
        allowed = {v[:1] for v in value.split(",")}
        return lambda p: r(p)["rating"] in allowed
    if name == "filetype":
        allowed = set(value.split(","))
        return lambda p: r(p)["file_ext"] in allowed
    if name == "mpixels":
        test = _range(value, float)
        return lambda p: r(p)["width"] is not None and test(r(p)["width"] * r(p)["height"] / 1e6)
    if name == "ratio":
        ratio = lambda t: float(t.split(":")[0]) / float(t.split(":")[1]) if ":" in t else float(t)  # noqa: E731
        test = _range(value, lambda t: round(ratio(t), 2))
        return lambda p: r(p)["width"] is not None and test(round(r(p)["width"] / max(1, r(p)["height"]), 2))
    if name == "date":
        test = _range(value, date.fromisoformat)
        return lambda p: r(p)["created_at"] is not None and test(r(p)["created_at"].astimezone(SITE_TZ).date())
    if name == "age":
        raise _Reply(422, {"success": False, "message": "age: is not supported by this test server"})
    raise AssertionError(name)


# --- HTTP -------------------------------------------------------------------------


def _handler(server: DanbooruServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def do_GET(self):
            t = time.monotonic()
            url = urlsplit(self.path)
            params = {k: v[-1] for k, v in parse_qs(url.query).items()}
            entry = {"t": t, "path": url.path, "params": params, "status": None, "plain": 0,
                     "user": self._user()}
            with server.lock:
                server.log.append(entry)
            try:
                status, body, headers = self._route(url.path, params, entry)
            except _Reply as reply:
                status, body, headers = reply.status, reply.body, reply.headers
            entry["status"] = status
            if status is None:
                return
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            try:
                self._send(status, data, headers, entry)
            except (BrokenPipeError, ConnectionResetError):  # the client timed out on a slow reply
                self.close_connection = True

        def _send(self, status, data, headers, entry):
            self.send_response(status)
            self.send_header("Content-Type", headers.pop("Content-Type", "application/json; charset=utf-8"))
            self.send_header("Content-Length", str(len(data)))
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if entry.get("truncate"):
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(data)

        def _user(self):
            auth = self.headers.get("Authorization", "")
            if not auth.startswith("Basic "):
                return None
            login, _, key = base64.b64decode(auth[6:]).decode().partition(":")
            return (login, key)

        def _level(self, entry):
            if entry["user"] is None:
                return "anonymous"
            login, key = entry["user"]
            if server.users.get(login, (None,))[0] != key:
                raise _Reply(401, {"success": False, "error": "SessionLoader::AuthenticationFailure",
                                   "message": "Invalid API key"})
            return server.users[login][1]

        def _route(self, path, params, entry):
            level = self._level(entry)
            if path == "/profile.json":
                if level == "anonymous":
                    raise _Reply(401, {"success": False, "message": "You must be logged in"})
                return 200, {"id": 1, "name": entry["user"][0], "level": LEVELS[level],
                             "level_string": level.title()}, {}
            if path == "/tag_aliases.json":
                names = params.get("search[antecedent_name_comma]", "").split(",")
                return 200, [{"antecedent_name": a, "consequent_name": server.aliases[a], "status": "active"}
                             for a in names if a in server.aliases], {}
            if path.startswith(("/original/", "/sample/")):
                served = server.file(path)
                if served is None:
                    raise _Reply(404, {"success": False, "message": "not found"})
                return 200, served[0], {"Content-Type": served[1]}
            if path not in ("/posts.json", "/counts/posts.json"):
                raise _Reply(404, {"success": False, "message": "not found"})
            fault = server.next_fault(path)
            entry["fault"] = fault
            limit = _number(params.get("limit", "20"), "limit")
            if fault == "reset":
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                return None, None, {}
            if fault == "slow":
                time.sleep(server.slow_s)
            if fault == "429":
                return 429, {"success": False, "message": "Too many requests"}, (
                    {"Retry-After": server.retry_after} if server.retry_after is not None else {})
            if fault == "500" and (limit > 20 or path == "/counts/posts.json"):
                return 500, {"success": False, "error": "ActiveRecord::QueryCanceled",
                             "message": "ERROR:  canceling statement due to statement timeout"}, {}
            if fault == "503":
                return 503, b"<html>down for maintenance</html>", {"Content-Type": "text/html"}
            if fault == "html403":
                return 403, b"<!DOCTYPE html><html><title>Just a moment...</title></html>", {"Content-Type": "text/html"}
            found, entry["plain"] = server.search(params.get("tags", ""), server.tag_limits[level])
            if path == "/counts/posts.json":
                return 200, {"counts": {"posts": len(found)}}, {}
            limit = max(1, min(limit, 200))
            page = params.get("page", "1") or "1"
            if not re.fullmatch(r"[ab]?\d{1,18}", page):
                raise _Reply(410, {"success": False, "error": "PaginationExtension::PaginationError",
                                   "message": "Invalid page number."})
            if server.ignore_cursor:  # a broken mirror: every page is the first one
                page = "1"
            if page[0] == "b":
                found = [p for p in found if p.id < int(page[1:])][:limit]
            elif page[0] == "a":
                found = [p for p in found if p.id > int(page[1:])][-limit:]  # the ids just above, newest first
            else:
                n = int(page)
                if n > 1000:
                    raise _Reply(410, {"success": False, "error": "PaginationExtension::PaginationError",
                                       "message": "You cannot go beyond page 1000. Try narrowing your search terms, or upgrade your account to go beyond page 1000."})
                found = found[(n - 1) * limit: n * limit]
            if fault == "short" and len(found) > 1:
                found = found[: len(found) // 2]
            entry["truncate"] = fault == "truncate"
            entry["ids"] = [p.id for p in found]
            return 200, [server.public(p.raw) for p in found], {}

    return Handler


def _number(text: str, name: str) -> int:
    """A query parameter that must be a number: a JSON 422 otherwise, as the site answers."""
    if not re.fullmatch(r"-?\d{1,9}", text.strip()):
        raise _Reply(422, {"success": False, "error": "ArgumentError", "message": f"{name} must be a number"})
    return int(text)


def main(argv: list[str] | None = None) -> None:  # pragma: no cover - for poking at it by hand
    """`python -m curate.demo.devserver POSTS [--files DIR] [--port N]`: serve a posts file
    (JSON array or JSON lines) until Ctrl-C; prints the URL."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("posts", type=Path)
    ap.add_argument("--files", type=Path, help="folder of image files to serve (original/ab/cd/<md5>.<ext>)")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args(argv)
    srv = DanbooruServer(read_posts(args.posts), files=args.files, port=args.port).start()
    print(srv.url, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        srv.stop()


def read_posts(path: Path) -> list[dict]:
    text = Path(path).read_text(encoding="utf-8")
    return json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines() if line.strip()]


if __name__ == "__main__":  # pragma: no cover
    main()
