"""Issue 26.3 and 26.4: an export killed or stopped by a full disk; a re-run finishes and
removes only what an export recorded as its own."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from curate.dataset import export
from curate.errors import CurateError
from tests.dataset.test_export import small_manifest
from tests.small_disk import fill, small_disk


def files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() or p.is_symlink())


KILL_AT_4TH_COPY = (
    "import os, shutil, signal, sys\n"
    "from curate.dataset import export\n"
    "real, n = shutil.copy2, []\n"
    "def copy(a, b):\n"
    "    n.append(b)\n"
    "    if len(n) > 3:\n"
    "        os.kill(os.getpid(), signal.SIGKILL)\n"
    "    return real(a, b)\n"
    "shutil.copy2 = copy\n"
    "export.run(sys.argv[1:2], sys.argv[2], link='copy')\n"
)


def test_a_killed_first_export_rerun_keeps_the_files_the_user_added(tmp_path):
    train = small_manifest(tmp_path / "train.parquet", {"main": 6}, "train")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", KILL_AT_4TH_COPY, str(train), str(out)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (out / export.JOURNAL).is_file()
    mine = out / "train" / "main" / "my_notes.txt"  # added by hand between the runs
    mine.write_text("keep me")
    other = out / "extra" / "reference.png"
    other.parent.mkdir()
    other.write_bytes(b"\x89PNG mine")
    s = export.run([train], out, link="copy")
    assert sum(n for _, n, _ in s.subsets) == 6
    assert mine.read_text() == "keep me" and other.read_bytes() == b"\x89PNG mine"
    assert not (out / export.JOURNAL).exists()
    record = json.loads((out / export.MARKER).read_text())
    assert "train/main/my_notes.txt" not in record["files"] and "extra/reference.png" not in record["files"]
    # a second export with fewer rows removes only its own leftovers
    small = small_manifest(tmp_path / "train.parquet", {"main": 2}, "train")
    export.run([small], out, link="copy")
    assert mine.exists() and other.exists()
    assert len([f for f in files(out / "train" / "main") if f.endswith(".png")]) == 2


def test_a_full_disk_during_export_is_one_line_and_the_rerun_finishes(tmp_path):
    train = small_manifest(tmp_path / "train.parquet", {"main": 12}, "train")
    with small_disk(tmp_path / "disk", "512k") as disk:
        out = disk / "out"
        filler = fill(disk, leave=6 * 4096)
        with pytest.raises(CurateError, match=r"No space left on device") as exc:
            export.run([train], out, link="copy")
        assert "\n" not in str(exc.value)
        with pytest.raises(CurateError, match=r"No space left on device"):  # still full: same line, no "damaged"
            export.run([train], out, link="copy")
        marker = out / export.MARKER
        assert marker.is_file() and json.loads(marker.read_text())  # never an empty marker
        filler.unlink()
        s = export.run([train], out, link="copy")
        assert sum(n for _, n, _ in s.subsets) == 12
        assert len([f for f in files(out / "train" / "main") if f.endswith(".txt")]) == 12


def test_a_full_disk_during_report_is_one_line_and_the_rerun_finishes(tmp_path):
    from curate.report import html

    train = small_manifest(tmp_path / "train.parquet", {"main": 30}, "train")
    with small_disk(tmp_path / "disk", "512k") as disk:
        filler = fill(disk, leave=3 * 4096)
        with pytest.raises(CurateError, match="No space left on device") as exc:
            html.build([train], disk / "report.html", workers=1)
        assert "\n" not in str(exc.value)
        filler.unlink()
        s = html.build([train], disk / "report.html", workers=1)
        assert (disk / "report.html").is_file() and s.thumbs_failed == 0
        assert not list(disk.rglob("*.part"))
