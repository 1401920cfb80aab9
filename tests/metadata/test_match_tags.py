"""Tags that will overfit (issue 27): flagged for a training manifest, and a reg subset
(`match_tags_of`) that draws part of its quota from them, on every source. The commands run
in this process (tests/inproc.py): the checks are on what they print."""

import json
from pathlib import Path

import pyarrow as pa
import pytest

from curate import manifest
from curate.common import overfit
from curate.demo.synthetic import make_posts
from curate.errors import CurateError
from curate.metadata.query import parse
from curate.metadata.select import select
from curate.metadata.sources import open_source
from curate.metadata.sync import sync
from tests.inproc import run_curate

TAGS_CSV = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "wd-tagger" / "selected_tags_wd-vit-tagger-v3.csv"


def planted_posts():
    """Synthetic posts; `halo` on 4% of them (its share of Danbooru: 2.4%)."""
    posts = make_posts(3000, seed=5)
    for p in posts[::25]:
        p["tag_string_general"] += " halo"
        p["tag_string"] = " ".join(sorted(p["tag_string"].split() + ["halo"]))
    return posts


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("match")
    posts = planted_posts()
    (d / "posts.jsonl").write_text("\n".join(json.dumps(p) for p in posts))
    sync(open_source(f"dump:{d / 'posts.jsonl'}"), d / "store")
    # The training set: a CG set where 3 in 4 images show a halo (Blue Archive).
    src = open_source(f"dump:{d / 'posts.jsonl'}")
    halo = select(parse('seed = 1\ntags = ["halo"]\ncount = 75'), src).table
    rest = select(parse('seed = 2\nexclude_tags = ["halo"]\ncount = 25'), src).table
    cg = pa.concat_tables([halo, rest])
    (d / "manifests").mkdir()
    manifest.write(cg, d / "manifests" / "official_cg.parquet", manifest.new_provenance(kind="fetch"))
    return d


def test_an_over_represented_tag_is_flagged(world):
    info = overfit.report(world / "manifests" / "official_cg.parquet", reg=None, counts=None)
    assert info["base"] is None and "no base" in info["note"]
    reg = world / "reg_plain.parquet"
    q = world / "plain.toml"
    q.write_text('seed = 3\nclass_token = "solo"\ncount = 400\n')
    manifest.write(select(parse(q.read_text()), open_source(f"store:{world / 'store'}")).table, reg,
                   manifest.new_provenance(kind="reg"))
    info = overfit.report(world / "manifests" / "official_cg.parquet", reg=reg)
    flagged = {d["tag"]: d for d in info["flagged"]}
    assert "halo" in flagged and flagged["halo"]["share"] == 0.75
    assert flagged["halo"]["ratio"] > 10 and flagged["halo"]["reg_share"] < 0.1
    assert "1girl" not in flagged and "solo" not in flagged  # common everywhere: not over-represented
    assert flagged["halo"]["meaning"].startswith("no captions yet")


def test_match_tags_of_shifts_the_reg_frequencies_on_every_source(world):
    text = ('seed = 7\nclass_token = "solo"\n[[subsets]]\nname = "vertical"\ncount = 300\n'
            'match_tags_of = "manifests/official_cg.parquet"\nmatch_tags_share = 0.3\n')
    q = world / "reg.toml"
    q.write_text(text)
    results = {}
    for name in ("dump", "store"):
        src = open_source(f"dump:{world / 'posts.jsonl'}" if name == "dump" else f"store:{world / 'store'}")
        from curate.metadata.query import load

        results[name] = select(load(q), src)
    a, b = results["dump"], results["store"]
    assert a.table.column("key").to_pylist() == b.table.column("key").to_pylist()  # deterministic, source-blind
    shift = {d["tag"]: d for d in a.tag_shift["vertical"]}
    assert shift["halo"]["before"] < 0.08 and shift["halo"]["after"] >= 0.3
    assert shift["halo"]["training"] == 0.75
    assert a.table.num_rows == 300
    plain = select(parse(text.replace('match_tags_of = "manifests/official_cg.parquet"\nmatch_tags_share = 0.3\n', ''),
                         base_dir=world), open_source(f"store:{world / 'store'}"))
    assert plain.tag_shift == {}


def test_build_reg_summary_shows_before_and_after(world):
    q = world / "reg.toml"
    r = run_curate("build-reg", q, "--source", f"store:{world / 'store'}", "--out", world / "reg.parquet",
                   "--no-images", cwd=world)
    assert r.returncode == 0, r.stderr
    assert "before -> after matching" in r.stdout
    line = next(x for x in r.stdout.splitlines() if x.strip().startswith("halo"))
    before, after = (float(v.rstrip("%")) for v in line.split()[1:4:2])
    assert before < 8 and after >= 30


def test_bad_match_tags_keys_are_one_line_errors(world):
    for body, msg in (('match_tags_share = 0.3', "needs match_tags_of"),
                      ('match_tags_of = "nope.parquet"', "manifest not found"),
                      ('match_tags_of = "manifests/official_cg.parquet"\nmatch_tags_share = 2', "from 0 to 1")):
        with pytest.raises(CurateError, match=msg):
            parse(f"count = 5\n{body}\n", base_dir=world)


# The recipe's own report of the same input: the BAXL v3 model card (the issue quotes it)
# lists `halo` and `heterochromia` overfitting; and Danbooru at large from the real
# SmilingWolf/wd-vit-tagger-v3 selected_tags.csv (halo on 171,236 of 7,182,544 posts).
def test_inspect_tags_against_danbooru_counts(world):
    if not TAGS_CSV.is_file():
        pytest.skip("tests/fixtures/wd-tagger/selected_tags_wd-vit-tagger-v3.csv is missing")
    shares = overfit.danbooru_shares(TAGS_CSV)
    assert shares["halo"] == pytest.approx(171236 / 7182544)
    r = run_curate("inspect", world / "manifests" / "official_cg.parquet", "--tags", "--counts", TAGS_CSV)
    assert r.returncode == 0, r.stderr
    halo = next(x for x in r.stdout.splitlines() if x.strip().startswith("halo "))
    assert "75% of rows vs 2.38% (31x)" in halo
    assert "baked into the style" in r.stdout
