import sqlite3

import pyarrow as pa
import pytest

from curate.demo.synthetic import make_posts, write_hakubooru_db
from curate.errors import CurateError
from curate.metadata.sources import open_source

CORE = ["post_id", "md5", "width", "height", "rating", "fav_count", "score", "created_at",
        "tags_general", "tags_character", "tags_copyright", "tags_artist", "tags_meta",
        "file_url", "file_ext", "is_deleted", "is_banned"]


def test_hakubooru_matches_dump(tmp_path):
    posts = make_posts(1200, seed=5)
    db = write_hakubooru_db(posts, tmp_path / "danbooru2023.db")
    (tmp_path / "d.json").write_text(__import__("json").dumps(posts))
    haku = pa.concat_tables(list(open_source(f"hakubooru:{db}").batches(batch_size=250)))
    dump = pa.concat_tables(list(open_source(f"dump:{tmp_path / 'd.json'}").batches()))
    assert haku.select(CORE).to_pylist() == dump.select(CORE).to_pylist()


def test_hakubooru_types_and_ratings(tmp_path):
    db = tmp_path / "h.db"
    conn = sqlite3.connect(db)
    from curate.demo.synthetic import HAKUBOORU_SCHEMA

    conn.executescript(HAKUBOORU_SCHEMA)
    conn.executemany("INSERT INTO tag VALUES (?,?,?,?)", [
        (1, "1girl", 0, 5), (2, "some_artist", 1, 1), (3, "hoshino_(blue_archive)", 2, 1),
        (4, "blue_archive", 3, 1), (5, "highres", 4, 1)])
    row = [7, "2023-04-01T10:00:00.000-04:00", 1, "", "f" * 32, None, 0, 0, 0, None, 0, 0, 1, 0,
           1200, 800, 1, "png", 3, 10, 0, 0, 42, None, None, None]
    conn.execute(f"INSERT INTO post VALUES ({','.join('?' * 26)})", row)
    conn.executemany("INSERT INTO posttagrelation (post_id, tag_id) VALUES (?, ?)", [(7, t) for t in range(1, 7)])
    conn.commit()
    conn.close()
    (r,) = pa.concat_tables(list(open_source(f"hakubooru:{db}").batches())).to_pylist()
    assert r["rating"] == "e" and r["fav_count"] == 42 and r["file_url"] is None
    assert (r["tags_general"], r["tags_artist"], r["tags_character"], r["tags_copyright"], r["tags_meta"]) == (
        ["1girl"], ["some_artist"], ["hoshino_(blue_archive)"], ["blue_archive"], ["highres"])
    assert r["created_at"].isoformat() == "2023-04-01T14:00:00+00:00"


def test_not_a_hakubooru_db(tmp_path):
    (tmp_path / "x.db").write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(CurateError, match="not a SQLite database"):
        open_source(f"hakubooru:{tmp_path / 'x.db'}")
    conn = sqlite3.connect(tmp_path / "y.db")
    conn.execute("CREATE TABLE post (id INTEGER)")
    conn.close()
    with pytest.raises(CurateError, match="missing tables"):
        open_source(f"hakubooru:{tmp_path / 'y.db'}")


def test_relation_to_a_missing_post_is_dropped(tmp_path):
    posts = make_posts(3, seed=14)
    db = write_hakubooru_db([posts[0], posts[2]], tmp_path / "h.db")
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO tag VALUES (999999, 'orphan_tag', 0, 1)")
    conn.execute("INSERT INTO posttagrelation (post_id, tag_id) VALUES (?, 999999)", (posts[1]["id"],))
    conn.commit()
    conn.close()
    rows = pa.concat_tables(list(open_source(f"hakubooru:{db}").batches())).to_pylist()
    assert [r["post_id"] for r in rows] == [posts[0]["id"], posts[2]["id"]]
    assert all("orphan_tag" not in r["tags_general"] for r in rows)


def test_hostile_values_are_nulled_and_counted_not_fatal(tmp_path):
    """SQLite holds any type in any column: wrong types and out-of-range numbers."""
    posts = make_posts(4, seed=21)
    db = write_hakubooru_db(posts, tmp_path / "h.db")
    conn = sqlite3.connect(db)
    a, b, c, _ = (p["id"] for p in posts)
    conn.execute("UPDATE post SET image_width = 99999999999, image_height = 'tall' WHERE id = ?", (a,))
    conn.execute("UPDATE post SET fav_count = 1e300, file_size = 'x', md5 = ? WHERE id = ?", (b"\x00blob", b))
    conn.execute("UPDATE post SET score = -3000000000, parent_id = '18446744073709551615' WHERE id = ?", (c,))
    conn.execute("INSERT INTO tag VALUES (10000000000000, 'huge_id_tag', 0, 1)")  # 10^13: no 73 TiB array
    conn.execute("INSERT INTO tag VALUES (7777777, x'00ff', 0, 1)")  # a name that is no text
    conn.execute("INSERT INTO posttagrelation (post_id, tag_id) VALUES (?, 10000000000000)", (a,))
    conn.execute("INSERT INTO posttagrelation (post_id, tag_id) VALUES (?, 'text')", (a,))
    conn.execute("INSERT INTO posttagrelation (post_id, tag_id) VALUES (?, 7777777)", (a,))
    conn.commit()
    conn.close()
    src = open_source(f"hakubooru:{db}")
    rows = {r["post_id"]: r for r in pa.concat_tables(list(src.batches())).to_pylist()}
    assert set(rows) == {a, b, c, posts[3]["id"]}
    assert rows[a]["width"] is None and rows[a]["height"] is None
    assert "huge_id_tag" in rows[a]["tags_general"]
    assert rows[b]["fav_count"] is None and rows[b]["file_size"] is None and rows[b]["md5"] is None
    assert rows[c]["score"] is None and rows[c]["parent_id"] is None
    assert rows[posts[3]["id"]]["width"] == posts[3]["image_width"]
    assert src.skipped["bad width"] == 1 and src.skipped["bad height"] == 1 and src.skipped["bad score"] == 1
    assert src.skipped["tag with a bad id or name"] == 1


def test_sizes_of_zero_or_less_are_nulled_and_counted(tmp_path):
    """A width, height or file size is a positive count; a negative score stays (it is one)."""
    posts = make_posts(3, seed=22)
    db = write_hakubooru_db(posts, tmp_path / "h.db")
    conn = sqlite3.connect(db)
    a, b, c = (p["id"] for p in posts)
    conn.execute("UPDATE post SET image_width = -5, image_height = 0 WHERE id = ?", (a,))
    conn.execute("UPDATE post SET file_size = -1, score = -7 WHERE id = ?", (b,))
    conn.commit()
    conn.close()
    src = open_source(f"hakubooru:{db}")
    rows = {r["post_id"]: r for r in pa.concat_tables(list(src.batches())).to_pylist()}
    assert rows[a]["width"] is None and rows[a]["height"] is None
    assert rows[b]["file_size"] is None and rows[b]["score"] == -7
    assert rows[c]["width"] == posts[2]["image_width"]
    assert src.skipped["bad width"] == 1 and src.skipped["bad height"] == 1 and src.skipped["bad file_size"] == 1
