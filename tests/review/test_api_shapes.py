"""Issue 26.3: malformed request bodies to the review API are HTTP 400 with one line, never
a 500 with a traceback; and a full disk is an error the page hears, not an HTTP 200."""

from __future__ import annotations

import pytest
import requests

pytest.importorskip("starlette", reason="the review extra: pip install -e '.[review]'")
pytest.importorskip("uvicorn", reason="the review extra: pip install -e '.[review]'")
from curate.common import decisions  # noqa: E402
from curate.review.server import Background  # noqa: E402
from tests.common.test_decisions_disk import tiny_manifest  # noqa: E402
from tests.small_disk import fill, small_disk  # noqa: E402


def post(bg, body: bytes | str):
    url = f"http://127.0.0.1:{bg.review.port}/api/decide"
    return requests.post(url, data=body, timeout=30, headers={"X-Curate-Token": bg.review.token,
                                                               "Content-Type": "application/json"})


@pytest.mark.parametrize("body", [
    b"\xff\xfe not utf-8", b"[1, 2]", b"null", b'"text"', b"{",
    b'{"m": 0, "lines": 5}', b'{"m": 0, "lines": "drop"}', b'{"m": 0, "undo": {"a": 1}}',
    b'{"m": "0", "lines": []}', b'{"m": null, "lines": []}', b'{"m": 0, "lines": [["k0", "drop"]]}',
    b'{"m": 0, "lines": [{"key": {"k": 1}, "action": "drop"}]}', b'{"m": 0, "undo": [5]}',
    b'{"m": 0, "lines": [{"key": "k0", "action": "crop", "box": [0, 0, 1e400, 5]}]}',
    b'{"m": 0, "lines": [{"key": "k0", "action": "crop", "box": [0, 0, 2, 2]}]}',
    b'{"m": 99, "lines": []}', b'{"m": 0, "lines": [{"key": "k0", "action": "caption", "text": 7}]}',
])
def test_malformed_bodies_are_400_with_one_line(tmp_path, body):
    m = tiny_manifest(tmp_path)
    with Background([m]) as bg:
        res = post(bg, body)
        assert res.status_code == 400, res.text
        error = res.json()["error"]
        assert error and "\n" not in error and "Traceback" not in error
    assert decisions.current(m).log == []


def test_a_full_disk_is_an_error_the_page_hears(tmp_path):
    with small_disk(tmp_path / "disk", "1m") as disk:
        m = tiny_manifest(disk)
        with Background([m]) as bg:
            filler = fill(disk, leave=4096)
            big = '{"m": 0, "lines": [{"key": "k0", "action": "caption", "text": "%s"}]}' % ("1girl, " * 4000)
            res = post(bg, big)
            assert res.status_code == 400 and "No space left" in res.json()["error"]
            assert decisions.current(m).log == []
            filler.unlink()
            assert post(bg, big).status_code == 200
            assert decisions.current(m).captions()["k0"].startswith("1girl, ")
