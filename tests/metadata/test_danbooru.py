"""The live Danbooru source against a real local HTTP server (tests/danbooru_server.py)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from curate import manifest
from curate.cli import app
from curate.errors import CurateError
from curate.metadata.query import parse
from curate.metadata.select import select
from curate.metadata.sources.danbooru import DanbooruSource, free_metatags
from curate.metadata.sources.dump import DumpSource
from curate.metadata.store import Store
from tests.danbooru_server import DanbooruServer  # noqa: E402
from tests.inproc import run_curate

FAST = 50.0  # requests/s in most tests
SECRET = "s3cret-API-key-do-not-leak"
CURATE = str(Path(sys.executable).parent / "curate")


# --- generated posts ----------------------------------------------------------------

COMMON = ["long_hair", "smile", "blush", "highres", "open_mouth", "skirt", "comic", "monochrome", "sketch",
          "simple_background", "absurdres", "looking_at_viewer"]


def gen_posts(n: int, seed: int = 1, first_id: int = 1000) -> list[dict]:
    """API-shaped posts with realistic quirks: hidden, deleted, banned, videos,
    near-square sizes (ratio rounding), times near midnight (date: time zones)."""
    rng = random.Random(seed)
    artists = [f"artist_{i}" for i in range(40)]
    posts, pid = [], first_id
    t0 = datetime(2018, 1, 1, tzinfo=timezone.utc)
    for _ in range(n):
        pid += rng.randint(1, 4)
        general = {t for t, p in (("1girl", 0.6), ("solo", 0.5)) if rng.random() < p}
        general |= {t for i, t in enumerate(COMMON) if rng.random() < 0.5 / (i + 1)}
        general |= {f"tag_{int(rng.paretovariate(1.1))}" for _ in range(rng.randint(3, 12))}
        w, h = rng.choice([(1000, 1500), (1500, 1000), (1200, 1200), (1001, 1000), (1000, 1001), (2400, 1800), (700, 990)])
        created = t0 + timedelta(days=rng.randint(0, 2000), hours=rng.choice([0, 1, 2, 3, 4, 12, 22, 23]),
                                 minutes=rng.randint(0, 59))
        ext = rng.choices(["jpg", "png", "mp4", "zip", "webp"], [70, 20, 4, 3, 3])[0]
        md5 = hashlib.md5(str(pid).encode()).hexdigest()
        post = {
            "id": pid, "created_at": created.astimezone(timezone(timedelta(hours=-4))).isoformat(timespec="milliseconds"),
            "updated_at": created.isoformat(), "score": int(rng.paretovariate(1.3) * 3) - 3,
            "fav_count": int(rng.paretovariate(1.2) * 5) - 5, "rating": rng.choice("gsqe"),
            "image_width": w, "image_height": h, "file_ext": ext, "file_size": rng.randint(10**5, 10**7),
            "md5": md5, "file_url": f"https://cdn.donmai.us/original/{md5[:2]}/{md5[2:4]}/{md5}.{ext}",
            "tag_string_general": " ".join(sorted(general)),
            "tag_string_artist": rng.choice(artists) if rng.random() < 0.9 else "",
            "tag_string_character": "", "tag_string_copyright": rng.choice(["original", "blue_archive", "touhou"]),
            "tag_string_meta": "highres" if w * h > 1_500_000 else "",
            "is_deleted": rng.random() < 0.03, "is_banned": rng.random() < 0.02, "is_pending": False,
            "parent_id": None, "source": "",
        }
        post["tag_string"] = " ".join(post[k] for k in post if k.startswith("tag_string_") and post[k])
        if rng.random() < 0.03:  # hidden: what anonymous users get for some posts
            del post["md5"], post["file_url"]
        posts.append(post)
    return posts


def shared_posts(folder: Path) -> list[dict]:
    out = []
    for f in sorted((folder / "danbooru").glob("*post*.json")):
        data = json.loads(f.read_text())
        out += data if isinstance(data, list) else [data]
    return out


def unique_by_id(posts: list[dict]) -> list[dict]:
    seen, out = set(), []
    for p in posts:
        if isinstance(p, dict) and p.get("id") not in seen:
            seen.add(p.get("id"))
            out.append(p)
    return out


def write_dump(posts: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(p) + "\n" for p in posts))
    return path


# --- fixtures --------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def own_rates(monkeypatch):
    """The sources and the in-process commands set 127.0.0.1's rate (--rate, 2/s by default):
    each test gets its own rule table and limiters, the process's are back afterwards."""
    from curate import http

    monkeypatch.setattr(http, "_rules", dict(http._rules))
    monkeypatch.setattr(http, "_limiters", {})


@pytest.fixture
def serve(monkeypatch):
    monkeypatch.delenv("DANBOORU_LOGIN", raising=False)
    monkeypatch.delenv("DANBOORU_API_KEY", raising=False)
    monkeypatch.delenv("CURATE_USER_AGENT", raising=False)
    servers = []

    def start(posts, **kw) -> DanbooruServer:
        srv = DanbooruServer(posts, **kw).start()
        servers.append(srv)
        monkeypatch.setenv("CURATE_DANBOORU_URL", srv.url)
        return srv

    yield start
    for srv in servers:
        srv.stop()


def live(srv: DanbooruServer, **kw) -> DanbooruSource:
    opts = dict(base_url=srv.url, rate=FAST, backoff=0.01, wait_429=0.01, timeout=(2, 0.3), retries=10)
    opts.update(kw)
    return DanbooruSource(**opts)


def ids_by_subset(table) -> list[tuple[str, int]]:
    return list(zip(table.column("subset").to_pylist(), table.column("post_id").to_pylist()))


QUERY = """
name = "mix"
seed = 7
exclude_tags = ["old_comic"]

[[subsets]]
name = "horizontal"
tags = ["1girl", "solo"]
fav_count = ">2"
orientation = "horizontal"
order = "id"

[[subsets]]
name = "vertical"
tags = ["1girl"]
orientation = "vertical"
artists = ["artist_1", "artist_2", "artist_3"]
order = "id"

[[subsets]]
name = "square"
any_tags = ["smile", "blush"]
orientation = "square"
rating = ["g", "s"]
created_after = "2019-06-01"
created_before = "2021-01-01"
min_pixels = 1000000
order = "id"

[[subsets]]
name = "videos"
tags = ["solo"]
file_ext = ["mp4", "zip"]
score = ">=0"
include_deleted = true
order = "id"
"""


# --- tests ------------------------------------------------------------------------------


def test_metatags_are_loose_supersets():
    q = parse(QUERY)
    assert free_metatags(q.subsets[0]) == ["favcount:>=3", "ratio:>=1", "filetype:jpg,png,gif,webp,avif"]
    sq = free_metatags(q.subsets[2])
    assert "date:2019-05-31..2021-01-02" in sq and "mpixels:>=1" in sq and "ratio:1" in sq and "rating:g,s" in sq
    assert free_metatags(q.subsets[3])[-2:] == ["filetype:mp4,zip", "status:any"]


def test_date_pushdown_covers_time_zones(serve, tmp_path):
    """The site reads date: in its own zone (UTC-5 here): posts just inside the
    UTC bounds must still come back."""
    base = gen_posts(4, seed=2)
    stamps = ["2019-06-01T02:00:00Z", "2019-05-31T23:00:00Z", "2020-12-31T23:30:00Z", "2021-01-01T00:30:00Z"]
    posts = [dict(p, created_at=t) for p, t in zip(base, stamps)]
    for p in posts:
        p.update(md5=p.get("md5") or "f" * 32, file_url=p.get("file_url") or "https://x/y.jpg", file_ext="jpg",
                 is_deleted=False, is_banned=False)
    srv = serve(posts)
    q = parse('created_after = "2019-06-01"\ncreated_before = "2021-01-01"\norder = "id"\n')
    got = select(q, live(srv))
    assert sorted(got.table.column("post_id").to_pylist()) == [posts[0]["id"], posts[2]["id"]]
    assert ids_by_subset(got.table) == ids_by_subset(select(q, DumpSource(str(write_dump(posts, tmp_path / "d.jsonl")))).table)


@pytest.mark.parametrize("orientation,size", [("horizontal", (1001, 1000)), ("vertical", (1000, 1001)),
                                              ("square", (1200, 1200))])
def test_ratio_pushdown_keeps_near_square(serve, orientation, size):
    """ratio is rounded to 2 decimals on the site: 1001x1000 has ratio 1.00."""
    posts = [dict(p, image_width=size[0], image_height=size[1], md5="e" * 32, file_url="https://x/y.jpg",
                  file_ext="jpg", is_deleted=False, is_banned=False) for p in gen_posts(3, seed=6)]
    srv = serve(posts)
    got = select(parse(f'orientation = "{orientation}"\n'), live(srv))
    assert got.table.num_rows == 3


def test_every_match_once_under_faults(serve, tmp_path):
    posts = gen_posts(3000)
    srv = serve(posts, aliases={"old_comic": "comic"})
    srv.queue = ["reset", "429", "500", "truncate", "short", "slow", "503"]  # each at least once, then at random
    srv.rates = {"429": 0.04, "500": 0.08, "503": 0.03, "reset": 0.04, "slow": 0.02, "truncate": 0.04, "short": 0.08}
    q = parse(QUERY)
    src = live(srv)
    got = select(q, src)
    # the site's alias applies to the excluded tag as the site would apply it (issue 21)
    want = select(q, DumpSource(str(write_dump(posts, tmp_path / "d.jsonl"))), aliases={"old_comic": "comic"})
    assert ids_by_subset(got.table) == ids_by_subset(want.table)
    assert len(set(got.table.column("post_id").to_pylist())) == got.table.num_rows
    assert [r.eligible for r in got.subsets] == [r.eligible for r in want.subsets]
    assert all(r.selected > 0 for r in got.subsets)
    assert src.skipped["hidden"] > 0
    log = srv.requests() + srv.requests("/counts/posts.json")
    faults = {e.get("fault") for e in log}
    assert {"429", "500", "503", "reset", "slow", "truncate", "short"} <= faults
    assert max(e["plain"] for e in log) <= 2 and all(e["status"] != 422 for e in log)
    assert any(int(e["params"].get("limit", 200)) < 200 for e in srv.requests())  # 500 -> smaller pages
    # the aliased exclusion is filtered locally, never sent as -old_comic
    assert not any("old_comic" in e["params"].get("tags", "") for e in log)
    assert any("status:any" in e["params"].get("tags", "") for e in log)
    print(f"\n{len(srv.log)} requests, excess over --rate {FAST:g}: {excess([e['t'] for e in srv.log], FAST):.2f}")
    assert excess([e["t"] for e in srv.log], FAST) <= JITTER * FAST


# Arrival times carry timer and thread-scheduling jitter (a few ms idle, tens of
# ms on a loaded 2-core box): a limiter that spaces sends exactly 1/rate apart
# shows up to rate * jitter "extra" requests. Allow 100 ms; no limiter at all
# shows several whole requests.
JITTER = 0.1


def excess(times: list[float], rate: float) -> float:
    """Most requests in any window [t_i, t_j] beyond the 1 + rate * (t_j - t_i) allowed."""
    return max(((j - i) - rate * (times[j] - times[i]) for i in range(len(times))
                 for j in range(i + 1, min(len(times), i + 200))), default=0.0)


def test_artists_per_artist_or_single_crawl(serve, tmp_path):
    posts = gen_posts(2500, seed=3)
    srv = serve(posts)
    dump = DumpSource(str(write_dump(posts, tmp_path / "d.jsonl")))
    few = parse('tags = ["1girl"]\nartists = ["artist_5", "artist_6"]\norder = "id"\n')
    got = select(few, live(srv))
    assert ids_by_subset(got.table) == ids_by_subset(select(few, dump).table)
    crawled = {e["params"]["tags"].split()[0] for e in srv.requests()}
    assert crawled == {"artist_5", "artist_6"}  # per-artist: fewer requests than the whole 1girl set

    srv.log.clear()
    many = parse('tags = ["1girl", "solo"]\nfav_count = ">10"\nartists = [%s]\norder = "id"\n'
                 % ", ".join(f'"artist_{i}"' for i in range(30)))
    got = select(many, live(srv))
    assert ids_by_subset(got.table) == ids_by_subset(select(many, dump).table)
    assert not any("artist_" in e["params"]["tags"] for e in srv.requests())  # one crawl, filtered locally
    assert len(srv.requests("/counts/posts.json")) == 1


def _same_manifest_as_dump(serve, tmp_path, posts):
    posts = unique_by_id(posts)
    srv = serve(posts)
    dump = write_dump(posts, tmp_path / "posts.jsonl")
    (tmp_path / "artists.txt").write_text("# test\nartist_1\nartist_7\nartist_9\nartist_11\n")
    qfile = tmp_path / "reg.toml"
    qfile.write_text("""
name = "reg"
seed = 20240405
class_token = "solo"
exclude_tags = ["comic", "monochrome", "sketch"]

[[subsets]]
name = "horizontal"
tags = ["1girl", "solo"]
fav_count = ">0"
orientation = "horizontal"
count = 150

[[subsets]]
name = "vertical"
tags = ["1girl"]
orientation = "vertical"
artists_file = "artists.txt"
count = 40
""")
    runner = CliRunner()
    a = runner.invoke(app, ["build-reg", str(qfile), "--source", "danbooru", "--out", str(tmp_path / "live.parquet"),
                            "--no-images", "--rate", str(FAST)])
    assert a.exit_code == 0, a.output + repr(a.exception)
    b = runner.invoke(app, ["build-reg", str(qfile), "--source", f"dump:{dump}", "--out", str(tmp_path / "dump.parquet"),
                            "--no-images"])
    assert b.exit_code == 0, b.output + repr(b.exception)
    live_t, live_meta = manifest.read(tmp_path / "live.parquet")
    dump_t, _ = manifest.read(tmp_path / "dump.parquet")
    assert live_t.column("key").to_pylist() == dump_t.column("key").to_pylist()
    assert live_t.column("subset").to_pylist() == dump_t.column("subset").to_pylist()
    assert live_t.num_rows > 0 and live_meta["source"] == f"danbooru:{srv.url}"
    assert max(e["plain"] for e in srv.requests()) <= 2
    return live_t


def test_same_manifest_as_dump_generated(serve, tmp_path):
    _same_manifest_as_dump(serve, tmp_path, gen_posts(4000, seed=5))


def test_same_manifest_as_dump_with_real_samples(serve, tmp_path, shared_data):
    real = shared_posts(shared_data)
    assert real
    t = _same_manifest_as_dump(serve, tmp_path, real + gen_posts(1500, seed=9))
    assert t.num_rows > 0


def test_rate_limit_measured_on_server(serve):
    srv = serve(gen_posts(1200, seed=4))
    rate = 4.0
    src = live(srv, rate=rate, page_limit=60)
    n = sum(t.num_rows for t in src.batches_for(parse('tags = ["1girl"]\n')))
    assert n > 0
    times = [e["t"] for e in srv.log]
    assert len(times) >= 10
    gaps = [b - a for a, b in zip(times, times[1:])]
    # never more than rate * d + 1 requests in any window of d seconds, up to JITTER
    worst = excess(times, rate)
    print(f"\n{len(times)} requests at --rate {rate}: min gap {min(gaps) * 1000:.1f} ms, "
          f"mean rate {(len(times) - 1) / (times[-1] - times[0]):.2f}/s, worst excess {worst:.3f}")
    assert worst <= JITTER * rate and min(gaps) >= 1 / rate - JITTER
    assert (len(times) - 1) / (times[-1] - times[0] + JITTER) <= rate
    assert sorted(gaps)[len(gaps) // 2] == pytest.approx(1 / rate, abs=0.01)  # evenly spaced, no bursts


def test_errors_are_one_line_and_say_what_to_do(serve, monkeypatch, tmp_path):
    srv = serve(gen_posts(300), users={"alice": (SECRET, "gold")})
    q = parse('tags = ["1girl", "solo", "smile"]\n')
    srv.queue = ["html403"]
    with pytest.raises(CurateError, match="User-Agent"):
        list(live(srv).batches_for(parse('tags = ["1girl"]\n')))
    with pytest.raises(CurateError, match="--tag-limit"):  # claims 6 tags, server allows 2 anonymous
        list(live(srv, tag_limit=6).batches_for(q))
    with pytest.raises(CurateError, match="page 1000"):
        live(srv)._get("/posts.json", {"page": 1001})
    monkeypatch.setenv("DANBOORU_LOGIN", "alice")
    monkeypatch.setenv("DANBOORU_API_KEY", "wrong-" + SECRET)
    with pytest.raises(CurateError, match="401") as exc:
        list(live(srv).batches_for(q))
    assert SECRET not in str(exc.value)
    r = run_curate("fetch", _write(tmp_path / "q.toml", 'tags = ["1girl"]\n'), "--source", "danbooru",
                   "--no-images", "--out", tmp_path / "m.parquet")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: Danbooru rejected")
    assert SECRET not in r.stderr + r.stdout and not (tmp_path / "m.parquet").exists()
    monkeypatch.delenv("DANBOORU_API_KEY")
    with pytest.raises(CurateError, match="both"):
        live(srv)


def test_429_without_retry_after_waits(serve):
    srv = serve(gen_posts(100))
    srv.retry_after = None
    srv.queue = ["429"]
    list(live(srv, wait_429=0.3).batches_for(parse('tags = ["solo"]\n')))
    t = [e["t"] for e in srv.requests()]
    assert srv.requests()[0]["status"] == 429 and t[1] - t[0] >= 0.3


def test_authenticated_tag_limit_and_no_secret_anywhere(serve, monkeypatch, tmp_path, caplog):
    posts = gen_posts(2000, seed=11)
    srv = serve(posts, users={"alice": (SECRET, "gold")})
    monkeypatch.setenv("DANBOORU_LOGIN", "alice")
    monkeypatch.setenv("DANBOORU_API_KEY", SECRET)
    srv.rates = {"500": 0.2, "429": 0.1}
    qfile = _write(tmp_path / "q.toml", 'tags = ["1girl", "solo"]\nexclude_tags = ["comic", "sketch", "monochrome", "blush", "smile"]\norder = "id"\n')
    caplog.set_level("DEBUG")
    r = CliRunner().invoke(app, ["fetch", str(qfile), "--source", "danbooru", "--no-images",
                                 "--out", str(tmp_path / "m.parquet"), "--rate", str(FAST)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert srv.requests("/profile.json") and all(e["user"] == ("alice", SECRET) for e in srv.log)
    assert max(e["plain"] for e in srv.requests()) == 6  # Gold: 6 plain terms, read from /profile.json
    t, meta = manifest.read(tmp_path / "m.parquet")
    want = select(parse(qfile.read_text()), DumpSource(str(write_dump(posts, tmp_path / "d.jsonl"))))
    assert t.column("key").to_pylist() == want.table.column("key").to_pylist()
    assert SECRET not in json.dumps(meta) and SECRET.encode() not in (tmp_path / "m.parquet").read_bytes()
    assert SECRET not in caplog.text and SECRET not in r.output


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _sync(store: Path, *extra, rate=FAST) -> subprocess.Popen:
    return subprocess.Popen([CURATE, "sync", "danbooru", "--store", str(store), "--rate", str(rate), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ))


def test_sync_resumes_after_kill_9(serve, tmp_path):
    posts = gen_posts(3000, seed=21)
    srv = serve(posts)
    store = tmp_path / "store"
    expected = {p["id"] for p in posts if p.get("md5")}
    proc = _sync(store, rate=5)  # 16 requests at 5/s: ~3 s, killed after 4 pages
    spool = store / "spool-danbooru"
    deadline = time.time() + 30
    while time.time() < deadline and len(list(spool.glob("page-*.jsonl"))) < 4:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    spooled = sorted(int(p.stem[5:]) for p in spool.glob("page-*.jsonl"))
    assert 4 <= len(spooled) < 15 and not (store / "CURRENT").exists()
    first_run = len(srv.requests())

    out, _ = _sync(store).communicate(timeout=60)
    assert "store now holds" in out, out
    resumed = srv.requests()[first_run]
    assert resumed["params"]["page"] == f"a{spooled[-1]}"  # went on after the last spooled page
    ids = Store(store).col("post_id").tolist()
    assert len(ids) == len(set(ids)) and set(ids) == expected
    assert not spool.exists()

    # incremental: only what is new, from the store's max id
    more = gen_posts(300, seed=22, first_id=max(expected) + 10)
    srv.set_posts(posts + more)
    before = len(srv.requests())
    out, _ = _sync(store).communicate(timeout=60)
    assert "store now holds" in out, out
    assert srv.requests()[before]["params"]["page"] == f"a{max(p['id'] for p in posts)}"
    ids = Store(store).col("post_id").tolist()
    assert len(ids) == len(set(ids)) and set(ids) == expected | {p["id"] for p in more if p.get("md5")}


def test_sync_since_id(serve, tmp_path):
    posts = gen_posts(500, seed=23)
    srv = serve(posts)
    cut = posts[250]["id"]
    r = CliRunner().invoke(app, ["sync", "danbooru", "--store", str(tmp_path / "s"), "--since-id", str(cut),
                                 "--rate", str(FAST)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    ids = Store(tmp_path / "s").col("post_id").tolist()
    assert sorted(ids) == sorted(p["id"] for p in posts if p["id"] > cut and p.get("md5"))
    assert srv.requests()[0]["params"]["page"] == f"a{cut}"


def test_artists_command_same_as_dump(serve, tmp_path):
    posts = gen_posts(1500, seed=31)
    serve(posts)
    dump = write_dump(posts, tmp_path / "d.jsonl")
    runner = CliRunner()
    outs = []
    for src, out in (("danbooru", "live.txt"), (f"dump:{dump}", "dump.txt")):
        r = runner.invoke(app, ["artists", "--source", src, "--copyright", "blue_archive", "--fav-count", ">1",
                                "--min-posts", "2", "--out", str(tmp_path / out), "--rate", str(FAST)])
        assert r.exit_code == 0, r.output + repr(r.exception)
        outs.append([ln for ln in (tmp_path / out).read_text().splitlines() if not ln.startswith("#")])
    assert outs[0] == outs[1] and len(outs[0]) > 5


def test_or_groups_go_in_whole_or_not_at_all(serve, tmp_path):
    posts = gen_posts(1500, seed=41)
    srv = serve(posts, tag_limits={"anonymous": 3})
    q = parse('tags = ["1girl"]\nany_tags = ["smile", "blush"]\nartists = ["artist_5"]\norder = "id"\n')
    src = live(srv, tag_limit=3)
    assert src.plan(q.subsets[0])[0][:3] in (("1girl", "~smile", "~blush"), ("artist_5", "1girl", "filetype:jpg,png,gif,webp,avif"))
    got = select(q, src)
    assert ids_by_subset(got.table) == ids_by_subset(select(q, DumpSource(str(write_dump(posts, tmp_path / "d.jsonl")))).table)
    for e in srv.requests():
        assert "~" not in e["params"]["tags"] or e["params"]["tags"].count("~") == 2


def test_a_server_that_ignores_the_cursor_stops_the_crawl(serve, tmp_path):
    srv = serve(gen_posts(500, seed=5))
    srv.ignore_cursor = True  # every page is the first one, whatever `page` says
    with pytest.raises(CurateError, match="ignored the id cursor") as exc:
        list(live(srv).batches_for(parse('tags = ["1girl"]\n')))
    assert "\n" not in str(exc.value)
    assert len(srv.requests()) == 2  # the first page, and the one that brought nothing new
    r = run_curate("sync", "danbooru", "--store", tmp_path / "s", "--rate", FAST)  # CURATE_DANBOORU_URL: serve()
    assert r.returncode == 2 and r.stderr.startswith("error: /posts.json ignored the id cursor")
    assert r.stderr.count("\n") == 1
    assert len(srv.requests()) == 4


@pytest.mark.parametrize("params, status", [({"limit": "abc"}, 422), ({"limit": "1e3"}, 422),
                                            ({"page": "x12"}, 410), ({"page": "b"}, 410),
                                            ({"page": "99999999999999999999999"}, 410),
                                            ({"tags": "id:abc"}, 422), ({"tags": "date:someday"}, 422),
                                            ({"tags": "ratio:1:0"}, 422), ({"tags": "score:>1..x"}, 422)])
def test_devserver_answers_bad_limit_and_page_with_json_4xx(serve, params, status):
    import urllib.error
    import urllib.parse
    import urllib.request

    srv = serve(gen_posts(20))
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(f"{srv.url}/posts.json?{urllib.parse.urlencode(params)}", timeout=5)
    assert exc.value.code == status
    body = json.loads(exc.value.read())
    assert body["success"] is False and body["message"]


def test_a_page_of_ids_that_are_no_post_ids_is_a_clear_error():
    """A broken mirror whose posts carry ids of 0, -4, 'abc', 1e30: none can be a cursor
    (`page=b-4` was sent, and reported as an ignored cursor)."""
    import http.server
    import threading

    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            body = json.dumps([{"id": 0}, {"id": -4}, {"id": "abc"}, {"id": 1e30}]).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    try:
        src = DanbooruSource(base_url=f"http://127.0.0.1:{httpd.server_address[1]}", rate=FAST, backoff=0.01,
                             retries=0)
        with pytest.raises(CurateError, match="^/posts.json returned a page without post ids"):
            list(src.batches_for(parse('tags = ["1girl"]\n')))
    finally:
        httpd.shutdown()
    assert len(seen) == 1
