"""Issue 26.4: an image replaced under the same name. Export never ships the new pixels
under the old facts; the next ingest reads the file again and clears what stages derived."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from curate import manifest
from curate.dataset import export
from tests.inproc import run_curate as run


def curate(*args):
    """The command in this process (the test is about the manifest, not the process): its stdout."""
    r = run(*args)
    assert r.returncode == 0, r.stderr
    return r.stdout


def rows(m):
    return {Path(r["source_path"]).name: r for r in manifest.read(m)[0].to_pylist()}


def test_a_replaced_image_is_left_out_of_export_then_redone_by_ingest(tmp_path):
    folder, m = tmp_path / "cg", tmp_path / "m.parquet"
    folder.mkdir()
    Image.new("RGB", (96, 64), (200, 30, 40)).save(folder / "a.png")
    Image.new("RGB", (64, 64), (20, 130, 40)).save(folder / "b.png")
    curate("ingest", folder, "--out", m, "--workers", 1)
    curate("crop", m, "--workers", 1)
    table, meta = manifest.read(m)
    manifest.write(manifest.with_column(table, "caption", ["solo, red", "solo, green"]), m, meta)
    before = rows(m)["a.png"]
    assert before["source_size"] == (folder / "a.png").stat().st_size and before["crop"] == [0, 0, 96, 64]

    Image.new("RGB", (40, 120), (0, 0, 255)).save(folder / "a.png")  # replaced: another size and picture
    s = export.run([m], tmp_path / "out", link="copy")
    assert s.skipped == {"image changed since ingest (run curate ingest again)": 1}
    assert sum(n for _, n, _ in s.subsets) == 1

    out = curate("ingest", folder, "--out", m, "--workers", 1)
    assert "1 images were replaced under the same name" in out
    after = rows(m)["a.png"]
    assert (after["width"], after["height"]) == (40, 120) and after["sha256"] != before["sha256"]
    assert after["key"] == before["key"]  # decisions stay attached
    assert after["crop"] is None and after["caption"] is None and after["path"] == after["source_path"]
    assert rows(m)["b.png"]["crop"] == [0, 0, 64, 64]  # the others keep what they had


def test_a_touched_file_with_the_same_bytes_is_no_change(tmp_path):
    folder, m = tmp_path / "cg", tmp_path / "m.parquet"
    folder.mkdir()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(folder / "a.png")
    curate("ingest", folder, "--out", m, "--workers", 1)
    table, meta = manifest.read(m)
    manifest.write(manifest.with_column(table, "caption", ["solo"]), m, meta)
    st = (folder / "a.png").stat()
    os.utime(folder / "a.png", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    s = export.run([m], tmp_path / "out", link="copy")
    assert not s.skipped and sum(n for _, n, _ in s.subsets) == 1
    assert "replaced" not in curate("ingest", folder, "--out", m, "--workers", 1)
