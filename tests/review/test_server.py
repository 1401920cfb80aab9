"""curate/review/server.py: the API over a real socket, and each safety rule."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace
from urllib.parse import parse_qs, quote, urlsplit

import pytest
import requests

from curate import manifest
from curate.common import decisions

pytest.importorskip("starlette", reason="the review extra: pip install -e '.[review]'")
pytest.importorskip("uvicorn", reason="the review extra: pip install -e '.[review]'")
from curate.review.server import Background  # noqa: E402
from tests.common.test_decisions import CURATE, HOSTILE, make_manifest, rows
from tests.review.conftest import copy_of


@pytest.fixture(scope="module")
def m(tmp_path_factory, staged_manifest):
    return copy_of(staged_manifest, tmp_path_factory.mktemp("review") / "built")  # make_manifest()


@pytest.fixture
def bg(m):
    with Background([m]) as b:
        yield b


def base(bg):
    return f"http://127.0.0.1:{bg.review.port}"


def get(bg, path, token=True, **headers):
    sep = "&" if "?" in path else "?"
    url = base(bg) + path + (f"{sep}token={bg.review.token}" if token else "")
    return requests.get(url, headers=headers, timeout=30)


def post(bg, body, token=True, **headers):
    h = {"X-Curate-Token": bg.review.token} if token else {}
    return requests.post(base(bg) + "/api/decide", json=body, headers={**h, **headers}, timeout=30)


def test_state_lists_every_row_with_its_bucket_and_vocabulary(bg, m):
    data = get(bg, "/api/state").json()
    keys = manifest.read(m)[0].column("key").to_pylist()
    assert data["rows"][0]["key"] == keys and len(data["manifests"]) == 1
    r = rows(m)
    i = keys.index(r["b_letterbox"]["key"])
    assert data["rows"][0]["crop"][i] == [0, 40, 480, 360]
    assert data["rows"][0]["bucket"][i] == bg.review.bucket(480, 320)  # the crop box's bucket
    assert data["rows"][0]["keeper_reason"] == [r_["keeper_reason"] for r_ in manifest.read(m)[0].to_pylist()]
    assert any(data["rows"][0]["keeper_reason"])  # dedupe's reason reaches the page's keeper label
    assert "1girl" in data["vocab"] and HOSTILE in data["vocab"]  # data, escaped by JSON, shown as text


def test_a_decision_is_on_disk_when_the_answer_comes(bg, m):
    key = rows(m)["c"]["key"]
    res = post(bg, {"m": 0, "lines": [{"key": key, "action": "drop", "reason": "blurry"}]})
    assert res.status_code == 200 and res.json()["state"][key]["dropped"] == "blurry"
    assert decisions.current(m).dropped == {key: "blurry"}
    rec = res.json()["records"][0]
    res = post(bg, {"m": 0, "undo": [rec["id"]]})
    assert res.status_code == 200 and decisions.current(m).dropped == {}
    assert [h["action"] for h in get(bg, "/api/state").json()["history"][:2]] == ["undo", "drop"]
    # a bad decision: a one-line reason, nothing stored
    n = len(decisions.current(m).log)
    res = post(bg, {"m": 0, "lines": [{"key": key, "action": "crop", "box": [0, 0, 9999, 10]}]})
    assert res.status_code == 400 and "outside" in res.json()["error"] and len(decisions.current(m).log) == n
    for line in ({"key": key, "action": ["drop"]}, {"key": [key], "action": "drop"}):  # the wrong JSON shapes
        res = post(bg, {"m": 0, "lines": [line]})
        assert res.status_code == 400 and "unknown" in res.json()["error"] and len(decisions.current(m).log) == n


def test_images_thumbnails_made_once(bg, m):
    key = rows(m)["c"]["key"]
    res = get(bg, f"/thumb?m=0&key={quote(key)}")
    assert res.status_code == 200 and res.content[:2] == b"\xff\xd8"
    folder = m.parent / f"{m.stem}_review_files"
    made = {p: p.stat().st_mtime_ns for p in folder.glob("*.jpg")}
    assert len(made) == 1
    assert get(bg, f"/thumb?m=0&key={quote(key)}").content == res.content
    assert {p: p.stat().st_mtime_ns for p in folder.glob("*.jpg")} == made
    orig = get(bg, f"/original?m=0&key={quote(key)}")
    assert orig.status_code == 200 and orig.content == (m.parent / rows(m)["c"]["path"]).read_bytes()


# --- safety -----------------------------------------------------------------------------------


def test_wrong_or_missing_token_is_refused(bg, m):
    key = rows(m)["c"]["key"]
    assert get(bg, "/", token=False).status_code == 403
    assert requests.get(base(bg) + "/api/state?token=wrong", timeout=30).status_code == 403
    assert get(bg, "/thumb?m=0&key=" + quote(key), token=False).status_code == 403
    assert post(bg, {"m": 0, "lines": [{"key": key, "action": "drop"}]}, token=False).status_code == 403
    res = post(bg, {"m": 0, "lines": [{"key": key, "action": "drop"}]}, token=False, **{"X-Curate-Token": "nope"})
    assert res.status_code == 403 and decisions.current(m).dropped == {}
    # no cookie grants access (a host-wide cookie reaches every port of 127.0.0.1): the page
    # sets none and deletes an older version's
    page = get(bg, "/")
    assert page.status_code == 200 and 'curate_review=""' in page.headers["set-cookie"]
    assert "max-age=0" in page.headers["set-cookie"].lower()
    cookies = {"curate_review": bg.review.token}
    assert requests.get(base(bg) + "/api/state", cookies=cookies, timeout=30).status_code == 403
    assert requests.get(base(bg) + "/thumb?m=0&key=" + quote(key), cookies=cookies, timeout=30).status_code == 403
    r = requests.post(base(bg) + "/api/decide", json={"m": 0, "lines": [{"key": key, "action": "drop"}]},
                      cookies=cookies, timeout=30)
    assert r.status_code == 403 and decisions.current(m).dropped == {}


def test_foreign_origin_and_cross_site_are_refused(bg, m):
    key = rows(m)["c"]["key"]
    line = {"m": 0, "lines": [{"key": key, "action": "drop"}]}
    assert post(bg, line, Origin="http://evil.example").status_code == 403
    assert post(bg, line, Origin=f"http://127.0.0.1:{bg.review.port + 1}").status_code == 403
    assert get(bg, "/api/state", Origin="http://evil.example").status_code == 403
    assert post(bg, line, **{"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert get(bg, "/api/state", **{"Sec-Fetch-Site": "same-site"}).status_code == 403  # another port, same host
    assert get(bg, "/api/state", **{"Sec-Fetch-Site": "same-origin"}).status_code == 200
    assert decisions.current(m).dropped == {}
    assert post(bg, line, Origin=f"http://127.0.0.1:{bg.review.port}").status_code == 200
    decisions.append(m, [{"key": key, "action": "restore"}])


def test_bad_host_is_refused(bg):
    for host in ("evil.example", f"evil.example:{bg.review.port}", "127.0.0.1", f"127.0.0.1:{bg.review.port + 1}"):
        assert get(bg, "/api/state", Host=host).status_code == 421, host
    assert get(bg, "/api/state", Host=f"localhost:{bg.review.port}").status_code == 200


def test_no_file_outside_the_manifests(bg, m, tmp_path):
    secret = m.parent / "secret.png"
    secret.write_bytes(b"\x89PNG not for you")
    for path in ("/original?m=0&key=../secret.png", "/original?m=0&key=" + quote(str(secret)),
                 "/image?m=0&key=local/none", "/thumb?m=1&key=x", "/original?m=-1&key=x",
                 "/static/../../decisions.py", "/static/%2e%2e%2fserver.py", "/static/index.html",
                 "/" + quote(str(secret)), "/../secret.png", "/original?m=0"):
        res = get(bg, path)
        assert res.status_code == 404 and b"not for you" not in res.content, path


def test_a_manifest_row_pointing_at_a_non_image_is_not_served(tmp_path, ingested_manifest):
    m = copy_of(ingested_manifest, tmp_path / "built")  # make_manifest(run_stages=False)
    table, meta = manifest.read(m)
    key = table.column("key")[0].as_py()
    paths = table.column("path").to_pylist()
    paths[0] = "../../../../../../../../etc/passwd"  # a hostile manifest
    table = manifest.with_column(table, "path", paths)
    manifest.write(manifest.with_column(table, "source_path", paths), m, meta)
    with Background([m]) as b:
        for kind in ("original", "image", "thumb"):
            res = get(b, f"/{kind}?m=0&key={quote(key)}")
            assert res.status_code == 404 and b"root:" not in res.content


def test_hostile_text_is_data_not_html(bg, m):
    res = get(bg, "/api/state")
    assert res.headers["content-type"].startswith("application/json")
    assert "script-src 'self'" in res.headers["content-security-policy"]
    assert res.headers["x-content-type-options"] == "nosniff"
    page = get(bg, "/").text
    assert "<script>" not in page and 'src="/static/app.js"' in page


def served_url(proc) -> str | None:
    """The URL a `curate review` process prints, once it answers (None: it exited, or
    printed none within a minute)."""
    url, deadline = None, time.monotonic() + 60
    while url is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            return None
        if "open http://127.0.0.1:" in line:
            url = line.split("open ", 1)[1].strip()
    for _ in range(100 if url else 0):  # the URL is printed just before uvicorn serves
        try:
            requests.get(url, timeout=5)
            break
        except requests.ConnectionError:
            time.sleep(0.1)
    return url


def test_cli_prints_the_url_serves_and_stops_on_ctrl_c(m):
    proc = subprocess.Popen([CURATE, "review", str(m), "--no-browser"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        url = served_url(proc)
        assert url and "token=" in url
        res = requests.get(url, timeout=5)
        assert res.status_code == 200 and "curate review" in res.text
        assert requests.get(url.split("?")[0] + "api/state", timeout=5).status_code == 403
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    assert "Traceback" not in proc.stderr.read()


def test_cli_another_host_warns(m):
    proc = subprocess.Popen([CURATE, "review", str(m), "--no-browser", "--host", "0.0.0.0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        first = proc.stdout.readline()
        assert first.startswith("warning: serving on 0.0.0.0, not loopback")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)


def test_a_read_only_folder_is_a_one_line_error_not_a_crash(tmp_path):
    m = make_manifest(tmp_path, run_stages=False)
    if os.geteuid() == 0:  # root writes into read-only folders: the server runs without that power
        with _served_without_the_override(m) as b:
            _read_only_folder_checks(m, b)
        return
    with Background([m]) as b:
        _read_only_folder_checks(m, b)


def _read_only_folder_checks(m, b):
    key = manifest.read(m)[0].column("key")[0].as_py()
    m.parent.chmod(0o555)
    try:
        res = post(b, {"m": 0, "lines": [{"key": key, "action": "drop"}]})
        assert res.status_code == 400 and res.json()["error"].startswith("cannot write review decisions")
        assert get(b, f"/thumb?m=0&key={quote(key)}").status_code == 404
    finally:
        m.parent.chmod(0o755)


# Drop, from the capability bounding set, what lets root ignore file modes (CAP_DAC_OVERRIDE,
# CAP_DAC_READ_SEARCH, CAP_FOWNER: 1, 2, 3; prctl PR_CAPBSET_DROP = 24), then exec the
# installed command: a root process then gets no more than the bounding set, so a 0o555
# folder it owns refuses its writes as it refuses anyone's.
_NO_OVERRIDE = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "for cap in (1, 2, 3):\n"
    "    if libc.prctl(24, cap, 0, 0, 0) != 0:\n"
    "        sys.exit(f'cannot drop capability {cap}: {os.strerror(ctypes.get_errno())}')\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


@contextlib.contextmanager
def _served_without_the_override(m):
    """As root (CI): `curate review M --no-browser` in a process that keeps uid 0 but not
    the capabilities that override file modes. Yields what `get`/`post` take (port, token)."""
    proc = subprocess.Popen([sys.executable, "-c", _NO_OVERRIDE, CURATE, "review", str(m), "--no-browser"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = served_url(proc)
        assert url, f"curate review did not start: {proc.poll()} {proc.stderr.read() if proc.poll() is not None else ''}"
        parts = urlsplit(url)
        yield SimpleNamespace(review=SimpleNamespace(port=parts.port, token=parse_qs(parts.query)["token"][0]))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    assert "Traceback" not in err, err


def test_a_manifest_removed_while_serving_is_a_clear_error(tmp_path, ingested_manifest):
    m = copy_of(ingested_manifest, tmp_path / "built")  # make_manifest(run_stages=False)
    with Background([m]) as b:
        m.unlink()
        res = get(b, "/api/state")
        assert res.status_code == 500 and res.json()["error"] == f"manifest {m} is gone"
