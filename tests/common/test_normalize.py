"""The trainer reads the pixels curate measured: sd-scripts' loader (PIL open + convert("RGB"),
no EXIF orientation, only .png/.jpg/.jpeg/.webp/.bmp globbed) run on the export, and
curate train's loader, both against images.open_image on the original."""

import glob
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import tomli_w
from PIL import Image, features

from curate import manifest
from curate.common import decode as images
from curate.common import normalize, train_config
from curate.common.buckets import resize_and_crop
from curate.dataset import export
from curate.errors import CurateError
from curate.train import data as train_data

SD_EXTS = [".png", ".jpg", ".jpeg", ".webp", ".bmp"]
SD_EXTS += [e.upper() for e in SD_EXTS]


def field(w: int, h: int, seed: int) -> Image.Image:
    """Smooth colour field: survives JPEG without being uniform, so rotation shows."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BILINEAR)


def make_images(folder) -> dict[str, tuple[str, str | None]]:
    """{name: (file, why curate normalizes it or None)} covering each kind the issue lists."""
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 90x60, displayed 60x90 (rotate 90 clockwise)
    field(90, 60, 1).save(folder / "rotated.jpg", "JPEG", quality=90, exif=exif.tobytes())
    made["rotated"] = ("rotated.jpg", "EXIF-rotated")
    rgba = np.zeros((48, 64, 4), np.uint8)
    rgba[:, 32:] = (200, 30, 30, 255)  # left half transparent, stored as (0, 0, 0, 0)
    Image.fromarray(rgba, "RGBA").save(folder / "transparent.png")
    made["transparent"] = ("transparent.png", "transparency flattened")
    field(40, 30, 2).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "anim.gif")
    made["gif"] = ("anim.gif", "gif converted to png")
    if features.check("avif"):
        field(40, 30, 3).save(folder / "post.avif", "AVIF", quality=90)
        made["avif"] = ("post.avif", "avif converted to png")
    field(50, 40, 4).save(folder / "photo.jfif", "JPEG", quality=90)
    made["jfif"] = ("photo.jfif", ".jfif jpg renamed .jpg")
    field(50, 40, 5).save(folder / "misnamed.png", "JPEG", quality=90)
    made["misnamed"] = ("misnamed.png", ".png jpg renamed .jpg")
    field(40, 30, 6).save(folder / "plain.png")
    made["plain"] = ("plain.png", None)
    field(30, 40, 7).save(folder / "upper.JPG", "JPEG", quality=90)
    made["upper"] = ("upper.JPG", None)
    deep = (np.asarray(field(32, 32, 8).convert("L"), np.uint16) * 257).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep.png")  # 16-bit greyscale PNG
    made["deep"] = ("deep.png", "I;16 pixels converted")
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.webp", "WEBP", lossless=True)
    made["webp"] = ("alpha.webp", "transparency flattened")
    return made


def write_manifest(root, made) -> Path:
    rows = []
    for name, (file, _) in made.items():
        w, h, _ = images.probe(root / "img" / file)  # what curate measured (display orientation)
        rows.append({"key": f"local/{name}", "subset": "cg", "path": f"img/{file}", "width": w, "height": h,
                     "caption": f"{name}, 1girl"})
    return manifest.write(pa.Table.from_pylist(rows), root / "m.parquet", manifest.new_provenance(kind="ingest"))


def sd_scripts_read(image_dir) -> dict[str, tuple[tuple[int, int], np.ndarray]]:
    """sd-scripts' glob_images + load_image + image size: {row key: ((w, h), RGB array)}."""
    paths = sorted({p for ext in SD_EXTS for p in glob.glob(os.path.join(glob.escape(str(image_dir)), "*" + ext))})
    out = {}
    for p in paths:
        with Image.open(p) as im:
            size = im.size
            rgb = im if im.mode == "RGB" else im.convert("RGB")
            out[os.path.splitext(os.path.basename(p))[0].replace("_", "/", 1)] = (size, np.array(rgb, np.uint8))
    return out


@pytest.fixture
def exported(tmp_path):
    made = make_images(tmp_path / "img")
    m = write_manifest(tmp_path, made)
    summary = export.run([m], tmp_path / "out")
    return tmp_path, made, m, summary


def test_sd_scripts_reads_the_pixels_and_size_curate_measured(exported):
    root, made, _, summary = exported
    read = sd_scripts_read(root / "out" / "m" / "cg")
    assert set(read) == {f"local/{name}" for name in made}  # nothing left out by its name or format
    for name, (file, _) in made.items():
        size, pixels = read[f"local/{name}"]
        seen = np.asarray(images.open_image(root / "img" / file))
        assert size == images.probe(root / "img" / file)[:2], name
        assert np.array_equal(pixels, seen), name
    rotated = read["local/rotated"]
    assert rotated[0] == (60, 90)  # upright, as measured; the original reads 90x60 sideways
    assert (rotated[1][:, :] == np.asarray(images.open_image(root / "img" / "rotated.jpg"))).all()
    transparent = read["local/transparent"][1]
    assert (transparent[:, :32] == 255).all() and (transparent[:, 32:] == (200, 30, 30)).all()  # on white
    lines = "\n".join(summary.lines())
    assert f"normalized {sum(1 for _, why in made.values() if why)} so sd-scripts reads what curate saw" in lines
    assert "alpha flattened on #ffffff" in lines


def test_originals_that_qualify_are_linked_and_jpegs_keep_their_bytes(exported):
    root, made, _, summary = exported
    folder = root / "out" / "m" / "cg"
    for name, (file, why) in made.items():
        (target,) = [p for p in folder.iterdir() if p.stem == f"local_{name}" and p.suffix != ".txt"]
        if why is None or "renamed" in why:  # the original's bytes, under a name sd-scripts globs
            assert target.is_symlink() and target.resolve() == (root / "img" / file).resolve(), name
            assert target.suffix == (".jpg" if why else os.path.splitext(file)[1].lower())
        else:
            assert not target.is_symlink() and target.suffix == ".png", name
            with Image.open(target) as im:
                assert im.format == "PNG" and im.mode == "RGB" and "exif" not in im.info
    assert summary.normalized == {why: sum(1 for _, w in made.values() if w == why)
                                  for why in {w for _, w in made.values() if w}}


def test_the_originals_would_not_have_matched(tmp_path):
    """The case the export fixes: read as is, sd-scripts gets other sizes and pixels."""
    made = make_images(tmp_path / "img")
    with Image.open(tmp_path / "img" / made["rotated"][0]) as im:
        assert im.size == (90, 60)
    with Image.open(tmp_path / "img" / made["transparent"][0]) as im:
        assert (np.array(im.convert("RGB"))[:, :32] == 0).all()  # black, where the tagger saw white


def test_curate_train_reads_the_same_pixels(exported):
    root, made, m, _ = exported
    read = sd_scripts_read(root / "out" / "m" / "cg")
    config = root / "c.toml"
    config.write_text(tomli_w.dumps({
        "pretrained": "tiny-random", "output_dir": str(root / "run"), "resolution": 64, "min_bucket_reso": 32,
        "max_bucket_reso": 128, "bucket_reso_steps": 32, "max_train_steps": 1, "datasets": [{"manifest": str(m)}]}))
    plan = train_data.plan(train_config.load(config))
    assert {s.key for s in plan.samples} == set(read)
    for s in plan.samples:
        size, pixels = read[s.key]
        assert s.size == size, s.key
        expected = np.asarray(resize_and_crop(Image.fromarray(pixels), s.placement), np.float32) / 127.5 - 1
        got = train_data.pixels(s, False).permute(1, 2, 0).numpy()
        assert np.allclose(got, expected, atol=1e-6), s.key


def test_background_is_one_setting_for_tagger_export_and_train(tmp_path, monkeypatch):
    monkeypatch.setenv(images.ALPHA_BACKGROUND_ENV, "#00ff00")
    made = make_images(tmp_path / "img")
    summary = export.run([write_manifest(tmp_path, made)], tmp_path / "out")
    _, pixels = sd_scripts_read(tmp_path / "out" / "m" / "cg")["local/transparent"]
    assert (pixels[:, :32] == (0, 255, 0)).all()
    assert (np.asarray(images.open_image(tmp_path / "img" / "transparent.png"))[:, :32] == (0, 255, 0)).all()
    assert "alpha flattened on #00ff00" in "\n".join(summary.lines())
    monkeypatch.setenv(images.ALPHA_BACKGROUND_ENV, "greenish")
    with pytest.raises(CurateError, match="CURATE_ALPHA_BACKGROUND='greenish': expected a colour"):
        export.run([tmp_path / "m.parquet"], tmp_path / "out")


def test_reexport_keeps_current_copies_and_redoes_changed_ones(exported, monkeypatch):
    root, made, m, _ = exported
    copy = root / "out" / "m" / "cg" / "local_transparent.png"
    before = copy.stat().st_mtime_ns
    export.run([m], root / "out")
    assert copy.stat().st_mtime_ns == before  # unchanged source: not rewritten
    rgba = np.zeros((48, 64, 4), np.uint8)
    rgba[:, :] = (10, 20, 30, 255)
    Image.fromarray(rgba, "RGBA").save(root / "img" / "transparent.png")
    export.run([m], root / "out")
    with Image.open(copy) as im:
        assert im.getpixel((0, 0)) == (10, 20, 30)
    monkeypatch.setenv(images.ALPHA_BACKGROUND_ENV, "#000000")  # another background: copies are redone
    Image.fromarray(np.zeros((48, 64, 4), np.uint8), "RGBA").save(root / "img" / "transparent.png")
    os.utime(root / "img" / "transparent.png", ns=(copy.stat().st_atime_ns, copy.stat().st_mtime_ns))
    export.run([m], root / "out")
    with Image.open(copy) as im:
        assert im.getpixel((0, 0)) == (0, 0, 0)


@pytest.mark.parametrize("name, mode, why", [
    ("a.JPEG", "RGB", None), ("a.jpeg", "L", None), ("a.bmp", "RGB", None), ("a.webp", "RGB", None),
    ("a.png", "P", None), ("a.png", "LA", "transparency flattened"), ("a.webp", "RGBA", "transparency flattened"),
    ("a.png", "I;16", "I;16 pixels converted"),
])
def test_decide(tmp_path, name, mode, why):
    fmt = {".jpeg": "JPEG", ".bmp": "BMP", ".webp": "WEBP", ".png": "PNG"}[os.path.splitext(name)[1].lower()]
    Image.new(mode, (8, 8)).save(tmp_path / name, fmt)
    form = normalize.decide(tmp_path / name)
    assert form.why == why and form.copy == (why is not None)
    assert form.ext == (os.path.splitext(name)[1].lower() if why is None else ".png")


def test_unreadable_image_is_skipped_not_fatal(tmp_path):
    made = make_images(tmp_path / "img")
    (tmp_path / "img" / "plain.png").write_bytes(b"<html>not an image</html>")
    summary = export.run([write_manifest_unprobed(tmp_path, made)], tmp_path / "out")
    assert summary.skipped == {"unreadable image (unsupported)": 1}


def write_manifest_unprobed(root, made):
    rows = [{"key": f"local/{n}", "subset": "cg", "path": f"img/{f}", "caption": n} for n, (f, _) in made.items()]
    return manifest.write(pa.Table.from_pylist(rows), root / "m.parquet", manifest.new_provenance(kind="ingest"))
