"""The Makefile's own logic, with each stage's command echoed instead of run (CURATE="echo
curate"): which stages a change re-runs, and the test target's summary line."""

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def make(tmp: Path, *args: str) -> str:
    cmd = ["make", "--no-print-directory", "-C", str(ROOT), "-o", f"{VENV}/.installed", f"VENV={VENV}",
           "CURATE=echo curate", f"QUERY={tmp}/q.toml", f"REG={tmp}/m/reg.parquet", f"CG={tmp}/cg",
           f"CGM={tmp}/m/cg.parquet", f"CONFIG={tmp}/train.toml", f"KOHYA={tmp}/kohya", f"STAMPS={tmp}/m/.make",
           f"REPORT={tmp}/report.html", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def newer(path: Path, text: str = "") -> None:
    """Write `path` after every stamp (make compares mtimes, to the nanosecond here)."""
    time.sleep(0.05)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def exported(tmp: Path) -> None:
    newer(tmp / "kohya" / "dataset_config.toml", "x")  # what a real export writes


def ran(out: str) -> set[str]:
    return {m.group(1) for m in re.finditer(r"^curate (\S+) ", out, re.M)}


@pytest.fixture
def built(tmp_path):
    for f in ("q.toml", "train.toml", "m/reg.parquet", "m/cg.parquet", "cg/a.png"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("x")
    first = make(tmp_path, "dataset")
    assert ran(first) == {"build-reg", "download", "caption", "ingest", "dedupe", "crop", "tag", "export"}
    exported(tmp_path)
    assert ran(make(tmp_path, "dataset")) == set()  # up to date
    return tmp_path


def test_review_decisions_rerun_dedupe_and_what_follows_then_the_export(built):
    """issue 25: `make cg dataset` after a review said "Nothing to be done" and exported a dropped image."""
    newer(built / "m" / "cg.parquet.decisions.jsonl", '{"key": "local/1", "action": "drop"}\n')
    out = make(built, "dataset")
    assert ran(out) == {"dedupe", "crop", "tag", "caption", "export"}, out
    exported(built)
    assert ran(make(built, "dataset")) == set()  # applied once


def test_reg_decisions_recaption_the_reg_set_and_redo_dedupe_against_it(built):
    newer(built / "m" / "reg.parquet.decisions.jsonl", '{"key": "danbooru/1", "action": "drop"}\n')
    out = make(built, "dataset")
    assert {"caption", "dedupe", "export"} <= ran(out) and "build-reg" not in ran(out) and "download" not in ran(out)
    assert f"curate caption {built}/m/reg.parquet" in out


def test_make_test_prints_the_pytest_summary_line(tmp_path):
    """CI reads the 'N passed' line: pyproject's addopts -q plus another -q (-qq) hides it
    (pytest's quiet levels: asottile/detect-test-pollution#8; tools parse that line, e.g.
    Dave-London/Pare#1118)."""
    out = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "-o", f"{VENV}/.installed", f"VENV={VENV}",
                          "test", "PYTEST_ARGS=-n 1 -p no:cacheprovider tests/test_layout.py"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert re.search(r"^\d+ passed", out.stdout, re.M), out.stdout[-2000:]
