"""The manifests the report tests read: the demo's generators run through every stage.

A generated corpus served over HTTP by the Danbooru look-alike (build-reg + download), and a
generated CG folder (ingest, dedupe --against the reg set, crop, tag with the demo's tiny
tagger, caption). The stages run in this process through the CLI (tests/inproc.run_curate): these
tests are about the report, not the stages' processes (tests/report/test_html.py keeps the
installed `curate report` command's exit codes). Built once per session; under pytest-xdist
once per run, by whichever worker asks first (a file lock in the run's shared temp folder).
Nothing here may change them: a test that writes copies them first (see `copy_manifests`).
"""

import fcntl
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.inproc import run_curate

ROOT = Path(__file__).resolve().parents[2]


def invoke(*args) -> str:
    r = run_curate(*args)
    assert r.returncode == 0, (args[0], r.stdout, r.stderr)
    return r.stdout


def build_manifests(root: Path) -> tuple[Path, Path]:
    """(cg manifest, reg manifest) under root, every stage run on them."""
    from curate.demo.devserver import DanbooruServer, read_posts
    from curate.demo.run import make_cg, make_corpus, make_tagger

    (root / "corpus").mkdir(parents=True)
    make_corpus(root / "corpus", 300)
    srv = DanbooruServer(read_posts(root / "corpus" / "posts.jsonl"), files=root / "corpus" / "files").start()
    reg = root / "m" / "reg.parquet"
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CURATE_DANBOORU_URL", srv.url)
            invoke("build-reg", ROOT / "queries" / "demo_reg.toml", "--source", "danbooru", "--out", reg, "--rate", "50")
    finally:
        srv.stop()
    invoke("caption", reg)
    make_cg(root / "cg", reg)
    cg = root / "m" / "official_cg.parquet"
    invoke("ingest", root / "cg", "--out", cg, "--name", "official_cg", "--workers", "1")
    invoke("dedupe", cg, "--against", reg, "--workers", "1")
    invoke("crop", cg, "--max-pixels", "384x384", "--workers", "1")
    tagger = make_tagger(root / "tagger")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 would: one core, whoever else runs beside
    try:
        invoke("tag", cg, "--model", tagger, "--device", "cpu", "--workers", "0")
    finally:
        torch.set_num_threads(threads)
    invoke("caption", cg)
    return cg, reg


@pytest.fixture(scope="session")
def manifests(tmp_path_factory):
    """(cg manifest, reg manifest), every stage run on them. Read only."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # one process: this session builds them
        return build_manifests(tmp_path_factory.mktemp("report"))
    shared = tmp_path_factory.getbasetemp().parent / "report_manifests"  # this run's, shared by its workers
    done = shared / "done.json"
    with open(str(shared) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not done.is_file():
                shutil.rmtree(shared, ignore_errors=True)  # a worker that died half-way
                cg, reg = build_manifests(shared)
                done.write_text(json.dumps([os.path.relpath(cg, shared), os.path.relpath(reg, shared)]))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    cg, reg = json.loads(done.read_text())
    return shared / cg, shared / reg


@pytest.fixture
def copy_manifests(manifests, tmp_path):
    """The shared manifests and everything they point at, copied for a test that changes them."""
    cg, reg = manifests
    root = cg.parent.parent
    assert reg.parent.parent == root
    mine = tmp_path / "built"
    shutil.copytree(root, mine, ignore=shutil.ignore_patterns("corpus", "tagger"), symlinks=True)
    return mine / cg.relative_to(root), mine / reg.relative_to(root)
