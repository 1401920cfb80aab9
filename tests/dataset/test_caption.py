"""curate caption: recipe rules on real Danbooru tag spellings, hostile tags, reg
captions, settings from --config and from the query text, real files and CLI."""

import dataclasses
import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pytest
from PIL import Image
from typer.testing import CliRunner

from curate import manifest
from curate.cli import app
from curate.common.caption_rules import (
    color_theme,
    format_tag,
    prune_overlaps,
    quality_tag,
)
from curate.dataset.caption import CaptionSettings, build_caption, choose_caption
from curate.errors import CurateError
from curate.schema import MANIFEST_SCHEMA

CURATE = str(Path(sys.executable).with_name("curate"))
HOSTILE = ["a,b", "line\nbreak", "keep|||split", "zero\u200bwidth", "para\u2028sep",
           "初音ミク", "don't_say_\"lazy\"", "\\||/", "(unbalanced", " ,,, ", "\x00"]


# --- helpers (test_export.py uses them too) -----------------------------------


def load_posts(shared_data: Path, name: str) -> dict[int, dict]:
    return {p["id"]: p for p in json.loads((shared_data / "danbooru" / name).read_text())}


def post_row(post: dict, subset: str = "main", **extra) -> dict:
    """A manifest row from a real Danbooru API post."""
    row = {
        "key": f"danbooru/{post['id']}", "post_id": post["id"], "subset": subset,
        "rating": post.get("rating"), "fav_count": post.get("fav_count"),
        "created_at": datetime.fromisoformat(post["created_at"]),
        **{f"tags_{c}": post.get(f"tag_string_{c}", "").split()
           for c in ("general", "character", "copyright", "artist", "meta")},
    }
    row.update(extra)
    return row


def write_manifest(path: Path, rows: list[dict], meta: dict | None = None,
                   colours: dict | None = None) -> Path:
    """Write rows as a real Parquet manifest; each row with a `path` gets a real PNG."""
    colours = colours or {}
    for row in rows:
        if row.get("path"):
            image = path.parent / row["path"]
            image.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (48, 32), colours.get(row["key"], (200, 200, 200))).save(image)
    names = list(dict.fromkeys(k for row in rows for k in row))
    schema = pa.schema([MANIFEST_SCHEMA.field(n) for n in names])
    table = pa.Table.from_pylist([{n: r.get(n) for n in names} for r in rows], schema=schema)
    return manifest.write(table, path, meta or manifest.new_provenance())


def captions_of(path: Path) -> dict[str, str]:
    table, _ = manifest.read(path)
    return dict(zip(table.column("key").to_pylist(), table.column("caption").to_pylist()))


def tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.replace("|||", ",").split(",") if t.strip()]


@pytest.fixture
def booru(shared_data):
    return load_posts(shared_data, "booru-rs_posts_2023-03.json")


@pytest.fixture
def feed(shared_data):
    return load_posts(shared_data, "rust-any2feed_posts_2023-03_limit100.json")


# --- rules one by one ------------------------------------------------------------


def test_order_special_character_copyright_artist_general_then_year_rating_quality(booru):
    post = booru[6148686]  # 1girl solo, two asuna characters, blue_archive
    s = CaptionSettings(artist=True, rating=True, year=True, keep_separator="|||")
    caption = build_caption(post_row(post), s)
    fixed, rest = caption.split(" ||| ")
    # HakuBooru's order and names: `solo` is not special, no `\(` escapes
    assert fixed == "1girl, asuna (blue archive), asuna (bunny) (blue archive), blue archive, user vfpg3584"
    assert rest.endswith(", newest, sensitive, worst quality")  # fav 1 <= p10 of s (2)
    assert "blonde hair" in tags(rest) and "solo" in tags(rest) and "1girl" not in tags(rest)


def test_quality_from_fav_count_percentiles_per_rating():
    assert quality_tag("g", 38) == "masterpiece" and quality_tag("g", 37) == "best quality"
    assert quality_tag("s", 38) == "great quality"  # same favs, stricter rating (p75 = 30)
    assert quality_tag("e", 263) == "masterpiece" and quality_tag("e", 9) == "worst quality"
    assert quality_tag(None, 500) is None and quality_tag("g", None) is None


def test_quality_thresholds_are_configurable(booru, tmp_path):
    config = tmp_path / "caption.toml"
    config.write_text('[caption]\nquality_labels = ["meh", "great"]\n'
                      'quality_thresholds = { g = [0], s = [0], q = [0], e = [0] }\n')
    m = write_manifest(tmp_path / "m.parquet", [post_row(booru[6148686], path="img/a.png"),
                                                 post_row(booru[6148687], path="img/b.png")])
    result = CliRunner().invoke(app, ["caption", str(m), "--config", str(config)])
    assert result.exit_code == 0, result.output
    caps = captions_of(m)
    assert tags(caps["danbooru/6148686"])[-1] == "great"  # fav 1 > 0
    assert tags(caps["danbooru/6148687"])[-1] == "meh"    # fav 0


def test_recipe_ban_list_and_overfit_drops(booru, feed):
    s = CaptionSettings(meta=True)
    assert "comic" not in tags(build_caption(post_row(booru[6148688]), s))
    assert "speech bubble" not in tags(build_caption(post_row(feed[6141704]), s))
    hina = tags(build_caption(post_row(booru[6148684]), s))
    assert "halo" not in hina and "1girl" in hina
    costume = tags(build_caption(post_row(feed[6141230]), s))
    assert not [t for t in costume if "official" in t]  # .*official.* (general and meta)
    focus = tags(build_caption(post_row(feed[6141616]), s))
    assert not [t for t in focus if "focus" in t]
    # both lists are configurable: empty lists keep every tag
    kept = tags(build_caption(post_row(booru[6148684]), CaptionSettings(ban=(), drop=())))
    assert "halo" in kept


def test_drop_matches_whole_tags_only(booru):
    row = post_row(booru[6148684])
    row["tags_general"] += ["adjusting_halo", "2boys", "heterochromia"]
    out = tags(build_caption(row, CaptionSettings()))
    assert "adjusting halo" in out  # `halo` is not a substring rule
    assert "heterochromia" not in out and "2boys" not in out  # `.*boy.*`


def test_overlapping_tags_pruned(booru):
    out = tags(build_caption(post_row(booru[6148686]), CaptionSettings()))
    assert "very long hair" in out and "long hair" not in out
    assert "absurdly long hair" in out
    assert prune_overlaps(["holding", "holding_staff", "staff", "solo", "solo_focus"]) == [
        "holding_staff", "solo", "solo_focus"]
    # a tagger-only tag never pushes out a source tag
    assert prune_overlaps(["long_hair", "very_long_hair"], source={"long_hair"}) == [
        "long_hair", "very_long_hair"]
    unpruned = tags(build_caption(post_row(booru[6148686]), CaptionSettings(prune_overlaps=False)))
    assert "long hair" in unpruned


def test_underscores_emoticons_and_parentheses(feed, shared_data):
    caps = [tags(build_caption(post_row(feed[i]), CaptionSettings())) for i in (6141385, 6141439, 6140734)]
    assert "^_^" in caps[0] and ":d" in caps[0]
    assert "=_=" in caps[1] and ">_<" in caps[2]
    eyja = load_posts(shared_data, "imgbrd_posts_2020-07.json")[4018204]
    out = build_caption(post_row(eyja), CaptionSettings())
    assert out.startswith("1girl, eyjafjalla (arknights), arknights")
    assert "originium arts (arknights)" in tags(out) and "\\" not in out
    assert format_tag("la+_darknesss") == "la+ darknesss"
    # a label list's escapes are undone; escaping is an explicit option
    assert format_tag("already_\\(escaped\\)") == "already (escaped)"
    assert format_tag("yuuka_(blue_archive)", escape=True) == "yuuka \\(blue archive\\)"
    assert format_tag("already_\\(escaped\\)", escape=True) == "already \\(escaped\\)"


def test_hostile_tags_never_split_or_break_a_caption(booru):
    row = post_row(booru[6148687], tags_general=["1girl", *HOSTILE], tags_character=["x,y\r\nz"])
    caption = build_caption(row, CaptionSettings(keep_separator="|||"))
    assert len(caption.splitlines()) == 1 and "\x00" not in caption and "\u200b" not in caption
    assert caption.count("|||") == 1
    fixed, rest = caption.split(" ||| ")
    assert fixed.split(", ") == ["1girl", "x y z", "touhou"]
    assert rest.split(", ") == [
        "a b", "line break", "keep split", "zero width", "para sep", "初音ミク",
        "don't say \"lazy\"", "\\||/", "(unbalanced", "worst quality"]


def test_colour_theme_from_pixels_placed_first(booru, tmp_path):
    assert color_theme(Image.new("RGB", (40, 40), (30, 60, 220))) == "blue_theme"
    assert color_theme(Image.new("RGB", (40, 40), (255, 105, 180))) == "pink_theme"
    assert color_theme(Image.new("RGB", (40, 40), (8, 8, 8))) == "black_theme"
    half = Image.new("RGB", (40, 40), (220, 20, 20))
    half.paste((20, 20, 220), (0, 0, 20, 40))
    assert color_theme(half) is None  # no dominant colour
    config = tmp_path / "c.toml"
    config.write_text('[caption]\ncolor_theme = true\nprefix = ["baxl style"]\n')
    rows = [post_row(booru[6148686], path="img/blue.png"), post_row(booru[6148687], path="img/red.png")]
    m = write_manifest(tmp_path / "m.parquet", rows, colours={
        "danbooru/6148686": (30, 60, 220), "danbooru/6148687": (220, 20, 20)})
    assert CliRunner().invoke(app, ["caption", str(m), "--config", str(config)]).exit_code == 0
    caps = captions_of(m)
    assert caps["danbooru/6148686"].startswith("blue theme, baxl style, 1girl, asuna")
    assert caps["danbooru/6148687"].startswith("red theme, baxl style, 1girl")


def test_tagger_tags_merged_source_wins(booru):
    row = post_row(booru[6148687])  # source: 1girl, red_hair, touhou's onozuka_komachi, no solo
    row["tagger"] = [
        {"tag": "solo", "category": "general", "score": 0.97},
        {"tag": "red_hair", "category": "character", "score": 0.99},  # source has it: source wins
        {"tag": "smile", "category": "general", "score": 0.2},        # below threshold
        {"tag": "hakurei_reimu", "category": "character", "score": 0.9},
        {"tag": "kirisame_marisa", "category": "character", "score": 0.5},
        {"tag": "general", "category": "rating", "score": 0.99},
        {"tag": "looking at viewer", "category": "general", "score": 0.6},
    ]
    out = tags(build_caption(row, CaptionSettings(keep_separator="|||")))
    assert out[:3] == ["1girl", "onozuka komachi", "hakurei reimu"] and "solo" in out[3:]
    assert "kirisame marisa" not in out and "smile" not in out and "general" not in out
    assert out.count("red hair") == 1 and out.index("red hair") > out.index("touhou")
    assert "looking at viewer" in out
    assert "solo" not in tags(build_caption(row, CaptionSettings(tagger=False)))


def test_reg_caption_is_class_token_alone_or_with_tags(booru):
    row = post_row(booru[6148686])
    assert build_caption(row, CaptionSettings(), is_reg=True, class_token="solo") == "solo"
    with_tags = build_caption(row, CaptionSettings(reg_caption="class+tags"), is_reg=True,
                              class_token="solo")
    assert tags(with_tags)[:2] == ["solo", "1girl"] and tags(with_tags).count("solo") == 1
    with pytest.raises(CurateError):
        build_caption(row, CaptionSettings(), is_reg=True, class_token="")


# --- the stage on real files -------------------------------------------------------


def test_stage_writes_txt_beside_images_and_skips_error_and_dup_rows(feed, tmp_path):
    ids = [6141385, 6141439, 6140734, 6141230, 6140739]
    rows = [post_row(feed[i], path=f"images/{i}.png") for i in ids]
    rows[3]["error"] = "download: 404"
    rows[4]["dup_of"] = "danbooru/6141385"
    rows.append(post_row(feed[6141704]))  # never downloaded: no path
    m = write_manifest(tmp_path / "m.parquet", rows)
    result = CliRunner().invoke(app, ["caption", str(m)])
    assert result.exit_code == 0, result.output
    assert "captioned 3 rows" in result.output and "skipped 1: duplicate" in result.output
    caps = captions_of(m)
    for i in ids[:3]:
        txt = tmp_path / "images" / f"{i}.txt"
        assert txt.read_text(encoding="utf-8") == caps[f"danbooru/{i}"]
        assert "\n" not in caps[f"danbooru/{i}"]
    for i in ids[3:]:
        assert caps[f"danbooru/{i}"] is None and not (tmp_path / "images" / f"{i}.txt").exists()
    _, meta = manifest.read(m)
    assert meta["stages"]["caption"]["written"] == 3


def test_a_path_reaching_outside_curates_folders_gets_no_txt_beside_it(feed, tmp_path):
    """A hand-edited or foreign manifest whose `path` points at someone's picture elsewhere:
    the caption goes to curate's own folder, nothing is written beside that picture. Images
    in a download folder outside the manifest's folder get theirs when the user names it (--images)."""
    ids = [6141385, 6141439, 6140734]
    proj, elsewhere, shared = tmp_path / "proj", tmp_path / "elsewhere", tmp_path / "shared_images"
    proj.mkdir()
    rows = [post_row(feed[ids[0]], path=f"../elsewhere/{ids[0]}.png"),
            post_row(feed[ids[1]], path=f"images/{ids[1]}.png"),
            post_row(feed[ids[2]], path=f"../shared_images/{ids[2]}.png")]
    meta = manifest.record_stage(manifest.new_provenance(), "download", images=str(shared))
    m = write_manifest(proj / "m.parquet", rows, meta)
    result = CliRunner().invoke(app, ["caption", str(m), "--images", str(shared)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in elsewhere.iterdir()) == [f"{ids[0]}.png"]
    files = by_file(m, "caption_file")
    assert files[str(ids[0])] == f"m.captions/danbooru_{ids[0]}.txt"
    assert (proj / files[str(ids[0])]).read_text(encoding="utf-8") == captions_of(m)[f"danbooru/{ids[0]}"]
    assert files[str(ids[1])] == f"images/{ids[1]}.txt" and (shared / f"{ids[2]}.txt").is_file()


def test_deterministic_across_runs(feed, tmp_path):
    rows = [post_row(feed[i], path=f"images/{i}.png") for i in list(feed)[:20]]
    m = write_manifest(tmp_path / "m.parquet", rows)
    CliRunner().invoke(app, ["caption", str(m)])
    first = captions_of(m)
    texts = {p.name: p.read_bytes() for p in (tmp_path / "images").glob("*.txt")}
    CliRunner().invoke(app, ["caption", str(m)])
    assert captions_of(m) == first and len(texts) == 20
    assert {p.name: p.read_bytes() for p in (tmp_path / "images").glob("*.txt")} == texts


def test_settings_from_query_text_with_per_subset_tables(booru, tmp_path):
    query = """
name = "baxl-v3-reg"
class_token = "solo"
[caption]
reg_caption = "class"
[[subsets]]
name = "horizontal"
tags = ["1girl", "solo"]
[[subsets]]
name = "vertical"
tags = ["1girl", "solo"]
[subsets.caption]
reg_caption = "class+tags"
suffix = ["celluloid style"]
keep_separator = "|||"
"""
    meta = manifest.new_provenance(query_text=query, kind="reg", class_token="solo")
    rows = [post_row(booru[6148686], "horizontal", path="h/a.png"),
            post_row(booru[6148684], "vertical", path="v/b.png")]
    m = write_manifest(tmp_path / "reg.parquet", rows, meta)
    result = CliRunner().invoke(app, ["caption", str(m)])
    assert result.exit_code == 0, result.output
    caps = captions_of(m)
    assert caps["danbooru/6148686"] == "solo"
    vertical = caps["danbooru/6148684"]
    assert vertical.startswith("solo, 1girl, hina") and vertical.endswith(" ||| celluloid style")
    assert vertical.count("|||") == 2
    _, meta = manifest.read(m)
    assert meta["stages"]["caption"]["keep_separators"] == {"horizontal": "", "vertical": "|||"}


def test_config_file_per_subset_prefix(booru, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text('[caption]\nquality = false\n[caption.subsets.cg]\nprefix = ["baxl style"]\n')
    rows = [post_row(booru[6148680], "cg", path="i/a.png"), post_row(booru[6148679], "other", path="i/b.png")]
    m = write_manifest(tmp_path / "m.parquet", rows)
    CliRunner().invoke(app, ["caption", str(m), "--config", str(config)])
    caps = captions_of(m)
    assert caps["danbooru/6148680"].startswith("baxl style, 1girl, ichikawa hinana")
    assert caps["danbooru/6148679"].startswith("1girl, tsukahara hibiki")
    assert "quality" not in caps["danbooru/6148679"]


def test_undecodable_image_gets_error_when_colours_are_needed(booru, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[caption]\ncolor_theme = true\n")
    m = write_manifest(tmp_path / "m.parquet", [post_row(booru[6148686], path="i/a.png"),
                                                 post_row(booru[6148687], path="i/b.png")])
    (tmp_path / "i" / "b.png").write_bytes(b"not a png at all")
    result = CliRunner().invoke(app, ["caption", str(m), "--config", str(config)])
    assert result.exit_code == 0, result.output
    table, _ = manifest.read(m)
    errors = dict(zip(table.column("key").to_pylist(), table.column("error").to_pylist()))
    assert errors["danbooru/6148687"].startswith("caption: decode")
    assert errors["danbooru/6148686"] is None and captions_of(m)["danbooru/6148686"]


@pytest.mark.parametrize("config_text, message", [
    ("[caption]\nquality_treshold = 3\n", "unknown caption key 'quality_treshold'"),
    ("[caption]\nban = ['(unclosed']\n", "ban: bad regular expression"),
    ("[caption]\nartist = 'yes'\n", "caption key 'artist' expects true/false"),
    ("[caption]\nreg_caption = 'tags'\n", "reg_caption must be one of"),
    ("[caption]\nquality_thresholds = { g = [3, 1, 2, 4, 5, 6] }\n", "ascending"),
    ("[other]\n", "no [caption] table"),
    ("[caption]\nrecipe = 'kohaku'\n", "recipe must be one of curate, hakubooru, kohaku-xl"),
    ("[caption]\nrecipe = ['hakubooru']\n", "recipe must be one of"),
    ("[caption.subsets.cg]\nuser_caption = 'keep'\n", "user_caption must be one of use, merge, ignore"),
    ("[caption]\nquality_max_post_id = 7e6\n", "quality_max_post_id' expects a whole number"),
    ("[caption\n", "not valid TOML"),
])
def test_bad_config_is_an_error_and_manifest_untouched(booru, tmp_path, config_text, message):
    config = tmp_path / "c.toml"
    config.write_text(config_text)
    m = write_manifest(tmp_path / "m.parquet", [post_row(booru[6148686], path="i/a.png")])
    before = m.read_bytes()
    result = CliRunner().invoke(app, ["caption", str(m), "--config", str(config)])
    assert isinstance(result.exception, CurateError) and message in str(result.exception)
    assert "\n" not in str(result.exception)
    assert m.read_bytes() == before and not (tmp_path / "i" / "a.txt").exists()


def test_cli_error_is_one_line_exit_2_no_traceback(booru, tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[caption]\nquality_treshold = 3\n")
    m = write_manifest(tmp_path / "m.parquet", [post_row(booru[6148686], path="i/a.png")])
    proc = subprocess.run([CURATE, "caption", str(m), "--config", str(config)],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"error: {config} [caption]: unknown caption key 'quality_treshold'\n"


def test_reg_manifest_without_class_token_is_an_error(booru, tmp_path):
    meta = manifest.new_provenance(kind="reg")
    m = write_manifest(tmp_path / "m.parquet", [post_row(booru[6148686], path="i/a.png")], meta)
    result = CliRunner().invoke(app, ["caption", str(m)])
    assert isinstance(result.exception, CurateError) and "class token" in str(result.exception)


def test_captioned_manifest_loads_in_pandas_duckdb_and_datasets(feed, tmp_path, monkeypatch):
    rows = [post_row(feed[i], path=f"images/{i}.png") for i in list(feed)[:8]]
    rows[0]["tagger"] = [{"tag": "smile", "category": "general", "score": 0.9}]
    rows[1]["tags_general"] = rows[1]["tags_general"] + HOSTILE
    m = write_manifest(tmp_path / "m.parquet", rows)
    assert CliRunner().invoke(app, ["caption", str(m)]).exit_code == 0
    expected = captions_of(m)

    import duckdb
    import pandas as pd

    df = pd.read_parquet(m)
    assert dict(zip(df["key"], df["caption"])) == expected
    got = duckdb.sql(f"select key, caption, len(tags_general) n from read_parquet('{m}')").fetchall()
    assert {k: c for k, c, _ in got} == expected and all(n > 0 for *_, n in got)

    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ds = datasets.load_dataset("parquet", data_files=str(m), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert dict(zip(ds["key"], ds["caption"])) == expected
    assert ds[0]["tagger"] == [{"tag": "smile", "category": "general", "score": pytest.approx(0.9)}]


def test_two_images_with_one_stem_share_no_caption_file(booru, tmp_path):
    rows = [post_row(booru[6148686], path="i/same.png"), post_row(booru[6148687], path="i/same.jpg")]
    m = write_manifest(tmp_path / "m.parquet", rows)
    result = CliRunner().invoke(app, ["caption", str(m)])
    assert result.exit_code == 0 and "share the caption file" in result.output
    caps = captions_of(m)
    assert (tmp_path / "i" / "same.txt").read_text(encoding="utf-8") == caps["danbooru/6148686"]


# --- the HakuBooru recipe against hakubooru's own make_caption ----------------------

API_RATINGS = {"g": "general", "s": "sensitive", "q": "questionable", "e": "explicit"}
CATEGORIES = ("general", "artist", "character", "copyright", "meta")


def real_posts(shared_data: Path) -> list[dict]:
    """Every real API post in tests/fixtures, plus copies (real tags) at HakuBooru's edges."""
    posts = []
    for name in ("booru-rs_posts_2023-03.json", "rust-any2feed_posts_2023-03_limit100.json",
                 "imgbrd_posts_2020-07.json", "booru.hs_post_9969513_2025-09_with_media_asset.json"):
        doc = json.loads((shared_data / "danbooru" / name).read_text())
        posts += doc if isinstance(doc, list) else [doc]
    base = next(p for p in posts if p["id"] == 6148686)
    edges = [  # (id, created_at, fav_count, extra artist)
        (1_000_001, "2010-12-31T22:00:00.000-05:00", 40, ""),   # 2011 in UTC, 2010 for Danbooru
        (1_000_002, "2004-06-01T12:00:00.000-04:00", 3, ""),    # before 2005: HakuBooru says early
        (1_000_003, "2025-01-02T12:00:00.000-05:00", 7, ""),    # after 2024: no year tag
        (1_000_004, "2015-05-05T12:00:00.000-04:00", 90, "banned_artist"),
        (7_000_000, "2023-12-01T12:00:00.000-05:00", 90, ""),   # the last id with a quality tag
        (7_000_001, "2023-12-01T12:00:00.000-05:00", 90, ""),
    ]
    for pid, created, fav, artist in edges:
        copy = dict(base, id=pid, created_at=created, fav_count=fav, rating="q" if pid % 2 else "e")
        copy["tag_string_artist"] = " ".join(filter(None, [base["tag_string_artist"], artist]))
        copy["tag_string"] = " ".join(sorted(copy["tag_string"].split() + ([artist] if artist else [])))
        posts.append(copy)
    return posts


def hakubooru_db(posts: list[dict], path: Path):
    """A HakuBooru database written with hakubooru's own peewee models."""
    pytest.importorskip("peewee")
    db_module = pytest.importorskip("hakubooru.dataset.db")
    db_module.load_db(str(path))
    Post, Tag, Relation = db_module.Post, db_module.Tag, db_module.PostTagRelation
    ids: dict[str, int] = {}
    with db_module.db.atomic():
        for p in posts:
            category = {t: c for c in CATEGORIES for t in p.get(f"tag_string_{c}", "").split()}
            for name in category:
                if name not in ids:
                    ids[name] = len(ids) + 1
                    Tag.create(id=ids[name], name=name, type=category[name], popularity=0)
            Post.create(
                id=p["id"], created_at=p["created_at"], uploader_id=p.get("uploader_id") or 0,
                source=p.get("source") or "", md5=p.get("md5"), parent_id=p.get("parent_id"),
                has_children=bool(p.get("has_children")), is_deleted=bool(p.get("is_deleted")),
                is_banned=bool(p.get("is_banned")), pixiv_id=p.get("pixiv_id"),
                has_active_children=bool(p.get("has_active_children")), bit_flags=p.get("bit_flags") or 0,
                has_large=bool(p.get("has_large")), has_visible_children=bool(p.get("has_visible_children")),
                image_width=p["image_width"], image_height=p["image_height"], file_size=p["file_size"],
                file_ext=p["file_ext"], rating=API_RATINGS[p["rating"]], score=p["score"],
                up_score=p["up_score"], down_score=p["down_score"], fav_count=p["fav_count"],
                file_url=p.get("file_url"), large_file_url=p.get("large_file_url"),
                preview_file_url=p.get("preview_file_url"), updated_at=p["updated_at"])
            for name in p["tag_string"].split():  # Danbooru's order, as an import writes it
                if name in category:
                    Relation.create(post=p["id"], tag=ids[name])
    return db_module


@pytest.fixture(scope="module")
def hakubooru_reference(shared_data, tmp_path_factory):
    """({post id: make_caption's text}, the database's path). Built once: the tests only read it."""
    caption_module = pytest.importorskip("hakubooru.caption")
    posts = real_posts(shared_data)
    path = tmp_path_factory.mktemp("hakubooru") / "danbooru2023.db"
    db_module = hakubooru_db(posts, path)
    expected = {p["id"]: caption_module.make_caption(db_module.Post.get_by_id(p["id"])) for p in posts}
    db_module.db.close()
    return expected, path, posts


def test_hakubooru_recipe_is_make_captions_text_for_posts_read_from_its_db(hakubooru_reference):
    from curate.metadata.sources import open_source

    expected, path, posts = hakubooru_reference
    s = CaptionSettings.of_recipe("hakubooru")
    rows = pa.concat_tables(list(open_source(f"hakubooru:{path}").batches())).to_pylist()
    assert len(rows) == sum(1 for p in posts if p.get("md5") or p.get("file_url"))  # hidden posts left out
    got = {r["post_id"]: build_caption(r, s) for r in rows}
    assert got == {pid: expected[pid] for pid in got}
    # the cases this recipe exists for, as make_caption writes them
    assert "solo" not in got[6148686].split("|||")[0] and "1girl" in got[6148686].split("|||")[0]
    assert all("commentary" not in t and "request" not in t for c in got.values() for t in tags(c))
    assert "banned artist" not in got[1_000_004] and got[1_000_004].count("|||") == 1
    assert "old" in tags(got[1_000_001]) and "early" in tags(got[1_000_002])
    assert not {"old", "early", "mid", "recent", "newest"} & set(tags(got[1_000_003]))
    assert "quality" in got[7_000_000] and "quality" not in got[7_000_001] + got[9969513]
    assert "\\(" not in "".join(got.values()) and "(blue archive)" in got[6148686]  # no escapes


def test_hakubooru_recipe_is_make_captions_text_for_api_posts(hakubooru_reference):
    expected, _, posts = hakubooru_reference
    s = CaptionSettings.of_recipe("hakubooru")
    for post in posts:
        assert build_caption(post_row(post), s) == expected[post["id"]], post["id"]


def test_hakubooru_recipe_from_a_config_and_where_curate_differs(hakubooru_reference, tmp_path):
    expected, _, posts = hakubooru_reference
    by_id = {p["id"]: p for p in posts}
    config = tmp_path / "c.toml"
    config.write_text('[caption]\nrecipe = "kohaku-xl"\n[caption.subsets.cg]\nrecipe = "curate"\n')
    ids = [6148686, 6141616, 4018204]
    rows = [post_row(by_id[i], path=f"i/{i}.png") for i in ids]
    rows[2]["subset"] = "cg"
    m = write_manifest(tmp_path / "m.parquet", rows)
    assert CliRunner().invoke(app, ["caption", str(m), "--config", str(config)]).exit_code == 0
    caps = captions_of(m)
    assert [caps[f"danbooru/{i}"] for i in ids[:2]] == [expected[i] for i in ids[:2]]
    assert (tmp_path / "i" / "6148686.txt").read_text(encoding="utf-8") == expected[6148686]
    # the curate recipe: same names and order, but its ban / drop lists and one flat list
    curate_text = caps["danbooru/4018204"]
    assert "|||" not in curate_text and tags(curate_text)[0] == tags(expected[4018204])[0]
    assert set(tags(curate_text)) < set(tags(expected[4018204]))
    _, meta = manifest.read(m)
    assert meta["stages"]["caption"]["keep_separators"] == {"main": "|||", "cg": ""}


def test_cg_rows_read_like_kohaku_captions(shared_data, tmp_path):
    """WD-tagged images with no post: the same order and names, colour scheme first."""
    import csv

    labels = {r["name"]: r["category"] for r in csv.DictReader(
        (shared_data / "wd-tagger" / "selected_tags_wd-vit-tagger-v3.csv").open(encoding="utf-8"))}
    picked = [("1girl", 0.99), ("solo", 0.97), ("hoshino_(blue_archive)", 0.95), ("halo", 0.9),
              ("ahoge", 0.8), ("pink_hair", 0.7), ("general", 0.9)]
    row = {"key": "local/cg1", "subset": "cg", "path": "cg/a.png", "source_path": "cg/a.png",
           "tagger": [{"tag": t, "category": {"0": "general", "4": "character", "9": "rating"}[labels[t]],
                       "score": sc} for t, sc in picked]}
    config = tmp_path / "c.toml"
    config.write_text('[caption]\nrecipe = "hakubooru"\ncolor_theme = true\n'
                      'copyright_tags = ["blue_archive"]\nquality_default = "masterpiece"\n')
    m = write_manifest(tmp_path / "m.parquet", [row], colours={"local/cg1": (255, 105, 180)})
    assert CliRunner().invoke(app, ["caption", str(m), "--config", str(config)]).exit_code == 0
    assert captions_of(m)["local/cg1"] == ("pink theme, 1girl, hoshino (blue archive), blue archive, "
                                           "|||solo, halo, ahoge, pink hair, masterpiece")
    # the caption file goes to curate's own folder: the image is the user's
    assert (tmp_path / "m.captions" / "local_cg1.txt").is_file() and not (tmp_path / "cg" / "a.txt").exists()


# --- the user's own captions ---------------------------------------------------------

USER_TEXT = "my oc, 1girl, hoshino \\(blue archive\\), smiling"
TAGGER = [{"tag": "1girl", "category": "general", "score": 0.99},
          {"tag": "hoshino_(blue_archive)", "category": "character", "score": 0.95},
          {"tag": "solo", "category": "general", "score": 0.9},
          {"tag": "smile", "category": "general", "score": 0.8},
          {"tag": "pink_hair", "category": "general", "score": 0.7}]


def ingested(tmp_path: Path) -> Path:
    """A CG folder with a hand-written caption for a.png, ingested by the real stage."""
    from curate.dataset import ingest

    cg = tmp_path / "cg"
    cg.mkdir()
    for name, colour in (("a", (200, 80, 80)), ("b", (80, 200, 80))):
        Image.new("RGB", (48, 32), colour).save(cg / f"{name}.png")
    (cg / "a.txt").write_bytes(b"\xef\xbb\xbf" + USER_TEXT.encode() + b"\n")
    m = tmp_path / "m.parquet"
    ingest.run(cg, m, "cg", workers=1)
    table, meta = manifest.read(m)
    manifest.write(manifest.with_column(table, "tagger", [TAGGER] * table.num_rows), m, meta)
    return m


def by_file(m: Path, column: str) -> dict:
    table, _ = manifest.read(m)
    return {Path(p).stem: v for p, v in zip(table.column("path").to_pylist(), table.column(column).to_pylist())}


@pytest.mark.parametrize("mode, expected_a", [
    ("use", "my oc, 1girl, hoshino (blue archive), smiling"),  # the user's text, no escapes
    ("merge", "1girl, hoshino (blue archive), my oc, smiling, solo, smile, pink hair"),
    ("ignore", "1girl, hoshino (blue archive), solo, smile, pink hair"),
])
def test_user_caption_chosen_per_subset_and_its_file_unchanged(tmp_path, mode, expected_a):
    m = ingested(tmp_path)
    user_file = (tmp_path / "cg" / "a.txt").read_bytes()
    config = tmp_path / "c.toml"
    config.write_text(f'[caption]\nuser_caption = "ignore"\n[caption.subsets.cg]\nuser_caption = "{mode}"\n')
    result = CliRunner().invoke(app, ["caption", str(m), "--config", str(config)])
    assert result.exit_code == 0, result.output
    caps = by_file(m, "caption")
    assert caps == {"a": expected_a, "b": "1girl, hoshino (blue archive), solo, smile, pink hair"}
    assert (tmp_path / "cg" / "a.txt").read_bytes() == user_file and not (tmp_path / "cg" / "b.txt").exists()
    for stem, rel in by_file(m, "caption_file").items():  # curate's copies live in its own folder
        assert Path(rel).parent == Path("m.captions")
        assert (tmp_path / rel).read_text(encoding="utf-8") == caps[stem]
    how = {"use": "1 user", "merge": "1 merged", "ignore": "2 generated"}[mode]
    assert how in result.output

    # export and train use the chosen text
    out = tmp_path / "kohya"
    assert CliRunner().invoke(app, ["export", str(m), "--kohya", str(out)]).exit_code == 0
    exported = {p.read_text(encoding="utf-8") for p in out.rglob("*.txt")}
    assert exported == set(caps.values())
    from curate.common import train_config
    from curate.train import data as train_data

    cfg = tmp_path / "t.toml"
    cfg.write_text(f'pretrained = "tiny-random"\noutput_dir = "{tmp_path / "run"}"\nmax_train_steps = 1\n'
                   f'resolution = 64\nmin_bucket_reso = 32\nmax_bucket_reso = 128\nbucket_reso_steps = 32\n'
                   f'[[datasets]]\nmanifest = "{m}"\n')
    samples = train_data.plan(train_config.load(cfg)).samples
    assert {s.caption for s in samples} == set(caps.values())


def test_caption_never_overwrites_a_file_it_did_not_write(booru, tmp_path):
    rows = [post_row(booru[i], path=f"images/{i}.png") for i in (6148686, 6148687, 6148684)]
    m = write_manifest(tmp_path / "m.parquet", rows)
    mine = tmp_path / "images" / "6148686.txt"
    mine.write_text("hand written", encoding="utf-8")  # a download with the user's caption beside it
    first = CliRunner().invoke(app, ["caption", str(m)])
    assert first.exit_code == 0 and "left alone 1 caption files" in first.output
    assert mine.read_text(encoding="utf-8") == "hand written"
    files = by_file(m, "caption_file")
    assert files["6148686"] == "m.captions/danbooru_6148686.txt" and files["6148687"] == "images/6148687.txt"
    caps = captions_of(m)
    assert (tmp_path / files["6148686"]).read_text(encoding="utf-8") == caps["danbooru/6148686"]

    # a file curate wrote and a person edited is theirs now; one nobody touched is rewritten
    edited = tmp_path / "images" / "6148687.txt"
    edited.write_text("edited by a person", encoding="utf-8")
    untouched = tmp_path / "images" / "6148684.txt"
    untouched_bytes = untouched.read_bytes()
    untouched.touch()
    second = CliRunner().invoke(app, ["caption", str(m)])
    assert second.exit_code == 0 and "left alone 2 caption files" in second.output
    assert mine.read_text(encoding="utf-8") == "hand written"
    assert edited.read_text(encoding="utf-8") == "edited by a person"
    assert untouched.read_bytes() == untouched_bytes and by_file(m, "caption_file")["6148684"] == "images/6148684.txt"
    assert by_file(m, "caption_file")["6148687"] == "m.captions/danbooru_6148687.txt"
    _, meta = manifest.read(m)
    assert meta["stages"]["caption"]["left_alone"] == 2


# --- escapes: none by default, and only together with weighted_captions -------------------


def test_unescaped_text_reaches_the_tokenizer(booru, tmp_path):
    """The caption's text is what the CLIP tokenizer gets: `(`, never `\\(` tokens."""
    import tomli_w

    from curate.common import train_config
    from curate.train import data as train_data
    from curate.train import sdxl

    row = post_row(booru[6148686], path="i/a.png")  # asuna_(blue_archive), asuna_(bunny)_(blue_archive)
    m = write_manifest(tmp_path / "m.parquet", [row])
    tok, _ = sdxl._tiny_tokenizers()  # a real CLIPTokenizer (byte-level BPE), built here
    backslash = set(tok.convert_tokens_to_ids(["\\", "\\</w>"]))
    doc = {"pretrained": "tiny-random", "output_dir": str(tmp_path / "run"), "max_train_steps": 1,
           "resolution": 64, "min_bucket_reso": 32, "max_bucket_reso": 128, "bucket_reso_steps": 32,
           "max_data_loader_n_workers": 0, "datasets": [{"manifest": str(m), "shuffle_caption": True}]}

    def encoder_text(config_extra: dict) -> str:
        cfg = tmp_path / "t.toml"
        cfg.write_text(tomli_w.dumps({**doc, **config_extra}))
        plan = train_data.plan(train_config.load(cfg))
        (caption,) = train_data.RunData(plan, None, 0, 0)[0]["captions"]
        ids = tok(caption).input_ids
        assert not backslash & set(ids)
        assert "(" in tok.convert_ids_to_tokens(ids) or "(</w>" in tok.convert_ids_to_tokens(ids)
        return caption

    assert CliRunner().invoke(app, ["caption", str(m)]).exit_code == 0
    assert "asuna (blue archive)" in tags(encoder_text({}))
    with pytest.raises(CurateError, match="weighted_captions = true needs captions written with"):
        encoder_text({"weighted_captions": True})

    # escaping is an explicit option; the train side then reads `\(` as `(` (never one without the other)
    config = tmp_path / "c.toml"
    config.write_text("[caption]\nescape_parentheses = true\n")
    assert CliRunner().invoke(app, ["caption", str(m), "--config", str(config)]).exit_code == 0
    assert "asuna \\(blue archive\\)" in captions_of(m)["danbooru/6148686"]
    assert "asuna (blue archive)" in tags(encoder_text({}))
    assert "asuna (blue archive)" in tags(encoder_text({"weighted_captions": True}))
    with pytest.raises(CurateError, match="set weighted_captions = true"):
        encoder_text({"weighted_captions": False})


def test_export_sets_weighted_captions_exactly_with_escapes(booru, tmp_path):
    rows = [post_row(booru[6148686], path="i/a.png")]
    plain = write_manifest(tmp_path / "plain" / "m.parquet", rows)
    escaped = write_manifest(tmp_path / "esc" / "m.parquet", rows)
    config = tmp_path / "c.toml"
    config.write_text("[caption]\nescape_parentheses = true\n")
    assert CliRunner().invoke(app, ["caption", str(plain)]).exit_code == 0
    assert CliRunner().invoke(app, ["caption", str(escaped), "--config", str(config)]).exit_code == 0
    for m, weighted in ((plain, False), (escaped, True)):
        out = tmp_path / f"out-{weighted}"
        result = CliRunner().invoke(app, ["export", str(m), "--kohya", str(out)])
        assert result.exit_code == 0, result.output
        assert ("--weighted_captions" in result.output) is weighted
        assert ("--weighted_captions" in (out / "dataset_config.toml").read_text()) is weighted
        assert ("\\(" in next(out.rglob("*.txt")).read_text(encoding="utf-8")) is weighted
    mixed = CliRunner().invoke(app, ["export", str(plain), str(escaped), "--kohya", str(tmp_path / "mixed")])
    assert isinstance(mixed.exception, CurateError) and "weighted_captions" in str(mixed.exception)


@pytest.mark.parametrize("escape, expected", [
    (False, "shiroko (blue archive), 1girl, ice cream"),
    (True, "shiroko \\(blue archive\\), 1girl, ice cream"),
])
def test_text_a_person_wrote_is_escaped_as_the_generated_captions_are(tmp_path, escape, expected):
    """A review edit (pasted from a prompt UI: `\\(`, a line break) and a user's .txt with
    plain parentheses both reach training escaped exactly like the generated text."""
    from curate.common import decisions

    m = ingested(tmp_path)
    (tmp_path / "cg" / "a.txt").write_text("shiroko (blue archive), 1girl, ice cream", encoding="utf-8")
    m.unlink()
    from curate.dataset import ingest

    ingest.run(tmp_path / "cg", m, "cg", workers=1)
    key_b = next(k for k, p in zip(*(manifest.read(m)[0].column(c).to_pylist() for c in ("key", "path")))
                 if Path(p).stem == "b")
    decisions.append(m, [{"key": key_b, "action": "caption",
                          "text": "shiroko \\(blue archive\\),\n1girl, ice cream"}], who="t")
    config = tmp_path / "c.toml"
    config.write_text(f"[caption]\nescape_parentheses = {str(escape).lower()}\n")
    result = CliRunner().invoke(app, ["caption", str(m), "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert by_file(m, "caption") == {"a": expected, "b": expected}
    out = tmp_path / "kohya"
    result = CliRunner().invoke(app, ["export", str(m), "--kohya", str(out)])
    assert result.exit_code == 0, result.output
    assert {p.read_text(encoding="utf-8") for p in out.rglob("*.txt")} == {expected}
    assert ("--weighted_captions" in (out / "dataset_config.toml").read_text()) is escape


def test_untagged_rows_are_named_in_the_summary_not_counted_as_captioned(tmp_path):
    """A CG folder captioned before `curate tag` ran: the two rows with nothing to go on are
    a warning, and the user's caption still counts."""
    m = ingested(tmp_path)
    table, meta = manifest.read(m)
    manifest.write(manifest.with_column(table, "tagger", [None] * table.num_rows), m, meta)
    result = CliRunner().invoke(app, ["caption", str(m)])
    assert result.exit_code == 0, result.output
    assert by_file(m, "caption") == {"a": "my oc, 1girl, hoshino (blue archive), smiling", "b": ""}
    assert "warning: 1 captions are empty (no tags, no tagger output): run curate tag first" in result.output


def test_a_file_where_the_caption_folder_goes_is_a_one_line_error(tmp_path):
    m = ingested(tmp_path)
    before = manifest.read(m)[0]
    (tmp_path / "m.captions").write_text("in the way")
    proc = subprocess.run([sys.executable, "-m", "curate", "caption", str(m)], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("error: cannot write caption file")
    assert manifest.read(m)[0].equals(before)  # nothing half done in the manifest


def test_files_from_before_records_were_kept_are_claimed_only_when_they_hold_the_caption(booru, tmp_path):
    rows = [post_row(booru[i], path=f"images/{i}.png", caption="old text") for i in (6148686, 6148687)]
    m = write_manifest(tmp_path / "m.parquet", rows)
    (tmp_path / "images" / "6148686.txt").write_text("old text", encoding="utf-8")      # curate wrote it
    (tmp_path / "images" / "6148687.txt").write_text("someone else's", encoding="utf-8")
    result = CliRunner().invoke(app, ["caption", str(m)])
    assert result.exit_code == 0 and "left alone 1 caption files" in result.output
    caps = captions_of(m)
    assert (tmp_path / "images" / "6148686.txt").read_text(encoding="utf-8") == caps["danbooru/6148686"] != "old text"
    assert (tmp_path / "images" / "6148687.txt").read_text(encoding="utf-8") == "someone else's"


def test_user_caption_with_hostile_characters_stays_clean_lines():
    # lines split where sd-scripts' readlines splits them (\n, \r\n, \r); each is an alternative
    row = {"key": "local/x", "user_caption": "1girl,\tsmile\u2028rain\x00drops\r\n\r\nnight, sky |||\u200bstars"}
    text, how = choose_caption(row, CaptionSettings())
    assert how == "user" and text == "1girl, smile, rain drops\nnight, sky ||| stars"
    merged, how = choose_caption(row, CaptionSettings(user_caption="merge", quality=False))
    assert how == "merged" and merged == "1girl, smile, rain drops\nnight, sky, stars"
    assert choose_caption({"key": "k", "user_caption": " \r\n\x00 "}, CaptionSettings(quality=False))[1] == "generated"
    row = {"key": "local/x", "user_caption": "my oc, hoshino (blue archive), yuuka \\(blue archive\\)",
           "tagger": [{"tag": t, "category": "character", "score": 0.9}
                      for t in ("hoshino_(blue_archive)", "yuuka_(blue_archive)")]}
    for escape, expected in ((False, "hoshino (blue archive), yuuka (blue archive), my oc"),
                             (True, "hoshino \\(blue archive\\), yuuka \\(blue archive\\), my oc")):
        s = CaptionSettings(user_caption="merge", escape_parentheses=escape, quality=False)
        assert choose_caption(row, s) == (expected, "merged")  # merged tags escaped alike, each once
    row = {"key": "local/x", "user_caption": "1girl, smile,\nrain,\n, night"}  # lines kept, stray commas not
    assert choose_caption(row, CaptionSettings())[0] == "1girl, smile\nrain\nnight"


def test_merged_user_tags_never_repeat_what_curate_adds():
    """With the hakubooru recipe (which, like make_caption, removes no repeats) a user's tag or
    a tagger's that curate also adds (copyright slot, colour theme, prefix) appears once."""
    s = dataclasses.replace(CaptionSettings.of_recipe("hakubooru"), copyright_tags=("blue_archive",),
                            prefix=("baxl_style",), user_caption="merge")
    row = {"key": "local/x", "user_caption": "baxl style, blue archive, 1girl, pink theme, hoshino (blue archive)",
           "tagger": [{"tag": "pink_theme", "category": "general", "score": 0.9},
                      {"tag": "hoshino_(blue_archive)", "category": "character", "score": 0.9},
                      {"tag": "solo", "category": "general", "score": 0.9}]}
    text, how = choose_caption(row, s, theme="pink_theme")
    assert how == "merged"
    assert text == "pink theme, baxl style, 1girl, hoshino (blue archive), blue archive, |||solo"


# --- a user's lines and paired sidecars, through ingest -> caption -> export -> train ----------


def sd_scripts_read_caption(path: Path, enable_wildcard: bool) -> str:
    """sd-scripts' DreamBooth read_caption (library/train_util.py): text-mode readlines, the
    first line stripped, or with enable_wildcard the non-blank lines joined by newlines."""
    with open(path, "rt", encoding="utf-8") as f:
        lines = f.readlines()
    return "\n".join(x.strip() for x in lines if x.strip()) if enable_wildcard else lines[0].strip()


def ingest_folder(tmp_path: Path, files: dict[str, str]) -> Path:
    from curate.dataset import ingest

    cg = tmp_path / "cg"
    cg.mkdir()
    for i, stem in enumerate(sorted({Path(n).stem for n in files})):
        Image.new("RGB", (64, 64), (40 * i, 90, 200)).save(cg / f"{stem}.png")
    for name, text in files.items():
        (cg / name).write_text(text, encoding="utf-8", newline="")
    m = tmp_path / "m.parquet"
    ingest.run(cg, m, "cg", workers=1)
    return m


def train_config_for(tmp_path: Path, m: Path, extra: str = "") -> Path:
    cfg = tmp_path / "t.toml"
    cfg.write_text(f'pretrained = "tiny-random"\noutput_dir = "{tmp_path / "run"}"\nmax_train_steps = 1\n'
                   f'resolution = 64\nmin_bucket_reso = 32\nmax_bucket_reso = 128\nbucket_reso_steps = 32\n'
                   f'[[datasets]]\nmanifest = "{m}"\n{extra}')
    return cfg


# sd-scripts PR #1155 ("if the caption file contains multiple lines, all but the first are
# ignored"; blank lines never picked) and docs/config_README-en.md#multi-line-captions
def test_a_users_lines_are_alternatives_in_export_and_train(tmp_path):
    import random

    from curate.common import train_config
    from curate.dataset import export
    from curate.train import data as train_data

    m = ingest_folder(tmp_path, {"a.txt": "1girl, smile\r\n\r\n1girl, rain, night\nsolo, umbrella\n",
                                 "b.txt": "1boy, one line"})
    result = CliRunner().invoke(app, ["caption", str(m)])
    assert result.exit_code == 0, result.output
    assert "1 captions keep the user's lines as alternatives" in result.output
    caps = by_file(m, "caption")
    assert caps["a"] == "1girl, smile\n1girl, rain, night\nsolo, umbrella" and caps["b"] == "1boy, one line"

    # export without enable_wildcard: the first line, as sd-scripts reads it, and said so
    plain = export.run([m], tmp_path / "plain")
    assert plain.lines_left_out == 1 and any("wrote the first" in x for x in plain.lines())
    (a_txt,) = [p for p in (tmp_path / "plain").rglob("*.txt") if "smile" in p.read_text(encoding="utf-8")]
    assert a_txt.read_text(encoding="utf-8") == "1girl, smile" == sd_scripts_read_caption(a_txt, False)
    # with enable_wildcard: every line, read back by sd-scripts as its alternatives
    cfg = train_config_for(tmp_path, m, "enable_wildcard = true\n")
    wild = export.run([m], tmp_path / "wild", cfg)
    assert wild.lines_left_out == 0
    meta = json.loads((tmp_path / "wild" / "metadata.json").read_text(encoding="utf-8"))
    assert {v["caption"] for v in meta.values()} == set(caps.values())
    assert all("tags" not in v for v in meta.values())  # sd-scripts would add "," + "" to every line
    (a_txt,) = [p for p in (tmp_path / "wild").rglob("*.txt") if "smile" in p.read_text(encoding="utf-8")]
    assert sd_scripts_read_caption(a_txt, True).split("\n") == caps["a"].split("\n")
    toml = (tmp_path / "wild" / "dataset_config.toml").read_text(encoding="utf-8")
    assert "enable_wildcard = true" in toml

    # curate train: one line per sample, seeded by the sample (a resumed run picks alike)
    config = train_config.load(cfg)
    (sample,) = [s for s in train_data.plan(config).samples if "smile" in s.caption]
    picks = [train_data.process_caption(sample.caption, config.datasets[0], None, train_data.sample_rng(1, e, 0, 0))
             for e in range(30)]
    assert set(picks) == set(caps["a"].split("\n"))
    assert picks == [train_data.process_caption(sample.caption, config.datasets[0], None,
                                                train_data.sample_rng(1, e, 0, 0)) for e in range(30)]
    # without it: the first line only, as sd-scripts
    first = train_config.load(train_config_for(tmp_path, m))
    assert {s.caption for s in train_data.plan(first).samples} == {"1girl, smile", "1boy, one line"}
    rng = random.Random(0)
    assert train_data.process_caption("1girl, smile", first.datasets[0], None, rng) == "1girl, smile"


# sd-scripts' fine-tune preparation: finetune/make_captions.py and merge_captions_to_metadata.py
# use <stem>.caption (BLIP sentences), tag_images_by_wd14_tagger.py and merge_dd_tags_to_metadata.py
# <stem>.txt (tags); FineTuningDataset trains on caption + caption_separator + tags.
@pytest.mark.parametrize("mode, expected, said", [
    ("use", "1girl, umbrella", ["used .txt for 1 rows with several caption files", "left out",
                                ".caption 1"]),
    ("merge", "a girl holding an umbrella in the rain, 1girl, umbrella, night",
     ["merged 1 rows' sentences and tags (.txt+.caption)"]),
])
def test_paired_sentences_and_tags(tmp_path, mode, expected, said):
    m = ingest_folder(tmp_path, {"a.caption": "a girl holding an umbrella in the rain\n",
                                 "a.txt": "1girl, umbrella\n"})
    table, meta = manifest.read(m)
    tagger = [[{"tag": "night", "category": "general", "score": 0.9}]]
    manifest.write(manifest.with_column(table, "tagger", tagger), m, meta)
    config = tmp_path / "c.toml"
    config.write_text(f'[caption]\nuser_caption = "{mode}"\nquality = false\n')
    result = CliRunner().invoke(app, ["caption", str(m), "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert by_file(m, "caption") == {"a": expected}
    for text in said:
        assert text in result.output
