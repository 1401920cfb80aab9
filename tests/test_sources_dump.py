import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.errors import CurateError
from curate.sources import open_source
from curate.sources.posts import normalize
from curate.synthetic import make_posts

SAMPLES = ["imgbrd_posts_2020-07.json", "booru-rs_posts_2023-03.json",
           "rust-any2feed_posts_2023-03_limit100.json", "booru.hs_post_9969513_2025-09_with_media_asset.json"]


def rows(source):
    return pa.concat_tables(list(source.batches())).to_pylist()


@pytest.mark.parametrize("name", SAMPLES)
def test_every_schema_era_loads(shared_data, name):
    src = open_source(f"dump:{shared_data / 'danbooru' / name}")
    out = rows(src)
    raw = json.loads((shared_data / "danbooru" / name).read_text())
    raw = raw if isinstance(raw, list) else [raw]
    assert len(out) + sum(src.skipped.values()) == len(raw)
    for r in out:
        assert r["post_id"] > 0 and len(r["md5"]) == 32 and r["width"] > 0
        assert r["rating"] in ("g", "s", "q", "e")
        assert r["created_at"].tzinfo is not None


def test_hidden_posts_counted_not_crashed(shared_data):
    src = open_source(f"dump:{shared_data / 'danbooru' / 'rust-any2feed_posts_2023-03_limit100.json'}")
    out = rows(src)
    assert src.skipped == {"hidden": 7} and len(out) == 93
    assert any(r["file_ext"] == "zip" for r in out)  # the ugoira stays in the source


def test_old_safe_rating_becomes_general(shared_data):
    old = rows(open_source(f"dump:{shared_data / 'danbooru' / 'imgbrd_posts_2020-07.json'}"))
    raw = json.loads((shared_data / "danbooru" / "imgbrd_posts_2020-07.json").read_text())
    assert [r["rating"] for r in old] == [{"s": "g"}.get(p["rating"], p["rating"]) for p in raw]


def test_media_asset_variants(shared_data):
    (r,) = rows(open_source(f"dump:{shared_data / 'danbooru' / 'booru.hs_post_9969513_2025-09_with_media_asset.json'}"))
    types = [v["type"] for v in r["variants"]]
    assert {"720x720", "sample", "original"} <= set(types)
    assert r["tags_character"] == ["sangonomiya_kokomi"] and r["tags_copyright"] == ["genshin_impact"]


def test_categories_from_tag_strings(shared_data):
    (first, *_) = rows(open_source(f"dump:{shared_data / 'danbooru' / 'booru-rs_posts_2023-03.json'}"))
    assert first["tags_artist"] == ["ekz_(robotekz)"] and "comic" in first["tags_general"]
    assert first["tags_meta"] == ["absurdres", "highres"]


def test_json_lines_gz_and_parquet_agree(tmp_path):
    posts = make_posts(300, seed=3)
    (tmp_path / "a.json").write_text(json.dumps(posts))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as fh:
        fh.writelines(json.dumps(p) + "\n" for p in posts)
    pq.write_table(pa.Table.from_pylist(posts), tmp_path / "c.parquet")
    a, b, c = (rows(open_source(f"dump:{tmp_path / n}")) for n in ("a.json", "b.jsonl.gz", "c.parquet"))
    assert a == b == c and len(a) == 300


def test_hostile_metadata(tmp_path):
    hostile = [
        {"id": "12", "md5": "A" * 32, "file_url": "u", "image_width": "100", "image_height": 50.0,
         "tag_string_general": "a,b comma,tag\nnewline_tag  \u6f22\u5b57 A,B", "tag_string_artist": None,
         "rating": "explicit", "fav_count": "lots", "score": True, "created_at": "not a date"},
        {"id": None, "md5": "b" * 32, "file_url": "u", "tag_string": "x"},           # no id
        {"md5": "c" * 32, "file_url": "u", "tag_string": "x"},                        # id missing
        {"id": 14, "tag_string": "x"},                                                # hidden
        {"id": 15, "md5": "d" * 32, "file_url": "u", "image_width": 2**40, "rating": 3,
         "tag_string_general": ["list", "of", "tags", 5], "media_asset": {"variants": "junk"}},
        "not an object",
        [1, 2, 3],
    ]
    path = tmp_path / "hostile.jsonl"
    path.write_text("\n".join(json.dumps(p) for p in hostile) + "\n{broken json\n")
    src = open_source(f"dump:{path}")
    out = rows(src)
    assert [r["post_id"] for r in out] == [12, 15]
    first = out[0]
    assert first["tags_general"] == ["a,b", "comma,tag", "newline_tag", "\u6f22\u5b57"]
    assert first["md5"] == "a" * 32 and first["width"] == 100 and first["height"] == 50
    assert first["fav_count"] is None and first["score"] is None and first["created_at"] is None
    assert first["rating"] == "e" and first["tags_artist"] == []
    assert out[1]["width"] is None and out[1]["rating"] is None and out[1]["tags_general"] == ["list", "of", "tags"]
    assert src.skipped["no id"] == 2 and src.skipped["hidden"] == 1 and src.skipped["bad json line"] == 1
    assert src.skipped["not an object"] == 2


def test_not_json_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("[this is not json")
    with pytest.raises(CurateError, match="not JSON"):
        rows(open_source(f"dump:{bad}"))
    with pytest.raises(CurateError, match="not found"):
        open_source(f"dump:{tmp_path / 'missing.json'}")


def test_normalize_skips_non_posts():
    assert normalize({"id": 1, "name": "blue_eyes", "category": 0}) == (None, "not a post")


def test_out_of_range_and_wrongly_typed_numbers_are_nulled_not_fatal(tmp_path):
    import json

    from curate.sources import open_source

    good = {"id": 5, "md5": "a" * 32, "file_url": "https://x/a.jpg", "image_width": 10, "image_height": 10,
            "rating": "g", "tag_string_general": "1girl", "file_ext": "jpg"}
    posts = [
        dict(good, id=1, file_size="99999999999999999999999", parent_id=1e300, fav_count=[3]),
        dict(good, id=2, image_width=2**40, score="-5000000000", media_asset={"variants": [
            {"type": "720x720", "url": "https://x/s.webp", "width": 2**40, "height": "12", "file_ext": "webp"}]}),
        dict(good, id="99999999999999999999999"),  # no usable id: skipped, counted
        dict(good, id=4, image_height=float("inf"), created_at=12345),
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(p) + "\n" for p in posts))
    src = open_source(f"dump:{tmp_path / 'd.jsonl'}")
    rows = {r["post_id"]: r for r in pa.concat_tables(list(src.batches())).to_pylist()}
    assert set(rows) == {1, 2, 4} and src.skipped["no id"] == 1
    assert rows[1]["file_size"] is None and rows[1]["parent_id"] is None and rows[1]["fav_count"] is None
    assert rows[2]["width"] is None and rows[2]["score"] is None
    assert rows[2]["variants"] == [{"type": "720x720", "url": "https://x/s.webp", "width": None, "height": 12,
                                    "file_ext": "webp"}]
    assert rows[4]["height"] is None and rows[4]["created_at"] is None and rows[4]["width"] == 10


def test_sizes_of_zero_or_less_are_nulled(tmp_path):
    import json

    from curate.sources import open_source

    good = {"id": 5, "md5": "a" * 32, "file_url": "https://x/a.jpg", "image_width": 10, "image_height": 10,
            "rating": "g", "tag_string_general": "1girl", "file_ext": "jpg", "score": -3}
    posts = [dict(good, id=1, image_width=-5, image_height=0, file_size=-1),
             dict(good, id=2, media_asset={"variants": [
                 {"type": "720x720", "url": "https://x/s.webp", "width": 0, "height": -12, "file_ext": "webp"}]})]
    (tmp_path / "d.json").write_text(json.dumps(posts))
    rows = {r["post_id"]: r for r in pa.concat_tables(list(open_source(f"dump:{tmp_path / 'd.json'}").batches())).to_pylist()}
    assert (rows[1]["width"], rows[1]["height"], rows[1]["file_size"], rows[1]["score"]) == (None, None, None, -3)
    assert (rows[2]["variants"][0]["width"], rows[2]["variants"][0]["height"]) == (None, None)
    assert (rows[2]["width"], rows[2]["height"]) == (10, 10)
