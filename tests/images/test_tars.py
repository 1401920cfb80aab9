"""curate.images.tars: every public archive layout, built for real (tarfile + hfutils JSON indexes),
read through curate.images.download so the check is the bytes that land."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from curate.errors import CurateError
from curate.images.download import download_manifest
from curate.images.tars import Archives, residue
from curate.report import inspect as inspect_mod
from tests.common.test_decode import encode, gradient
from tests.images.test_download import (
    FAST,
    Server,
    make_shard,
    md5,
    post,
    rows_by_key,
    stored,
    write_manifest,
)
from tests.inproc import run_curate

JPG = {i: encode(gradient(40 + i % 7, 30 + i % 5), "JPEG") for i in range(20)}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_archive(tar: Path, members: dict[str, bytes], index: Path | None = None) -> dict:
    """A tar of `members` (names as given: `./1.jpg`, `a/1.jpg`); its hfutils index (with
    the archive's own hashes) written to `index` (None: no index). Returns the index."""
    tar.parent.mkdir(parents=True, exist_ok=True)
    idx = make_shard(tar, members)
    raw = tar.read_bytes()
    idx.update(hash=hashlib.sha1(raw).hexdigest(), hash_lfs=sha256(raw))
    if index is not None:
        index.parent.mkdir(parents=True, exist_ok=True)
        index.write_text(json.dumps(idx))
    return idx


def landed(tmp_path: Path, m: Path) -> dict:
    """key -> bytes of the stored file (or the error)."""
    return {k: (tmp_path / r["path"]).read_bytes() if r["path"] else r["error"] for k, r in rows_by_key(m).items()}


@pytest.fixture
def d2023(tmp_path):
    """danbooru2023: original/data-0XXX.tar (index beside, `./` names), recent/data-1XXX.tar
    (index beside, names in a folder), updates/**/*-D.tar (no index: headers scanned)."""
    root = tmp_path / "danbooru2023"
    make_archive(root / "original" / "data-0001.tar", {"./1001.jpg": JPG[1], "./2001.jpg": JPG[2]},
                 root / "original" / "data-0001.json")
    make_archive(root / "original" / "data-0002.tar", {"./1002.jpg": JPG[3]}, root / "original" / "data-0002.json")
    make_archive(root / "recent" / "data-1001.tar", {"recent/7001.jpg": JPG[4]}, root / "recent" / "data-1001.json")
    make_archive(root / "updates" / "20240101" / "posts-1.tar", {"8011.jpg": JPG[5], "readme.txt": b"x"})
    # 1001 and 1002 carry the post's file_size: the index's sha256 alone vouches for them
    rows = [post(1001, JPG[1], file_size=len(JPG[1])), post(2001, JPG[2]),
            post(1002, JPG[3], file_size=len(JPG[3])), post(7001, JPG[4]),
            post(8011, JPG[5]), post(9001, JPG[6])]
    return root, rows


def test_danbooru2023_layout_from_the_root(d2023, tmp_path):
    root, rows = d2023
    m = write_manifest(tmp_path / "m.parquet", rows)
    s = download_manifest(m, tmp_path / "img", from_tars=str(root), **FAST)
    got = landed(tmp_path, m)
    assert got == {"danbooru/1001": JPG[1], "danbooru/2001": JPG[2], "danbooru/1002": JPG[3],
                   "danbooru/7001": JPG[4], "danbooru/8011": JPG[5], "danbooru/9001": "not in archives"}
    for r in rows_by_key(m).values():
        if r["path"]:
            assert Path(r["path"]).name == f"{r['md5']}.jpg"  # originals: named by the post's md5
    assert s.failed == {"not in archives": 1}
    assert "hint: not in archives" in s.render() and "without --from-tars" in s.render()
    assert (tmp_path / "m.parquet.archives.sqlite").is_file()  # the lookup, cached beside the manifest


def test_a_subfolder_of_the_dataset_is_a_root_too(d2023, tmp_path):
    root, rows = d2023
    m = write_manifest(tmp_path / "m.parquet", rows)
    download_manifest(m, tmp_path / "img", from_tars=str(root / "original"), **FAST)
    got = landed(tmp_path, m)
    assert got["danbooru/1001"] == JPG[1] and got["danbooru/1002"] == JPG[3]
    assert got["danbooru/7001"] == got["danbooru/8011"] == "not in archives"


def test_lookup_cache_is_used_then_invalidated_when_an_index_changes(d2023, tmp_path):
    root, rows = d2023
    m = write_manifest(tmp_path / "m.parquet", rows[:1])
    download_manifest(m, tmp_path / "img", from_tars=str(root), **FAST)
    index = root / "original" / "data-0001.json"
    st = index.stat()
    # Same size and mtime, junk inside: a second run answers from the cache, never reads it.
    index.write_bytes(b"#" * st.st_size)
    os.utime(index, ns=(st.st_atime_ns, st.st_mtime_ns))
    m2 = write_manifest(tmp_path / "m.parquet", rows[:1])
    download_manifest(m2, tmp_path / "img2", from_tars=str(root), **FAST)
    assert landed(tmp_path, m2)["danbooru/1001"] == JPG[1]
    # A new version of the archive and its index: read again, the new bytes land.
    new = encode(gradient(90, 20), "JPEG")
    make_archive(root / "original" / "data-0001.tar", {"pad.txt": b"p" * 3000, "./1001.jpg": new}, index)
    m3 = write_manifest(tmp_path / "m.parquet", [post(1001, new)])
    download_manifest(m3, tmp_path / "img3", from_tars=str(root), **FAST)
    assert landed(tmp_path, m3)["danbooru/1001"] == new


@pytest.fixture
def webp_set(tmp_path):
    """danbooru2023 re-encoded: images/data-0XXX.tar + data-1XXX.tar, WebP members, the
    index in a separate folder (its own repo), sha256 only; the posts' md5 are the originals'."""
    root, idx = tmp_path / "danbooru2023-webp-4Mpixel", tmp_path / "danbooru2023-webp-4Mpixel_index"
    webp = {i: encode(gradient(30 + i, 20), "WEBP") for i in (1, 2, 3)}
    make_archive(root / "images" / "data-0001.tar", {"1001.webp": webp[1], "2001.webp": webp[2]},
                 idx / "images" / "data-0001.json")
    index = make_archive(root / "images" / "data-1001.tar", {"5001.webp": webp[3]}, None)
    index["files"]["5001.webp"]["sha256"] = sha256(b"what the member was before someone changed it")
    (idx / "images" / "data-1001.json").write_text(json.dumps(index))
    rows = [post(1001, JPG[1]), post(2001, JPG[2]), post(5001, JPG[3])]  # md5 of the original JPEGs
    return root, idx, rows, webp


def test_reencoded_members_are_verified_by_sha256_and_kept_as_derivatives(webp_set, tmp_path):
    root, idx, rows, webp = webp_set
    m = write_manifest(tmp_path / "m.parquet", rows)
    s = download_manifest(m, tmp_path / "img", from_tars=str(root), tar_index=str(idx), **FAST)
    got = rows_by_key(m)
    for pid, n in ((1001, 1), (2001, 2)):
        r = got[f"danbooru/{pid}"]
        assert (tmp_path / r["path"]).read_bytes() == webp[n]
        assert r["md5"] == md5(JPG[n])  # the post's md5 stays
        assert r["file_sha256"] == sha256(webp[n]) and r["derivative"] == "archive"
        assert Path(r["path"]).name == f"{md5(JPG[n])}.archive.webp"
        assert (r["width"], r["height"]) == (30 + n, 20)
    assert got["danbooru/5001"]["error"] == "checksum: 5001.webp in images/data-1001.tar does not match its index's sha256"
    assert got["danbooru/5001"]["path"] is None and got["danbooru/5001"]["file_sha256"] is None
    assert len(stored(tmp_path / "img")) == 2  # the tampered member was never kept
    assert s.derivatives == 2 and s.failed == {"checksum": 1}
    info = inspect_mod.inspect(m)
    assert info["derivatives"] == {"archive": 2}
    assert "derivatives: 2 files are re-encoded copies from an archive" in inspect_mod.render(info)

    s2 = download_manifest(m, tmp_path / "img", from_tars=str(root), tar_index=str(idx), **FAST)
    assert s2.already == 2 and s2.downloaded == 0  # a re-run keeps the derivatives


def test_reencoded_files_on_disk_are_rechecked_by_sha256(webp_set, tmp_path):
    root, idx, rows, webp = webp_set
    m = write_manifest(tmp_path / "m.parquet", rows[:2])
    download_manifest(m, tmp_path / "img", from_tars=str(root), tar_index=str(idx), **FAST)
    first = rows_by_key(m)["danbooru/1001"]["path"]
    (tmp_path / first).write_bytes(webp[2])  # a valid image, but not the archive's member
    m2 = write_manifest(tmp_path / "m.parquet", rows[:2])  # a fresh manifest finds the files on disk
    s = download_manifest(m2, tmp_path / "img", from_tars=str(root), tar_index=str(idx), **FAST)
    assert (tmp_path / first).read_bytes() == webp[1]
    assert s.reused == 1 and s.downloaded == 1


def test_danbooru2024_layout_index_beside_members_in_a_folder(tmp_path):
    root = tmp_path / "danbooru2024"
    png = encode(gradient(33, 22), "PNG")
    make_archive(root / "images" / "0001.tar", {"0001/1001.png": png, "0001/3001.jpg": JPG[7]},
                 root / "images" / "0001.json")
    make_archive(root / "images" / "0002.tar", {"0002/1002.jpg": JPG[8]}, root / "images" / "0002.json")
    rows = [post(1001, png, file_ext="png"), post(3001, JPG[7]), post(1002, JPG[8]), post(4003, JPG[9])]
    m = write_manifest(tmp_path / "m.parquet", rows)
    download_manifest(m, tmp_path / "img", from_tars=str(root), **FAST)
    assert landed(tmp_path, m) == {"danbooru/1001": png, "danbooru/3001": JPG[7], "danbooru/1002": JPG[8],
                                   "danbooru/4003": "not in archives"}
    assert rows_by_key(m)["danbooru/1001"]["path"].endswith(f"{md5(png)}.png")


def test_remote_archives_named_by_a_local_index_folder(webp_set, tmp_path):
    root, idx, rows, webp = webp_set
    srv = Server()
    try:
        for f in root.rglob("*.tar"):
            srv.add("/ds/" + f.relative_to(root).as_posix(), f.read_bytes())
        m = write_manifest(tmp_path / "m.parquet", rows)
        download_manifest(m, tmp_path / "img", from_tars=srv.url + "/ds", tar_index=str(idx), **FAST)
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()
    got = landed(tmp_path, m)
    assert got["danbooru/1001"] == webp[1] and got["danbooru/2001"] == webp[2]
    assert got["danbooru/5001"].startswith("checksum")
    assert srv.range_hits == 3 and not any(p.endswith(".json") for p in srv.hits)


@pytest.mark.parametrize("junk, says", [
    (b"{not json", "not an hfutils tar index"),
    (b'{"files": []}', "not an hfutils tar index"),
    (json.dumps({"filesize": 12, "files": {}}).encode(), "is for another version of its archive"),
])
def test_an_unreadable_index_is_one_line_naming_the_file(d2023, tmp_path, junk, says):
    root, rows = d2023
    bad = root / "original" / "data-0001.json"
    bad.write_bytes(junk)
    m = write_manifest(tmp_path / "m.parquet", rows)
    r = run_curate("download", m, "--from-tars", root)  # the command's entry point, in this process
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line, = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert says in line and str(bad) in line
    assert all(row["path"] is None and row["error"] is None for row in rows_by_key(m).values())  # nothing lost


def test_an_unreadable_archive_without_index_names_the_file(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    (root / "data-0001.tar").write_bytes(b"this is not a tar archive" * 40)
    with pytest.raises(CurateError, match="unreadable tar archive .*data-0001.tar"):
        Archives(root).find([1001])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CurateError, match="no .tar archives under"):
        Archives(tmp_path / "empty")
    with pytest.raises(CurateError, match="--tar-index: no such folder"):
        Archives(root, index=tmp_path / "nope")


def test_residue_of_archive_names():
    assert residue("data-0123") == (1000, 123) and residue("data-1123") == (1000, 123)
    assert residue("0123") == (1000, 123) and residue("posts-2024-7") == (10, 7)
    assert residue("extra") is None and residue("part12") is None


def test_the_first_archive_in_path_order_wins_and_others_are_not_guessed(tmp_path):
    root = tmp_path / "ds"
    make_archive(root / "a" / "data-0001.tar", {"1001.jpg": JPG[1]}, root / "a" / "data-0001.json")
    make_archive(root / "b" / "data-0001.tar", {"1001.jpg": JPG[2]}, root / "b" / "data-0001.json")
    make_archive(root / "b" / "misc.tar", {"42.jpg": JPG[3]})  # no id in its name: searched for every id
    found = Archives(root).find([1001, 42, 7])
    assert found[1001].label == "a/data-0001.tar" and found[42].label == "b/misc.tar" and 7 not in found


def test_local_archives_with_an_index_url(webp_set, tmp_path):
    root, idx, rows, webp = webp_set
    srv = Server()
    try:
        for js in idx.rglob("*.json"):
            srv.add("/idx/" + js.relative_to(idx).as_posix(), js.read_bytes())
        m = write_manifest(tmp_path / "m.parquet", rows)
        download_manifest(m, tmp_path / "img", from_tars=str(root), tar_index=srv.url + "/idx", **FAST)
        hits = dict(srv.hits)
        m2 = write_manifest(tmp_path / "m.parquet", rows)
        download_manifest(m2, tmp_path / "img", from_tars=str(root), tar_index=srv.url + "/idx", **FAST)
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()
    got = landed(tmp_path, m2)
    assert got["danbooru/1001"] == webp[1] and got["danbooru/5001"].startswith("checksum")
    assert hits == {"/idx/images/data-0001.json": 1, "/idx/images/data-1001.json": 1}
    assert srv.hits == {k: 2 for k in hits}  # asked again; unchanged headers: the cached lookup answers


def test_a_member_past_the_end_of_its_archive_is_an_error_row(tmp_path):
    root = tmp_path / "ds"
    index = make_archive(root / "data-0001.tar", {"1001.jpg": JPG[1], "2001.jpg": JPG[2]})
    del index["filesize"]  # an index without filesize cannot tell it is stale
    index["files"]["2001.jpg"]["offset"] = (root / "data-0001.tar").stat().st_size + 512
    (root / "data-0001.json").write_text(json.dumps(index))
    m = write_manifest(tmp_path / "m.parquet", [post(1001, JPG[1]), post(2001, JPG[2])])
    download_manifest(m, tmp_path / "img", from_tars=str(root), **FAST)
    assert landed(tmp_path, m) == {"danbooru/1001": JPG[1],
                                   "danbooru/2001": "truncated archive: data-0001.tar ends inside 2001.jpg"}


def test_big_runs_read_members_in_worker_processes(webp_set, d2023, tmp_path, monkeypatch):
    """The same rows as the thread path, from worker processes (used from PROCESSES_FROM jobs on)."""
    monkeypatch.setattr("curate.images.download.PROCESSES_FROM", 1)
    monkeypatch.setattr("curate.images.download.ARCHIVE_BATCH", 2)
    root, idx, rows, webp = webp_set
    m = write_manifest(tmp_path / "m.parquet", rows)
    s = download_manifest(m, tmp_path / "img", from_tars=str(root), tar_index=str(idx), **FAST)
    got = rows_by_key(m)
    assert (tmp_path / got["danbooru/1001"]["path"]).read_bytes() == webp[1]
    assert got["danbooru/2001"]["derivative"] == "archive" and got["danbooru/5001"]["error"].startswith("checksum")
    assert s.derivatives == 2 and s.downloaded == 2
    root2, rows2 = d2023
    m2 = write_manifest(tmp_path / "m2.parquet", rows2)
    download_manifest(m2, tmp_path / "img", from_tars=str(root2), **FAST)
    assert landed(tmp_path, m2)["danbooru/7001"] == JPG[4] and not list((tmp_path / "img" / ".part").iterdir())


KILL_ARCHIVE = """
import sys
from curate.cli import main
sys.argv = ["curate", "download", sys.argv[1], "--images", sys.argv[2], "--from-tars", sys.argv[3],
            "--max-pixels", "4096", "--workers", "2"]
main()
"""


def test_kill_9_during_an_archive_run_with_worker_processes_then_rerun(tmp_path):
    """A big run (worker processes) killed mid-way: the re-run finishes with every file verified."""
    import signal
    import time

    n = 1200  # over PROCESSES_FROM: members go to worker processes; downscaling keeps them busy
    bodies = {pid: encode(gradient(100 + pid % 200, 60 + pid // 200), "PNG") for pid in range(1, n + 1)}  # distinct
    root = tmp_path / "ds"  # one archive whose name holds no residue: searched for every id
    make_archive(root / "all.tar", {f"./{p}.png": b for p, b in bodies.items()}, root / "all.json")
    m = write_manifest(tmp_path / "m.parquet", [post(p, b, file_ext="png") for p, b in bodies.items()])
    img = tmp_path / "img"
    proc = subprocess.Popen([sys.executable, "-c", KILL_ARCHIVE, str(m), str(img), str(root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import psutil

    try:
        for _ in range(3000):
            if img.is_dir() and len(stored(img)) >= 30:
                break
            if proc.poll() is not None:
                pytest.fail("the download finished before it could be killed")
            time.sleep(0.01)
        workers = psutil.Process(proc.pid).children()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert len(stored(img)) < n
    assert workers, "the run had no worker processes"
    # the workers die with their parent, not minutes later holding the archives open (issue 25):
    # ProcessPoolExecutor leaves them running on (python/cpython#111873; the same fix as
    # blacklanternsecurity/bbot#3203: PR_SET_PDEATHSIG in the worker initializer)
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"archive workers outlived the killed download: {[p.pid for p in alive]}"
    s = download_manifest(m, img, from_tars=str(root), max_pixels=4096, **FAST)
    rows = rows_by_key(m)
    assert all(r["error"] is None for r in rows.values()) and s.downloaded + s.reused == n
    for r in rows.values():
        w, h = r["width"], r["height"]
        assert w * h <= 4096 and (tmp_path / r["path"]).is_file()
    assert len(stored(img)) == n
