import json

import numpy as np

from curate.demo.synthetic import make_posts
from curate.metadata.sources import open_source
from curate.metadata.store import Store, _postings
from curate.metadata.sync import sync


def dump(path, posts):
    path.write_text("\n".join(json.dumps(p) for p in posts) + "\n")
    return open_source(f"dump:{path}")


def test_postings_equal_a_stable_argsort():
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 8, 1000)
    post_offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat = rng.integers(0, 50, post_offsets[-1]).astype(np.int32)
    counts = np.bincount(flat, minlength=50)
    tag_offsets = np.concatenate([[0], np.cumsum(counts)])
    expected = np.repeat(np.arange(1000), lengths)[np.argsort(flat, kind="stable")]
    for chunk in (7, 100, 10**6):
        assert (_postings(flat, post_offsets, tag_offsets, chunk=chunk) == expected).all()


def test_store_round_trips_posts(tmp_path, shared_data):
    src = open_source(f"dump:{shared_data / 'danbooru'}")
    direct = [r for b in src.batches() for r in b.to_pylist()]
    sync(open_source(f"dump:{shared_data / 'danbooru'}"), tmp_path / "s")
    stored = [r for b in Store(tmp_path / "s").batches() for r in b.to_pylist()]
    assert sorted(direct, key=lambda r: r["post_id"]) == stored


def test_store_parquet_is_queryable_with_duckdb(tmp_path):
    import duckdb

    posts = make_posts(300, seed=8)
    sync(dump(tmp_path / "a.jsonl", posts), tmp_path / "store")
    gen = Store(tmp_path / "store").dir
    n = duckdb.sql(f"""
        SELECT count(*) FROM read_parquet('{gen / "posts.parquet"}') p
        WHERE list_contains(p.tag_ids, (SELECT tag_id FROM read_parquet('{gen / "tags.parquet"}') WHERE name = '1girl'))
    """).fetchall()[0][0]
    assert n == sum("1girl" in p["tag_string"].split() for p in posts) > 0
