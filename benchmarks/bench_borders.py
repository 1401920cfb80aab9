"""Border trim: bars recovered and content kept, per kind of picture, new vs old in one run.

Generated pictures with grain (per-pixel noise), half of them JPEG (q 70-95):
- content kinds, nothing to trim (the truth is the full frame): flat-background art
  (a figure on a mid-green, sky-blue, white, cream... field, off-centre or centred),
  dark scenes (1920x1080 near-black night, stars, a lit figure), gradient skies (pale
  or dark sky fading to colour over a horizon), art on a black/white field reaching both
  sides unequally (one side alone often leaving a standard aspect), CG scenes;
- bar kinds (the truth is the content box): black letterbox, pillarbox, windowbox,
  white frame, grey bars, JPEG-noisy bars (q 45-70 and analog noise), colour frames
  (all four sides), a lone black bar (a cinema frame with one bar cropped away), a
  cinema letterbox with a subtitle in its bottom bar.
Per kind and method: share of frames whose box is within 2 px of the truth on every
side (bar kinds: bars recovered; content kinds: kept whole), and the share of content
pixels lost (outside the box). Targets: 0 content lost on every content kind, >= 99%
of bars recovered. Methods: curate.dataset.borders (new), curate.dataset.borders before issue 17
(benchmarks/borders_v1.py), and the usual Pillow recipe (difference from the corner
colour, getbbox). Then the extra memory border detection takes on a decoded 12 MP
and 121 MP picture (peak RSS growth and peak traced allocations; Linux).

    python benchmarks/bench_borders.py [--frames 20] [--big-mp 121]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont

sys.path.insert(0, str(Path(__file__).parent))
import borders_v1  # noqa: E402
from bench_dedupe_synth import jpeg, letterbox, scene  # noqa: E402

from curate.dataset import borders  # noqa: E402

FIELDS = [(70, 160, 80), (120, 190, 235), (250, 250, 250), (225, 225, 225), (240, 180, 200),
          (245, 235, 210), (30, 30, 40), (90, 200, 190)]
SIZES = [(1920, 1080), (1080, 1920), (1600, 1200), (1200, 1600), (1280, 720)]


def baseline(im: Image.Image) -> tuple:
    """Stack Overflow's trim: difference from the corner pixel, thresholded, getbbox."""
    bg = Image.new(im.mode, im.size, im.getpixel((0, 0)))
    diff = ImageChops.difference(im, bg)
    diff = ImageChops.add(diff, diff, 2.0, -24)
    return diff.getbbox() or (0, 0, im.width, im.height)


METHODS = {"new": borders.detect, "v1": borders_v1.detect, "getbbox": baseline}


def grain(im: Image.Image, rng, std: float) -> Image.Image:
    a = np.asarray(im).astype(np.float32)
    a += rng.normal(0, std, a.shape[:2] + (1,)).astype(np.float32)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def figure(d: ImageDraw.ImageDraw, rng, cx: float, top: float, bottom: float, fill, outline=(20, 20, 30)):
    """A cel-shaded standing figure from `top` down to `bottom`: body, head, hair, arms."""
    hgt = bottom - top
    hr = hgt * rng.uniform(0.09, 0.13)
    cy = top + hr
    body = [(cx - hgt * rng.uniform(0.15, 0.3), bottom), (cx + hgt * rng.uniform(0.15, 0.3), bottom),
            (cx + hr * 0.7, cy + hr * 1.2), (cx - hr * 0.7, cy + hr * 1.2)]
    d.polygon(body, fill=fill, outline=outline, width=3)
    for side in (-1, 1):  # arms
        d.line([(cx + side * hr * 0.7, cy + hr * 1.5), (cx + side * hgt * rng.uniform(0.15, 0.3), cy + hgt * 0.45)],
               fill=outline, width=max(3, int(hr * 0.3)))
    d.ellipse([cx - hr, cy - hr, cx + hr, cy + hr], fill=(250, 225, 205), outline=outline, width=3)
    hair = tuple(int(c) for c in rng.integers(0, 256, 3))
    d.chord([cx - hr * 1.15, cy - hr * 1.2, cx + hr * 1.15, cy + hr * 0.6], 180, 360, fill=hair, outline=outline, width=3)


def flat_art(k: int, rng) -> Image.Image:
    w, h = SIZES[k % len(SIZES)]
    field = FIELDS[k % len(FIELDS)]
    im = Image.new("RGB", (w, h), field)
    d = ImageDraw.Draw(im)
    cx = w * (0.5 if k % 4 == 0 else rng.uniform(0.25, 0.75))  # every 4th centred (a sprite)
    top = h * rng.uniform(0.05, 0.35)
    bottom = h if k % 3 else h * rng.uniform(0.8, 0.95)  # standing on the bottom edge, or floating
    figure(d, rng, cx, top, bottom, tuple(int(c) for c in rng.integers(0, 256, 3)))
    if k % 2:  # a soft drop shadow and a signature
        d.ellipse([cx - w * 0.1, h * 0.93, cx + w * 0.1, h * 0.97], fill=tuple(int(c * 0.85) for c in field))
        d.text((w * 0.85, h * 0.95), "sig.", fill=(60, 60, 60))
    return grain(im, rng, rng.uniform(1, 3))


def dark_scene(k: int, rng) -> Image.Image:
    w, h = 1920, 1080
    base = rng.integers(0, 14)
    im = Image.new("RGB", (w, h), (int(base), int(base), int(base + rng.integers(0, 8))))
    d = ImageDraw.Draw(im)
    if k % 2:
        for _ in range(int(rng.integers(5, 60))):  # stars
            x, y, r = rng.uniform(0, w), rng.uniform(0, h * 0.6), rng.uniform(0.5, 2.5)
            d.ellipse([x - r, y - r, x + r, y + r], fill=(230, 230, 255))
    cx = w * (0.5 if k % 5 == 0 else rng.choice([rng.uniform(0.15, 0.4), rng.uniform(0.6, 0.85)]))
    if k % 3 == 0:  # a warm glow around the subject
        glow = Image.new("L", (w, h), 0)
        ImageDraw.Draw(glow).ellipse([cx - 260, h * 0.25, cx + 260, h * 0.95], fill=70)
        im = Image.composite(Image.new("RGB", (w, h), (255, 200, 120)), im, glow.filter(ImageFilter.GaussianBlur(80)))
        d = ImageDraw.Draw(im)
    bottom = h if k % 3 else h * 0.92
    figure(d, rng, cx, h * rng.uniform(0.25, 0.45), bottom, (200, 160, 110), outline=(5, 5, 8))
    return grain(im, rng, rng.uniform(1, 3))


def gradient_sky(k: int, rng) -> Image.Image:
    w, h = SIZES[k % len(SIZES)]
    pale = [(250, 250, 252), (255, 255, 255), (8, 10, 30), (245, 240, 230)][k % 4]
    low = tuple(int(c) for c in rng.integers(60, 230, 3))
    t = np.linspace(0, 1, h)[:, None, None] ** rng.uniform(0.6, 2.0)
    sky = (np.array(pale) * (1 - t) + np.array(low) * t).astype(np.float32)
    im = Image.fromarray(np.broadcast_to(sky, (h, w, 3)).astype(np.uint8))
    d = ImageDraw.Draw(im)
    horizon = h * rng.uniform(0.55, 0.85)
    d.rectangle([0, horizon, w, h], fill=tuple(int(c) for c in rng.integers(20, 200, 3)))
    for _ in range(int(rng.integers(2, 6))):
        x0, bw = rng.uniform(0, w), rng.uniform(0.05, 0.2) * w
        d.rectangle([x0, horizon - rng.uniform(0.1, 0.4) * h, x0 + bw, horizon],
                    fill=tuple(int(c) for c in rng.integers(0, 256, 3)), outline=(20, 20, 30), width=2)
    figure(d, rng, w * rng.uniform(0.3, 0.7), h * rng.uniform(0.3, 0.5), h, (200, 60, 80))
    return grain(im, rng, rng.uniform(1, 3))


def panel_on_field(k: int, rng) -> Image.Image:
    """Art on a black or white field that reaches both sides unequally; every other picture's
    wider side alone would leave a standard aspect (3:2, 4:3, 16:10), as a lone bar would."""
    w, h = 1920, 1080
    left = int(rng.integers(60, 400))
    if k % 2:
        left = w - int(round(h * [3 / 2, 4 / 3, 16 / 10][k % 3]))
    right = int(rng.integers(60, 400))
    while abs(right - left) < 40:
        right = int(rng.integers(60, 400))
    im, _ = framed(content(k, rng, w - left - right, h), [(0, 0, 0), (255, 255, 255)][k % 4 // 2], (left, 0, right, 0))
    return grain(im, rng, 1.0)


def content(k: int, rng, w: int, h: int) -> Image.Image:
    return grain(scene(k, k + int(rng.integers(0, 10**6)), w, h), rng, rng.uniform(1, 3))


def framed(im: Image.Image, colour, pad: tuple[int, int, int, int], rng=None, noise=0.0):
    l, t, r, b = pad
    out = Image.new("RGB", (im.width + l + r, im.height + t + b), colour)
    if noise:
        out = grain(out, rng, noise)
    out.paste(im, (l, t))
    return out, (l, t, l + im.width, t + im.height)


def boxed(cont: Image.Image, frame: tuple[int, int], colour, scale: float = 1.0):
    """Content centred in a frame of aspect `frame`, scaled down by `scale` (windowbox)."""
    im, _ = letterbox(cont, colour, frame)
    W, H = int(im.width / scale), int(im.height / scale)
    x, y = (W - cont.width) // 2, (H - cont.height) // 2
    return framed(cont, colour, (x, y, W - cont.width - x, H - cont.height - y))


def make(kind: str, k: int, rng):
    """(picture, truth box) of one kind."""
    if kind in CONTENT_KINDS:
        im = {"flat-background art": flat_art, "dark scene": dark_scene, "gradient sky": gradient_sky,
              "panel on a black/white field": panel_on_field,
              "CG scene": lambda k, rng: content(k, rng, *SIZES[k % len(SIZES)])}[kind](k, rng)
        return im, (0, 0, im.width, im.height)
    cw = int(rng.integers(640, 1280))
    if kind == "letterbox (black)":
        ca, fa = [((16, 9), (4, 3)), ((16, 9), (1, 1)), ((16, 9), (9, 16)), ((21, 9), (16, 9)),
                  ((2.39, 1), (16, 9))][k % 5]
        return boxed(content(k, rng, cw, int(cw * ca[1] / ca[0])), fa, (0, 0, 0))
    if kind == "pillarbox (black)":
        ca = [(4, 3), (1, 1), (9, 16), (3, 2)][k % 4]
        ch = int(rng.integers(480, 1080))
        return boxed(content(k, rng, int(ch * ca[0] / ca[1]), ch), (16, 9), (0, 0, 0))
    if kind == "windowbox (black)":
        return boxed(content(k, rng, cw, cw * 3 // 4), (16, 9), (0, 0, 0), scale=rng.uniform(0.7, 0.9))
    if kind == "white frame":
        b = int(rng.integers(4, 60))
        return framed(content(k, rng, cw, cw * 9 // 16), (255, 255, 255), (b, b, b, b))
    if kind == "grey bars":
        g = int(rng.integers(24, 200))
        fa = [(4, 3), (1, 1)][k % 2]
        return boxed(content(k, rng, cw, cw * 9 // 16), fa, (g, g, g))
    if kind == "colour frame":
        b = int(rng.integers(6, 60))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        return framed(content(k, rng, cw, cw * 9 // 16), colour, (b, b, b, b))
    if kind == "lone black bar":
        ca = [2.39, 21 / 9, 2.0][k % 3]
        cont = content(k, rng, cw, int(round(cw / ca)))
        bar = int(round(cw * 9 / 16)) - cont.height
        return framed(cont, (0, 0, 0), (0, bar, 0, 0) if k % 2 else (0, 0, 0, bar))
    if kind == "subtitle in a bar":
        cont = content(k, rng, cw, int(round(cw / [2.39, 21 / 9][k % 2])))
        im, box = boxed(cont, (16, 9), (0, 0, 0))
        d = ImageDraw.Draw(im)
        size = max(12, (im.height - box[3]) // 3)
        try:
            font = ImageFont.load_default(size)
        except TypeError:  # old Pillow
            font = ImageFont.load_default()
        d.text((im.width / 2, (box[3] + im.height) / 2), "I'll be right there, Sensei!", font=font, anchor="mm",
               fill=(255, 255, 255), stroke_width=max(1, size // 12), stroke_fill=(30, 30, 30))
        return im, box
    if kind == "JPEG-noisy bars":
        colour = [(0, 0, 0), (255, 255, 255)][k % 2]
        if k % 4 < 2:
            im, box = boxed(content(k, rng, cw, cw * 9 // 16), (4, 3), colour)
        else:
            im, box = boxed(content(k, rng, cw * 3 // 4, cw * 9 // 16), (16, 9), colour)
        return grain(im, rng, 2.0), box  # analog capture noise on the bars too
    raise ValueError(kind)


CONTENT_KINDS = ["flat-background art", "dark scene", "gradient sky", "panel on a black/white field", "CG scene"]
BAR_KINDS = ["letterbox (black)", "pillarbox (black)", "windowbox (black)", "white frame", "grey bars",
             "JPEG-noisy bars", "colour frame", "lone black bar", "subtitle in a bar"]


def lost(box, truth) -> int:
    """Content pixels outside the box."""
    l, t, r, b = truth
    il, it, ir, ib = max(l, box[0]), max(t, box[1]), min(r, box[2]), min(b, box[3])
    inside = max(0, ir - il) * max(0, ib - it)
    return (r - l) * (b - t) - inside


def quality_table(n: int, seed: int) -> None:
    print(f"border trim: {n} generated pictures per kind, half JPEG; box within 2 px of the truth on every side,")
    print("and content pixels lost (outside the box). Targets: content lost 0 everywhere, bars >= 99%.")
    head = f"{'kind':<22}{'n':>4} | box within 2 px:" + "".join(f"{m:>9}" for m in METHODS) + \
        " | content px lost:" + "".join(f"{m:>9}" for m in METHODS)
    print(head)
    totals = {kind: {} for kind in ("content", "bars")}
    t = dict.fromkeys(METHODS, 0.0)
    for kind in CONTENT_KINDS + BAR_KINDS:
        rng = np.random.default_rng([seed, (CONTENT_KINDS + BAR_KINDS).index(kind)])
        within, loss, pixels = dict.fromkeys(METHODS, 0), dict.fromkeys(METHODS, 0), 0
        for k in range(n):
            im, truth = make(kind, k, rng)
            if kind == "JPEG-noisy bars":
                im = jpeg(im, int(rng.integers(45, 71)))
            elif k % 2:
                im = jpeg(im, int(rng.integers(70, 96)))
            pixels += (truth[2] - truth[0]) * (truth[3] - truth[1])
            for name, fn in METHODS.items():
                t0 = time.perf_counter()
                box = tuple(fn(im))
                t[name] += time.perf_counter() - t0
                within[name] += max(abs(a - b) for a, b in zip(box, truth)) <= 2
                loss[name] += lost(box, truth)
        group = totals["content" if kind in CONTENT_KINDS else "bars"]
        for name in METHODS:
            w, ls, p, f = group.get(name, (0, 0, 0, 0))
            group[name] = (w + within[name], ls + loss[name], p + pixels, f + n)
        print(f"{kind:<22}{n:>4} | {'':15}" + "".join(f"{within[m] / n:>9.0%}" for m in METHODS)
              + f" | {'':16}" + "".join(f"{loss[m] / pixels:>9.2%}" for m in METHODS))
    for group, label in (("content", "all content kinds"), ("bars", "all bar kinds")):
        g = totals[group]
        print(f"{label:<22}{next(iter(g.values()))[3]:>4} | {'':15}" + "".join(f"{g[m][0] / g[m][3]:>9.1%}" for m in METHODS)
              + f" | {'':16}" + "".join(f"{g[m][1] / g[m][2]:>9.3%}" for m in METHODS))
    frames = (len(CONTENT_KINDS) + len(BAR_KINDS)) * n
    print("ms per picture: " + ", ".join(f"{m} {1000 * t[m] / frames:.1f}" for m in METHODS))
    c, b = totals["content"], totals["bars"]
    print(f"ratio new / v1: content pixels lost {c['new'][1] / max(c['v1'][1], 1):.3f}x, "
          f"bars recovered {b['new'][0] / max(b['v1'][0], 1):.2f}x")


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def extra_peak(fn, im) -> tuple[int, int, tuple]:
    """(peak RSS above what the process held before fn(im), peak of traced allocations, box).

    RSS: VmHWM reset through clear_refs; it misses heap pages already resident.
    Traced: tracemalloc (every numpy array and Python object, not Pillow's own buffers).
    """
    import gc
    import tracemalloc

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    tracemalloc.start()
    try:
        box = fn(im)
        traced = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return _status("VmHWM") - before, traced, box


def memory_table(sizes_mp: list[float]) -> None:
    if not Path("/proc/self/clear_refs").exists():
        print("memory: needs Linux /proc (peak RSS reset); skipped")
        return
    print("extra memory of border detection on a decoded picture (black letterbox, 16:9 in 4:3):")
    print("peak RSS growth / peak traced allocations (numpy, Python), MB")
    print(f"{'picture':<24}{'new':>14}{'v1':>14}{'picture itself':>16}{'box ok (new)':>14}")
    small = scene(3, 3, 1600, 900)
    for mp in sizes_mp:
        w = int(round((mp * 1e6 * 4 / 3) ** 0.5 / 4) * 4)
        h = w * 3 // 4
        ch = w * 9 // 16
        im = Image.new("RGB", (w, h))
        im.paste(small.resize((w, ch), Image.Resampling.BILINEAR), (0, (h - ch) // 2))
        truth = (0, (h - ch) // 2, w, (h - ch) // 2 + ch)
        rss, traced, box = extra_peak(borders.detect, im)
        ok = max(abs(a - b) for a, b in zip(box, truth)) <= 2
        old = f"{'not run':>14}"
        if mp <= 30:  # v1 takes ~45 bytes a pixel: 5+ GB at 121 MP
            o_rss, o_traced, _ = extra_peak(borders_v1.detect, im)
            old = f"{o_rss / 2**20:>7.0f}/{o_traced / 2**20:<6.0f}"
        print(f"{f'{w}x{h} ({w * h / 1e6:.0f} MP)':<24}{rss / 2**20:>7.0f}/{traced / 2**20:<6.0f}{old}"
              f"{w * h * 3 / 2**20:>14.0f}MB{str(ok):>14}")
        del im


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=20, help="pictures per kind")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--big-mp", type=float, default=121, help="largest picture for the memory table (0: skip)")
    args = ap.parse_args()
    quality_table(args.frames, args.seed)
    if args.big_mp:
        memory_table([12, args.big_mp])


if __name__ == "__main__":
    main()
