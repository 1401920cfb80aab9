"""Sizes listed before EXIF rotation (issue 21, part 5): a post whose listed size is the
stored, unrotated one lands in `horizontal`; download measures it upright (portrait).
The row must leave the subset (marked) and the quota be refilled from the next posts.
Images come from a real HTTP server on 127.0.0.1 (tests.images.test_download.Server).
The case is Danbooru's own (danbooru/danbooru#3692, "Rotate pictures based on metadata":
post 3105959 stored unrotated with an EXIF orientation, listed with the stored size)."""

import json

from typer.testing import CliRunner

from curate import manifest
from curate.cli import app
from tests.common.test_decode import encode, exif_rotated_jpeg, gradient
from tests.images.test_download import md5, server  # noqa: F401

QUERY = """
name = "reg"
seed = 1
[[subsets]]
name = "horizontal"
orientation = "horizontal"
order = "id"
count = 3

[[subsets]]
name = "vertical"
orientation = "vertical"
order = "id"
count = 1
"""


def dump(server, tmp_path):
    """Posts 1-5 horizontal as listed; post 2 is the EXIF-rotated JPEG (stored 60x20,
    upright 20x60); post 10 is vertical."""
    posts = []
    for pid in (1, 2, 3, 4, 5, 10):
        data = exif_rotated_jpeg() if pid == 2 else encode(gradient(30, 50) if pid == 10 else gradient(60 + pid, 20), "JPEG")
        h = md5(data)
        w, ht = (30, 50) if pid == 10 else (60, 20) if pid == 2 else (60 + pid, 20)
        posts.append({"id": pid, "md5": h, "file_ext": "jpg", "image_width": w, "image_height": ht, "rating": "g",
                      "file_url": server.add(f"/{h}.jpg", data), "tag_string_general": "1girl",
                      "created_at": "2015-01-01T00:00:00Z", "updated_at": "2015-01-01T00:00:00Z"})
    (tmp_path / "posts.json").write_text(json.dumps(posts))
    (tmp_path / "q.toml").write_text(QUERY)
    return tmp_path / "posts.json"


def test_rotated_post_leaves_its_subset_and_the_quota_is_refilled(server, tmp_path):  # noqa: F811
    src = dump(server, tmp_path)
    out = tmp_path / "m.parquet"
    r = CliRunner().invoke(app, ["fetch", str(tmp_path / "q.toml"), "--source", f"dump:{src}", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "size check: 1 rows no longer fit their subset" in r.output and "orientation changed 1" in r.output
    assert "horizontal: 1 marked, 1 refilled from the next eligible posts" in r.output
    table, meta = manifest.read(out)
    rows = {x["post_id"]: x for x in table.to_pylist()}
    assert sorted(rows) == [1, 2, 3, 4, 10], r.output  # post 4 refills horizontal; 5 stays out
    assert rows[2]["error"].startswith("orientation changed: 20x60 is vertical, subset horizontal is horizontal")
    assert (rows[2]["width"], rows[2]["height"]) == (20, 60)
    assert rows[4]["subset"] == "horizontal" and rows[4]["error"] is None and rows[4]["path"]
    usable = [x["post_id"] for x in table.to_pylist() if x["subset"] == "horizontal" and not x["error"]]
    assert len(usable) == 3
    assert meta["stages"]["size-check"]["marked"] == {"horizontal": 1} and meta["stages"]["size-check"]["refilled"] == 1


def test_download_alone_refills_from_the_recorded_source(server, tmp_path):  # noqa: F811
    src = dump(server, tmp_path)
    out = tmp_path / "m.parquet"
    r = CliRunner().invoke(app, ["fetch", str(tmp_path / "q.toml"), "--source", f"dump:{src}", "--out", str(out), "--no-images"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["download", str(out)])
    assert r.exit_code == 0, r.output
    assert "horizontal: 1 marked, 1 refilled" in r.output
    rows = {x["post_id"]: x for x in manifest.read(out)[0].to_pylist()}
    assert rows[4]["path"] and rows[2]["error"].startswith("orientation changed")
    # the source gone: marked, not refilled, and said so
    out2 = tmp_path / "m2.parquet"
    r = CliRunner().invoke(app, ["fetch", str(tmp_path / "q.toml"), "--source", f"dump:{src}", "--out", str(out2), "--no-images"])
    src.rename(tmp_path / "moved.json")
    r = CliRunner().invoke(app, ["download", str(out2)])
    assert r.exit_code == 0, r.output
    assert "horizontal: 1 marked, 0 refilled" in r.output and "cannot be opened here" in r.output


def test_a_fetch_rerun_keeps_the_subset_full(server, tmp_path):  # noqa: F811
    """fetch again selects the listed sizes again (the rotated post, not its replacement);
    the marked row's error carries over, and the next download refills once more."""
    src = dump(server, tmp_path)
    out = tmp_path / "m.parquet"
    args = ["fetch", str(tmp_path / "q.toml"), "--source", f"dump:{src}", "--out", str(out)]
    assert CliRunner().invoke(app, args).exit_code == 0
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "horizontal: 0 marked, 1 refilled" in r.output
    table, _ = manifest.read(out)
    usable = sorted(x["post_id"] for x in table.to_pylist() if x["subset"] == "horizontal" and not x["error"])
    assert usable == [1, 3, 4]


def test_the_refill_counts_max_per_artist_with_the_rows_kept(server, tmp_path):  # noqa: F811
    """max_per_artist = 1: the first refill candidate (post 4) is by the artist of post 1, which
    stays in the subset, so post 5 refills it (before: post 4, two posts of one artist)."""
    src = dump(server, tmp_path)
    posts = json.loads(src.read_text())
    for post in posts:
        post["tag_string_artist"] = {1: "x", 2: "y", 3: "z", 4: "x", 5: "w", 10: "v"}[post["id"]]
    src.write_text(json.dumps(posts))
    (tmp_path / "q.toml").write_text(QUERY.replace('count = 3\n', 'count = 3\nmax_per_artist = 1\n', 1))
    out = tmp_path / "m.parquet"
    r = CliRunner().invoke(app, ["fetch", str(tmp_path / "q.toml"), "--source", f"dump:{src}", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "horizontal: 1 marked, 1 refilled" in r.output
    rows = manifest.read(out)[0].to_pylist()
    usable = sorted(x["post_id"] for x in rows if x["subset"] == "horizontal" and not x["error"])
    assert usable == [1, 3, 5], r.output
