"""Border detection on held-out kinds of pictures: bars are framing, never content.

The pictures here are drawn by this file (not the benchmark's generators): grain on
every field, real sizes (1920x1080), PNG and JPEG.
"""

import io
import tracemalloc

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from curate.dataset import borders


def grain(im, seed, std=2.5):
    a = np.asarray(im).astype(np.float32)
    a += np.random.default_rng(seed).normal(0, std, a.shape[:2] + (1,))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def jpeg(im, q):
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=q)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def girl(d, cx, top, bottom, dress, skin=(250, 226, 210), line=(25, 20, 30)):
    """A standing figure: dress, arms, head, twin tails."""
    s = bottom - top
    d.polygon([(cx - s * 0.22, bottom), (cx + s * 0.25, bottom), (cx + s * 0.07, top + s * 0.22),
               (cx - s * 0.07, top + s * 0.22)], fill=dress, outline=line, width=3)
    d.line([(cx - s * 0.06, top + s * 0.26), (cx - s * 0.2, top + s * 0.5)], fill=line, width=6)
    d.line([(cx + s * 0.06, top + s * 0.26), (cx + s * 0.18, top + s * 0.45)], fill=line, width=6)
    r = s * 0.1
    for side in (-1, 1):
        d.ellipse([cx + side * r * 1.4 - r * 0.5, top + r * 0.5, cx + side * r * 1.4 + r * 0.5, top + r * 3],
                  fill=(90, 60, 160), outline=line, width=2)
    d.ellipse([cx - r, top, cx + r, top + 2 * r], fill=skin, outline=line, width=3)


def scene(seed, w, h):
    """A CG-like frame: sky gradient, hills, houses, a girl."""
    rng = np.random.default_rng(seed)
    c = lambda lo=40, hi=220: tuple(int(v) for v in rng.integers(lo, hi, 3))  # noqa: E731
    t = np.linspace(0, 1, h)[:, None, None]
    im = Image.fromarray((np.array(c()) * (1 - t) + np.array(c()) * t).repeat(w, axis=1).astype(np.uint8))
    d = ImageDraw.Draw(im)
    d.ellipse([-w * 0.2, h * 0.6, w * 0.7, h * 1.4], fill=c())
    d.ellipse([w * 0.4, h * 0.55, w * 1.3, h * 1.5], fill=c())
    for _ in range(4):
        x = rng.uniform(0, w)
        d.rectangle([x, h * 0.45, x + w * 0.08, h * 0.65], fill=c(), outline=(30, 30, 30), width=2)
    girl(d, w * rng.uniform(0.3, 0.7), h * 0.2, h, c())
    return grain(im, seed)


def framed(im, pad, colour):
    l, t, r, b = pad
    out = grain(Image.new("RGB", (im.width + l + r, im.height + t + b), colour), 99, 0.8)
    out.paste(im, (l, t))
    return out, (l, t, l + im.width, t + im.height)


def night(subject_x, seed=1, centred_lantern=False):
    """1920x1080 near-black night: stars, a lit girl (or a lantern) off the centre."""
    im = Image.new("RGB", (1920, 1080), (6, 7, 14))
    d = ImageDraw.Draw(im)
    rng = np.random.default_rng(seed)
    for x, y in rng.uniform((0, 0), (1920, 500), (40, 2)):
        d.point([(x, y), (x + 1, y)], fill=(200, 200, 230))
    if centred_lantern:
        d.ellipse([900, 480, 1020, 600], fill=(255, 190, 90))
    else:
        girl(d, subject_x, 300, 1040, (230, 170, 90), line=(40, 25, 10))
    return grain(im, seed, 2.0)


def field(colour, cx, w=1920, h=1080):
    im = Image.new("RGB", (w, h), colour)
    girl(ImageDraw.Draw(im), cx, h * 0.15, h * 0.95, (200, 40, 60))
    return grain(im.filter(ImageFilter.GaussianBlur(0.6)), 5)


FULL = (0, 0, 1920, 1080)


@pytest.mark.parametrize("q", [None, 90, 70])
def test_dark_night_scene_keeps_the_full_frame(q):
    for im in (night(1450), night(420, seed=2), night(0, seed=3, centred_lantern=True)):
        im = jpeg(im, q) if q else im
        assert borders.detect(im) == FULL


@pytest.mark.parametrize("colour", [(90, 170, 80), (130, 195, 240), (250, 250, 250), (230, 230, 230)])
def test_flat_background_art_keeps_its_background(colour):
    for cx in (700, 1300, 960):  # off-centre both ways, and a sprite centred on its field
        im = field(colour, cx)
        assert borders.detect(im) == FULL, (colour, cx)
        assert borders.detect(jpeg(im, 85)) == FULL, (colour, cx)


def test_gradient_sky_is_content():
    t = np.linspace(0, 1, 1080)[:, None, None] ** 1.6
    sky = (np.array([253, 253, 255]) * (1 - t) + np.array([70, 120, 200]) * t).astype(np.uint8)
    im = Image.fromarray(np.broadcast_to(sky, (1080, 1920, 3)).copy())
    girl(ImageDraw.Draw(im), 1200, 500, 1080, (60, 60, 160))
    im = grain(im, 3, 1.5)
    assert borders.detect(im) == FULL
    assert borders.detect(jpeg(im, 80)) == FULL


@pytest.mark.parametrize("q", [None, 92])
def test_real_pillarbox_and_letterbox_are_cut_exactly(q):
    pillar, truth_p = framed(scene(1, 1440, 1080), (240, 0, 240, 0), (0, 0, 0))   # 4:3 in 1920x1080
    letter, truth_l = framed(scene(2, 1920, 800), (0, 140, 0, 140), (0, 0, 0))    # 2.4:1 in 1920x1080
    for im, truth in ((pillar, truth_p), (letter, truth_l)):
        assert im.size == (1920, 1080)
        box = borders.detect(jpeg(im, q) if q else im)
        assert (box == truth) if q is None else max(abs(a - b) for a, b in zip(box, truth)) <= 1


def test_windowbox_white_frame_grey_bars_and_colour_frames():
    content = scene(4, 1200, 900)
    for pad, colour in (((360, 90, 360, 90), (0, 0, 0)),          # windowbox: 4:3 inside 16:9, bars all round
                        ((30, 30, 30, 30), (255, 255, 255)),       # white frame
                        ((0, 225, 0, 225), (128, 128, 128)),       # grey letterbox
                        ((20, 20, 20, 20), (200, 60, 60))):        # a red frame on all four sides
        im, truth = framed(content, pad, colour)
        assert borders.detect(im) == truth, (pad, colour)


def test_coloured_bars_on_two_sides_are_content():
    im, _ = framed(scene(5, 1440, 1080), (240, 0, 240, 0), (100, 170, 90))  # a green field, not bars
    assert borders.detect(im) == FULL


def test_lone_bar_only_where_a_letterbox_would_be():
    cinema = scene(6, 1920, 803)                        # 2.39:1 with its bottom bar cropped away
    im, truth = framed(cinema, (0, 277, 0, 0), (0, 0, 0))
    assert borders.detect(im) == truth
    plain = scene(7, 1920, 980)                         # a black strip leaving 1.96:1: no known frame
    im, _ = framed(plain, (0, 0, 0, 100), (0, 0, 0))
    assert borders.detect(im) == FULL


@pytest.mark.parametrize("colour", [(0, 0, 0), (255, 255, 255)])
def test_unequal_field_on_both_sides_is_background_even_at_a_standard_aspect(colour):
    """Art on a black or white field reaching both sides unequally (300 and 420 px): the left
    run alone leaves 1620x1080 = 3:2, which once made it a lone letterbox bar."""
    im, _ = framed(scene(11, 1200, 1080), (300, 0, 420, 0), colour)
    assert borders.standard_aspect(1920 - 300, 1080, vertical=False)
    assert borders.detect(im) == FULL
    assert borders.detect(jpeg(im, 70)) == FULL


@pytest.mark.parametrize("pad", [(192, 0, 288, 0), (240, 0, 335, 0), (0, 100, 0, 177)])
def test_unequal_black_field_that_leaves_a_standard_aspect_is_kept(pad):
    """Art on black, the field unequal on two sides: what both leave is 4:3, 5:4, 2.39:1
    by chance. Equal widths are what makes bars; these stay."""
    l, t, r, b = pad
    im, _ = framed(scene(12, 1920 - l - r, 1080 - t - b), pad, (0, 0, 0))
    assert borders.detect(im) == FULL
    assert borders.detect(jpeg(im, 80)) == FULL


def test_nested_white_frame_around_black_letterbox():
    inner, _ = framed(scene(8, 800, 450), (0, 75, 0, 75), (0, 0, 0))
    im, _ = framed(inner, (20, 20, 20, 20), (255, 255, 255))
    assert max(abs(a - b) for a, b in zip(borders.detect(im), (20, 95, 820, 545))) <= 1


def test_standard_aspect():
    assert borders.standard_aspect(1080, 1920, vertical=True)       # 16:9
    assert borders.standard_aspect(1440, 1080, vertical=False)      # 4:3
    assert borders.standard_aspect(803, 1920, vertical=True)        # 2.39:1
    assert not borders.standard_aspect(980, 1920, vertical=True)


def test_big_pictures_are_scanned_in_bounded_memory():
    """24 MP: reduced copy + thin full-resolution strips; the box is still exact."""
    w, h, ch = 6000, 4000, 3375  # 16:9 content letterboxed into 3:2
    im = Image.new("RGB", (w, h))
    im.paste(scene(9, 1600, 900).resize((w, ch), Image.Resampling.BILINEAR), (0, 312))
    assert w * h > borders.WORK_PIXELS
    tracemalloc.start()
    try:
        box = borders.detect(im)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert box == (0, 312, w, 312 + ch)
    # the bound borders' docstring states (28 MB here; the picture itself is 72 MB, and before it took ~16x that)
    assert peak < 3 * borders.WORK_PIXELS + 60 * borders.CHUNK_PIXELS
    a = np.asarray(im)  # an array takes the same path
    assert borders.detect(a) == box


@pytest.mark.parametrize("q", [None, 88])
def test_subtitle_in_the_bottom_bar_is_still_a_letterbox(q):
    from PIL import ImageFont

    im, truth = framed(scene(10, 1920, 804), (0, 138, 0, 138), (0, 0, 0))  # 2.39:1 in 1920x1080
    d = ImageDraw.Draw(im)
    d.text((960, 1010), "Sensei, the train leaves at dawn.", font=ImageFont.load_default(40), anchor="mm",
           fill=(255, 255, 255), stroke_width=2, stroke_fill=(20, 20, 20))
    box = borders.detect(jpeg(im, q) if q else im)
    assert max(abs(a - b) for a, b in zip(box, truth)) <= 1
