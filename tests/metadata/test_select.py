"""Selection rules checked against a plain-Python reference, on every source."""

import json
import random
from datetime import datetime, timezone

import numpy as np
import pytest

from curate.demo.synthetic import make_posts, write_hakubooru_db
from curate.metadata.query import parse
from curate.metadata.select import keyed_hash, keyed_hash_one, select
from curate.metadata.sources import open_source
from curate.metadata.sync import sync


@pytest.fixture(scope="module")
def posts():
    """Built when a test asks (not at import: each xdist worker collects every file)."""
    return make_posts(3000, seed=11)


@pytest.fixture(scope="module")
def sources(tmp_path_factory, posts):
    d = tmp_path_factory.mktemp("src")
    (d / "posts.jsonl").write_text("\n".join(json.dumps(p) for p in posts))
    shuffled = posts[:]
    random.Random(1).shuffle(shuffled)
    (d / "shuffled.json").write_text(json.dumps(shuffled))
    sync(open_source(f"dump:{d / 'posts.jsonl'}"), d / "store")
    write_hakubooru_db(posts, d / "haku.db")
    return {"dump": f"dump:{d / 'posts.jsonl'}", "shuffled": f"dump:{d / 'shuffled.json'}",
            "store": f"store:{d / 'store'}", "hakubooru": f"hakubooru:{d / 'haku.db'}"}


def tags_of(p):
    return set(p["tag_string"].split())


def reference(p, rules):
    """What a subset's rules mean, written the obvious way."""
    w, h = p["image_width"], p["image_height"]
    t = tags_of(p)
    ok = not p["is_deleted"] and not p["is_banned"]
    ok &= p["file_ext"] in rules.get("file_ext", ["jpg", "jpeg", "png", "gif", "webp", "avif"])
    ok &= set(rules.get("tags", [])) <= t
    ok &= not (set(rules.get("exclude_tags", [])) & t)
    if "any_tags" in rules:
        ok &= bool(set(rules["any_tags"]) & t)
    if "artists" in rules:
        ok &= bool(set(rules["artists"]) & set(p["tag_string_artist"].split()))
    if "fav_gt" in rules:
        ok &= p["fav_count"] > rules["fav_gt"]
    if "score_range" in rules:
        lo, hi = rules["score_range"]
        ok &= lo <= p["score"] <= hi
    if "rating" in rules:
        ok &= p["rating"] in rules["rating"]
    o = rules.get("orientation", "any")
    ok &= {"horizontal": w > h, "vertical": h > w, "square": w == h, "any": True}[o]
    ok &= w * h >= rules.get("min_pixels", 0) and w >= rules.get("min_width", 0)
    if "created_after" in rules:
        ok &= datetime.fromisoformat(p["created_at"]) >= rules["created_after"]
    return ok


CASES = [
    ('tags=["1girl","solo"]\nfav_count=">30"\norientation="horizontal"', {"tags": ["1girl", "solo"], "fav_gt": 30, "orientation": "horizontal"}),
    ('tags=["1girl"]\nexclude_tags=["comic","monochrome"]\norientation="vertical"\nrating=["g","s"]',
     {"tags": ["1girl"], "exclude_tags": ["comic", "monochrome"], "orientation": "vertical", "rating": ["g", "s"]}),
    ('any_tags=["2girls","1boy"]\nscore="3..20"\nmin_pixels=2000000', {"any_tags": ["2girls", "1boy"], "score_range": (3, 20), "min_pixels": 2_000_000}),
    ('artists=["artist_1","artist_2","artist_3"]\norientation="square"', {"artists": ["artist_1", "artist_2", "artist_3"], "orientation": "square"}),
    ('file_ext=["zip","mp4"]', {"file_ext": ["zip", "mp4"]}),
    ('tags=["solo"]\ncreated_after=2015-01-10\nmin_width=2000', {"tags": ["solo"], "created_after": datetime(2015, 1, 10, tzinfo=timezone.utc), "min_width": 2000}),
]


@pytest.mark.parametrize("spec,rules", CASES)
@pytest.mark.parametrize("kind", ["dump", "store", "hakubooru"])
def test_rules_match_reference(sources, posts, spec, rules, kind):
    q = parse(f'name="t"\nseed=3\n{spec}\n')
    got = select(q, open_source(sources[kind])).table.column("post_id").to_pylist()
    want = {p["id"] for p in posts if reference(p, rules)}
    assert len(want) > 0
    assert sorted(got) == sorted(want)


RECIPE = """
name = "r"
seed = 20240405
class_token = "solo"
exclude_tags = ["comic", "monochrome"]
[[subsets]]
name = "horizontal"
tags = ["1girl", "solo"]
fav_count = ">10"
orientation = "horizontal"
count = 40
[[subsets]]
name = "vertical"
tags = ["1girl", "solo"]
artists = ["artist_1", "artist_2", "artist_3", "artist_4", "artist_5", "artist_6"]
max_per_artist = 3
count = 12
[[subsets]]
name = "any"
tags = ["1girl"]
count = 30
"""


def test_same_manifest_on_every_source_and_source_order_irrelevant(sources):
    q = parse(RECIPE)
    tables = {k: select(q, open_source(v)).table for k, v in sources.items()}
    keys = {k: t.column("key").to_pylist() for k, t in tables.items()}
    assert keys["dump"] == keys["store"] == keys["shuffled"] == keys["hakubooru"]
    assert tables["dump"].to_pylist() == tables["store"].to_pylist() == tables["shuffled"].to_pylist()


def test_disjoint_quota_random_and_max_per_artist(sources, posts):
    q = parse(RECIPE)
    sel = select(q, open_source(sources["store"]))
    t = sel.table.to_pylist()
    ids = [r["post_id"] for r in t]
    assert len(ids) == len(set(ids))  # disjoint
    counts = {r.name: r.selected for r in sel.subsets}
    assert counts == {"horizontal": 40, "vertical": 12, "any": 30}
    vertical = [r for r in t if r["subset"] == "vertical"]
    per_artist = {}
    for r in vertical:
        for a in r["tags_artist"]:
            per_artist[a] = per_artist.get(a, 0) + 1
    assert max(per_artist.values()) <= 3
    # random = the k smallest keyed hashes among eligible posts (no max_per_artist here)
    eligible = [p["id"] for p in posts if reference(p, {"tags": ["1girl", "solo"], "fav_gt": 10, "orientation": "horizontal",
                                                        "exclude_tags": ["comic", "monochrome"]})]
    want = sorted(eligible, key=lambda i: (keyed_hash_one(20240405, i), i))[:40]
    assert [r["post_id"] for r in t if r["subset"] == "horizontal"] == want
    # "any" overlaps the others' rules but takes none of their posts
    assert not {r["post_id"] for r in t if r["subset"] == "any"} & set(ids[:52])


def test_quota_shortfall_takes_all(sources):
    q = parse('name="t"\nartists=["artist_7"]\nfav_count=">50"\ncount=100000\n')
    sel = select(q, open_source(sources["dump"]))
    (res,) = sel.subsets
    assert res.selected == res.eligible == sel.table.num_rows < 100000


@pytest.mark.parametrize("order,key", [("fav_count", lambda p: (-p["fav_count"], p["id"])),
                                       ("score", lambda p: (-p["score"], p["id"])), ("id", lambda p: p["id"])])
def test_orders(sources, posts, order, key):
    q = parse(f'name="t"\ntags=["solo"]\norder="{order}"\ncount=25\n')
    want = [p["id"] for p in sorted((p for p in posts if reference(p, {"tags": ["solo"]})), key=key)][:25]
    for kind in ("dump", "store"):
        assert select(q, open_source(sources[kind])).table.column("post_id").to_pylist() == want


def test_seed_changes_sample_and_is_deterministic(sources):
    a = select(parse('name="t"\nseed=1\ntags=["1girl"]\ncount=50\n'), open_source(sources["store"])).table
    b = select(parse('name="t"\nseed=1\ntags=["1girl"]\ncount=50\n'), open_source(sources["store"])).table
    c = select(parse('name="t"\nseed=2\ntags=["1girl"]\ncount=50\n'), open_source(sources["store"])).table
    assert a.equals(b) and a.column("key").to_pylist() != c.column("key").to_pylist()


def test_deleted_and_banned_only_when_asked(sources, posts):
    q = parse('name="t"\ninclude_deleted=true\ninclude_banned=true\n')
    got = set(select(q, open_source(sources["store"])).table.column("post_id").to_pylist())
    deleted = {p["id"] for p in posts if p["is_deleted"] and p["file_ext"] in ("jpg", "png", "webp", "gif")}
    assert deleted and deleted <= got


def test_keyed_hash_numpy_equals_python():
    ids = np.array([0, 1, 2, 12345, 9_999_999, 2**40], dtype=np.int64)
    for seed in (0, 1, 20240405, -5, 2**70):
        assert keyed_hash(seed, ids).tolist() == [keyed_hash_one(seed, int(i)) for i in ids]


def test_aliases_resolve_query_tags(tmp_path):
    posts = make_posts(200, seed=9)
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(p) for p in posts))
    (tmp_path / "a.json").write_text(json.dumps([{"antecedent_name": "old_solo", "consequent_name": "solo", "status": "active"}]))
    sync(open_source(f"dump:{tmp_path / 'p.jsonl'}"), tmp_path / "s", aliases_file=str(tmp_path / "a.json"))
    src = open_source(f"store:{tmp_path / 's'}")
    by_old = select(parse('name="t"\ntags=["old_solo"]\n'), src).table.column("post_id").to_pylist()
    by_new = select(parse('name="t"\ntags=["solo"]\n'), src).table.column("post_id").to_pylist()
    assert by_old == by_new and len(by_new) > 50


def test_max_per_artist_must_be_positive():
    from curate.errors import CurateError

    with pytest.raises(CurateError, match="max_per_artist: must be >= 1"):
        parse('name="t"\nmax_per_artist=0\n')


def test_rating_words(sources):
    q = parse('name="t"\nrating=["general", "E"]\ncount=5\n')
    assert q.subsets[0].rating == ["g", "e"]
    from curate.errors import CurateError

    with pytest.raises(CurateError, match="unknown rating 'spicy'"):
        parse('name="t"\nrating=["spicy"]\n')


def test_repeated_posts_in_a_dump_are_read_once(tmp_path):
    posts = make_posts(30, seed=12)
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(p) for p in posts))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(p) for p in posts))
    src = open_source(f"dump:{tmp_path}")
    sel = select(parse('name="t"\ncount=5\n'), src)
    eligible = sum(1 for p in posts if reference(p, {}))
    assert sel.subsets[0].selected == 5 and sel.subsets[0].eligible == eligible
    assert src.skipped["repeated id"] == 30


def test_empty_store_selects_nothing(tmp_path):
    (tmp_path / "empty.json").write_text("[]")
    sync(open_source(f"dump:{tmp_path / 'empty.json'}"), tmp_path / "s")
    sel = select(parse('name="t"\ntags=["1girl"]\ncount=5\n'), open_source(f"store:{tmp_path / 's'}"))
    assert sel.table.num_rows == 0 and sel.subsets[0].eligible == 0
