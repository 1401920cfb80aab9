"""The `curate review` web app: Starlette on uvicorn, one page (static/), a JSON API.

Safety: every request needs the random token (query `token` or header `X-Curate-Token`;
writes need the header). No cookie carries it: a browser sends a cookie for 127.0.0.1 to
every port of that host, so another local service would receive it, and two review
servers would overwrite each other's. The page keeps the token from its URL and sends it
itself (the header for the API, the query for images). The page's own code
(/static/app.js, app.css, judge.js) is served without it. Host must be the address we
listen on (no DNS rebinding), a foreign Origin or a cross-site fetch is refused, and
files are served only by (manifest, key): the path comes from the manifest row,
never from the request. The page builds its DOM from text nodes only.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import socket
import threading
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse
from starlette.routing import Route

from curate import manifest as mf
from curate.common import decisions
from curate.common.buckets import RECIPE_BUCKETS
from curate.common.thumbs import Thumbs, thumb_job
from curate.errors import CurateError
from curate.review import judgement

STATIC = Path(__file__).with_name("static")
COOKIE = "curate_review"  # set by older versions; now only ever deleted
PUBLIC = {"/static/app.js", "/static/app.css", "/static/judge.js"}  # the page's code: no secret in it
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".jfif", ".jpe", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif"}
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
TAG_COLUMNS = ("tags_general", "tags_character", "tags_copyright", "tags_artist", "tags_meta")


class Source:
    """One manifest as the page sees it; reloaded when the file changes on disk."""

    def __init__(self, index: int, path: Path):
        self.index, self.path = index, Path(path)
        self.base = self.path.parent
        self.thumbs = Thumbs(self.base / f"{self.path.stem}_review_files")
        self.stamp = None
        self.load()

    def load(self) -> None:
        st = self.path.stat()
        self.stamp = (st.st_mtime_ns, st.st_size)
        table, self.meta = mf.read(self.path)
        self.table = table
        self.rows = table.select(["key", "subset", "width", "height", "path", "source_path", "error",
                                  "dup_of", "crop", "caption", *TAG_COLUMNS, "tagger"]).to_pydict()
        reason = "keeper_reason"  # dedupe's column (absent before dedupe ran)
        self.rows[reason] = table.column(reason).to_pylist() if reason in table.column_names else [None] * table.num_rows
        self.by_key = {k: i for i, k in enumerate(self.rows["key"])}
        self.sizes = {k: {"width": w, "height": h} for k, w, h in
                      zip(self.rows["key"], self.rows["width"], self.rows["height"])}

    def fresh(self) -> None:
        try:
            st = self.path.stat()
        except OSError:
            raise CurateError(f"manifest {self.path} is gone") from None
        if (st.st_mtime_ns, st.st_size) != self.stamp:
            self.load()

    def file(self, key: str, original: bool) -> Path | None:
        """The image a row references (its original, or the derived file); nothing else."""
        i = self.by_key.get(key)
        if i is None:
            return None
        rel = (self.rows["source_path"][i] if original else None) or self.rows["path"][i]
        if not rel:
            return None
        p = self.base / rel
        return p if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() else None


class Review:
    def __init__(self, manifests: list, host: str, port: int, token: str | None = None):
        from curate.common.buckets import Buckets

        self.sources = [Source(i, Path(p)) for i, p in enumerate(manifests)]
        self.token = token or secrets.token_urlsafe(24)
        self.lock = threading.Lock()
        self.making: dict[str, threading.Lock] = {}  # thumbnail -> lock: two requests make it once
        res, lo, hi, step = RECIPE_BUCKETS
        self.buckets = Buckets((res, res), lo, hi, step)
        self.set_address(host, port)

    def set_address(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        names = {host, "127.0.0.1", "localhost", "[::1]"} if _loopback(host) else {host}
        if host in ("0.0.0.0", "::"):  # every interface: the names this machine is reached by
            names |= {socket.gethostname(), socket.getfqdn(), "127.0.0.1", "localhost"}
            try:
                names |= set(socket.gethostbyname_ex(socket.gethostname())[2])
            except OSError:
                pass
        names = {f"[{n}]" if ":" in n and not n.startswith("[") else n for n in names}
        self.hosts = {f"{n}:{port}" for n in names}
        self.origins = {f"http://{h}" for h in self.hosts}

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/?token={self.token}"

    # --- what the page loads ---------------------------------------------------

    def state(self) -> dict:
        out = {"manifests": [], "rows": [], "decisions": [], "history": self.history()}
        vocab: dict[str, int] = {}
        for s in self.sources:
            s.fresh()
        current = [decisions.current(s.path) for s in self.sources]
        losers = decisions.cross_losers(list(zip((s.table for s in self.sources), current)))  # across manifests
        for s, d in zip(self.sources, current):
            dup = [losers.get(k, v) for k, v in zip(s.rows["key"], d.applied(s.table).column("dup_of").to_pylist())]
            r = s.rows
            tags = []
            for i in range(len(r["key"])):
                t = [x for c in TAG_COLUMNS for x in (r[c][i] or [])]
                t += [e["tag"] for e in (r["tagger"][i] or []) if e.get("tag") and e.get("category") != "rating"]
                tags.append([vocab.setdefault(x, len(vocab)) for x in dict.fromkeys(t)])
            out["manifests"].append({"name": s.path.stem, "path": str(s.path), "rows": len(r["key"]),
                                     "kind": s.meta.get("kind") or "local"})
            out["rows"].append({"key": r["key"], "subset": r["subset"], "w": r["width"], "h": r["height"],
                                "error": r["error"], "dup_of": dup, "crop": r["crop"], "caption": r["caption"],
                                "keeper_reason": r["keeper_reason"],
                                "file": [Path(p or q).name if (p or q) else None
                                         for p, q in zip(r["source_path"], r["path"])],
                                "tags": tags, "bucket": [self.bucket(w, h, c) for w, h, c in
                                                         zip(r["width"], r["height"], r["crop"])]})
            out["decisions"].append(d.state)
        out["vocab"] = list(vocab)
        out.update(self.judgement())
        return out

    def judgement(self) -> dict:
        """Issue 27's columns and overfitting tags (static/judge.js; also in the state)."""
        for s in self.sources:
            s.fresh()
        return {"judgement": [judgement.columns(s.table) for s in self.sources],
                "overfit": judgement.overfit_tags(self.sources)}

    def bucket(self, w, h, box=None) -> str | None:
        if box:
            w, h = box[2] - box[0], box[3] - box[1]
        if not w or not h or w <= 0 or h <= 0:
            return None
        bw, bh = self.buckets.select_bucket(w, h)[0]
        return f"{bw}x{bh}"

    def history(self, limit: int = 300) -> list[dict]:
        out = []
        for s in self.sources:
            for n, rec in enumerate(decisions.current(s.path).log):
                out.append((rec.get("at") or "", n, {**rec, "m": s.index}))
        out.sort(key=lambda x: x[:2], reverse=True)  # newest first; within one millisecond, log order
        return [r for _, _, r in out[:limit]]

    def decide(self, m: int, lines: list, undo: list) -> dict:
        s = self._source(m)
        s.fresh()
        for n, line in enumerate(lines, 1):
            problem = decisions.check(line, s.sizes, f"decision {n}")
            if problem:
                raise CurateError(problem)
        if not all(isinstance(u, str) for u in undo):
            raise CurateError("undo wants record ids")
        with self.lock:
            records, d = decisions.record(s.path, lines, undo=undo)
        return {"records": [{**r, "m": m} for r in records], "state": {r["key"]: d.get(r["key"]) for r in records}}

    def _source(self, m) -> Source:
        if not isinstance(m, int) or not 0 <= m < len(self.sources):
            raise CurateError("no such manifest")
        return self.sources[m]

    def thumb(self, m: int, key: str) -> Path | None:
        s = self._source(m)
        src = s.file(key, original=True)
        name = s.thumbs.want(src) if src else None
        if not name:
            return None
        dst = s.thumbs.folder / name
        with self.lock:
            making = self.making.setdefault(str(dst), threading.Lock())
        with making:
            if not dst.is_file():  # made once, on first view; kept for the next session
                try:
                    s.thumbs.folder.mkdir(parents=True, exist_ok=True)
                except OSError:
                    return None
                _, _, _, err = thumb_job((str(src.resolve()), str(dst)))
                if err:
                    return None
        return dst

    # --- the app ------------------------------------------------------------------

    def app(self) -> Starlette:
        def page(request):
            resp = FileResponse(STATIC / "index.html", media_type="text/html")
            resp.delete_cookie(COOKIE, path="/")  # an older curate's host-wide cookie: gone
            return resp

        def static(request):
            name = request.path_params["name"]
            if name not in ("app.js", "app.css", "judge.js"):
                return PlainTextResponse("not found", 404)
            return FileResponse(STATIC / name)

        def state(request):
            try:
                return JSONResponse(self.state())
            except CurateError as exc:
                return JSONResponse({"error": str(exc)}, 500)

        async def decide(request):
            try:
                body = await request.json()
                if not isinstance(body, dict):
                    raise ValueError
            except (ValueError, UnicodeDecodeError):
                return JSONResponse({"error": "body must be a JSON object"}, 400)
            lines, undo = body.get("lines", []), body.get("undo", [])
            if not isinstance(lines, list) or not isinstance(undo, list) or type(body.get("m")) is not int:
                return JSONResponse({"error": "body wants m (a number), lines and undo (lists)"}, 400)
            try:
                return JSONResponse(self.decide(body["m"], lines, undo))
            except CurateError as exc:
                return JSONResponse({"error": str(exc)}, 400)

        def bucket(request):
            try:
                w, h = int(request.query_params["w"]), int(request.query_params["h"])
            except (KeyError, ValueError):
                return JSONResponse({"error": "w and h wanted"}, 400)
            return JSONResponse({"bucket": self.bucket(w, h)})

        def image(request):
            try:
                m = int(request.query_params.get("m", ""))
                key = request.query_params["key"]
                s = self._source(m)
            except (ValueError, KeyError, CurateError):
                return PlainTextResponse("not found", 404)
            kind = request.url.path.strip("/")
            path = self.thumb(m, key) if kind == "thumb" else s.file(key, original=kind == "original")
            if path is None:
                return PlainTextResponse("not found", 404)
            return FileResponse(path)

        def judge(request):
            try:
                return JSONResponse(self.judgement())
            except CurateError as exc:
                return JSONResponse({"error": str(exc)}, 500)

        routes = [Route("/", page), Route("/static/{name}", static), Route("/api/state", state),
                  Route("/api/judgement", judge),
                  Route("/api/decide", decide, methods=["POST"]), Route("/api/bucket", bucket),
                  Route("/thumb", image), Route("/original", image), Route("/image", image)]
        return Guard(Starlette(routes=routes), self)


class Guard:
    """ASGI middleware: Host, Origin and token checks before anything else runs."""

    def __init__(self, app, review: Review):
        self.app, self.review = app, review

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        problem = self.refuse(request)
        if problem:
            resp = PlainTextResponse(problem[1], problem[0], headers=HEADERS)
            return await resp(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + [
                    (k.lower().encode(), v.encode()) for k, v in HEADERS.items()]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def refuse(self, request: Request) -> tuple[int, str] | None:
        r = self.review
        if request.headers.get("host", "").lower() not in r.hosts:
            return 421, "wrong Host header (curate review answers only to its own address)"
        origin = request.headers.get("origin")
        if origin is not None and origin.lower() not in r.origins:
            return 403, "foreign Origin"
        if request.headers.get("sec-fetch-site", "none") not in ("same-origin", "none"):
            return 403, "cross-site request"  # same-site too: another port of this host is another app
        given = request.headers.get("x-curate-token")
        if request.method != "GET":
            if given is None or not hmac.compare_digest(given.encode(), r.token.encode()):
                return 403, "writes need the X-Curate-Token header"
            return None
        if request.url.path in PUBLIC:
            return None
        given = given or request.query_params.get("token") or ""  # never a cookie: see the docstring
        if not hmac.compare_digest(given.encode(), r.token.encode()):
            return 403, "missing or wrong token: open the URL curate review printed"
        return None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets that say so (else Nagle
    # and delayed ACK hold every response body back ~40 ms)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise CurateError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    return sock


def serve(manifests: list, host: str = "127.0.0.1", port: int = 0, open_browser: bool = True,
          echo=print) -> None:
    """Serve until Ctrl-C. Port 0: a free one, chosen by binding (no race)."""
    import uvicorn

    if not manifests:
        raise CurateError("name at least one manifest")
    review = Review(manifests, host, port)
    sock = bind(host, port)
    review.set_address(host, sock.getsockname()[1])
    if not _loopback(host):
        echo(f"warning: serving on {host}, not loopback: anyone who can reach it and has the URL "
             "can see the images and change decisions")
    echo(f"curate review: {sum(len(s.rows['key']) for s in review.sources)} rows in "
         f"{len(review.sources)} manifest(s); decisions go to <manifest>{decisions.SUFFIX}")
    echo(f"  open {review.url}")
    echo("  Ctrl-C stops the server")
    if open_browser:
        import webbrowser

        threading.Timer(0.5, webbrowser.open, (review.url,)).start()
    config = uvicorn.Config(review.app(), log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


class Background:
    """The server in a thread (tests, benchmarks): `with Background([m]) as bg: bg.review.url`."""

    def __init__(self, manifests: list, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.review = Review(manifests, host, port)
        self.sock = bind(host, port)
        self.review.set_address(host, self.sock.getsockname()[1])
        self.server = uvicorn.Server(uvicorn.Config(self.review.app(), log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "Background":
        import time

        self.thread.start()
        while not self.server.started and self.thread.is_alive():
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
