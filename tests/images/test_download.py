"""curate.images.download against a real HTTP server on 127.0.0.1 with injected faults."""

import hashlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image

from curate import manifest
from curate.common import decode as images
from curate.images.download import Options, download_manifest, download_table
from curate.schema import MANIFEST_SCHEMA
from tests.common.test_decode import (
    animated_gif,
    encode,
    exif_rotated_jpeg,
    gradient,
    palette_png_transparent,
    png_header_bomb,
)

# -- a real server with faults ------------------------------------------------------


class Route:
    def __init__(self, body=b"", statuses=(), stall=0.0, cut=None, ranges=True, delay=0.0):
        self.body = body
        self.statuses = list(statuses)  # served first, one per request, then 200
        self.stall = stall  # pause after half of the body
        self.cut = cut  # send only this many bytes (Content-Length stays full), then close
        self.ranges = ranges  # honour Range
        self.delay = delay  # before the response


class Server:
    def __init__(self):
        self.routes, self.hits, self.range_hits = {}, {}, 0
        self.lock = threading.Lock()
        srv = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                with srv.lock:
                    n = srv.hits[self.path] = srv.hits.get(self.path, 0) + 1
                route = srv.routes.get(self.path)
                try:
                    self.respond(route, n)
                except OSError:  # the client gave up (timeouts, kill -9)
                    self.close_connection = True

            def respond(self, route, n):
                if route is None or n <= len(route.statuses):
                    status = 404 if route is None else route.statuses[n - 1]
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                time.sleep(route.delay)
                body, status = route.body, 200
                m = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
                if m and route.ranges:
                    a, b = int(m[1]), int(m[2])
                    body, status = body[a : b + 1], 206
                    with srv.lock:
                        srv.range_hits += 1
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {a}-{a + len(body) - 1}/{len(route.body)}")
                self.end_headers()
                if route.cut is not None:
                    self.wfile.write(body[: route.cut])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                half = len(body) // 2
                self.wfile.write(body[:half])
                if route.stall:
                    self.wfile.flush()
                    time.sleep(route.stall)
                self.wfile.write(body[half:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def add(self, path, body=b"", **kw) -> str:
        self.routes[path] = Route(body, **kw)
        return self.url + path


@pytest.fixture
def server():
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


# -- helpers ------------------------------------------------------------------------

FAST = dict(retries=1, backoff=0.01, timeout=(2.0, 0.5), workers=4, progress=False)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def write_manifest(path: Path, rows: list[dict]) -> Path:
    cols = {name for row in rows for name in row}
    schema = pa.schema([f for f in MANIFEST_SCHEMA if f.name in cols])
    table = pa.Table.from_pylist([{c: r.get(c) for c in schema.names} for r in rows], schema=schema)
    return manifest.write(table, path, manifest.new_provenance())


def post(pid, data=None, url=None, **extra) -> dict:
    row = {"key": f"danbooru/{pid}", "post_id": pid, "md5": md5(data) if data is not None else None,
           "file_url": url, "file_ext": "jpg"}
    row.update(extra)
    return row


def rows_by_key(path: Path) -> dict:
    table, _ = manifest.read(path)
    return {r["key"]: r for r in table.to_pylist()}


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def stored(images_dir: Path) -> list[Path]:
    return [p for p in files_under(images_dir) if ".part" not in p.parts]


def assert_verifies(path: Path):
    """A stored original: named by its own md5, fully decodable, extension = content."""
    data = path.read_bytes()
    assert md5(data) == path.name.split(".")[0]
    assert images.verify(path)[2] == path.suffix[1:]


IMG = {
    "jpg": encode(gradient(64, 48), "JPEG"),
    "png": encode(gradient(40, 30), "PNG"),
    "webp": encode(gradient(50, 20), "WEBP"),
    "cmyk": encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"),
    "exif": exif_rotated_jpeg(),
    "palette": palette_png_transparent(),
    "gif": animated_gif(),
}


# -- tests --------------------------------------------------------------------------


def test_download_verifies_stores_by_md5_and_updates_manifest(server, tmp_path):
    rows = [post(i, data, server.add(f"/{name}.jpg", data)) for i, (name, data) in enumerate(IMG.items(), 1)]
    rows.append(post(99, IMG["jpg"], server.add("/dup.jpg", IMG["jpg"]), key="danbooru/99"))  # same file
    m = write_manifest(tmp_path / "m.parquet", rows)
    s = download_manifest(m, tmp_path / "img", **FAST)

    got = rows_by_key(m)
    assert s.downloaded == len(IMG) and not s.failed and s.rows == len(IMG) + 1
    for i, (name, data) in enumerate(IMG.items(), 1):
        r = got[f"danbooru/{i}"]
        assert r["error"] is None
        h = md5(data)
        ext = {"png": "png", "webp": "webp", "palette": "png", "gif": "gif"}.get(name, "jpg")
        assert r["path"] == f"img/{h[:2]}/{h}.{ext}"  # relative to the manifest's folder
        assert_verifies(tmp_path / r["path"])
    assert (got["danbooru/1"]["width"], got["danbooru/1"]["height"]) == (64, 48)
    assert (got["danbooru/5"]["width"], got["danbooru/5"]["height"]) == (20, 60)  # EXIF-rotated
    assert got["danbooru/99"]["path"] == got["danbooru/1"]["path"]
    assert server.hits.get("/jpg.jpg", 0) + server.hits.get("/dup.jpg", 0) == 1  # one file, fetched once
    assert len(stored(tmp_path / "img")) == len(IMG)
    assert manifest.read(m)[1]["stages"]["download"]["variant"] == "original"

    hits = dict(server.hits)
    s2 = download_manifest(m, tmp_path / "img", **FAST)  # idempotent: nothing fetched again
    assert server.hits == hits and s2.already == len(IMG) + 1 and s2.downloaded == 0


def test_png_content_behind_jpg_name_is_stored_by_content(server, tmp_path):
    data = IMG["png"]
    m = write_manifest(tmp_path / "m.parquet", [post(1, data, server.add("/a.jpg", data), file_ext="jpg")])
    download_manifest(m, tmp_path / "img", **FAST)
    assert rows_by_key(m)["danbooru/1"]["path"].endswith(f"{md5(data)}.png")


def test_failures_stay_as_rows_with_reasons(server, tmp_path):
    jpg = IMG["jpg"]
    half = encode(gradient(256, 256), "JPEG")
    rows = [
        post(1, jpg, server.add("/404.jpg")) | {"file_url": server.url + "/missing.jpg"},
        post(2, IMG["png"], server.add("/flaky.png", IMG["png"], statuses=[500])),
        post(3, b"other bytes", server.add("/wrong.jpg", jpg)),
        post(4, png_header_bomb(), server.add("/bomb.png", png_header_bomb())),
        post(5, None, server.add("/page.jpg", b"<!DOCTYPE html><html>Just a moment...</html>")),
        post(6, None, server.add("/cut.jpg", half[: len(half) // 2])),  # complete body, truncated image
        post(7, half, server.add("/short.jpg", half, cut=len(half) // 2)),  # body shorter than promised
        post(8, b"zip", server.add("/ugoira.zip", b"PK\x03\x04"), file_ext="zip"),
        {"key": "danbooru/9", "post_id": 9, "md5": None, "file_url": None, "file_ext": "jpg"},
        post(10, IMG["cmyk"], server.add("/slow.jpg", IMG["cmyk"], stall=3.0)),
        post(11, IMG["webp"], server.add("/gone.webp", statuses=[503, 503, 503])),
        post(12, IMG["gif"], None),  # no URL (a HakuBooru database, an old dump): the CDN by md5
        post(13, b"no URL and no extension to build one", None, file_ext=None),
    ]
    h12 = md5(IMG["gif"])
    server.add(f"/cdn/original/{h12[:2]}/{h12[2:4]}/{h12}.jpg", IMG["gif"])
    m = write_manifest(tmp_path / "m.parquet", rows)
    s = download_manifest(m, tmp_path / "img", cdn=server.url + "/cdn", **FAST)
    got = {k: r["error"] for k, r in rows_by_key(m).items()}
    assert got == {
        "danbooru/1": "http 404",
        "danbooru/2": None,
        "danbooru/3": "md5 mismatch",
        "danbooru/4": "too many pixels: 100000x100000",
        "danbooru/5": "decode: not an image (html)",
        "danbooru/6": got["danbooru/6"],
        "danbooru/7": "truncated body",
        "danbooru/8": "unsupported: zip",
        "danbooru/9": "hidden",
        "danbooru/10": "timeout",
        "danbooru/11": "http 503",
        "danbooru/12": None,
        "danbooru/13": "no url (images of this source need --from-tars)",
    }
    assert got["danbooru/6"].startswith("decode: image file is truncated")
    assert server.hits["/flaky.png"] == 2 and "/ugoira.zip" not in server.hits
    assert server.hits["/short.jpg"] == 2  # one retry of a body that broke off
    assert sorted(p.name for p in stored(tmp_path / "img")) == sorted([f"{md5(IMG['png'])}.png", f"{h12}.gif"])
    assert s.failed["http 404"] == 1 and s.failed["decode"] == 2 and s.failed["unsupported: zip"] == 1
    assert sum(s.failed.values()) == 11 and s.downloaded == 2
    assert not list((tmp_path / "img" / ".part").iterdir())


def test_slow_body_within_the_read_timeout_succeeds(server, tmp_path):
    jpg = IMG["jpg"]
    m = write_manifest(tmp_path / "m.parquet", [post(1, jpg, server.add("/slow.jpg", jpg, stall=0.2))])
    download_manifest(m, tmp_path / "img", **(FAST | {"timeout": (2.0, 2.0)}))
    assert rows_by_key(m)["danbooru/1"]["error"] is None


def test_hostile_metadata_never_writes_outside_the_folder(server, tmp_path):
    jpg, png = IMG["jpg"], IMG["png"]
    work = tmp_path / "deep" / "work"
    work.mkdir(parents=True)
    rows = [
        post(1, jpg, server.add("/a.jpg", jpg), file_ext="../../x"),
        post(2, png, server.add("/b.png", png), file_ext="jpg/../../y"),
        post(3, IMG["webp"], server.add("/c.webp", IMG["webp"]), file_ext="png\n"),
        post(4, None, server.add("/d.jpg", jpg), md5="../../../../etc/passwd"),
        post(5, None, "file:///etc/passwd", md5=md5(b"x")),
        post(6, None, server.url + "/../../e.jpg", md5="0" * 31 + "/"),
        post(-7, None, server.add("/f.jpg", IMG["gif"])),  # no md5: named by content
    ]
    m = write_manifest(work / "m.parquet", rows)
    download_manifest(m, work / "img", **FAST)
    got = rows_by_key(m)
    assert [got[f"danbooru/{i}"]["error"] for i in (1, 2, 3, 4, 5, 6, -7)] == [
        None, None, None, "invalid md5", "bad url", "invalid md5", None]
    assert got["danbooru/2"]["path"].endswith(".png") and got["danbooru/3"]["path"].endswith(".webp")
    outside = [p for p in files_under(tmp_path) if not (p.is_relative_to(work / "img") or p == m)]
    assert outside == []
    for p in stored(work / "img"):
        assert_verifies(p)


def test_variant_choice_and_fallback_to_file_url(server, tmp_path):
    orig, sample, small = encode(gradient(300, 200), "JPEG"), encode(gradient(150, 100), "JPEG"), IMG["webp"]

    def variants(h, with_sample=True):
        v = [{"type": "720x720", "url": server.add(f"/720/{h}.webp", small), "width": 50, "height": 20, "file_ext": "webp"},
             {"type": "original", "url": server.add(f"/original/{h}.jpg", orig), "width": 300, "height": 200, "file_ext": "jpg"}]
        if with_sample:
            v.append({"type": "sample", "url": server.add(f"/sample/{h}.jpg", sample), "width": 150, "height": 100, "file_ext": "jpg"})
        return v

    h = md5(orig)
    rows = [post(1, orig, server.url + f"/original/{h}.jpg", variants=variants(h))]
    other = encode(gradient(310, 200), "JPEG")
    rows.append(post(2, other, server.add("/other.jpg", other), variants=[]))  # no variants: file_url
    m = write_manifest(tmp_path / "m.parquet", rows)

    download_manifest(m, tmp_path / "img", variant="sample", **FAST)
    got = rows_by_key(m)
    assert got["danbooru/1"]["path"] == f"img/{h[:2]}/{h}.sample.jpg"
    assert (got["danbooru/1"]["width"], got["danbooru/1"]["height"]) == (150, 100)
    assert got["danbooru/2"]["path"] == f"img/{md5(other)[:2]}/{md5(other)}.jpg"

    download_manifest(m, tmp_path / "img", variant="720", **FAST)  # another variant: redone
    got = rows_by_key(m)
    assert got["danbooru/1"]["path"] == f"img/{h[:2]}/{h}.720.webp"
    assert server.hits["/other.jpg"] == 1  # the fallback file was already right

    download_manifest(m, tmp_path / "img", **FAST)
    assert rows_by_key(m)["danbooru/1"]["path"] == f"img/{h[:2]}/{h}.jpg"
    assert server.hits[f"/original/{h}.jpg"] == 1


def test_max_pixels_downscales_on_save(server, tmp_path):
    big, small = encode(gradient(400, 200), "PNG"), IMG["jpg"]
    rows = [post(1, big, server.add("/big.png", big)), post(2, small, server.add("/small.jpg", small))]
    m = write_manifest(tmp_path / "m.parquet", rows)
    download_manifest(m, tmp_path / "img", max_pixels=20_000, **FAST)
    got = rows_by_key(m)
    h = md5(big)
    assert got["danbooru/1"]["path"] == f"img/{h[:2]}/{h}.max20000.png"
    w, ht = got["danbooru/1"]["width"], got["danbooru/1"]["height"]
    assert w * ht <= 20_000 and abs(w / ht - 2) < 0.02
    with Image.open(tmp_path / got["danbooru/1"]["path"]) as im:
        assert im.size == (w, ht)
    assert got["danbooru/2"]["path"].endswith(f"{md5(small)}.jpg")  # small enough: untouched original
    assert_verifies(tmp_path / got["danbooru/2"]["path"])
    assert len(stored(tmp_path / "img")) == 2  # the big original was not kept


@pytest.mark.parametrize("listing", [False, True])  # big runs list each subfolder once instead of stats
def test_rerun_reverifies_files_found_on_disk(server, tmp_path, monkeypatch, listing):
    if listing:
        monkeypatch.setattr("curate.images.download.LIST_FOLDERS_FROM", 1)
    good, bad = IMG["jpg"], IMG["png"]
    img = tmp_path / "img"
    hg, hb = md5(good), md5(bad)
    (img / hg[:2]).mkdir(parents=True)
    (img / hg[:2] / f"{hg}.jpg").write_bytes(good)  # a finished file from a killed run
    (img / hb[:2]).mkdir(exist_ok=True)
    (img / hb[:2] / f"{hb}.png").write_bytes(bad[:40])  # corrupt, under the final name
    (img / ".part").mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (img / ".part" / f"{dead.pid}-1-0.part").write_bytes(b"leftover")
    rows = [post(1, good, server.add("/good.jpg", good)), post(2, bad, server.add("/bad.png", bad))]
    m = write_manifest(tmp_path / "m.parquet", rows)
    s = download_manifest(m, img, **FAST)
    assert "/good.jpg" not in server.hits and server.hits["/bad.png"] == 1
    assert s.reused == 1 and s.downloaded == 1
    for p in stored(img):
        assert_verifies(p)
    assert not list((img / ".part").iterdir())


def make_shard(path: Path, members: dict[str, bytes]) -> dict:
    """Write a tar; return its hfutils-style index."""
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    files = {}
    with tarfile.open(path) as tar:
        for ti in tar:
            data = tar.extractfile(ti).read()
            files[ti.name] = {"offset": ti.offset_data, "size": ti.size, "sha256": hashlib.sha256(data).hexdigest()}
    return {"filesize": path.stat().st_size, "files": files}


@pytest.fixture
def shards(tmp_path):
    """Shard 1 without a JSON index (scanned), shard 5 with one; no shard 7."""
    d = tmp_path / "tars"
    d.mkdir()
    index1 = make_shard(d / "data-0001.tar", {"1001.jpg": IMG["jpg"], "2001.png": IMG["png"],
                                              "3001.zip": b"PK\x03\x04", "6001.jpg": IMG["cmyk"]})
    index5 = make_shard(d / "data-0005.tar", {"5.webp": IMG["webp"], "1005.gif": IMG["gif"]})
    index5["files"]["1005.gif"]["sha256"] = "0" * 64  # a member that no longer matches its index
    (d / "data-0005.json").write_text(json.dumps(index5))
    rows = [
        post(1001, IMG["jpg"]), post(2001, IMG["png"]), post(3001, b"z", file_ext="zip"),
        post(5, IMG["webp"]), post(1005, IMG["gif"]), post(4001, b"absent"), post(7, b"no shard"),
        post(6001, b"not the tar's file", file_ext="jpg"),
    ]
    return d, rows, index1


EXPECTED_TAR_ERRORS = {
    "danbooru/1001": None, "danbooru/2001": None, "danbooru/3001": "unsupported: zip",
    "danbooru/5": None, "danbooru/1005": "checksum: 1005.gif in data-0005.tar does not match its index's sha256",
    "danbooru/4001": "not in archives", "danbooru/7": "not in archives",
    "danbooru/6001": "md5 mismatch",  # no index, so no sha256: the post's md5 is the only check
}


def test_from_local_tars(shards, tmp_path):
    d, rows, _ = shards
    m = write_manifest(tmp_path / "m.parquet", rows)
    download_manifest(m, tmp_path / "img", from_tars=str(d), **FAST)
    got = rows_by_key(m)
    assert {k: r["error"] for k, r in got.items()} == EXPECTED_TAR_ERRORS
    assert got["danbooru/5"]["path"] == f"img/{md5(IMG['webp'])[:2]}/{md5(IMG['webp'])}.webp"
    assert len(stored(tmp_path / "img")) == 3
    for p in stored(tmp_path / "img"):
        assert_verifies(p)


@pytest.mark.parametrize("with_ranges", [True, False])
def test_tars_over_http_with_range_requests(server, shards, tmp_path, with_ranges):
    d, rows, index1 = shards
    for f in d.iterdir():
        server.add(f"/ds/{f.name}", f.read_bytes(), ranges=with_ranges)
    server.add("/ds/data-0001.json", json.dumps(index1).encode())  # remote shards need an index
    m = write_manifest(tmp_path / "m.parquet", rows)
    download_manifest(m, tmp_path / "img", from_tars=server.url + "/ds/", **FAST)
    got = {k: r["error"] for k, r in rows_by_key(m).items()}
    if with_ranges:
        # Served with its index, 6001's member is vouched for by sha256: a derivative, not the post's bytes.
        assert got == EXPECTED_TAR_ERRORS | {"danbooru/6001": None}
        assert rows_by_key(m)["danbooru/6001"]["derivative"] == "archive"
        assert server.hits["/ds/data-0001.json"] == 1  # index fetched once per archive
        assert server.hits["/ds/data-0007.json"] == 1  # a guessed name: its 404 means "not there"
        assert server.range_hits == 5
    else:
        assert got["danbooru/1001"] == got["danbooru/5"] == "tar server ignored Range"
        assert not stored(tmp_path / "img")


KILL_SCRIPT = """
import sys
from curate.cli import main
sys.argv = ["curate", "download", sys.argv[1], "--images", sys.argv[2], "--workers", "3", "--retries", "0"]
main()
"""


def test_kill_9_mid_run_then_rerun_completes_with_verified_files(server, tmp_path):
    n = 30
    bodies = [encode(gradient(64 + i, 48), "JPEG") for i in range(n)]
    rows = [post(i + 1, b, server.add(f"/{i}.jpg", b, stall=0.15)) for i, b in enumerate(bodies)]
    m = write_manifest(tmp_path / "m.parquet", rows)
    img = tmp_path / "img"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(m), str(img)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(600):  # until a few files are finished and others are mid-body
            if len(stored(img)) >= 4 if img.is_dir() else False:
                break
            if proc.poll() is not None:
                pytest.fail("the download finished before it could be killed")
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert 4 <= len(stored(img)) < n

    s = download_manifest(m, img, **FAST)
    got = rows_by_key(m)
    assert all(r["error"] is None and r["path"] for r in got.values())
    files = stored(img)
    assert len(files) == n and {p.name.split(".")[0] for p in files} == {md5(b) for b in bodies}
    for p in files:
        assert_verifies(p)
    assert s.reused >= 4 and s.reused + s.downloaded == n
    assert not list((img / ".part").iterdir())
    assert all(server.hits[f"/{i}.jpg"] <= 2 for i in range(n))


def test_cli_user_errors_are_one_line(tmp_path):
    from tests.inproc import run_curate  # the command's entry point, in this process

    def download(*args):
        return run_curate("download", *args)

    r = download(str(tmp_path / "nope.parquet"))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"error: manifest not found: {tmp_path / 'nope.parquet'}"]
    m = write_manifest(tmp_path / "m.parquet", [post(1, b"x", "http://127.0.0.1:9/x.jpg")])
    r = download(str(m), "--variant", "huge")
    assert r.returncode == 2 and r.stderr.strip() == "error: --variant must be one of original, sample, 720, not 'huge'"
    r = download(str(m), "--from-tars", str(tmp_path / "none"))
    assert r.returncode == 2 and "no such folder" in r.stderr and "Traceback" not in r.stderr
    r = download(str(m), "--verify", "fast")
    assert r.returncode == 2 and r.stderr.strip() == "error: --verify must be digest or decode, not 'fast'"
    r = download(str(m), "--tar-index", str(tmp_path))
    assert r.returncode == 2 and r.stderr.strip() == "error: --tar-index needs --from-tars"


def test_download_table_is_a_plain_function(server, tmp_path):
    data = IMG["png"]
    m = write_manifest(tmp_path / "m.parquet", [post(1, data, server.add("/a.png", data))])
    table, _ = manifest.read(m)
    out, summary = download_table(table, tmp_path, Options(images=tmp_path / "store", **FAST))
    assert out.num_rows == 1 and out.column("path").to_pylist() == [f"store/{md5(data)[:2]}/{md5(data)}.png"]
    assert "1 rows: 1 with images (1 downloaded" in summary.render()


def api_rows(posts: list[dict], server) -> list[dict]:
    """Real Danbooru API posts -> manifest rows, their CDN URLs pointed at the local server."""
    local = lambda u: u and u.replace("https://cdn.donmai.us", server.url)  # noqa: E731
    rows = []
    for p in posts:
        variants = [dict(v, url=local(v["url"])) for v in (p.get("media_asset") or {}).get("variants", [])]
        rows.append({"key": f"danbooru/{p['id']}", "post_id": p["id"], "md5": p.get("md5"),
                     "file_url": local(p.get("file_url")), "file_ext": p.get("file_ext"), "variants": variants})
    return rows


def test_real_danbooru_posts_variants_hidden_and_ugoira(server, tmp_path, shared_data):
    d = shared_data / "danbooru"
    kokomi = json.loads((d / "booru.hs_post_9969513_2025-09_with_media_asset.json").read_text())
    h = kokomi["md5"]
    server.add(f"/sample/{h[:2]}/{h[2:4]}/sample-{h}.jpg", encode(gradient(85, 85), "JPEG"))
    server.add(f"/720x720/{h[:2]}/{h[2:4]}/{h}.webp", encode(gradient(72, 72), "WEBP"))
    feed = json.loads((d / "rust-any2feed_posts_2023-03_limit100.json").read_text())
    m = write_manifest(tmp_path / "m.parquet", api_rows([kokomi] + feed, server))

    s = download_manifest(m, tmp_path / "img", variant="sample", **FAST)
    got = rows_by_key(m)
    assert got["danbooru/9969513"]["path"] == f"img/{h[:2]}/{h}.sample.jpg"
    assert got["danbooru/6141706"]["error"] == "hidden"  # no md5, no URLs: not visible to anonymous users
    assert got["danbooru/6141439"]["error"] == "unsupported: zip"  # ugoira
    assert s.failed["hidden"] == 7 and s.failed["unsupported: zip"] == 1
    assert s.failed["http 404"] == len(feed) - 8  # the rest: originals this server does not have
    assert "/original/2b/9b/2b9ba83f79690ea5431b2003020378ad.zip" not in server.hits

    download_manifest(m, tmp_path / "img", variant="720", **FAST)
    got = rows_by_key(m)
    assert got["danbooru/9969513"]["path"] == f"img/{h[:2]}/{h}.720.webp"
    assert (got["danbooru/9969513"]["width"], got["danbooru/9969513"]["height"]) == (72, 72)


def test_download_leaves_local_and_derived_files_alone(tmp_path):
    """An ingested image (no URL, no md5) and a cropped one (source_path set) keep their paths."""
    from PIL import Image

    from curate import manifest as mf

    (tmp_path / "cg").mkdir()
    Image.new("RGB", (300, 300), (10, 20, 30)).save(tmp_path / "cg" / "a.png")
    Image.new("RGB", (200, 100), (40, 50, 60)).save(tmp_path / "cg" / "b_crop.png")
    rows = [
        {"key": "local/a", "path": "cg/a.png", "width": 300, "height": 300},
        {"key": "danbooru/7", "post_id": 7, "md5": "0" * 32, "file_url": "http://127.0.0.1:9/x.png",
         "path": "cg/b_crop.png", "source_path": "images/00/" + "0" * 32 + ".png", "width": 200, "height": 100},
    ]
    import pyarrow as pa

    m = tmp_path / "m.parquet"
    mf.write(pa.Table.from_pylist(rows), m, mf.new_provenance())
    download_manifest(m, tmp_path / "images", max_pixels=4096)
    got = {r["key"]: r for r in mf.read(m)[0].to_pylist()}
    assert got["local/a"]["path"] == "cg/a.png" and got["local/a"]["error"] is None
    assert got["danbooru/7"]["path"] == "cg/b_crop.png" and got["danbooru/7"]["error"] is None


def test_digest_mode_reads_the_header_decode_mode_the_pixels(server, tmp_path):
    """A file whose md5 the source vouches for is checked by digest + header; its pixels only
    with --verify decode (here: bytes cut short after the header, md5 of the cut file)."""
    full = encode(gradient(256, 256), "JPEG")
    cut = full[: len(full) // 2]
    bomb = png_header_bomb()
    rows = [post(1, cut, server.add("/cut.jpg", cut)), post(2, bomb, server.add("/bomb.png", bomb)),
            post(3, None, server.add("/nodigest.jpg", cut))]  # no md5: decoded whatever the mode
    m = write_manifest(tmp_path / "m.parquet", rows)
    download_manifest(m, tmp_path / "img", **FAST)
    got = rows_by_key(m)
    assert got["danbooru/1"]["error"] is None and (got["danbooru/1"]["width"], got["danbooru/1"]["height"]) == (256, 256)
    assert got["danbooru/2"]["error"] == "too many pixels: 100000x100000"  # the guard is in the header check
    assert got["danbooru/3"]["error"].startswith("decode: image file is truncated")
    m2 = write_manifest(tmp_path / "m2.parquet", rows)
    download_manifest(m2, tmp_path / "img2", verify="decode", **FAST)
    assert rows_by_key(m2)["danbooru/1"]["error"].startswith("decode: image file is truncated")
