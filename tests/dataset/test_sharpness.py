"""curate.dataset.sharpness: sharpness and effective resolution on drawn images."""

import io

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from curate.dataset import sharpness
from tests.dataset.test_dedupe import picture


def jpeg(im, q=90):
    b = io.BytesIO()
    im.save(b, "JPEG", quality=q)
    b.seek(0)
    return Image.open(b).convert("RGB")


def grey(im):
    return np.asarray(im.convert("L"))


# Public reports: cleanlab/cleanvision#120 (uniformly-coloured images scored as blurry, and
# scores off on high-resolution images) and deepfakes/faceswap#563 (a Laplacian blur score
# depends on image size and must be normalized): a flat picture scores 0 without dividing
# by zero, brightness does not change the score, and the keeper compares only copies of
# one size.
def test_flat_and_tiny_pictures_score_zero():
    assert sharpness.sharpness(np.full((200, 300), 128, np.uint8)) == 0.0
    assert sharpness.sharpness(np.zeros((2, 2))) == 0.0
    assert sharpness.upscale_factor(Image.new("RGB", (600, 400), (20, 30, 40))) == 1.0


def test_blur_lowers_sharpness_brightness_does_not():
    im = picture(3)
    s = sharpness.sharpness(grey(im))
    assert sharpness.sharpness(grey(ImageEnhance.Brightness(im).enhance(1.1))) == pytest.approx(s, rel=0.05)
    assert sharpness.sharpness(grey(im.filter(ImageFilter.GaussianBlur(1)))) < 0.5 * s
    assert sharpness.sharpness(grey(im.filter(ImageFilter.BoxBlur(3)))) < 0.2 * s


@pytest.mark.parametrize("factor", [1.5, 2.0, 3.0])
def test_an_upscale_is_found_a_genuine_picture_is_not(factor):
    im = picture(4, 640, 400)
    assert sharpness.upscale_factor(im) == 1.0
    assert sharpness.upscale_factor(jpeg(im)) == 1.0
    for resample in (Image.Resampling.LANCZOS, Image.Resampling.BICUBIC):
        up = im.resize((int(640 * factor), int(400 * factor)), resample)
        found = sharpness.upscale_factor(jpeg(up))
        assert 1.5 <= found <= factor, (factor, resample, found)


def test_effective_pixels_of_files(tmp_path):
    im = picture(5, 500, 300)
    im.save(tmp_path / "orig.png")
    im.resize((1000, 600), Image.Resampling.LANCZOS).save(tmp_path / "up.jpg", quality=92)
    (tmp_path / "bad.png").write_bytes(b"nope")
    assert sharpness.effective_pixels(str(tmp_path / "orig.png")) == 500 * 300
    assert sharpness.effective_pixels(str(tmp_path / "up.jpg")) == 500 * 300
    assert sharpness.effective_pixels(str(tmp_path / "bad.png")) is None


def record_strips(monkeypatch) -> list:
    """Heights of the JPEG strips effective_pixels decodes."""
    from curate.common import jpeg_rows

    seen, real = [], jpeg_rows.top_strips

    def spy(*args, **kwargs):
        for strip, height in real(*args, **kwargs):
            seen.append(strip.height)
            yield strip, height
    monkeypatch.setattr(jpeg_rows, "top_strips", spy)
    return seen


def test_detail_in_the_top_rows_settles_a_genuine_jpeg(tmp_path, monkeypatch):
    from tests.common.test_jpeg_rows import busy

    p = tmp_path / "cg.jpg"
    busy(7, 1024, 2048).save(p, quality=90)
    seen = record_strips(monkeypatch)
    assert sharpness.effective_pixels(str(p)) == 1024 * 2048
    assert seen == [sharpness.STRIPS[0]]  # 64 of 2048 rows decoded


# Public reports: 0x09/resdet#12 (an upscale guess is unreliable where "most of the image is
# just a green field") and timotgl/inspector-bokeh#4 (sharp and soft areas in one picture): a
# soft top (a blurred background) must not make a genuine picture look upscaled; only the
# whole picture may say "upscaled".
def test_a_soft_top_is_judged_by_the_whole_picture(tmp_path, monkeypatch):
    from tests.common.test_jpeg_rows import busy

    im = busy(8, 1024, 1536)
    top = im.crop((0, 0, 1024, 600)).filter(ImageFilter.GaussianBlur(3))
    im.paste(top, (0, 0))
    p = tmp_path / "soft_top.jpg"
    im.save(p, quality=90)
    seen = record_strips(monkeypatch)
    assert sharpness.measured_factor(np.asarray(top.convert("L"))) >= 1.5  # the top alone looks upscaled
    assert sharpness.effective_pixels(str(p)) == 1024 * 1536
    assert seen[-1] == 1536  # decided on the whole picture


# Public reports: rif/imgdup2go#4 (a PNG "might ... simply be a convert from a jpeg and not
# necessarily carry more image information") and 0x09/resdet#10 (a game screenshot upscaled to
# 4K): upscales found in a lossless convert and in a progressive JPEG (decoded whole).
@pytest.mark.parametrize("name, options", [("up.png", {}), ("up.jpg", {"quality": 90, "progressive": True})])
def test_an_upscale_is_found_in_any_file_kind(tmp_path, monkeypatch, name, options):
    im = picture(6, 640, 400)
    im.resize((1280, 800), Image.Resampling.LANCZOS).save(tmp_path / name, **options)
    seen = record_strips(monkeypatch)
    px = sharpness.effective_pixels(str(tmp_path / name))
    assert 640 * 400 <= px <= 1280 * 800 / 1.5 ** 2 and seen == []
