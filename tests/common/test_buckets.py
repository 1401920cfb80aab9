"""Buckets: the list sd-scripts makes, the bucket it picks for an image, the resize+crop."""

import math
import random

import pytest
from PIL import Image

from curate.common.buckets import Buckets, make_bucket_resolutions, resize_and_crop


def sd_scripts_reference(max_reso, min_size, max_size, divisible):
    """sd-scripts library/model_util.py make_bucket_resolutions, transcribed for comparison."""
    max_width, max_height = max_reso
    max_area = max_width * max_height
    resos = set()
    width = int(math.sqrt(max_area) // divisible) * divisible
    resos.add((width, width))
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    resos = list(resos)
    resos.sort()
    return resos


SETTINGS = [((1024, 1024), 256, 4096, 32), ((1024, 1024), 256, 2048, 64), ((512, 512), 256, 1024, 64),
            ((512, 768), 256, 1024, 64), ((768, 1024), 320, 1536, 32), ((64, 64), 32, 128, 32)]


@pytest.mark.parametrize("max_reso,lo,hi,step", SETTINGS)
def test_bucket_list_is_sd_scripts(max_reso, lo, hi, step):
    resos = make_bucket_resolutions(max_reso, lo, hi, step)
    assert resos == sd_scripts_reference(max_reso, lo, hi, step)
    area = max_reso[0] * max_reso[1]
    for w, h in resos:
        assert w % step == 0 and h % step == 0 and w * h <= area
        assert (h, w) in resos


def test_recipe_has_193_buckets():
    resos = make_bucket_resolutions((1024, 1024), 256, 4096, 32)
    assert len(resos) == 193
    assert (1024, 1024) in resos and (256, 4096) in resos and (4096, 256) in resos
    assert (832, 1216) in resos and (1216, 832) in resos  # the usual SDXL portrait/landscape


def test_small_setting_listed_exactly():
    # by hand: width 448 -> 262144 // 448 = 585 -> floor to 64 = 576; width 832 -> 315 -> 256
    assert make_bucket_resolutions((512, 512), 256, 1024, 64) == [
        (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640),
        (448, 576), (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256),
        (896, 256), (960, 256), (1024, 256)]


def test_every_image_lands_in_the_bucket_of_nearest_aspect():
    buckets = Buckets((1024, 1024), 256, 4096, 32)
    rng = random.Random(1)
    for _ in range(2000):
        w, h = rng.randint(64, 6000), rng.randint(64, 6000)
        p = buckets.place(w, h)
        best = min(abs(bw / bh - w / h) for bw, bh in buckets.predefined)
        assert abs(p.bucket[0] / p.bucket[1] - w / h) == pytest.approx(best)
        # resize covers the bucket, one side exactly (to rounding), crop inside the image
        rw, rh = p.resized
        assert rw >= p.bucket[0] and rh >= p.bucket[1]
        assert min(rw - p.bucket[0], rh - p.bucket[1]) <= 1
        assert 0 <= p.crop[0] <= rw - p.bucket[0] and 0 <= p.crop[1] <= rh - p.bucket[1]


def test_image_already_bucket_sized_keeps_its_size():
    buckets = Buckets((1024, 1024), 256, 4096, 32)
    p = buckets.place(832, 1216)
    assert p.bucket == (832, 1216) and p.resized == (832, 1216) and p.crop == (0, 0)


def test_no_upscale_buckets_never_exceed_the_image():
    buckets = Buckets((1024, 1024), 256, 4096, 32, no_upscale=True)
    assert buckets.predefined == []
    assert buckets.place(500, 300).bucket == (480, 288)
    assert buckets.place(500, 300).resized == (500, 300)
    rng = random.Random(2)
    for _ in range(500):
        w, h = rng.randint(40, 5000), rng.randint(40, 5000)
        p = buckets.place(w, h)
        assert p.bucket[0] <= min(w, p.resized[0]) and p.bucket[1] <= min(h, p.resized[1])
        assert p.bucket[0] * p.bucket[1] <= 1024 * 1024
        assert p.bucket[0] % 32 == 0 and p.bucket[1] % 32 == 0


def test_resize_and_crop_gives_the_bucket_size_and_the_centre():
    image = Image.new("RGB", (300, 100), (255, 0, 0))
    for x in range(150 - 5, 150 + 5):  # a green stripe in the middle survives the centre crop
        for y in range(100):
            image.putpixel((x, y), (0, 255, 0))
    buckets = Buckets((64, 64), 32, 128, 32)
    p = buckets.place(*image.size)
    out = resize_and_crop(image, p)
    assert out.size == p.bucket
    r, g, b = out.getpixel((out.size[0] // 2, out.size[1] // 2))
    assert g > 200 and r < 60
