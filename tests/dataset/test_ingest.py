"""`curate ingest`: real image files of many kinds on disk, the real CLI, real Parquet."""

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

from tests.inproc import in_new_process as curate  # the command in a new interpreter
from tests.inproc import run_curate as run  # the stage in this process


def picture(seed: int, w: int = 320, h: int = 180) -> Image.Image:
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (w, h), tuple(int(c) for c in rng.integers(0, 256, 3)))
    d = ImageDraw.Draw(im)
    for _ in range(12):
        x, y = rng.uniform(0, w, 2)
        r = rng.uniform(0.05, 0.3) * min(w, h)
        d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return im


@pytest.fixture
def cg_folder(tmp_path) -> Path:
    d = tmp_path / "official_cg"
    (d / "event" / "deep").mkdir(parents=True)
    picture(1).save(d / "a.png")
    rgba = picture(2).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    rgba.save(d / "alpha.png")
    picture(3).convert("L").save(d / "grey.png")
    picture(4).save(d / "event" / "b.jpg", quality=90)
    picture(5).save(d / "event" / "c.webp")
    picture(6).save(d / "event" / "deep" / "d.bmp")
    picture(7).save(d / "event" / "deep" / "e.gif")
    Image.new("RGB", (1, 1), (9, 9, 9)).save(d / "one.png")
    Image.new("RGB", (20000, 100), (200, 30, 30)).save(d / "strip.png")
    (d / "copy_of_a.png").write_bytes((d / "a.png").read_bytes())
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    full = (d / "event" / "b.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(full[: len(full) // 2])
    picture(8).save(d / "no_extension", format="PNG")
    (d / "notes.txt").write_text("not an image")
    (d / ".hidden").mkdir()
    picture(9).save(d / ".hidden" / "thumb.png")
    return d


IMAGES = 13  # files above that are images (or claim to be), hidden folder excluded


def test_ingest_every_kind_of_file(cg_folder, tmp_path):
    out = tmp_path / "manifests" / "cg.parquet"
    r = run("ingest", cg_folder, "--out", out)
    assert r.returncode == 0, r.stderr
    assert f"{IMAGES} image files" in r.stdout and "2 unreadable" in r.stdout
    t = pq.read_table(out).to_pylist()
    assert len(t) == IMAGES
    rows = {Path(x["source_path"]).name: x for x in t}
    assert set(rows) == {"a.png", "alpha.png", "grey.png", "b.jpg", "c.webp", "d.bmp", "e.gif", "one.png",
                         "strip.png", "copy_of_a.png", "broken.png", "truncated.jpg", "no_extension"}
    keys = [x["key"] for x in t]
    assert len(set(keys)) == len(keys)
    assert all(re.fullmatch(r"local/[0-9a-f]{16}", k) for k in keys)
    for x in t:
        assert x["subset"] == "official_cg"
        assert x["path"] == x["source_path"]
        assert (out.parent / x["path"]).is_file()  # relative to the manifest's folder
        assert x["post_id"] is None
    assert rows["strip.png"]["width"] == 20000 and rows["strip.png"]["height"] == 100
    assert rows["one.png"]["width"] == 1 and rows["alpha.png"]["error"] is None
    assert rows["d.bmp"]["error"] is None and rows["no_extension"]["error"] is None
    assert rows["broken.png"]["error"].startswith("ingest: ")
    assert rows["truncated.jpg"]["error"].startswith("ingest: ")
    # the key is the content's sha256 prefix; the identical copy still gets its own row
    assert rows["a.png"]["key"] == "local/" + rows["a.png"]["sha256"][:16]
    assert rows["copy_of_a.png"]["sha256"] == rows["a.png"]["sha256"]
    assert rows["copy_of_a.png"]["key"] != rows["a.png"]["key"]


def test_reingest_adds_only_new_files_and_keeps_rows(cg_folder, tmp_path):
    out = tmp_path / "cg.parquet"
    assert run("ingest", cg_folder, "--out", out, "--name", "ba_cg").returncode == 0
    from curate import manifest

    table, meta = manifest.read(out)  # a later stage's work on the rows must survive
    table = manifest.with_column(table, "caption", ["kept"] * table.num_rows)
    manifest.write(table, out, meta)
    before = pq.read_table(out).to_pylist()

    picture(42).save(cg_folder / "event" / "new.png")
    r = run("ingest", cg_folder, "--out", out, "--name", "ba_cg")
    assert r.returncode == 0, r.stderr
    assert "1 added" in r.stdout and f"{IMAGES} already in the manifest" in r.stdout
    after = pq.read_table(out).to_pylist()
    assert after[: len(before)] == before
    assert len(after) == len(before) + 1
    assert after[-1]["source_path"].endswith("new.png") and after[-1]["caption"] is None
    assert {x["subset"] for x in after} == {"ba_cg"}


def test_default_manifest_goes_to_manifests_folder(cg_folder, tmp_path):
    r = run("ingest", cg_folder, "--name", "ba", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = pq.read_table(tmp_path / "manifests" / "ba.parquet").to_pylist()
    assert len(rows) == IMAGES and rows[0]["path"].startswith("../official_cg/")


def test_manifest_inside_the_folder_is_not_ingested(cg_folder):
    out = cg_folder / "cg.parquet"
    assert run("ingest", cg_folder, "--out", out).returncode == 0
    r = run("ingest", cg_folder, "--out", out)
    assert r.returncode == 0 and "0 added" in r.stdout
    assert all(not x["path"].endswith(".parquet") for x in pq.read_table(out).to_pylist())


def test_bad_input_is_one_line_error(tmp_path):
    r = curate("ingest", tmp_path / "nope", "--out", tmp_path / "m.parquet")
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "junk.parquet").write_text("not parquet")
    (tmp_path / "imgs").mkdir()
    picture(1).save(tmp_path / "imgs" / "a.png")
    r = curate("ingest", tmp_path / "imgs", "--out", tmp_path / "junk.parquet")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert (tmp_path / "junk.parquet").read_text() == "not parquet"  # nothing lost


def test_postscript_in_the_folder_is_an_unsupported_format_row(tmp_path):
    d = tmp_path / "cg"
    d.mkdir()
    picture(1).save(d / "a.png")
    ps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    (d / "evil.eps").write_bytes(ps)
    (d / "renamed.jpg").write_bytes(ps)
    (d / "no_suffix_ps").write_bytes(ps)
    out = tmp_path / "m.parquet"
    r = run("ingest", d, "--out", out)
    assert r.returncode == 0, r.stderr
    rows = {Path(x["path"]).name: x for x in pq.read_table(out).to_pylist()}
    assert rows["a.png"]["error"] is None
    for name in ("evil.eps", "renamed.jpg", "no_suffix_ps"):
        assert rows[name]["error"] == "ingest: unsupported format: eps"


@pytest.fixture
def linked(tmp_path):
    """A CG folder with links: inside, to an image outside, to a secret outside, a loop, a dangling one."""
    d, outside = tmp_path / "cg", tmp_path / "elsewhere"
    (d / "sub").mkdir(parents=True)
    outside.mkdir()
    picture(1).save(d / "a.png")
    picture(2).save(outside / "outside.png")
    (outside / "secret.jpg").write_bytes(b"-----BEGIN OPENSSH PRIVATE KEY-----\n")
    (d / "inner_link.png").symlink_to(d / "a.png")
    (d / "sub" / "out_link.png").symlink_to(outside / "outside.png")
    (d / "secret_link.jpg").symlink_to(outside / "secret.jpg")
    (d / "loop1.png").symlink_to(d / "loop2.png")
    (d / "loop2.png").symlink_to(d / "loop1.png")
    (d / "dangling.png").symlink_to(d / "gone.png")
    (d / "linked_dir").symlink_to(outside, target_is_directory=True)
    (d / "a.txt").symlink_to(outside / "secret.jpg")  # a "caption" that is a file elsewhere
    return d, outside


def test_symlinks_record_the_in_folder_path_and_outside_links_are_refused(linked, tmp_path):
    d, outside = linked
    out = tmp_path / "m.parquet"
    r = run("ingest", d, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    rows = {x["path"]: x for x in pq.read_table(out).to_pylist()}
    assert set(rows) == {"cg/a.png", "cg/inner_link.png", "cg/sub/out_link.png", "cg/secret_link.jpg",
                         "cg/loop1.png", "cg/loop2.png", "cg/dangling.png"}  # linked_dir not entered
    assert rows["cg/a.png"]["error"] is None
    assert rows["cg/inner_link.png"]["error"] is None  # the link's own path, not its target's
    assert rows["cg/inner_link.png"]["source_path"] == "cg/inner_link.png"
    for p in ("cg/sub/out_link.png", "cg/secret_link.jpg"):
        assert rows[p]["error"].startswith("ingest: symlink to a file outside the folder")
        assert rows[p]["sha256"] != hashlib.sha256((outside / "secret.jpg").read_bytes()).hexdigest()
    assert rows["cg/loop1.png"]["error"] == rows["cg/loop2.png"]["error"] == "ingest: symlink loop"
    assert rows["cg/dangling.png"]["error"] == "ingest: broken symlink"
    assert rows["cg/a.png"]["user_caption"] is None  # its .txt links to the secret outside
    keys = [x["key"] for x in rows.values()]
    assert len(set(keys)) == len(keys)
    # nothing beside the outside files after captioning the manifest
    assert run("caption", out).returncode == 0
    assert sorted(p.name for p in outside.iterdir()) == ["outside.png", "secret.jpg"]


def test_follow_external_links_reads_them_under_the_in_folder_path(linked, tmp_path):
    d, outside = linked
    out = tmp_path / "m.parquet"
    r = run("ingest", d, "--out", out, "--follow-external-links")
    assert r.returncode == 0, r.stderr
    rows = {x["path"]: x for x in pq.read_table(out).to_pylist()}
    assert rows["cg/sub/out_link.png"]["error"] is None and rows["cg/sub/out_link.png"]["width"] == 320
    assert rows["cg/secret_link.jpg"]["error"].startswith("ingest: ")  # read, and not an image
    assert rows["cg/loop1.png"]["error"] == "ingest: symlink loop"


def test_killed_worker_keeps_finished_rows_and_a_rerun_finishes(cg_folder, tmp_path):
    out = tmp_path / "m.parquet"
    env = {**os.environ, "CURATE_POOL_KILL": "5"}
    r = subprocess.run([sys.executable, "-m", "curate", "ingest", cg_folder, "--out", out, "--workers", "2"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ingesting: a worker process was killed")
    kept = pq.read_table(out).num_rows
    assert 0 < kept < IMAGES
    r = curate("ingest", cg_folder, "--out", out, "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert f"{IMAGES - kept} added, {kept} already in the manifest" in r.stdout
    assert pq.read_table(out).num_rows == IMAGES


def test_sidecar_captions_read_as_the_users_with_or_without_bom(tmp_path):
    d = tmp_path / "cg"
    d.mkdir()
    for i, name in enumerate("abcde"):
        picture(10 + i, 64, 48).save(d / f"{name}.png")
    (d / "a.txt").write_bytes("\ufeffmy oc, 1girl, hoshino \\(blue archive\\)\r\n".encode("utf-8"))
    (d / "b.caption").write_text("1girl, rainy street", encoding="utf-8")
    (d / "d.txt").write_bytes("caf\xe9, 1girl".encode("latin-1"))  # not UTF-8
    (d / "e.txt").write_text("  \n", encoding="utf-8")                 # empty: no caption
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    out = tmp_path / "m.parquet"
    proc = run("ingest", d, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "2 images have the user's own caption" in proc.stdout
    assert "d.txt: caption file is not UTF-8" in proc.stdout
    t = pq.read_table(out).to_pylist()
    users = {Path(r["path"]).name: r["user_caption"] for r in t}
    assert users == {"a.png": "my oc, 1girl, hoshino \\(blue archive\\)", "b.png": "1girl, rainy street",
                     "c.png": None, "d.png": None, "e.png": None}
    # a caption written after the first ingest is read on the next one; files never change
    (d / "c.txt").write_text("later", encoding="utf-8")
    assert run("ingest", d, "--out", out).returncode == 0
    assert {Path(r["path"]).name: r["user_caption"] for r in pq.read_table(out).to_pylist()}["c.png"] == "later"
    assert {p.name: p.read_bytes() for p in d.iterdir() if p.name != "c.txt"} == before
    assert "<stem>.caption" in run("ingest", "--help").stdout  # a new user learns it from --help


# The layout mbrrg/synology-thumbgen (PR #11) documents: Synology keeps
# `@eaDir/<image name>/SYNOPHOTO_THUMB_SM.jpg` (and _XL, _PREVIEW) beside every image.
def test_housekeeping_folders_are_skipped_and_counted(tmp_path):
    d = tmp_path / "cg"
    (d / "@eaDir" / "a.png").mkdir(parents=True)
    picture(20, 64, 48).save(d / "a.png")
    for size in ("SM", "XL"):
        picture(21, 32, 24).save(d / "@eaDir" / "a.png" / f"SYNOPHOTO_THUMB_{size}.jpg")
    for folder in ("#recycle", "$RECYCLE.BIN", "System Volume Information", "__MACOSX", ".Trash-1000"):
        (d / folder).mkdir()
        picture(22, 64, 48).save(d / folder / "deleted_cg.png")  # a CG the user deleted
    (d / "#recycle" / "deleted_cg.txt").write_text("1girl, deleted", encoding="utf-8")
    (d / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0 thumbnail cache")
    (d / "desktop.ini").write_text("[.ShellClassInfo]\n", encoding="utf-8")
    out = tmp_path / "m.parquet"
    r = run("ingest", d, "--out", out)
    assert r.returncode == 0, r.stderr
    assert [Path(p).name for p in pq.read_table(out).column("path").to_pylist()] == ["a.png"]
    assert ("skipped housekeeping files (--include-housekeeping reads them): #recycle 2, $RECYCLE.BIN 1, "
            "@eaDir 2, System Volume Information 1, Thumbs.db 1, Trash-<uid> 1, __MACOSX 1, desktop.ini 1") in r.stdout
    assert "non-image files ignored" not in r.stdout
    # on request they are the user's images after all
    r = run("ingest", d, "--out", tmp_path / "all.parquet", "--include-housekeeping")
    assert r.returncode == 0, r.stderr
    names = sorted(Path(p).parent.name + "/" + Path(p).name for p in pq.read_table(tmp_path / "all.parquet").column("path").to_pylist())
    assert len(names) == 8 and "#recycle/deleted_cg.png" in names and "a.png/SYNOPHOTO_THUMB_SM.jpg" in names
    assert "skipped housekeeping" not in r.stdout


# sd-scripts' fine-tune preparation: finetune/make_captions.py writes BLIP sentences to
# <stem>.caption, finetune/tag_images_by_wd14_tagger.py WD14 tags to <stem>.txt, beside one image
def test_paired_sidecars_are_all_kept(tmp_path):
    d = tmp_path / "cg"
    d.mkdir()
    for name in "abc":
        picture(30 + ord(name), 64, 48).save(d / f"{name}.png")
    (d / "a.caption").write_text("a girl standing in the rain\n", encoding="utf-8")
    (d / "a.txt").write_text("1girl, rain, umbrella", encoding="utf-8")
    (d / "b.caption").write_text("a cat on a roof", encoding="utf-8")
    (d / "c.tags").write_text("cat, roof", encoding="utf-8")
    out = tmp_path / "m.parquet"
    r = run("ingest", d, "--out", out, "--caption-ext", "tags")
    assert r.returncode == 0, r.stderr
    rows = {Path(x["path"]).name: x for x in pq.read_table(out).to_pylist()}
    assert rows["a.png"]["user_sidecars"] == [{"ext": ".txt", "text": "1girl, rain, umbrella"},
                                              {"ext": ".caption", "text": "a girl standing in the rain"}]
    assert rows["a.png"]["user_caption"] == "1girl, rain, umbrella"
    assert rows["b.png"]["user_caption"] == "a cat on a roof"
    assert rows["c.png"]["user_sidecars"] == [{"ext": ".tags", "text": "cat, roof"}]
    assert "1 images have several caption files (.caption 2, .tags 1, .txt 1)" in r.stdout
    assert "3 images have the user's own caption" in r.stdout
    bad = curate("ingest", d, "--out", out, "--caption-ext", "a/b")
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --caption-ext '.a/b' is not a file extension"
