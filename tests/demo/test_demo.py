"""The offline demo: `make demo` end to end on a small corpus, through the real Makefile,
the Danbooru look-alike on 127.0.0.1, and every stage's CLI; then a re-run does nothing."""

import http.client
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from curate import manifest
from curate.common import train_config
from curate.demo.devserver import DanbooruServer, read_posts
from curate.demo.run import make_corpus

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parents[1]


def make(demo: Path, *targets: str) -> subprocess.CompletedProcess:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    if sys.prefix == sys.base_prefix:
        pytest.skip("the Makefile runs curate from a venv; run the tests from one (make test does)")
    # -o: the test runs inside the venv; never let make reinstall it underneath
    cmd = ["make", "--no-print-directory", "-C", str(ROOT), "-o", f"{VENV}/.installed", f"VENV={VENV}",
           f"DEMO={demo}", "DEMO_POSTS=400", *targets]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def test_make_demo_runs_every_stage_then_nothing(tmp_path):
    demo = tmp_path / "demo"
    r = make(demo, "demo")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    for command in ("curate build-reg queries/demo_reg.toml --source danbooru", "curate download", "curate ingest",
                    "curate dedupe", "--against", "curate crop", "curate tag", "curate caption", "curate export",
                    "curate train", "curate report"):
        assert command in out, command
    assert "where everything went" in out and "report.html" in out
    reg, cg = demo / "manifests" / "demo_reg.parquet", demo / "manifests" / "official_cg.parquet"
    _, reg_meta = manifest.read(reg)
    assert reg_meta["source"].startswith("danbooru:http://127.0.0.1:")  # the live path, over HTTP
    assert set(reg_meta["stages"]) >= {"download", "caption"}
    cg_rows, cg_meta = manifest.read(cg)
    assert set(cg_meta["stages"]) >= {"ingest", "dedupe", "crop", "tag", "caption"}
    rows = cg_rows.to_pylist()
    assert any(r["error"] for r in rows)                                         # the broken file
    assert any(r["dup_of"] and r["dup_of"].startswith("danbooru/") for r in rows)  # repost of a reg image
    assert any(r["crop"] and r["crop"] != [0, 0, r["width"], r["height"]] for r in rows)  # bars trimmed
    assert all(r["caption"] for r in rows if not r["error"] and not r["dup_of"])
    assert (demo / "kohya" / "dataset_config.toml").is_file()
    assert set(exported_reg_use(demo)) == {"horizontal", "vertical"}  # sd-scripts uses every reg subset
    assert (demo / "runs" / "demo" / "demo.safetensors").is_file()
    steps = [json.loads(line)["step"] for line in (demo / "runs" / "demo" / "metrics.jsonl").read_text().splitlines()]
    assert steps and max(steps) == 6
    assert 'id="duplicates"' in (demo / "report.html").read_text()
    # file targets: a second run finds everything up to date
    again = make(demo, "demo")
    assert again.returncode == 0, again.stderr[-2000:]
    ran = again.stdout.split("where everything went")[0]  # the summary names commands to type next
    assert "curate " not in ran.replace("curate demo", "").replace("curate.demo", "")
    assert ". " in again.stdout and "/bin/activate" in again.stdout  # the summary says how to get curate on PATH
    # the README's commands after the demo, in a new shell, and the dry run of docs/inputs.md
    for doc, block in (("README.md", "after-demo"), ("docs/inputs.md", "dry-run")):
        out = run_in_new_shell(demo, shell_block(ROOT / doc, block))
        assert out.returncode == 0, (doc, out.stdout[-2000:], out.stderr[-2000:])
    assert "usable" in out.stdout or "steps" in out.stdout
    # a decision in review, then make: the stamps see the decisions file, the export obeys it
    # (an exported image with no duplicates: the drop changes the export and leaves nothing to re-tag)
    exported = {p.stem for p in (demo / "kohya").rglob("*") if p.suffix in (".png", ".jpg", ".webp")}
    rows = manifest.read(cg)[0].to_pylist()
    kept_over = {r["dup_of"] for r in rows if r["dup_of"]}
    row = next(r for r in rows if not r["error"] and not r["dup_of"] and r["key"] not in kept_over
               and r["key"].replace("/", "_") in "".join(exported))
    line = json.dumps({"key": row["key"], "action": "drop", "reason": "off model"})
    review = subprocess.run([str(VENV / "bin" / "curate"), "review", str(cg), "--apply", "-"], input=line,
                            capture_output=True, text=True)
    assert review.returncode == 0, review.stderr
    decided = make(demo, "demo", "DEMO_TARGETS=dataset")
    assert decided.returncode == 0, decided.stderr[-2000:]
    assert "curate dedupe" in decided.stdout and "curate export" in decided.stdout, decided.stdout[-2000:]
    after = {p.stem for p in (demo / "kohya").rglob("*") if p.suffix in (".png", ".jpg", ".webp")}
    assert not any(row["key"].replace("/", "_") in name for name in after) and after
    # a new file in the CG folder (a name with spaces) re-runs the CG chain, not the reg set; it is
    # one more copy of a video frame, which dedupe marks as a duplicate of the lossless CG
    shutil.copyfile(demo / "cg" / "cg_00_frame2.jpg", demo / "cg" / "new shot (2).jpg")
    grown = make(demo, "demo", "DEMO_TARGETS=cg")  # the CG chain only: training again adds nothing here
    assert grown.returncode == 0, grown.stderr[-2000:]
    assert "1 added" in grown.stdout and "curate tag" in grown.stdout and "curate build-reg" not in grown.stdout
    # a deleted manifest is made again, and only what depends on it: the CG set's first stage
    # is its target (ingest runs again, the reg set's build-reg does not; the stages after it
    # are the same re-run as above, left out: a whole re-tag would only load the tagger again)
    cg.unlink()
    third = make(demo, "demo", f"DEMO_TARGETS={demo}/.make/{cg.name}.ingest")
    assert third.returncode == 0, third.stderr[-2000:]
    assert "curate ingest" in third.stdout and "curate build-reg" not in third.stdout and cg.is_file()


def shell_block(doc: Path, name: str) -> str:
    """The code block between <!-- NAME:start ... --> and <!-- NAME:end --> of a document."""
    text = doc.read_text(encoding="utf-8")
    found = re.search(rf"<!-- {name}:start[^>]*-->\s*```[a-z]*\n(.*?)```\s*<!-- {name}:end -->", text, re.S)
    assert found, f"{doc}: no {name} block"
    return found.group(1)


def run_in_new_shell(demo: Path, script: str) -> subprocess.CompletedProcess:
    """Run a documented block as a user would, in a new shell at the repository's root: no
    venv on PATH, `demo/` and `.venv` where the Makefile puts them (links into the test's)."""
    home = demo.parent / "checkout"
    home.mkdir(exist_ok=True)
    for name, target in (("demo", demo), (".venv", VENV), ("configs", ROOT / "configs"), ("queries", ROOT / "queries")):
        if not (home / name).exists():
            (home / name).symlink_to(target)
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    if os.environ.get("PYTHONPATH"):  # a development checkout runs its own code
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=home, env=env,
                          capture_output=True, text=True, timeout=300)


def exported_reg_use(demo: Path) -> dict:
    """Reg images per subset that sd-scripts' own rule takes from the demo's export."""
    from tests.dataset.test_export import sd_scripts_reg_use

    config = train_config.read_toml(demo / "kohya" / "dataset_config.toml")
    return sd_scripts_reg_use(config, [demo / "manifests" / "official_cg.parquet", demo / "manifests" / "demo_reg.parquet"])


def test_devserver_serves_files_and_nothing_outside(tmp_path):
    make_corpus(tmp_path, 20)
    srv = DanbooruServer(read_posts(tmp_path / "posts.jsonl"), files=tmp_path / "files").start()
    try:
        host, port = srv.url.split("//")[1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", "/posts.json?limit=5")
        posts = json.loads(conn.getresponse().read())
        post = next(p for p in posts if p["file_ext"] in ("jpg", "png", "webp"))
        assert post["file_url"].startswith(srv.url + "/original/")  # URLs point at the server itself
        conn.request("GET", post["file_url"][len(srv.url):])
        resp = conn.getresponse()
        body = resp.read()
        assert resp.status == 200 and __import__("hashlib").md5(body).hexdigest() == post["md5"]
        for bad in ("/original/../posts.jsonl", "/original/%2e%2e/posts.jsonl", "/original/nope.png"):
            conn.request("GET", bad)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 404, bad
    finally:
        srv.stop()


def test_hand_captioned_cgs_survive_the_pipeline(tmp_path):
    """The demo's CG folder holds a user's own captions: ingest reads them, dedupe and crop
    keep those images, caption uses the text (no escapes) and never touches the files."""
    from typer.testing import CliRunner

    from curate.cli import app
    from curate.common.caption_rules import unescape
    from curate.demo.run import HAND_CAPTIONS, make_cg

    cg, m = tmp_path / "cg", tmp_path / "manifests" / "official_cg.parquet"
    assert make_cg(cg, None)["hand_captioned"] == len(HAND_CAPTIONS)
    sidecars = {name: (cg / name).read_bytes() for name in HAND_CAPTIONS}
    for args in (["ingest", str(cg), "--out", str(m)], ["dedupe", str(m)],
                 ["crop", str(m), "--max-pixels", "512x512"], ["caption", str(m)]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, (args, result.output)
    rows = {Path(r["source_path"]).stem: r for r in manifest.read(m)[0].to_pylist()}
    for name, data in HAND_CAPTIONS.items():
        row = rows[Path(name).stem]
        text = ", ".join(line.strip() for line in data.decode("utf-8-sig").splitlines() if line.strip())
        assert not row["dup_of"] and not row["error"] and row["path"] != row["source_path"]  # a crop
        assert row["user_caption"] == data.decode("utf-8-sig").strip()
        assert row["caption"] == unescape(text) and "\\" not in row["caption"]
        assert (cg / name).read_bytes() == sidecars[name]
    export = CliRunner().invoke(app, ["export", str(m), "--kohya", str(tmp_path / "kohya")])
    assert export.exit_code == 0, export.output
    exported = {p.read_text(encoding="utf-8") for p in (tmp_path / "kohya").rglob("*.txt")}
    assert {rows[Path(n).stem]["caption"] for n in HAND_CAPTIONS} <= exported
