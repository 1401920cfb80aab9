import gzip
import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.demo.synthetic import make_posts
from curate.errors import CurateError
from curate.metadata.sources import open_source
from curate.metadata.sources.posts import normalize

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


# -- the Danbooru2017-2021 public metadata (JSON lines; fixture written by hand from its format) --

from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

ERA_2021 = Path(__file__).resolve().parents[1] / "fixtures" / "danbooru2021_metadata.jsonl"


def windows_copy(src: Path, dst: Path) -> Path:
    """The same file as a Windows editor saves it: UTF-8 with a BOM, CRLF line ends."""
    dst.write_bytes(b"\xef\xbb\xbf" + src.read_bytes().replace(b"\n", b"\r\n"))
    return dst


def test_danbooru2017_2021_metadata_rows():
    src = open_source(f"dump:{ERA_2021}")
    got = {r["post_id"]: r for r in rows(src)}
    assert sorted(got) == [1001, 2002, 3003, 4004, 5005] and src.skipped == {"hidden": 1}  # 6006: md5 ""
    a = got[1001]
    assert (a["tags_general"], a["tags_artist"], a["tags_copyright"], a["tags_meta"], a["tags_character"]) == (
        ["1girl", "smile", "solo"], ["kantoku"], ["original"], ["highres"], [])
    assert got[2002]["tags_character"] == ["hatsune_miku"] and got[2002]["tags_copyright"] == ["vocaloid"]
    assert [got[i]["rating"] for i in (1001, 2002, 3003, 4004)] == ["g", "q", "e", "g"]  # that era's s = safe
    assert [got[i]["fav_count"] for i in (1001, 2002, 3003)] == [3, 35, 40]  # fav_count, else len(favs)
    assert (a["width"], a["height"], a["score"], a["file_size"]) == (1200, 800, 45, 123456)
    assert a["created_at"] == datetime(2019, 3, 4, 5, 6, 7, 890120, tzinfo=timezone.utc)
    assert a["parent_id"] is None and got[2002]["parent_id"] == 1001
    assert [(got[i]["is_deleted"], got[i]["is_banned"]) for i in (1001, 4004, 5005)] == [
        (False, False), (True, False), (False, True)]
    assert a["md5"] == "0a1b2c3d4e5f60718293a4b5c6d7e8f9" and a["file_url"] is None and a["file_ext"] == "jpg"


def test_bom_and_crlf_dumps_read_the_same(tmp_path):
    plain = rows(open_source(f"dump:{ERA_2021}"))
    assert rows(open_source(f"dump:{windows_copy(ERA_2021, tmp_path / 'w.jsonl')}")) == plain
    arr = tmp_path / "a.json"
    arr.write_text("[" + ",".join(ERA_2021.read_text().splitlines()) + "]")
    assert rows(open_source(f"dump:{windows_copy(arr, tmp_path / 'w.json')}")) == plain


def test_old_api_site_relative_file_url():
    h = "ab" * 16
    row, _ = normalize({"id": 9, "md5": h, "file_ext": "png", "file_url": f"/data/{h}.png", "tag_string": "a"})
    assert row["file_url"] == f"https://cdn.donmai.us/original/ab/ab/{h}.png"
    row, _ = normalize({"id": 9, "md5": h, "file_url": "/data/sample/x.jpg", "tag_string": "a"})  # no ext
    assert row["file_url"] == "https://danbooru.donmai.us/data/sample/x.jpg"
    row, _ = normalize({"id": 9, "md5": h, "file_ext": "jpg", "file_url": "//evil.example/x.jpg", "tag_string": "a"})
    assert row["file_url"] == "//evil.example/x.jpg"  # not site-relative: download calls it a bad url


QUERY_2021 = """name = "era-2021"
seed = 1
[[subsets]]
name = "vertical"
tags = ["1girl", "solo"]
fav_count = ">30"
orientation = "vertical"
artists_file = "artists.txt"
"""


def cli(*args):
    """The command through its entry point, in this process (tests/inproc.py)."""
    from tests.inproc import run_curate

    return run_curate(*args)


def with_real_md5s(tmp_path):
    """The fixture with each md5 replaced by a real image's, written with a BOM and CRLF."""
    from tests.common.test_decode import encode, gradient

    bodies, lines = {}, []
    for i, line in enumerate(ERA_2021.read_text().splitlines()):
        post = json.loads(line)
        if post["md5"]:
            fmt = "PNG" if post["file_ext"] == "png" else "JPEG"
            bodies[int(post["id"])] = data = encode(gradient(20 + i, 30), fmt)
            post["md5"] = hashlib.md5(data).hexdigest()
        lines.append(json.dumps(post))
    (tmp_path / "raw.jsonl").write_text("\n".join(lines) + "\n")
    return windows_copy(tmp_path / "raw.jsonl", tmp_path / "posts.jsonl"), bodies


@pytest.mark.parametrize("via", ["dump", "store"])
def test_2021_era_posts_are_selected_and_downloaded(tmp_path, via):
    from curate import manifest
    from tests.images.test_download import Server
    from tests.images.test_tars import make_archive

    dump, bodies = with_real_md5s(tmp_path)
    (tmp_path / "q.toml").write_bytes(b"\xef\xbb\xbf" + QUERY_2021.replace("\n", "\r\n").encode())
    (tmp_path / "artists.txt").write_bytes("\ufeffkantoku\r\nwlop\r\nmika pikazo\r\nkantokku\r\n".encode())
    source = f"dump:{dump}"
    if via == "store":
        out = cli("sync", source, "--store", tmp_path / "store")
        assert out.returncode == 0, out.stderr
        source = f"store:{tmp_path / 'store'}"
    m = tmp_path / "m.parquet"
    out = cli("fetch", tmp_path / "q.toml", "--source", source, "--out", m, "--no-images")
    assert out.returncode == 0, out.stderr
    # 2002 (mika_pikazo, 35 favs) and 3003 (wlop, 40); 4004 is deleted, 5005 banned, 1001 horizontal
    rows_ = {r["post_id"]: r for r in manifest.read(m)[0].to_pylist()}
    assert sorted(rows_) == [2002, 3003]
    assert rows_[2002]["tags_artist"] == ["mika_pikazo"] and rows_[2002]["tags_character"] == ["hatsune_miku"]
    warnings = [ln.strip() for ln in out.stdout.splitlines() if "warning" in ln]
    assert warnings == ["warning: artist 'kantokku' (subset vertical's artists file) matches no post "
                        "in the source; a typo?"]

    srv = Server()  # the CDN, by md5: no file_url in these dumps
    try:
        for pid, data in bodies.items():
            h = hashlib.md5(data).hexdigest()
            ext = "png" if data.startswith(b"\x89PNG") else "jpg"
            srv.add(f"/original/{h[:2]}/{h[2:4]}/{h}.{ext}", data)
        from curate.images.download import download_manifest

        s = download_manifest(m, tmp_path / "img", cdn=srv.url, progress=False, retries=0)
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()
    assert s.downloaded == 2 and not s.failed
    for r in manifest.read(m)[0].to_pylist():
        assert (tmp_path / r["path"]).read_bytes() == bodies[r["post_id"]]

    # ... or from the archives (danbooru2023 layout), into another folder
    make_archive(tmp_path / "ds" / "original" / "data-0002.tar", {"./2002.png": bodies[2002]})
    make_archive(tmp_path / "ds" / "original" / "data-0003.tar", {"./3003.jpg": bodies[3003]},
                 tmp_path / "ds" / "original" / "data-0003.json")
    m2 = tmp_path / "m2.parquet"
    assert cli("fetch", tmp_path / "q.toml", "--source", source, "--out", m2, "--no-images").returncode == 0
    out = cli("download", m2, "--images", tmp_path / "img2", "--from-tars", tmp_path / "ds")
    assert out.returncode == 0, out.stderr
    for r in manifest.read(m2)[0].to_pylist():
        assert r["path"].startswith("img2/") and (tmp_path / r["path"]).read_bytes() == bodies[r["post_id"]]


def test_out_of_range_and_wrongly_typed_numbers_are_nulled_not_fatal(tmp_path):
    import json

    from curate.metadata.sources import open_source

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

    from curate.metadata.sources import open_source

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
