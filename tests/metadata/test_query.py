import subprocess
import sys
from pathlib import Path

import pytest

from curate.errors import CurateError
from curate.metadata.query import Range, load, parse

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text,lo,hi", [
    ("30", 30, 30), (">30", 31, None), (">=30", 30, None), ("<30", None, 29),
    ("<=30", None, 30), ("10..20", 10, 20), ("10..", 10, None), ("..20", None, 20), (" > 5 ", 6, None),
])
def test_range_syntax(text, lo, hi):
    r = Range.parse(text, "x")
    assert (r.lo, r.hi) == (lo, hi)


@pytest.mark.parametrize("bad", ["abc", ">>3", "5..2", "", "..", "3.5", True, 1.5, [1]])
def test_bad_range_names_the_key(bad):
    with pytest.raises(CurateError, match=r"subsets\[0\]\.fav_count"):
        parse(f"[[subsets]]\nname='a'\nfav_count = {_toml(bad)}\n")


def _toml(v):
    if isinstance(v, str):
        return repr(v).replace("'", '"')
    return str(v).lower() if isinstance(v, bool) else str(v)


def test_top_level_defaults_and_additive_lists():
    q = parse("""
name = "q"
seed = 7
rating = ["g", "s"]
exclude_tags = ["comic"]
tags = ["1girl"]
[[subsets]]
name = "a"
tags = ["solo"]
exclude_tags = ["monochrome"]
[[subsets]]
name = "b"
rating = ["e"]
""")
    a, b = q.subsets
    assert a.tags == ["1girl", "solo"] and a.exclude_tags == ["comic", "monochrome"]
    assert a.rating == ["g", "s"] and b.rating == ["e"] and b.tags == ["1girl"]
    assert q.seed == 7


def test_no_subsets_means_one_subset_named_after_query():
    q = parse('name = "mine"\ntags = ["1girl"]\ncount = 3\n'.replace("count = 3\n", ""))
    assert [s.name for s in q.subsets] == ["mine"]


@pytest.mark.parametrize("text,needle", [
    ('favcount = ">3"', "unknown key 'favcount'"),
    ('[[subsets]]\nname="a"\nfav_cuont=3', r"subsets\[0\]: unknown key 'fav_cuont'"),
    ('[[subsets]]\nname="a"\norientation="diagonal"', "orientation"),
    ('[[subsets]]\nname="a"\norder="newest"', "order"),
    ('[[subsets]]\nname="a"\nrating=["x"]', "rating"),
    ('[[subsets]]\nname="a"\ncount=-1', "count"),
    ('[[subsets]]\nname="a"\n[[subsets]]\nname="a"', "duplicate subset"),
    ('seed = "x"', "seed"),
    ("this is = not toml =", "invalid TOML"),
])
def test_spec_errors_name_the_key(text, needle):
    with pytest.raises(CurateError, match=needle):
        parse(text)


def test_artists_file_relative_to_query(tmp_path):
    (tmp_path / "artists").mkdir()
    (tmp_path / "artists" / "a.txt").write_text("# header\nfoo bar\n\nbaz  # comment\n")
    (tmp_path / "q.toml").write_text('[[subsets]]\nname="v"\nartists_file="artists/a.txt"\nartists=["x"]\n')
    q = load(tmp_path / "q.toml")
    assert q.subsets[0].artists == ["x", "foo_bar", "baz"]


def test_missing_artists_file_names_the_file(tmp_path):
    (tmp_path / "q.toml").write_text('[[subsets]]\nname="v"\nartists_file="nope.txt"\n')
    with pytest.raises(CurateError, match="nope.txt"):
        load(tmp_path / "q.toml")


def test_recipe_query_parses():
    q = load(ROOT / "queries" / "baxl_v3_reg.toml")
    h, v = q.subsets
    assert q.class_token == "solo"
    assert h.orientation == "horizontal" and v.orientation == "vertical"
    assert h.fav_count == Range(31, None) and {"1girl", "solo"} <= set(h.tags)
    assert h.count >= 1000 and v.count >= 1000 and v.artists


def test_bom_and_crlf_query_and_artists_file(tmp_path):
    (tmp_path / "a.txt").write_bytes("\ufefffirst_artist\r\nsecond artist\r\n".encode())
    (tmp_path / "q.toml").write_bytes('\ufeff[[subsets]]\r\nname="v"\r\nartists_file="a.txt"\r\n'.encode())
    q = load(tmp_path / "q.toml")
    assert q.subsets[0].artists == ["first_artist", "second_artist"]  # a BOM used to drop the first


def test_artists_file_outside_the_query_folder_needs_a_flag(tmp_path):
    from curate.metadata.query import load

    (tmp_path / "q").mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("password123\n")
    for where in (str(secret), "../secret.txt"):
        (tmp_path / "q" / "q.toml").write_text(f'[[subsets]]\nname="v"\nartists_file="{where}"\n')
        with pytest.raises(CurateError, match="outside the query's folder.*--allow-outside-files"):
            load(tmp_path / "q" / "q.toml")
        assert load(tmp_path / "q" / "q.toml", outside_files=True).subsets[0].artists == ["password123"]
    (tmp_path / "q" / "link.txt").symlink_to(secret)  # a link inside pointing out is outside too
    (tmp_path / "q" / "q.toml").write_text('[[subsets]]\nname="v"\nartists_file="link.txt"\n')
    with pytest.raises(CurateError, match="outside the query's folder"):
        load(tmp_path / "q" / "q.toml")
    (tmp_path / "none.json").write_text("[]")
    r = subprocess.run([sys.executable, "-m", "curate", "fetch", tmp_path / "q" / "q.toml", "--source",
                        f"dump:{tmp_path / 'none.json'}", "--no-images"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "outside the query's folder" in r.stderr
