"""Issue 26.4: a caption run killed before it saved the manifest (kill -9, SIGTERM, Ctrl-C):
the re-run recognises the files it had just written as its own and brings them up to date."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from curate.dataset import caption
from tests.dataset.test_caption import captions_of, write_manifest
from tests.dataset.test_caption_confined import row

KILL_AT_4TH_WRITE = (
    "import os, signal, sys\n"
    "from curate.dataset import caption\n"
    "real, n = caption._write_bytes, []\n"
    "def write(path, data):\n"
    "    n.append(path)\n"
    "    if len(n) > 3:\n"
    "        os.kill(os.getpid(), getattr(signal, sys.argv[2]))\n"
    "    real(path, data)\n"
    "caption._write_bytes = write\n"
    "caption.run(sys.argv[1])\n"
)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_a_killed_caption_run_is_finished_by_the_rerun(tmp_path, how):
    ids = list(range(101, 107))
    rows = [row(i, path=f"images/{i}.png") for i in ids]
    m = write_manifest(tmp_path / "m.parquet", rows)
    proc = subprocess.run([sys.executable, "-c", KILL_AT_4TH_WRITE, str(m), how], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode != 0
    written = sorted(p.name for p in (tmp_path / "images").glob("*.txt"))
    assert len(written) == 3 and captions_of(m)[f"danbooru/{ids[0]}"] is None  # the manifest never saw them
    s = caption.run(m)  # the same settings: every file is the run's own
    assert s.left_alone == [] and s.written == 6
    caps = captions_of(m)
    for i in ids:
        assert (tmp_path / "images" / f"{i}.txt").read_text(encoding="utf-8") == caps[f"danbooru/{i}"]
    assert not m.with_name(m.name + ".caption-journal.jsonl").exists()


def test_a_file_a_person_edited_after_the_kill_is_still_left_alone(tmp_path):
    ids = list(range(201, 206))
    m = write_manifest(tmp_path / "m.parquet", [row(i, path=f"images/{i}.png") for i in ids])
    proc = subprocess.run([sys.executable, "-c", KILL_AT_4TH_WRITE, str(m), "SIGKILL"], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == -signal.SIGKILL
    edited = sorted((tmp_path / "images").glob("*.txt"))[0]
    edited.write_text("my own words", encoding="utf-8")
    s = caption.run(m)
    assert edited.read_text(encoding="utf-8") == "my own words" and len(s.left_alone) == 1
