"""Renamed artists (issue 21, part 3): an artists file written before Danbooru aliased
an artist's tag names the old tag. The live site answers a search for it with the new
tag's posts; curate must resolve the name too, and say so instead of "a typo?".
Renames are tag aliases on Danbooru (danbooru/danbooru: TagAlias moves the antecedent's
posts to the consequent); /tag_aliases.json lists the active ones."""

import json

from typer.testing import CliRunner

from curate.cli import app
from curate.metadata.fetch import fetch
from curate.metadata.query import load
from curate.metadata.select import select
from curate.metadata.sources import open_source
from tests.metadata.test_danbooru import (  # noqa: F401
    gen_posts,
    ids_by_subset,
    live,
    serve,
    write_dump,
)

OLD, NEW = "artist_3", "artist_3_(renamed)"


def renamed_posts():
    posts = gen_posts(1500, seed=8)
    for p in posts:
        if p["tag_string_artist"] == OLD:
            p["tag_string_artist"] = NEW
            p["tag_string"] = p["tag_string"].replace(OLD, NEW)
    return posts


def write_query(tmp_path):
    (tmp_path / "artists.txt").write_text(f"# written before the rename\n{OLD}\nartist_4\nno_such_artist\n")
    (tmp_path / "q.toml").write_text('name = "v"\nseed = 1\n[[subsets]]\nname = "vertical"\n'
                                     'artists_file = "artists.txt"\norder = "id"\n')
    return tmp_path / "q.toml"


def aliases_file(tmp_path):
    f = tmp_path / "tag_aliases.json"
    f.write_text(json.dumps([{"antecedent_name": OLD, "consequent_name": NEW, "status": "active"},
                             {"antecedent_name": "x", "consequent_name": "y", "status": "deleted"}]))
    return f


def test_live_source_resolves_the_old_name(serve, tmp_path):
    posts = renamed_posts()
    n_new = sum(p.get("md5") is not None and p["tag_string_artist"] == NEW and not p["is_deleted"]
                and not p["is_banned"] and p["file_ext"] in ("jpg", "png", "webp") for p in posts)  # eligible
    srv = serve(posts, aliases={OLD: NEW})
    q = load(write_query(tmp_path))
    got = select(q, live(srv))
    (res,) = got.subsets
    assert res.renamed_artists == [(OLD, NEW, n_new)] and res.unmatched_artists == ["no_such_artist"]
    # the same rows as a dump of the same posts read with the aliases file
    dump = open_source(f"dump:{write_dump(posts, tmp_path / 'd.jsonl')}")
    from curate.metadata.sync import load_aliases

    local = select(q, dump, aliases=load_aliases(aliases_file(tmp_path)))
    assert ids_by_subset(got.table) == ids_by_subset(local.table)
    assert any(NEW in a for a in got.table.column("tags_artist").to_pylist())


def test_local_sources_warn_typo_only_without_an_alias(tmp_path):
    posts = renamed_posts()
    dump = write_dump(posts, tmp_path / "d.jsonl")
    q = write_query(tmp_path)
    runner = CliRunner()
    r = runner.invoke(app, ["fetch", str(q), "--source", f"dump:{dump}", "--out", str(tmp_path / "a.parquet"), "--no-images"])
    assert r.exit_code == 0, r.output
    assert f"artist '{OLD}' (subset vertical's artists file) matches no post" in r.output
    r = runner.invoke(app, ["fetch", str(q), "--source", f"dump:{dump}", "--out", str(tmp_path / "b.parquet"),
                            "--no-images", "--aliases", str(aliases_file(tmp_path))])
    assert r.exit_code == 0, r.output
    assert f"artist '{OLD}' is now '{NEW}' (alias):" in r.output and f"'{OLD}' (subset" not in r.output
    assert "'no_such_artist' (subset vertical's artists file) matches no post" in r.output
    # the store's alias table does the same (sync --aliases)
    r = runner.invoke(app, ["sync", f"dump:{dump}", "--store", str(tmp_path / "s"), "--aliases", str(aliases_file(tmp_path))])
    assert r.exit_code == 0, r.output
    res = fetch(q, open_source(f"store:{tmp_path / 's'}"), tmp_path / "c.parquet")
    (sub,) = res.selection.subsets
    n_new = sum(p.get("md5") is not None and p["tag_string_artist"] == NEW and not p["is_deleted"]
                and not p["is_banned"] and p["file_ext"] in ("jpg", "png", "webp") for p in posts)
    assert sub.renamed_artists == [(OLD, NEW, n_new)] and sub.unmatched_artists == ["no_such_artist"]
