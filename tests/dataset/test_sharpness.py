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
