"""The foundation's commands, run as a user runs them: `curate --help`, sync and build-reg in a
real subprocess; the other checks of what a command says and makes run it in
this process through the same entry point (tests/inproc.py), without an interpreter start each."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curate.demo.synthetic import make_posts, write_hakubooru_db
from tests.inproc import in_new_process as curate  # the command in a new interpreter
from tests.inproc import run_curate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    posts = make_posts(1500, seed=21)
    (d / "posts.jsonl").write_text("\n".join(json.dumps(p) for p in posts))
    write_hakubooru_db(posts, d / "haku.db")
    (d / "q.toml").write_text("""
name = "reg"
seed = 5
class_token = "solo"
[[subsets]]
name = "horizontal"
tags = ["1girl", "solo"]
fav_count = ">5"
orientation = "horizontal"
count = 30
[[subsets]]
name = "vertical"
tags = ["1girl", "solo"]
orientation = "vertical"
artists_file = "artists.txt"
count = 5000
""")
    (d / "artists.txt").write_text("# mine\nartist_1\nartist_2\n")
    return d


def test_help_lists_every_command_and_imports_no_torch():
    out = curate("--help")
    assert out.returncode == 0
    for cmd in ("sync", "fetch", "build-reg", "inspect", "artists"):
        assert cmd in out.stdout
        assert run_curate(cmd, "--help").returncode == 0
    code = "import sys, curate.cli; sys.exit('torch' in sys.modules or 'transformers' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_sync_build_reg_inspect(corpus, tmp_path):
    out = curate("sync", f"hakubooru:{corpus / 'haku.db'}", "--store", tmp_path / "store")
    assert out.returncode == 0, out.stderr
    assert "1500 new" in out.stdout
    m = tmp_path / "reg.parquet"
    out = curate("build-reg", corpus / "q.toml", "--source", f"store:{tmp_path / 'store'}", "--out", m, "--no-images")
    assert out.returncode == 0, out.stderr
    assert "horizontal" in out.stdout and "fewer than the quota" in out.stdout  # vertical asks for 5000
    table = pq.read_table(m)
    meta = json.loads(table.schema.metadata[b"curate"])
    assert meta["kind"] == "reg" and meta["class_token"] == "solo" and meta["seed"] == 5
    assert "artists_file" in meta["query_text"] and meta["subsets"]["horizontal"]["selected"] == 30
    assert table.column("key").to_pylist()[0].startswith("danbooru/")
    # the same query on the dump gives the same rows
    m2 = tmp_path / "reg2.parquet"
    assert run_curate("build-reg", corpus / "q.toml", "--source", f"dump:{corpus / 'posts.jsonl'}", "--out", m2, "--no-images").returncode == 0
    assert pq.read_table(m2).column("key").to_pylist() == table.column("key").to_pylist()
    info = run_curate("inspect", m, "--json")
    assert info.returncode == 0
    data = json.loads(info.stdout)
    assert data["subsets"]["horizontal"] == 30 and data["provenance"]["class_token"] == "solo"
    assert data["failures"] == {} and data["stages_filled"]["caption"] == 0
    human = run_curate("inspect", m)
    assert "class token: solo" in human.stdout and "quota 30" in human.stdout


def test_fetch_default_out_and_seed_override(corpus, tmp_path):
    out = run_curate("fetch", corpus / "q.toml", "--source", f"dump:{corpus / 'posts.jsonl'}", "--no-images", "--seed", "9", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    meta = json.loads(pq.read_table(tmp_path / "manifests" / "q.parquet").schema.metadata[b"curate"])
    assert meta["seed"] == 9 and meta["kind"] == "fetch"


def test_artists_ranks_and_writes_a_usable_file(corpus, tmp_path):
    out = run_curate("artists", "--source", f"dump:{corpus / 'posts.jsonl'}", "--copyright", "blue_archive",
                 "--fav-count", ">3", "--min-posts", "3", "--top", "10", "--out", tmp_path / "a.txt")
    assert out.returncode == 0, out.stderr
    lines = [line for line in (tmp_path / "a.txt").read_text().splitlines() if not line.startswith("#")]
    assert 0 < len(lines) <= 10
    from curate.metadata.query import read_artists_file

    assert len(read_artists_file(tmp_path / "a.txt")) == len(lines)
    posts = [json.loads(x) for x in (corpus / "posts.jsonl").read_text().splitlines()]
    top = lines[0].split()[0]
    n = sum(1 for p in posts if top in p["tag_string_artist"].split() and "blue_archive" in p["tag_string_copyright"].split()
            and p["fav_count"] > 3 and not p["is_deleted"] and not p["is_banned"] and p["file_ext"] in ("jpg", "png", "webp", "gif"))
    assert f"posts={n} " in lines[0]


@pytest.mark.parametrize("args,needle", [
    (["build-reg", "{d}/missing.toml", "--source", "dump:{d}/posts.jsonl"], "query file not found"),
    (["build-reg", "{d}/bad.toml", "--source", "dump:{d}/posts.jsonl"], "unknown key 'favcount'"),
    (["build-reg", "{d}/noart.toml", "--source", "dump:{d}/posts.jsonl"], "artists file not found"),
    (["build-reg", "{d}/q.toml", "--source", "dump:{d}/nope.json"], "dump not found"),
    (["build-reg", "{d}/q.toml", "--source", "ftp:x"], "unknown source"),
    (["build-reg", "{d}/q.toml", "--source", "store:{d}/nostore"], "no curate store"),
    (["inspect", "{d}/q.toml"], "not a readable Parquet manifest"),
    (["sync", "hakubooru:{d}/posts.jsonl", "--store", "{d}/s"], "not a SQLite database"),
])
def test_user_errors_are_one_line_exit_2(corpus, args, needle):
    (corpus / "bad.toml").write_text('[[subsets]]\nname="a"\nfavcount=">3"\n')
    (corpus / "noart.toml").write_text('class_token="solo"\n[[subsets]]\nname="a"\nartists_file="gone.txt"\n')
    out = run_curate(*[a.format(d=corpus) for a in args])
    assert out.returncode == 2
    assert needle in out.stderr and len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_build_reg_downloads_images_from_a_local_server(tmp_path):
    import hashlib
    import http.server
    import threading
    from functools import partial

    from PIL import Image

    files = tmp_path / "cdn"
    files.mkdir()
    posts = make_posts(40, seed=31)
    for p in posts:
        p["file_ext"] = "png"
        path = files / f"{p['id']}.png"
        Image.new("RGB", (p["image_width"] // 20, p["image_height"] // 20), (p["id"] % 255, 80, 160)).save(path)
        p["md5"] = hashlib.md5(path.read_bytes()).hexdigest()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(files))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        for p in posts:
            p["file_url"] = f"http://127.0.0.1:{server.server_port}/{p['id']}.png"
        (tmp_path / "posts.jsonl").write_text("\n".join(json.dumps(p) for p in posts))
        (tmp_path / "q.toml").write_text('name="q"\nclass_token="solo"\ntags=["1girl"]\ncount=5\n')
        out = run_curate("build-reg", tmp_path / "q.toml", "--source", f"dump:{tmp_path / 'posts.jsonl'}",
                     "--out", tmp_path / "m" / "reg.parquet", "--images", tmp_path / "m" / "images")
        assert out.returncode == 0, out.stderr
        rows = pq.read_table(tmp_path / "m" / "reg.parquet").to_pylist()
        assert len(rows) == 5 and all(r["error"] is None for r in rows)
        for r in rows:
            f = tmp_path / "m" / r["path"]
            assert f.is_file() and hashlib.md5(f.read_bytes()).hexdigest() == r["md5"]
    finally:
        server.shutdown()


def test_rerun_keeps_stage_work_of_rows_selected_again(corpus, tmp_path):
    from curate import manifest

    m = tmp_path / "reg.parquet"
    args = ("build-reg", corpus / "q.toml", "--source", f"dump:{corpus / 'posts.jsonl'}", "--out", m, "--no-images")
    assert run_curate(*args).returncode == 0
    table, meta = manifest.read(m)
    table = manifest.with_column(table, "caption", [f"c{i}" for i in range(table.num_rows)])
    manifest.write(table, m, manifest.record_stage(meta, "caption"))
    assert run_curate(*args).returncode == 0
    again, meta2 = manifest.read(m)
    assert again.column("caption").to_pylist() == [f"c{i}" for i in range(table.num_rows)]
    assert "caption" in meta2["stages"]


def test_unwritable_out_is_a_one_line_error(corpus, tmp_path):
    (tmp_path / "file").write_text("x")
    out = run_curate("build-reg", corpus / "q.toml", "--source", f"dump:{corpus / 'posts.jsonl'}",
                 "--out", tmp_path / "file" / "m.parquet", "--no-images")
    assert out.returncode == 2 and "cannot write manifest" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("args, error", [
    (["download", "m.parquet", "--retries", "-1"], "--retries must be at least 0, got -1"),
    (["download", "m.parquet", "--workers", "0"], "--workers must be at least 1, got 0"),
    (["download", "m.parquet", "--rate", "0"], "--rate must be more than 0, got 0.0"),
    (["download", "m.parquet", "--max-pixels", "-5"], "--max-pixels must be at least 1, got -5"),
    (["report", "m.parquet", "--out", "r.html", "--max-per-subset", "-1"], "--max-per-subset must be at least 0"),
    (["report", "m.parquet", "--out", "r.html", "--workers", "-2"], "--workers must be at least 1"),
    (["ingest", ".", "--out", "m.parquet", "--workers", "0"], "--workers must be at least 1"),
    (["crop", "m.parquet", "--workers", "-1"], "--workers must be at least 1"),
    (["dedupe", "m.parquet", "--shard-rows", "0"], "--shard-rows must be at least 1"),
    (["tag", "m.parquet", "--model", "x", "--general-threshold", "1.5"], "--general-threshold must be between 0 and 1"),
    (["tag", "m.parquet", "--model", "x", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["sync", "danbooru", "--store", "s", "--since-id", "-3"], "--since-id must be at least 0"),
    (["artists", "--source", "dump:x", "--top", "0"], "--top must be at least 1"),
    (["fetch", "q.toml", "--source", "danbooru", "--tag-limit", "-1"], "--tag-limit must be at least 0"),
])
def test_out_of_range_numbers_are_one_line_errors(tmp_path, args, error):
    r = run_curate(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"error: {error}") and r.stderr.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # nothing was made
