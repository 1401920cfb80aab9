"""A gallery-dl download folder as a dump (issue 21, part 4).

Shaped as gallery-dl writes it for `gallery-dl --write-metadata --write-info-json
"https://danbooru.donmai.us/posts?tags=..."` (mikf/gallery-dl: extractor/danbooru.py
adds filename/extension/date and tags_<category> lists to the API post, directory
`{category}/{search_tags}`, file `{category}_{id}_{filename}.{extension}`;
postprocessor/metadata.py writes `<file>.json` with indent 4, ensure_ascii off,
non-JSON values through str()). The posts are the real 2023 /posts.json page of
tests/fixtures/danbooru/, with md5 set to the bytes of the small images written here."""

import json
import os
from pathlib import Path

from typer.testing import CliRunner

from curate import manifest
from curate.cli import app
from curate.metadata.sources import open_source
from curate.metadata.sources.dump import NOT_METADATA
from tests.common.test_decode import encode, gradient
from tests.images.test_download import md5, server  # noqa: F401

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "danbooru"
SEARCH = "ekz_(robotekz)"


def gallery_dl_folder(root: Path, url: str, custom_name: int = 9, missing: int = 8):
    """The folder; post `custom_name` saved under `{id}.{extension}` (no md5 in the name),
    post `missing` has its .json but its image was deleted by the user."""
    posts = json.loads((FIXTURES / "booru-rs_posts_2023-03.json").read_text())
    d = root / "gallery-dl" / "danbooru" / SEARCH
    d.mkdir(parents=True)
    for i, post in enumerate(posts):
        data = encode(gradient(40 + i, 30), "JPEG")
        h = md5(data)
        post.update(md5=h, file_ext="jpg", file_url=f"{url}/data/{h}.jpg")
        kw = dict(post, filename=h, extension="jpg", date=post["created_at"][:19].replace("T", " "),
                  category="danbooru", subcategory="tag", search_tags=SEARCH)
        for cat in ("", "_artist", "_character", "_copyright", "_general", "_meta"):
            kw[f"tags{cat}"] = post[f"tag_string{cat}"].split(" ") if post[f"tag_string{cat}"] else []
        name = f"{post['id']}.jpg" if i == custom_name else f"danbooru_{post['id']}_{h}.jpg"
        if i != missing:
            (d / name).write_bytes(data)
        (d / f"{name}.json").write_text(json.dumps(kw, indent=4, ensure_ascii=False))
        post["_bytes"] = data
    # --write-info-json: the search's own metadata, written once, not a post (mikf/gallery-dl#3779)
    (d / "info.json").write_text(json.dumps({"category": "danbooru", "subcategory": "tag", "search_tags": SEARCH}, indent=4))
    (root / "gallery-dl" / "notes.txt").write_text("downloaded for the style LoRA\n")
    return root / "gallery-dl", posts


def test_dump_reads_a_gallery_dl_folder_and_skips_the_rest(tmp_path):
    folder, posts = gallery_dl_folder(tmp_path, "http://127.0.0.1:9")
    src = open_source(f"dump:{folder}")
    rows = [r for b in src.batches() for r in b.to_pylist()]
    assert sorted(r["post_id"] for r in rows) == sorted(p["id"] for p in posts)
    assert src.skipped == {NOT_METADATA: 10, "not a post": 1}  # 9 images + notes.txt; info.json
    first = next(r for r in rows if r["post_id"] == posts[0]["id"])
    assert first["tags_artist"] == [SEARCH] and first["rating"] == posts[0]["rating"]


def test_fetch_links_the_images_already_there(server, tmp_path):  # noqa: F811
    folder, posts = gallery_dl_folder(tmp_path, server.url)
    missing = posts[8]
    server.add(f"/data/{missing['md5']}.jpg", missing["_bytes"])
    (tmp_path / "q.toml").write_text('name = "style"\nseed = 1\n[[subsets]]\nname = "all"\n')
    out = tmp_path / "m.parquet"
    r = CliRunner().invoke(app, ["fetch", str(tmp_path / "q.toml"), "--source", f"dump:{folder}", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "10 with images (1 downloaded, 9 found locally," in r.output
    assert f"skipped from source: {NOT_METADATA} 10, not a post 1" in r.output
    assert server.hits == {f"/data/{missing['md5']}.jpg": 1}  # only the image not on disk
    table, meta = manifest.read(out)
    by_id = {p["id"]: p for p in posts}
    for row in table.to_pylist():
        f = out.parent / row["path"]
        assert row["error"] is None and md5(f.read_bytes()) == by_id[row["post_id"]]["md5"]
    linked = [f for f in (out.parent / "images").rglob("*.jpg") if os.stat(f).st_nlink == 2]
    assert len(linked) == 9  # hard links to the user's files, not copies
    assert meta["stages"]["download"]["found_locally"] == 9


def test_md5_named_files_from_a_custom_filename_format(server, tmp_path):  # noqa: F811
    """gallery-dl's documented Hydrus recipe (mikf/gallery-dl#135): `"filename": "{md5}.{extension}"`
    with the metadata post processor: `<md5>.jpg` beside `<md5>.jpg.json`."""
    from curate.images.download import download_manifest
    from curate.metadata.fetch import fetch

    folder, posts = gallery_dl_folder(tmp_path, server.url)
    d = folder / "danbooru" / SEARCH
    for f in sorted(d.glob("*.jpg")):
        meta = json.loads((d / f"{f.name}.json").read_text())
        f.rename(d / f"{meta['md5']}.jpg")
        (d / f"{f.name}.json").rename(d / f"{meta['md5']}.jpg.json")
    server.add(f"/data/{posts[8]['md5']}.jpg", posts[8]["_bytes"])
    (tmp_path / "q.toml").write_text('name = "style"\nseed = 1\n[[subsets]]\nname = "all"\n')
    res = fetch(tmp_path / "q.toml", open_source(f"dump:{folder}"), tmp_path / "m.parquet")
    s = download_manifest(res.out, local_images=[folder], progress=False)
    assert (s.local, s.downloaded, sum(s.failed.values())) == (9, 1, 0)


def test_one_post_files_are_judged_per_folder(tmp_path):
    """A gallery-dl folder saved today: an old post alone (rating s, last updated 2021) says
    nothing about the scale; the folder it was saved with (a g post) does."""
    folder, posts = gallery_dl_folder(tmp_path, "http://127.0.0.1:9")
    d = folder / "danbooru" / SEARCH
    for f in d.glob("*.jpg.json"):
        kw = json.loads(f.read_text())
        if kw["rating"] == "s":
            kw["updated_at"] = "2021-03-01T00:00:00.000-05:00"
            f.write_text(json.dumps(kw, indent=4))
    src = open_source(f"dump:{folder}")
    rows = {r["post_id"]: r["rating"] for b in src.batches() for r in b.to_pylist()}
    assert rows == {p["id"]: p["rating"] for p in posts}  # s stays sensitive
    assert set(src.scales.values()) == {"new"} and not src.warnings
