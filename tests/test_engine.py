"""--engine ray: a real local Ray (2 CPUs) gives the same manifest as the local engine;
failed shards are retried; a re-run after a crash redoes only unfinished shards."""

import shutil
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

ray = pytest.importorskip("ray")

from typer.testing import CliRunner  # noqa: E402

from curate import engine
from curate import manifest as mf  # noqa: E402
from curate.cli import app  # noqa: E402
from curate.dataset import dedupe  # noqa: E402
from curate.errors import CurateError  # noqa: E402
from curate.images.download import download_manifest  # noqa: E402
from tests.dataset.test_dedupe import letterbox, picture  # noqa: E402
from tests.images.test_download import FAST, IMG, post, server, write_manifest  # noqa: E402,F401 (server: a fixture)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 << 20)
    yield
    ray.shutdown()


def columns(path: Path, names: list[str]) -> dict:
    """The manifest's columns; error messages that name a file name it relative to the manifest."""
    table, _ = mf.read(path)
    got = {c: table.column(c).to_pylist() for c in names}
    if "error" in got:
        got["error"] = [e and e.replace(str(path.parent.resolve()), "<dir>") for e in got["error"]]
    return got


def twin(path: Path, where: Path) -> Path:
    """The same manifest and images in another folder (each engine gets its own copy)."""
    shutil.copytree(path.parent, where)
    return where / path.name


# --- dedupe ----------------------------------------------------------------------------


def dedupe_inputs(folder: Path) -> tuple[Path, Path]:
    """A manifest with exact and near duplicates, a broken file, an error row; and an --against one."""
    folder.mkdir()
    rows = []
    for i in range(6):
        picture(i, 200, 120).save(folder / f"p{i}.png")
        rows.append({"key": f"local/p{i}", "path": f"p{i}.png"})
    letterbox(picture(1, 200, 120), 20).save(folder / "p1_lb.png")  # near duplicate of p1
    shutil.copy(folder / "p2.png", folder / "p2_copy.png")  # same bytes
    picture(3, 200, 120).save(folder / "p3.jpg", quality=92)  # same picture, another encoding
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    rows += [{"key": "local/p1_lb", "path": "p1_lb.png"}, {"key": "local/p2_copy", "path": "p2_copy.png"},
             {"key": "local/p3_jpg", "path": "p3.jpg"}, {"key": "local/broken", "path": "broken.png"},
             {"key": "local/failed", "path": "p0.png", "error": "download: 404"}]
    m = folder / "m.parquet"
    mf.write(pa.Table.from_pylist([{"error": None, **r} for r in rows]), m, mf.new_provenance())
    picture(5, 240, 150).save(folder / "other5.png")  # a bigger twin of p5 in the other manifest
    other = folder / "other.parquet"
    mf.write(pa.Table.from_pylist([{"key": "other/5", "path": "other5.png", "error": None}]), other,
             mf.new_provenance())
    return m, other


HASHED = ["key", "phash", "dhash", "colour", "sha256", "dup_of", "error"]


def test_dedupe_on_ray_matches_local(tmp_path):
    m_local, other = dedupe_inputs(tmp_path / "local")
    m_ray = twin(m_local, tmp_path / "ray")
    s1 = dedupe.run(m_local, [other], workers=1)
    s2 = dedupe.run(m_ray, [m_ray.parent / other.name], ray=engine.RayOptions(shard_rows=3))

    got = columns(m_ray, HASHED)
    assert got == columns(m_local, HASHED)
    dup = dict(zip(got["key"], got["dup_of"]))
    assert dup["local/p1_lb"] == "local/p1" and dup["local/p2_copy"] == "local/p2"
    assert dup["local/p5"] == "other/5"
    assert got["error"][got["key"].index("local/broken")].startswith("dedupe:")
    counts = lambda s: (s.hashed, s.failed, s.duplicates, s.exact_bytes, s.near_pairs, s.against)  # noqa: E731
    assert counts(s2) == counts(s1)
    assert s2.hashed == 9 and s2.duplicates >= 3
    assert not (m_ray.parent / "m.parquet.work").exists()  # shard results dropped once merged

    s3 = dedupe.run(m_ray, ray=engine.RayOptions(shard_rows=3))  # stored hashes: nothing hashed again
    assert s3.hashed == 0 and s3.reused == 9


def test_cli_dedupe_engine_ray(tmp_path):
    m_local, _ = dedupe_inputs(tmp_path / "local")
    m_ray = twin(m_local, tmp_path / "ray")
    runner = CliRunner()
    r = runner.invoke(app, ["dedupe", str(m_ray), "--engine", "ray", "--shard-rows", "4"])
    assert r.exit_code == 0, r.output
    assert "9 hashed" in r.output
    assert runner.invoke(app, ["dedupe", str(m_local)]).exit_code == 0
    assert columns(m_ray, HASHED) == columns(m_local, HASHED)


def test_engine_options_are_checked():
    with pytest.raises(CurateError, match="--engine must be one of local, ray"):
        engine.options("spark")
    with pytest.raises(CurateError, match="--ray-address needs --engine ray"):
        engine.options("local", "10.0.0.1:6379")
    with pytest.raises(CurateError, match="--shard-rows"):
        engine.options("ray", None, 0)
    assert engine.options("local") is None


def test_engine_ray_without_ray_installed_says_how_to_install(tmp_path):
    m, _ = dedupe_inputs(tmp_path / "m")
    code = ("import sys\nsys.modules['ray'] = None  # as if not installed\nfrom curate.cli import main\n"
            f"sys.argv = ['curate', 'dedupe', {str(m)!r}, '--engine', 'ray']\nmain()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --engine ray needs Ray, which is not installed: pip install 'curate[ray]'"]


def test_a_ray_address_where_no_ray_listens_is_one_line(tmp_path):
    m, _ = dedupe_inputs(tmp_path / "m")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = subprocess.run([sys.executable, "-m", "curate", "dedupe", str(m), "--engine", "ray",
                        "--ray-address", f"127.0.0.1:{port}"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: --ray-address 127.0.0.1:{port}: no Ray there (Connection refused)"


def test_local_engine_never_imports_ray(tmp_path):
    m, _ = dedupe_inputs(tmp_path / "m")
    code = ("import sys\nfrom curate.cli import main\n"
            f"sys.argv = ['curate', 'dedupe', {str(m)!r}, '--workers', '1']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\nprint('ray imported:', 'ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "9 hashed" in out and out.strip().endswith("ray imported: False")


def test_help_imports_neither_ray_nor_torch():
    code = ("import sys\nfrom curate.cli import main\nsys.argv = ['curate', 'dedupe', '--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('ray' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "--engine" in out and out.strip().endswith("False False")


# --- retry and resume, on the engine itself ----------------------------------------------


def hash_inputs(folder: Path, n: int = 10) -> pa.Table:
    folder.mkdir()
    for i in range(n):
        picture(100 + i, 120, 80).save(folder / f"h{i}.png")
    return pa.table({"key": [f"local/h{i}" for i in range(n)], "path": [f"h{i}.png" for i in range(n)],
                     "error": pa.nulls(n, pa.string())})


def test_a_failed_shard_is_retried(tmp_path, monkeypatch):
    rows = hash_inputs(tmp_path / "img")
    fn = partial(dedupe.hash_rows, base=tmp_path / "img", cached=False)
    expected, _ = fn(rows)
    work = tmp_path / "work"
    monkeypatch.setenv(engine.FAIL_ENV, "2")  # shard 2's first attempt raises
    with engine.connect(engine.RayOptions(shard_rows=3)) as cluster:
        out, stats = cluster.map(fn, rows, work)
    assert [f.read_text() for f in work.glob("000002-*.failures")] == ["1"]  # it failed once ...
    assert out.equals(expected)  # ... and its retry gave the same rows as one local call
    assert sum(st["hashed"] for st in stats) == 10 and len(stats) == 4


def test_rerun_after_a_crash_redoes_only_unfinished_shards(tmp_path, monkeypatch):
    rows = hash_inputs(tmp_path / "img")
    fn = partial(dedupe.hash_rows, base=tmp_path / "img", cached=False)
    expected, _ = fn(rows)
    work = tmp_path / "work"
    monkeypatch.setenv(engine.FAIL_ENV, "4:99")  # the last shard fails every time: the run dies
    with engine.connect(engine.RayOptions(shard_rows=2, retries=1)) as cluster:
        with pytest.raises(CurateError, match=r"shard 4 failed after 2 tries .*injected failure.*re-run"):
            cluster.map(fn, rows, work)
    finished = {f.name: f.stat().st_mtime_ns for f in work.glob("*.parquet")}
    assert 1 <= len(finished) <= 4 and not any(name.startswith("000004-") for name in finished)

    monkeypatch.delenv(engine.FAIL_ENV)
    with engine.connect(engine.RayOptions(shard_rows=2, retries=1)) as cluster:
        out, _ = cluster.map(fn, rows, work)
        assert (cluster.reused, cluster.ran) == (len(finished), 5 - len(finished))
    assert out.equals(expected)
    assert {f.name: f.stat().st_mtime_ns for f in work.glob("*.parquet") if f.name in finished} == finished

    other = partial(dedupe.hash_rows, base=tmp_path / "img", cached=True)  # other settings: nothing reused
    with engine.connect(engine.RayOptions(shard_rows=2)) as cluster:
        cluster.map(other, rows, work)
        assert (cluster.reused, cluster.ran) == (0, 5)


# --- download --------------------------------------------------------------------------------


def test_download_on_ray_matches_local(server, tmp_path):
    rows = [post(i, data, server.add(f"/{name}", data)) for i, (name, data) in enumerate(IMG.items(), 1)]
    rows += [post(20, IMG["jpg"], server.add("/dup.jpg", IMG["jpg"])),  # the same file as post 1
             post(21, IMG["png"], server.url + "/missing.png"),  # post 2's file: the same result
             post(24, b"never served", server.url + "/missing.jpg"),
             post(22, b"other bytes", server.add("/wrong.jpg", IMG["jpg"])),
             post(23, b"zip", server.add("/u.zip", b"PK\x03\x04"), file_ext="zip")]
    m_local = write_manifest(tmp_path / "local" / "m.parquet", rows)
    m_ray = write_manifest(tmp_path / "ray" / "m.parquet", rows)
    s1 = download_manifest(m_local, **FAST)
    s2 = download_manifest(m_ray, ray=engine.RayOptions(shard_rows=3), **FAST)

    names = ["key", "path", "error", "width", "height"]
    got = columns(m_ray, names)
    assert got == columns(m_local, names)
    assert got["error"].count(None) == len(IMG) + 2 and "http 404" in got["error"]
    assert all((m_ray.parent / p).is_file() for p in got["path"] if p)
    assert s2.failed == s1.failed and s2.downloaded == s1.downloaded == len(IMG)
    assert s2.reused == s1.reused == 0


def test_download_from_archives_on_ray_matches_local(tmp_path):
    """Archive members on Ray shards: the same paths, errors and derivative columns as here."""
    from tests.common.test_decode import encode, gradient
    from tests.images.test_tars import JPG, make_archive

    webp = encode(gradient(30, 20), "WEBP")
    root = tmp_path / "ds"
    make_archive(root / "original" / "data-0001.tar", {"./1001.jpg": JPG[1], "./2001.webp": webp},
                 root / "original" / "data-0001.json")
    rows = [post(1001, JPG[1]), post(2001, JPG[2]), post(3002, JPG[3])]  # 2001: a re-encode; 3002: nowhere
    m_local = write_manifest(tmp_path / "local" / "m.parquet", rows)
    m_ray = write_manifest(tmp_path / "ray" / "m.parquet", rows)
    download_manifest(m_local, from_tars=str(root), **FAST)
    s = download_manifest(m_ray, from_tars=str(root), ray=engine.RayOptions(shard_rows=1), **FAST)
    names = ["key", "path", "error", "width", "height", "file_sha256", "derivative"]
    got = columns(m_ray, names)
    assert got == columns(m_local, names)
    assert got["derivative"] == [None, "archive", None] and got["error"] == [None, None, "not in archives"]
    assert s.derivatives == 1


# --- tag ---------------------------------------------------------------------------------------


def test_tag_on_ray_matches_local(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("timm")
    from curate.dataset import tag
    from tests.dataset.test_tag import (
        make_images,
        make_manifest,
        make_tagger,
        small_labels,
    )

    model = tmp_path / "model"
    make_tagger(model, "vit", small_labels())
    m_local = make_manifest(tmp_path / "local" / "m.parquet", make_images(tmp_path / "local" / "img"))
    m_ray = twin(m_local, tmp_path / "ray")
    s1 = tag.run(m_local, str(model), device="cpu", workers=0, progress=False)
    monkeypatch.setenv(engine.FAIL_ENV, "1")  # the actor's first try of shard 1 raises: retried on the actor
    s2 = tag.run(m_ray, str(model), device="cpu", workers=0, progress=False, ray=engine.RayOptions(shard_rows=2))

    a, b = (columns(m, ["key", "tagger", "error"]) for m in (m_local, m_ray))
    assert b["key"] == a["key"] and b["error"] == a["error"]
    assert sum(t is not None for t in b["tagger"]) == s2.tagged == s1.tagged == 5
    for x, y in zip(a["tagger"], b["tagger"]):
        assert (x is None) == (y is None)
        if x is not None:
            assert [(e["tag"], e["category"]) for e in y] == [(e["tag"], e["category"]) for e in x]
            np.testing.assert_allclose([e["score"] for e in y], [e["score"] for e in x], rtol=1e-5, atol=1e-6)
    assert s2.failed == s1.failed and sum(s2.failed.values()) == 1  # broken.jpg
    assert (s2.skipped_dups, s2.skipped_error, s2.missing) == (s1.skipped_dups, s1.skipped_error, s1.missing)
    assert "Ray actor" in s2.device
    assert mf.read(m_ray)[1]["stages"]["tag"]["complete"] is True
