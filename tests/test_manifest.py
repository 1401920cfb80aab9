"""curate.manifest: real Parquet files, a real second process (the CLI) on the same manifest.
The one-line error checks run the command in this process (tests/inproc.py): they are about
what it prints and its exit code, not about a second process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate import manifest as mf
from curate.errors import CurateError
from tests.inproc import in_new_process as curate  # the command in a new interpreter
from tests.inproc import run_curate


@pytest.fixture
def local(tmp_path) -> Path:
    """An ingested folder of three images: a manifest stages can work on."""
    d = tmp_path / "cg"
    d.mkdir()
    for i in range(3):
        Image.new("RGB", (32, 24), (i * 80, 20, 200)).save(d / f"im{i}.png")
    m = tmp_path / "m.parquet"
    assert run_curate("ingest", d, "--out", m).returncode == 0
    return m


def test_a_second_process_writing_meanwhile_loses_nothing(local):
    # this process plays the long stage (download): it read the manifest, works, checkpoints
    table, meta = mf.read(local)
    r = curate("caption", local)  # meanwhile another process captions the same manifest
    assert r.returncode == 0, r.stderr
    captions = pq.read_table(local).column("caption").to_pylist()
    assert all(c is not None for c in captions)
    errors = ["download: http 404", None, None]
    table = mf.with_column(table, "error", errors)
    mf.record_stage(meta, "download", images="x")
    mf.write(table, local, meta)  # a checkpoint: merged, not overwritten
    got = pq.read_table(local)
    assert got.column("caption").to_pylist() == captions
    assert got.column("error").to_pylist() == errors
    got_meta = json.loads(got.schema.metadata[b"curate"])
    assert {"caption", "download", "ingest"} <= set(got_meta["stages"])
    # a later write of the same in-memory table (the stage's final write) keeps both too
    mf.write(mf.with_column(table, "md5", ["a", "b", "c"]), local, meta)
    got = pq.read_table(local)
    assert got.column("caption").to_pylist() == captions and got.column("md5").to_pylist() == ["a", "b", "c"]


def test_the_same_cell_changed_by_both_is_a_one_line_error(local):
    table, meta = mf.read(local)
    other = subprocess.run([sys.executable, "-c", (
        "import sys; from curate import manifest as mf\n"
        "t, m = mf.read(sys.argv[1]); mf.write(mf.with_column(t, 'caption', ['x', None, None]), sys.argv[1], m)"),
        str(local)], capture_output=True, text=True)
    assert other.returncode == 0, other.stderr
    before = local.read_bytes()
    with pytest.raises(CurateError, match="changed by another curate process.*column 'caption'") as exc:
        mf.write(mf.with_column(table, "caption", ["y", None, None]), local, meta)
    assert "\n" not in str(exc.value)
    assert local.read_bytes() == before
    # different rows of one column merge
    table, meta = mf.read(local)
    assert subprocess.run([sys.executable, "-c", (
        "import sys; from curate import manifest as mf\n"
        "t, m = mf.read(sys.argv[1]); mf.write(mf.with_column(t, 'caption', ['x', 'b', None]), sys.argv[1], m)"),
        str(local)]).returncode == 0
    mf.write(mf.with_column(table, "caption", ["x", None, "c"]), local, meta)
    assert pq.read_table(local).column("caption").to_pylist() == ["x", "b", "c"]


def test_stale_temp_files_are_cleaned_on_the_next_write(local):
    stale = local.parent / f"{local.name}.k2j3h4g5.part"  # what a killed writer leaves
    stale.write_bytes(b"half a parquet file")
    other = local.parent / "unrelated.part"
    other.write_bytes(b"not ours")
    theirs = local.parent / f"{local.name}.decisions.jsonl.part"  # another writer's temp file, mid-write
    theirs.write_bytes(b"{}")
    table, meta = mf.read(local)
    mf.write(table, local, meta)
    assert not stale.exists() and other.exists() and theirs.exists()
    assert sorted(p.name for p in local.parent.glob("*.part")) == [theirs.name, "unrelated.part"]


def test_mode_follows_the_previous_file_or_the_umask(tmp_path, local):
    os.chmod(local, 0o644)
    table, meta = mf.read(local)
    mf.write(table, local, meta)
    assert local.stat().st_mode & 0o777 == 0o644
    old = os.umask(0o027)
    try:
        new = tmp_path / "new.parquet"
        mf.write(table, new, meta)
    finally:
        os.umask(old)
    assert new.stat().st_mode & 0o777 == 0o640


def _bad_manifest(path: Path, keys, meta: bytes | None = b"{}"):
    t = pa.table({"key": pa.array(keys, pa.string())})
    if meta is not None:
        t = t.replace_schema_metadata({b"curate": meta})
    pq.write_table(t, path)


@pytest.mark.parametrize("keys, meta, error", [
    (["a", "a", "b"], b"{}", "duplicate key 'a'"),
    (["a", None], b"{}", "1 rows have no key"),
    (["a", ""], b"{}", "1 rows have no key"),
    ([None, None], b"{}", "2 rows have no key"),
    ([], b"{}", None),
    (["a"], b'{"stages": {"crop": "done"}}', "malformed provenance metadata"),
    (["a"], b"[1, 2]", "malformed provenance metadata"),
    (["a"], b'{"stages": "x"}', "malformed provenance metadata"),
    (["a"], b"\xff\xfe", "unreadable provenance metadata"),
])
def test_malformed_manifests_are_one_line_errors_before_any_work(tmp_path, keys, meta, error):
    m = tmp_path / "bad.parquet"
    _bad_manifest(m, keys, meta)
    if error is None:  # an empty manifest is fine
        assert mf.read(m)[0].num_rows == 0
        return
    with pytest.raises(CurateError, match=error):
        mf.read(m)
    before = m.read_bytes()
    for cmd in (["inspect", m], ["caption", m], ["crop", m]):
        r = run_curate(*cmd)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and error.split("'")[0] in r.stderr
    assert m.read_bytes() == before


def test_keys_of_the_wrong_type_are_an_error(tmp_path):
    m = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"key": [1, 2], "width": ["wide", "tall"]}), m)
    with pytest.raises(CurateError, match="wrong type"):
        mf.read(m)


def test_caption_while_download_runs_loses_neither(tmp_path):
    """The case as users meet it: `curate download` fetching slow files in one process,
    `curate caption` on the same manifest in another, finishing first."""
    import time

    from curate.images.download import download_manifest
    from tests.images.test_download import (
        FAST,
        Server,
        encode,
        gradient,
        post,
        rows_by_key,
        write_manifest,
    )

    server = Server()
    try:
        bodies = [encode(gradient(40 + i, 30), "JPEG") for i in range(10)]
        rows = [post(i + 1, b, server.add(f"/{i}.jpg", b, stall=0 if i < 4 else 1.5),
                     subset="s", tags_general=["1girl", f"tag_{i}"]) for i, b in enumerate(bodies)]
        m, img = write_manifest(tmp_path / "m.parquet", rows[:4]), tmp_path / "img"
        download_manifest(m, img, **FAST)  # four rows are on disk already
        table, meta = mf.read(m)
        mf.write(pa.concat_tables([table, mf.conform(pa.Table.from_pylist(rows[4:]))
                                   .select(table.column_names)]), m, meta)
        download = subprocess.Popen([sys.executable, "-m", "curate", "download", m, "--images", img,
                                     "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        while not any(server.hits.get(f"/{i}.jpg") for i in range(4, 10)):  # it has read the manifest
            assert download.poll() is None, download.communicate()
            time.sleep(0.05)
        r = curate("caption", m)
        assert r.returncode == 0, r.stderr
        assert download.poll() is None  # the download is still fetching: its write comes after caption's
        assert download.wait(timeout=120) == 0, download.communicate()
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
    got = rows_by_key(m)
    assert all(got[f"danbooru/{i}"]["path"] and got[f"danbooru/{i}"]["error"] is None for i in range(1, 11))
    assert [got[f"danbooru/{i}"]["caption"] for i in range(1, 5)] == [f"1girl, tag {i}" for i in range(4)]
    stages = mf.read(m)[1]["stages"]
    assert "caption" in stages and "download" in stages


@pytest.mark.parametrize("column, values, error", [
    ("phash", pa.array(["1e+30", None], pa.string()), "1 rows have a malformed phash"),
    ("phash", pa.array([1e30, None]), "1 rows have a malformed phash"),  # a float column, cast to text
    ("dhash", pa.array(["0123456789abcdeg", "0123456789abcdef"]), "1 rows have a malformed dhash"),
    ("crop", pa.array([[1, 2], None], pa.list_(pa.int32())), "1 rows have a malformed crop"),
    ("crop", pa.array([[10, 0, 5, 8], [0, 0, 4, 4]], pa.list_(pa.int32())), "1 rows have a malformed crop"),
    ("crop", pa.array([[0, None, 4, 4], None], pa.list_(pa.int32())), "1 rows have a malformed crop"),
])
def test_malformed_hashes_and_crop_boxes_are_one_line_errors(tmp_path, column, values, error):
    """A hand-edited or foreign manifest: dedupe parsed the hash, report indexed the box (tracebacks)."""
    m = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"key": ["a", "b"], column: values}), m)
    with pytest.raises(CurateError, match=error):
        mf.read(m)
    for cmd in (["dedupe", m], ["report", m, "--out", tmp_path / "r.html"]):
        r = run_curate(*cmd)
        assert r.returncode == 2 and r.stderr.startswith(f"error: manifest {m}: {error}")
        assert len(r.stderr.strip().splitlines()) == 1


def test_good_hashes_and_crop_boxes_read(tmp_path):
    m = tmp_path / "ok.parquet"
    pq.write_table(pa.table({"key": ["a", "b"], "phash": ["ffffffffffffffff", None],
                             "dhash": ["0123456789ABCDEF", None],
                             "crop": pa.array([[0, 0, 4, 4], None], pa.list_(pa.int32()))}), m)
    assert mf.read(m)[0].column("crop").to_pylist() == [[0, 0, 4, 4], None]
