import json
import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from curate.demo.synthetic import make_posts
from curate.errors import CurateError
from curate.metadata.sources import open_source
from curate.metadata.store import Store
from curate.metadata.sync import load_aliases, resolve_chains, sync


def dump(path, posts):
    path.write_text("\n".join(json.dumps(p) for p in posts) + "\n")
    return open_source(f"dump:{path}")


def test_sync_then_resync_adds_and_updates_without_duplicates(tmp_path):
    posts = make_posts(500, seed=1)
    r1 = sync(dump(tmp_path / "a.jsonl", posts[:300]), tmp_path / "store")
    assert (r1.added, r1.total) == (300, 300)
    changed = dict(posts[10], fav_count=99999, updated_at="2030-01-01T00:00:00+00:00",
                   tag_string_general=posts[10]["tag_string_general"] + " new_tag")
    r2 = sync(dump(tmp_path / "b.jsonl", posts[200:] + [changed]), tmp_path / "store")
    assert (r2.added, r2.updated, r2.unchanged, r2.total) == (200, 1, 100, 500)
    store = Store(tmp_path / "store")
    ids = store.col("post_id")
    assert len(ids) == len(set(ids.tolist())) == 500 and list(ids) == sorted(ids)
    (row,) = store.take([list(ids).index(posts[10]["id"])]).to_pylist()
    assert row["fav_count"] == 99999 and "new_tag" in row["tags_general"]
    # Only the live generation remains, and it is plain Parquet others can read.
    assert [p.name for p in (tmp_path / "store").glob("gen-*")] == [store.dir.name]
    assert pq.read_table(store.dir / "posts.parquet").num_rows == 500


def test_source_failure_leaves_previous_store(tmp_path):
    sync(dump(tmp_path / "a.jsonl", make_posts(100, seed=2)), tmp_path / "store")

    class Broken:
        skipped = {}

        def describe(self):
            return "broken"

        def batches(self):
            yield from dump(tmp_path / "b.jsonl", make_posts(50, seed=3, start_id=10_000)).batches()
            raise OSError("disk went away")

    with pytest.raises(OSError):
        sync(Broken(), tmp_path / "store")
    assert len(Store(tmp_path / "store")) == 100


def test_kill_during_sync_leaves_previous_store_readable(tmp_path):
    sync(dump(tmp_path / "a.jsonl", make_posts(200, seed=4)), tmp_path / "store")
    big = tmp_path / "big.jsonl"
    dump(big, make_posts(8_000, seed=5, start_id=100_000))  # big enough to be killed mid-way, small enough for 2 cores
    for delay in (0.3, 0.8, 1.6):
        proc = subprocess.Popen([sys.executable, "-m", "curate", "sync", f"dump:{big}", "--store", str(tmp_path / "store")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        n = len(Store(tmp_path / "store"))
        assert n in (200, 8_200)  # the old store or the complete new one, never a mix
    sync(open_source(f"dump:{big}"), tmp_path / "store")
    assert len(Store(tmp_path / "store")) == 8_200


def test_aliases_applied_to_posts_and_chains(tmp_path):
    posts = make_posts(50, seed=6)
    posts[0]["tag_string_general"] += " old_name"
    (tmp_path / "aliases.json").write_text(json.dumps([
        {"antecedent_name": "old_name", "consequent_name": "middle_name", "status": "active"},
        {"antecedent_name": "middle_name", "consequent_name": "new_name", "status": "active"},
        {"antecedent_name": "tag_0", "consequent_name": "ignored", "status": "deleted"},
    ]))
    sync(dump(tmp_path / "a.jsonl", posts), tmp_path / "store", aliases_file=str(tmp_path / "aliases.json"))
    store = Store(tmp_path / "store")
    assert store.aliases == {"old_name": "new_name", "middle_name": "new_name"}
    (row,) = store.take([0]).to_pylist()
    assert "new_name" in row["tags_general"] and "old_name" not in row["tags_general"]


def test_alias_chains_drop_cycles():
    assert resolve_chains({"a": "b", "b": "a", "c": "d"}) == {"c": "d"}


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(CurateError, match="no curate store"):
        Store(tmp_path / "nothing")
    (tmp_path / "al.json").write_text("{{{")
    with pytest.raises(CurateError, match="not JSON"):
        load_aliases(tmp_path / "al.json")


def test_older_version_does_not_overwrite_newer(tmp_path):
    post = make_posts(1, seed=13)[0]
    new = dict(post, fav_count=99, updated_at="2025-01-01T00:00:00+00:00")
    old = dict(post, fav_count=5, updated_at="2020-01-01T00:00:00+00:00")
    sync(dump(tmp_path / "new.jsonl", [new]), tmp_path / "s")
    report = sync(dump(tmp_path / "old.jsonl", [old]), tmp_path / "s")
    assert (report.updated, report.stale) == (0, 1)
    assert Store(tmp_path / "s").take([0]).to_pylist()[0]["fav_count"] == 99
