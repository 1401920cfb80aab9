"""The rating scale of a file, not of a post (issue 21, part 1).

The window fixture is the real 2020-07 /posts.json page (tests/fixtures/danbooru/)
as the API served it between 2022-01-06 and 2022-05-22 (dates from issue 21 and
../shared/data/README.md): the lock flags gone, no `g` yet, `s` still meaning safe."""

import json
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from curate import manifest
from curate.cli import app
from curate.errors import CurateError
from curate.metadata.fetch import fetch
from curate.metadata.sources import open_source
from curate.metadata.sources.rating_scale import judge

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "danbooru"
OLD_KEYS = ("is_rating_locked", "is_note_locked", "is_status_locked")


def window_page() -> list[dict]:
    """The 2020 page as saved in March 2022: no lock flags, updated_at in the window."""
    posts = json.loads((FIXTURES / "imgbrd_posts_2020-07.json").read_text())
    for i, p in enumerate(posts):
        for k in OLD_KEYS:
            p.pop(k, None)
        p["updated_at"] = f"2022-03-{10 + i:02d}T12:00:00.000-05:00"
    return posts


def ratings(spec, **kw):
    src = open_source(spec, **kw)
    return [r["rating"] for r in pa.concat_tables(list(src.batches())).to_pylist()], src


REG = """
name = "reg"
seed = 1
class_token = "solo"
rating = ["g"]
[[subsets]]
name = "general"
"""


def test_a_2022_window_page_is_on_the_old_scale(tmp_path):
    page = tmp_path / "posts-2022-03.json"
    page.write_text(json.dumps(window_page()))
    got, src = ratings(f"dump:{page}")
    assert got == ["g"] * 10 and src.scales == {str(page): "old"} and not src.warnings
    # the reg set of general posts is not empty, and provenance says why
    (tmp_path / "reg.toml").write_text(REG)
    res = fetch(tmp_path / "reg.toml", src, tmp_path / "reg.parquet", kind="reg")
    assert res.selection.table.num_rows == 10
    _, meta = manifest.read(tmp_path / "reg.parquet")
    assert meta["rating_scale"] == {"option": "auto", "applied": "old", "files": {"old": 1}, "old_files": [str(page)]}
    # told otherwise, the user wins: s stays sensitive and the reg set is empty
    got, _ = ratings(f"dump:{page}", rating_scale="new")
    assert got == ["s"] * 10


def test_each_file_of_a_folder_on_its_own_scale(tmp_path):
    (tmp_path / "a-2022-03.json").write_text(json.dumps(window_page()))
    new = json.loads((FIXTURES / "booru-rs_posts_2023-03.json").read_text())
    (tmp_path / "b-2023-03.json").write_text(json.dumps(new))
    src = open_source(f"dump:{tmp_path}")
    rows = pa.concat_tables(list(src.batches())).to_pylist()
    by_id = {r["post_id"]: r["rating"] for r in rows}
    assert [by_id[p["id"]] for p in new] == [p["rating"] for p in new]  # s stays sensitive
    assert [by_id[p["id"]] for p in window_page()] == ["g"] * 10
    assert src.describe_scale()["applied"] == "mixed"


def test_unclear_files_warn_once_with_counts(tmp_path):
    # only s and q, saved after the cutover: sensitive posts, or an old page touched later?
    posts = [p for p in json.loads((FIXTURES / "booru-rs_posts_2023-03.json").read_text()) if p["rating"] in "sq"]
    f = tmp_path / "sq.json"
    f.write_text(json.dumps(posts))
    got, src = ratings(f"dump:{f}")
    assert set(got) == {"s", "q"} and len(src.warnings) == 1
    assert "s 5" in src.warnings[0] and "q 2" in src.warnings[0] and "--rating-scale old" in src.warnings[0]
    got, src = ratings(f"dump:{f}", rating_scale="old")
    assert set(got) == {"g", "q"} and not src.warnings


def test_verdicts():
    assert judge([{"rating": "q"}, {"rating": "e"}], "f").scale == "new"  # nothing to convert
    assert judge([{"rating": "safe"}], "f").scale == "old"
    assert judge([{"rating": "s", "is_rating_locked": False, "updated_at": "2023-01-01"}], "f").scale == "old"
    assert judge([{"rating": "s", "updated_at": "2022-05-21T23:00:00Z"}], "f").scale == "old"
    v = judge([{"rating": "s"}], "f")
    assert v.scale == "new" and "no dates" in v.warning
    with pytest.raises(CurateError, match="auto, old or new"):
        open_source("dump:x", rating_scale="sideways")
    with pytest.raises(CurateError, match="does not apply to store"):
        open_source("store:x", rating_scale="old")


def test_cli_records_the_scale_in_inspect_and_the_store(tmp_path):
    page = tmp_path / "dump"
    page.mkdir()
    (page / "p.json").write_text(json.dumps(window_page()))
    (tmp_path / "reg.toml").write_text(REG)
    r = CliRunner().invoke(app, ["build-reg", str(tmp_path / "reg.toml"), "--source", f"dump:{page}",
                                 "--out", str(tmp_path / "m.parquet"), "--no-images"])
    assert r.exit_code == 0, r.output
    assert "1 file(s) on the old scale" in r.output
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "m.parquet")])
    assert "rating scale: old (--rating-scale auto; files: old 1)" in r.output
    r = CliRunner().invoke(app, ["sync", f"dump:{page}", "--store", str(tmp_path / "s"), "--rating-scale", "new"])
    assert r.exit_code == 0, r.output
    gen = (tmp_path / "s" / "CURRENT").read_text().strip()
    meta = json.loads((tmp_path / "s" / gen / "meta.json").read_text())
    assert meta["sources"][-1]["rating_scale"]["applied"] == "new"


def test_rating_words_say_their_own_scale(tmp_path):
    """Clients that save the rating as a word (Bionus/imgbrd-grabber#2723, Xwilarg/BooruSharp#39:
    "safe" was renamed to "sensitive" when "general" arrived): the word decides, whatever the file."""
    posts = [{"id": 1, "md5": "a" * 32, "rating": "safe", "updated_at": "2023-06-01T00:00:00Z"},
             {"id": 2, "md5": "b" * 32, "rating": "questionable", "updated_at": "2023-06-01T00:00:00Z"}]
    (tmp_path / "old.json").write_text(json.dumps(posts))
    got, src = ratings(f"dump:{tmp_path / 'old.json'}")
    assert got == ["g", "q"] and src.scales[str(tmp_path / "old.json")] == "old" and not src.warnings
    posts = [dict(p, id=p["id"] + 10, rating=r) for p, r in zip(posts, ("sensitive", "general"))]
    (tmp_path / "new.json").write_text(json.dumps(posts))
    got, src = ratings(f"dump:{tmp_path / 'new.json'}")
    assert got == ["s", "g"] and src.scales[str(tmp_path / "new.json")] == "new"
