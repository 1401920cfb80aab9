"""Helper for the dedupe/border/hash benchmarks: synthetic CG-like images and variants.

Not a benchmark itself (run it to write a few samples to look at). A scene is a
flat-shaded background (sky gradient, horizon, blocky buildings) plus a cel-shaded
"character" (outlined flat shapes) and props. Scenes that share a `layout` seed
share the composition (horizon, buildings, the character's place and size) but
not the colours, character or props: distinct pictures, same layout.
"""

from __future__ import annotations

import io
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont


def _colour(rng, lo=0, hi=256):
    return tuple(int(c) for c in rng.integers(lo, hi, 3))


def scene(layout: int, content: int, w: int = 960, h: int = 540) -> Image.Image:
    """A CG-like picture; same `layout` -> same composition (geometry), other colours."""
    lr, cr = np.random.default_rng(layout), np.random.default_rng(content + 10**6)
    top, bottom = np.array(_colour(cr)), np.array(_colour(cr))
    t = np.linspace(0, 1, h)[:, None, None]
    sky = (top * (1 - t) + bottom * t).repeat(w, axis=1).astype(np.uint8)
    im = Image.fromarray(sky)
    d = ImageDraw.Draw(im)
    horizon = int(h * lr.uniform(0.45, 0.8))
    d.rectangle([0, horizon, w, h], fill=_colour(cr))
    for _ in range(int(lr.integers(3, 9))):  # buildings / props
        x0 = int(lr.uniform(0, w)); bw = int(lr.uniform(0.05, 0.25) * w)
        y0 = int(horizon - lr.uniform(0.1, 0.5) * h)
        d.rectangle([x0, y0, x0 + bw, horizon], fill=_colour(cr), outline=(20, 20, 30), width=2)
    cx, cy = lr.uniform(0.25, 0.75) * w, lr.uniform(0.35, 0.6) * h  # the character's place
    s = min(w, h) * lr.uniform(0.2, 0.35)
    # the character: body, head, hair, eyes, ornaments -- all from `content`
    lw = max(2, int(min(w, h) / 200))
    d.polygon([(cx - s * cr.uniform(0.4, 0.8), h), (cx + s * cr.uniform(0.4, 0.8), h),
               (cx + s * 0.3, cy + s * 0.4), (cx - s * 0.3, cy + s * 0.4)],
              fill=_colour(cr), outline=(10, 10, 10), width=lw)
    hr = s * cr.uniform(0.3, 0.45)
    d.ellipse([cx - hr, cy - hr, cx + hr, cy + hr], fill=_colour(cr, 180, 256), outline=(10, 10, 10), width=lw)
    hair = _colour(cr)
    for _ in range(int(cr.integers(4, 9))):
        a = cr.uniform(0, np.pi)
        d.polygon([(cx + np.cos(a) * hr * 1.1, cy - np.sin(a) * hr * 1.1),
                   (cx + np.cos(a + 0.5) * hr * 1.6, cy - np.sin(a + 0.5) * hr * 1.2 + hr * 0.8),
                   (cx + np.cos(a - 0.3) * hr * 0.6, cy - np.sin(a - 0.3) * hr * 0.6)],
                  fill=hair, outline=(10, 10, 10))
    eye = _colour(cr)
    for ex in (-0.35, 0.35):
        d.ellipse([cx + ex * hr - hr * 0.12, cy - hr * 0.05, cx + ex * hr + hr * 0.12, cy + hr * 0.25],
                  fill=eye, outline=(0, 0, 0), width=max(1, lw // 2))
    for _ in range(int(cr.integers(5, 14))):  # props / effects scattered over the picture
        x, y, r = cr.uniform(0, w), cr.uniform(0, h), cr.uniform(0.01, 0.06) * min(w, h)
        d.ellipse([x - r, y - r, x + r, y + r], fill=_colour(cr))
    return im


def jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def letterbox(im: Image.Image, colour=(0, 0, 0), frame=(16, 9), content_scale=1.0):
    """Content centred in a bigger frame of another aspect; returns (image, content box)."""
    w, h = im.size
    fw, fh = frame
    if w / h > fw / fh:  # wider content -> bars top and bottom
        W, H = w, int(round(w * fh / fw))
    else:
        W, H = int(round(h * fw / fh)), h
    W, H = int(W * content_scale), int(H * content_scale)
    out = Image.new("RGB", (W, H), colour)
    x, y = (W - w) // 2, (H - h) // 2
    out.paste(im, (x, y))
    return out, (x, y, x + w, y + h)


def subtitle(im: Image.Image, text: str = "I'll be right there, Sensei!") -> Image.Image:
    im = im.copy()
    d = ImageDraw.Draw(im)
    size = max(12, im.height // 18)
    try:
        font = ImageFont.load_default(size)
    except TypeError:  # old Pillow
        font = ImageFont.load_default()
    tw = d.textlength(text, font=font)
    d.text(((im.width - tw) / 2, im.height * 0.86), text, font=font, fill=(255, 255, 255),
           stroke_width=max(1, size // 10), stroke_fill=(0, 0, 0))
    return im


def variants(im: Image.Image, rng) -> list[tuple[str, Image.Image]]:
    """The near-duplicate variants the benchmark labels as duplicates of `im`."""
    w, h = im.size
    out = []
    f = rng.uniform(0.5, 2.0)
    out.append(("resize", im.resize((max(8, int(w * f)), max(8, int(h * f))), Image.Resampling.LANCZOS)))
    out.append(("jpeg", jpeg(im, int(rng.integers(60, 96)))))
    out.append(("letterbox", letterbox(im, frame=(4, 3) if rng.random() < 0.5 else (1, 1))[0]))
    c = rng.uniform(0.02, 0.05)
    dx, dy = int(w * c * rng.random()), int(h * c * rng.random())
    out.append(("crop", im.crop((dx, dy, w - int(w * c) + dx, h - int(h * c) + dy))))
    out.append(("subtitle", subtitle(im)))
    j = ImageEnhance.Brightness(im).enhance(rng.uniform(0.9, 1.1))
    j = ImageEnhance.Color(j).enhance(rng.uniform(0.85, 1.15))
    out.append(("jitter", ImageEnhance.Contrast(j).enhance(rng.uniform(0.9, 1.1))))
    return out


if __name__ == "__main__":
    dest = sys.argv[1] if len(sys.argv) > 1 else "/tmp"
    rng = np.random.default_rng(0)
    base = scene(1, 1)
    base.save(f"{dest}/synth_base.png")
    scene(1, 2).save(f"{dest}/synth_same_layout.png")
    for name, v in variants(base, rng):
        v.save(f"{dest}/synth_{name}.png")
    print("samples written to", dest)
