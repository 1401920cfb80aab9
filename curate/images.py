"""Safe image decoding, used by every stage that opens an image.

Untrusted files: a pixel-count guard runs before any pixel is decoded, so a
decompression bomb is an error row, never a memory blow-up. The result is always
an RGB image in display orientation (EXIF applied), first frame of animations,
alpha composited on white.
"""

from __future__ import annotations

import os
import warnings

from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 150_000_000  # ~12k x 12k; Danbooru's largest legitimate posts fit

# Our own guard replaces Pillow's global one (which warns, then raises on 2x).
Image.MAX_IMAGE_PIXELS = None


class ImageError(Exception):
    """The file is not a usable image; str(exc) is the manifest's `error` text."""


def probe(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int, str]:
    """(width, height, format) from the header only; checks the pixel guard."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            fmt = (im.format or "").lower()
            orientation = im.getexif().get(0x0112, 1) if fmt in ("jpeg", "webp", "png", "tiff") else 1
    except Exception as exc:  # PIL raises many types for junk input
        raise ImageError(f"decode: {_reason(exc)}") from None
    if w * h > max_pixels:
        raise ImageError(f"too many pixels: {w}x{h}")
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    return w, h, fmt


def open_image(
    path: str | os.PathLike,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode to RGB. `draft_size` lets JPEG decode at reduced scale (>= that size)."""
    try:
        im = Image.open(path)
    except Exception as exc:
        raise ImageError(f"decode: {_reason(exc)}") from None
    try:
        w, h = im.size
        if w * h > max_pixels:
            raise ImageError(f"too many pixels: {w}x{h}")
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)
        if draft_size and im.format == "JPEG":
            im.draft("RGB", draft_size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im.load()
        im = ImageOps.exif_transpose(im) or im
        return to_rgb(im)
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"decode: {_reason(exc)}") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """Any mode -> RGB; transparency composited on white."""
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        im = im.point(lambda v: v / 256).convert("L")
    if im.mode in ("LA", "PA"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im, mask=im.getchannel("A"))
        return bg
    if im.mode != "RGB":
        im = im.convert("RGB")
    return im


def _reason(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]
