"""Issue 26.2: an archive index that lies. The post's md5 (when known) decides what is stored
under its name, and index values past 64 bits are clean error rows, never a traceback."""

from __future__ import annotations

import json

from curate.images.download import download_manifest
from tests.images.test_download import (
    FAST,
    md5,
    post,
    rows_by_key,
    stored,
    write_manifest,
)
from tests.images.test_tars import JPG, make_archive, sha256


def test_an_index_entry_alone_never_stores_another_image_under_the_posts_md5(tmp_path):
    """Same size, same extension, sha256 vouched for by the index, but not the post's bytes:
    it is kept as a derivative under its own name (`<md5>.archive`), never as the original."""
    root = tmp_path / "ds"
    impostor = JPG[9]
    make_archive(root / "data-0001.tar", {"./1001.jpg": impostor}, root / "data-0001.json")
    index = json.loads((root / "data-0001.json").read_text())
    assert index["files"]["./1001.jpg"]["sha256"] == sha256(impostor)
    m = write_manifest(tmp_path / "m.parquet", [post(1001, JPG[1], file_size=len(impostor))])
    download_manifest(m, tmp_path / "img", from_tars=str(root), **FAST)
    row = rows_by_key(m)["danbooru/1001"]
    assert row["derivative"] == "archive" and row["file_sha256"] == sha256(impostor)
    names = [p.name for p in stored(tmp_path / "img")]
    assert not any(n.startswith(md5(JPG[1]) + ".jpg") for n in names)
    assert names == [f"{md5(JPG[1])}.archive.jpg"]
    # a re-run finds the derivative again and still never calls it the original
    download_manifest(m, tmp_path / "img", from_tars=str(root), **FAST)
    assert rows_by_key(m)["danbooru/1001"]["derivative"] == "archive"


def test_an_impostor_already_stored_under_the_md5_name_is_not_trusted_by_sha256(tmp_path):
    root = tmp_path / "ds"
    impostor = JPG[9]
    make_archive(root / "data-0001.tar", {"./1001.jpg": impostor}, root / "data-0001.json")
    m = write_manifest(tmp_path / "m.parquet", [post(1001, JPG[1], file_size=len(impostor))])
    planted = tmp_path / "img" / md5(JPG[1])[:2] / f"{md5(JPG[1])}.jpg"
    planted.parent.mkdir(parents=True)
    planted.write_bytes(impostor)  # what an earlier version stored there
    download_manifest(m, tmp_path / "img", from_tars=str(root), **FAST)
    row = rows_by_key(m)["danbooru/1001"]
    assert row["derivative"] == "archive" and not row["path"].endswith(f"{md5(JPG[1])}.jpg")


def test_index_values_of_2_to_the_63_or_more_are_clean_error_rows(tmp_path):
    root = tmp_path / "ds"
    index = make_archive(root / "data-0001.tar", {"1001.jpg": JPG[1], "2001.jpg": JPG[2], "3001.jpg": JPG[3]})
    index["files"]["2001.jpg"]["offset"] = 2**63
    index["files"]["3001.jpg"]["size"] = 2**64 + 5
    del index["filesize"]
    (root / "data-0001.json").write_text(json.dumps(index))
    m = write_manifest(tmp_path / "m.parquet", [post(1001, JPG[1]), post(2001, JPG[2]), post(3001, JPG[3])])
    download_manifest(m, tmp_path / "img", from_tars=str(root), **FAST)
    rows = rows_by_key(m)
    assert rows["danbooru/1001"]["error"] is None and rows["danbooru/1001"]["path"]
    assert rows["danbooru/2001"]["error"].startswith("truncated archive") and rows["danbooru/2001"]["path"] is None
    assert rows["danbooru/3001"]["error"] == "too large" and rows["danbooru/3001"]["path"] is None
