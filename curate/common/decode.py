"""Safe image decoding, used by every stage that opens an image.

Files are untrusted. Every open goes through `_open`: only the whitelisted
formats (OPEN_FORMATS: the still images users bring) reach a Pillow plugin, so a
PostScript file (even named .jpg) never reaches Ghostscript; anything else is
`unsupported format`. The pixel-count guard runs right after the header is read,
before EXIF or any pixel is decoded, so a decompression bomb is an error row,
never a memory blow-up. It bounds pixels and memory both: a decode may take at most
`decode_budget(max_pixels)` bytes (DECODE_BUDGET, under the 2 GiB per worker that
pool.default_workers assumes, at the default guard), at the measured peak bytes per
pixel of its format (DECODE_BYTES_PER_PIXEL: WebP decodes RGBA twice, ~17 B/px), so a
38-byte WebP declaring 144 megapixels is refused from its header. A JPEG's metadata
segments (EXIF, XMP, ICC, comments) are counted and measured before Pillow parses them
(Pillow's EXIF handling is quadratic in their number): over MAX_METADATA_SEGMENTS or
MAX_METADATA_BYTES is an error row. What a file is comes from its content, never its name. `open_image` always returns
an RGB image in display orientation (EXIF applied), the first frame of an
animation, CMYK / palette / LA / 16-bit converted, alpha composited on
`alpha_background()` (white unless CURATE_ALPHA_BACKGROUND says otherwise).
Every failure is an ImageError whose text is the manifest's `error` value.

    sniff(head) -> kind        what the first bytes are ("jpg", "png", "html", "zip", ...)
    verify(path) -> (w, h, ext)  full decode of a downloaded file; ext from content
    probe(path) -> (w, h, fmt)   header only
    stored_form(path) -> (kind, mode, orientation, alpha)  header only; what a plain reader gets
    open_image(path) -> RGB Image
    save_downscaled(src, dst, max_pixels, ext) -> (w, h)
"""

from __future__ import annotations

import math
import os
import warnings

from PIL import Image, ImageOps, features

DEFAULT_MAX_PIXELS = 150_000_000  # ~12k x 12k; Danbooru's largest legitimate posts fit
# Peak bytes per pixel of open_image (Pillow 11, measured on 36 MP files; RGB is stored
# 4 bytes a pixel, and EXIF transposing or flattening copies it once more)
DECODE_BYTES_PER_PIXEL = {"webp": 17, "png": 10, "avif": 17}
DEFAULT_BYTES_PER_PIXEL = 9
DECODE_BUDGET = (2 << 30) - (256 << 20)  # pool.WORKER_MEMORY less the interpreter's own share
MAX_METADATA_SEGMENTS = 100   # APPn + COM segments of a JPEG (real files: a handful; ICC/XMP split: dozens)
MAX_METADATA_BYTES = 16 << 20

# Our own guard replaces Pillow's global one (which warns, then raises on 2x).
Image.MAX_IMAGE_PIXELS = None

# Pillow format -> stored extension. Only these are accepted as downloads.
FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif"}
if features.check("avif"):
    FORMAT_EXT["AVIF"] = "avif"
_OPEN_FORMATS = [f for f in FORMAT_EXT if f != "MPO"]  # JPEG's opener yields MPO itself
# What any stage may open (ingested folders also hold BMP / TIFF); downloads stay FORMAT_EXT.
OPEN_FORMATS = [*_OPEN_FORMATS, "BMP", "TIFF"]
OPEN_KINDS = {"jpg", "png", "gif", "webp", "bmp", "tiff"} | ({"avif"} if "AVIF" in FORMAT_EXT else set())
IMAGE_EXTS = frozenset(FORMAT_EXT.values()) | {"jpeg"}
# Not images at all: Danbooru ugoira (zip), videos, flash. An error, not a decode attempt.
NOT_IMAGE_EXTS = frozenset({"zip", "mp4", "webm", "swf", "mkv", "mov", "avi", "gz", "rar", "7z", "pdf"})

_MAGIC = [  # (offset, bytes, kind); first match wins
    (0, b"\xff\xd8\xff", "jpg"),
    (0, b"\x89PNG\r\n\x1a\n", "png"),
    (0, b"GIF87a", "gif"),
    (0, b"GIF89a", "gif"),
    (8, b"WEBP", "webp"),
    (4, b"ftypavif", "avif"),
    (4, b"ftypavis", "avif"),
    (4, b"ftyp", "mp4"),
    (0, b"\x1a\x45\xdf\xa3", "webm"),
    (0, b"PK\x03\x04", "zip"),
    (0, b"FWS", "swf"),
    (0, b"CWS", "swf"),
    (0, b"ZWS", "swf"),
    (0, b"%PDF", "pdf"),
    (0, b"\x1f\x8b", "gz"),
    (0, b"BM", "bmp"),
    (0, b"II*\x00", "tiff"),
    (0, b"MM\x00*", "tiff"),
    (0, b"%!PS", "eps"),
    (0, b"\xc5\xd0\xd3\xc6", "eps"),  # DOS EPS binary header
    (0, b"8BPS", "psd"),
    (0, b"\x00\x00\x01\x00", "ico"),
    (0, b"DDS ", "dds"),
    (0, b"\x01\xda", "sgi"),
    (4, b"ftypheic", "heic"),
    (0, b"\x00\x00\x00\x0cjP  ", "jp2"),
]


class ImageError(Exception):
    """The file is not a usable image; str(exc) is the manifest's `error` text."""


def sniff(head: bytes) -> str | None:
    """What the file is, from its first bytes (64 are plenty); None when unknown."""
    for offset, magic, kind in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return kind
    text = head.lstrip()[:15].lower()
    if text.startswith((b"<!doctype", b"<html", b"<head", b"<body", b"<?xml", b"<svg")):
        return "svg" if b"svg" in text else "html"
    if text.startswith((b"{", b"[")):
        return "json"
    return None


def verify(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int, str]:
    """Fully decode (first frame) a file meant to be stored; return display (w, h, ext).

    Only whitelisted formats (FORMAT_EXT) are opened at all, so hostile bytes never
    reach an exotic decoder.
    """
    with open(path, "rb") as f:
        kind = sniff(f.read(64))
    if kind in NOT_IMAGE_EXTS or kind in ("bmp", "tiff", "svg", "eps"):
        raise ImageError(f"unsupported: {kind}")
    if kind == "avif" and "AVIF" not in FORMAT_EXT:
        raise ImageError("unsupported: avif (this Pillow cannot read it)")
    try:
        im = _open(path, max_pixels, _OPEN_FORMATS)
    except ImageError as exc:
        if str(exc).startswith("unsupported format"):
            raise ImageError(f"decode: not an image ({kind})") from None
        raise
    with im:
        w, h = im.size
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                im.load()
            orientation = im.getexif().get(0x0112, 1)
        except Exception as exc:
            raise ImageError(f"decode: {_reason(exc)}") from None
        ext = FORMAT_EXT[im.format]
    return (h, w, ext) if orientation in (5, 6, 7, 8) else (w, h, ext)


def decode_budget(max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """Bytes one decode may take: DECODE_BUDGET, or more when the user raised the guard."""
    return max(DECODE_BUDGET, max_pixels * DEFAULT_BYTES_PER_PIXEL)


def check_pixels(w: int, h: int, kind: str | None, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """The header guard: pixel count, and the memory decoding them would take."""
    if w * h > max_pixels:
        raise ImageError(f"too many pixels: {w}x{h}")
    cost = w * h * DECODE_BYTES_PER_PIXEL.get(kind or "", DEFAULT_BYTES_PER_PIXEL)
    budget = decode_budget(max_pixels)
    if cost > budget:
        raise ImageError(f"too many pixels: {w}x{h} {kind} (~{cost / 2**30:.1f} GiB to decode, "
                         f"over the {budget / 2**30:.2f} GiB one worker may take)")


def metadata_guard(segments: int, size: int) -> None:
    """The limit on a JPEG's metadata segments (APPn, COM) counted so far."""
    if segments > MAX_METADATA_SEGMENTS or size > MAX_METADATA_BYTES:
        raise ImageError(f"decode: too much metadata (over {MAX_METADATA_SEGMENTS} segments "
                         f"or {MAX_METADATA_BYTES >> 20} MiB before the image data)")


def check_jpeg_metadata(path: str | os.PathLike) -> None:
    """Count and measure a JPEG's metadata segments before Pillow parses any (its EXIF
    handling is quadratic in their number: 1,000 segments cost a minute of CPU)."""
    count = size = 0
    try:
        with open(path, "rb") as f:
            if f.read(2) != b"\xff\xd8":
                return
            while True:
                b = f.read(1)
                if not b:
                    return
                if b != b"\xff":
                    return  # not a marker where one belongs: Pillow's decoder says what is wrong
                marker = f.read(1)
                while marker == b"\xff":  # fill bytes
                    marker = f.read(1)
                if not marker or marker == b"\xda" or marker == b"\xd9":  # start of scan / end: done
                    return
                if marker == b"\x01" or b"\xd0" <= marker <= b"\xd7":
                    continue  # no length
                raw = f.read(2)
                if len(raw) < 2:
                    return
                length = int.from_bytes(raw, "big")
                if b"\xe0" <= marker <= b"\xef" or marker == b"\xfe":
                    count += 1
                    size += length
                    metadata_guard(count, size)
                f.seek(max(0, length - 2), os.SEEK_CUR)
    except OSError as exc:
        raise ImageError(f"cannot read file: {exc.strerror or exc}") from None


def probe(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int, str]:
    """(width, height, format) from the header only; checks the pixel guard."""
    size = _webp_size(path)
    if size and min(size) > 0:  # a zero side is a broken header: Pillow's opener says why
        check_pixels(size[0], size[1], "webp", max_pixels)
        return size[0], size[1], "webp"
    with _open(path, max_pixels) as im:
        w, h = im.size
        fmt = (im.format or "").lower()
        try:
            orientation = _header_orientation(im)
        except Exception as exc:  # PIL raises many types for junk input
            raise ImageError(f"decode: {_reason(exc)}") from None
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    return w, h, fmt


def _webp_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """A still WebP's size from its first chunk, or None (not WebP, animated, EXIF, odd).

    Pillow's WebP opener sets up its animation decoder even for a header read (~3 ms a
    file, most of a digest-verified download's CPU); the first chunk holds the size.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(30)
    except OSError:
        return None
    if len(head) < 30 or head[:4] != b"RIFF" or head[8:12] != b"WEBP":
        return None
    chunk = head[12:16]
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":  # lossy key frame start code
        return int.from_bytes(head[26:28], "little") & 0x3FFF, int.from_bytes(head[28:30], "little") & 0x3FFF
    if chunk == b"VP8L" and head[20] == 0x2F:  # lossless signature
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and not head[20] & 0x0A:  # extended, neither animated (0x02) nor EXIF (0x08)
        return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
    return None


def _header_orientation(im: Image.Image) -> int:
    """EXIF orientation from what the header holds; never decodes pixels
    (PNG's getexif() would load the whole image to look for a late eXIf chunk)."""
    if im.format == "PNG":
        raw = im.info.get("exif")
        if not raw:
            return 1
        exif = Image.Exif()
        exif.load(raw)
        return exif.get(0x0112, 1)
    if im.format in ("JPEG", "MPO", "WEBP", "TIFF"):
        return im.getexif().get(0x0112, 1)
    return 1


def _open(path: str | os.PathLike, max_pixels: int, formats: list[str] = OPEN_FORMATS) -> Image.Image:
    """Open (header only) with the whitelisted plugins, then the pixel guard; nothing decoded yet."""
    try:
        with open(path, "rb") as f:
            kind = sniff(f.read(64))
    except OSError as exc:
        raise ImageError(f"cannot read file: {exc.strerror or exc}") from None
    if kind is None:  # no image we know of (garbage, a cut-off header): no decoder tries it
        raise ImageError("decode: not an image")
    if kind not in OPEN_KINDS:
        raise ImageError(f"unsupported format: {kind}")
    if kind == "webp":  # the size from the first chunk, before Pillow's opener reads the file
        size = _webp_size(path)
        if size and min(size) > 0:
            check_pixels(size[0], size[1], kind, max_pixels)
    elif kind == "jpg":
        check_jpeg_metadata(path)
    Image.init()  # register every plugin, or `formats=` trips over unloaded ones
    try:
        im = Image.open(path, formats=formats)
    except Exception as exc:  # PIL raises many types for junk input
        raise ImageError(f"decode: {_reason(exc)}") from None
    w, h = im.size
    try:
        check_pixels(w, h, kind, max_pixels)
    except ImageError:
        im.close()
        raise
    return im


def open_image(
    path: str | os.PathLike,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Decode to RGB. `draft_size` lets JPEG decode at reduced scale (>= that size)."""
    im = _open(path, max_pixels)  # at frame 0: n_frames would decode every frame of a GIF
    try:
        if draft_size and im.format in ("JPEG", "MPO"):
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
    """Any mode -> RGB; transparency composited on alpha_background(), 16-bit scaled to 8."""
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif im.mode in ("L", "RGB") and "transparency" in im.info:  # tRNS colour key
        im = im.convert("RGBA")
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        im = im.point(lambda v: v / 256).convert("L")  # plain convert would clip, not scale
    elif im.mode == "F":
        im = im.point(lambda v: v * 255).convert("L")
    if im.mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        bg = Image.new("RGB", im.size, alpha_background())
        bg.paste(im, mask=im.getchannel("A"))
        return bg
    if im.mode != "RGB":
        im = im.convert("RGB")  # CMYK, 1, L, YCbCr, LAB, HSV
    return im


ALPHA_BACKGROUND_ENV = "CURATE_ALPHA_BACKGROUND"
WHITE = (255, 255, 255)


def parse_colour(text: str) -> tuple[int, int, int] | None:
    """'#rrggbb' or 'rrggbb' -> (r, g, b); None when it is not that."""
    text = text.strip().removeprefix("#")
    if len(text) != 6:
        return None
    try:
        return tuple(bytes.fromhex(text))
    except ValueError:
        return None


def alpha_background() -> tuple[int, int, int]:
    """The one colour transparency is flattened on: by the tagger, crop, export and training
    alike, so every stage sees the same pixels. White (what the WD taggers were trained on)
    unless env CURATE_ALPHA_BACKGROUND = #rrggbb; export and train refuse a malformed value."""
    return parse_colour(os.environ.get(ALPHA_BACKGROUND_ENV, "")) or WHITE


def stored_form(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[str, str, int, bool]:
    """(content kind, Pillow mode, EXIF orientation, has alpha) from the header, no pixels
    decoded: what a reader that applies neither EXIF orientation nor alpha compositing
    (sd-scripts: open + convert("RGB")) would get wrong. Whitelisted formats only."""
    with open(path, "rb") as f:
        kind = sniff(f.read(64))
    if kind not in ("jpg", "png", "gif", "webp", "avif", "bmp", "tiff") or (kind == "avif" and "AVIF" not in FORMAT_EXT):
        raise ImageError(f"unsupported: {kind}")
    with _open(path, max_pixels, _OPEN_FORMATS + ["BMP", "TIFF"]) as im:  # the guard before getexif (PNG: a load)
        try:
            mode = im.mode
            orientation = im.getexif().get(0x0112, 1)
            alpha = bool({"A", "a"} & set(im.getbands())) or "transparency" in im.info
        except Exception as exc:
            raise ImageError(f"decode: {_reason(exc)}") from None
    return kind, mode, orientation if isinstance(orientation, int) else 1, alpha


def fit_pixels(w: int, h: int, max_pixels: int) -> tuple[int, int]:
    """Largest (w, h) with the same aspect ratio and w*h <= max_pixels."""
    if w * h <= max_pixels:
        return w, h
    scale = math.sqrt(max_pixels / (w * h))
    nw, nh = max(1, int(w * scale)), max(1, int(h * scale))
    return nw, nh


_SAVE = {  # stored extension -> (Pillow format, save options); lossless stays lossless
    "jpg": ("JPEG", {"quality": 95, "subsampling": 0}),
    "png": ("PNG", {"compress_level": 6}),
    "webp": ("WEBP", {"quality": 95, "method": 4}),
}
DOWNSCALED_EXT = {"jpg": "jpg", "png": "png", "gif": "png", "webp": "webp", "avif": "webp"}


def save_downscaled(src, dst, max_pixels: int, ext: str, guard: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Decode `src`, resize (Lanczos) to fit `max_pixels`, save to `dst` as DOWNSCALED_EXT[ext].

    The result is RGB in display orientation (no EXIF rotation left to apply).
    """
    with _open(src, guard) as head:
        w, h = head.size
    tw, th = fit_pixels(w, h, max_pixels)
    im = open_image(src, max_pixels=guard, draft_size=(tw, th))
    if im.size[0] * im.size[1] > max_pixels:
        im = im.resize(fit_pixels(*im.size, max_pixels), Image.Resampling.LANCZOS, reducing_gap=3.0)
    fmt, opts = _SAVE[DOWNSCALED_EXT[ext]]
    im.save(dst, fmt, **opts)
    return im.size


def _reason(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:200]


def jpeg_tables(path: str | os.PathLike) -> dict | None:
    """A JPEG's quantization tables from its header, no pixels decoded (None for any
    other file): how lossy it was saved. The JPEG plugin only."""
    with open(path, "rb") as f:
        if sniff(f.read(64)) != "jpg":
            return None
    check_jpeg_metadata(path)
    Image.init()
    try:
        with Image.open(path, formats=["JPEG"]) as im:
            return dict(getattr(im, "quantization", None) or {}) or None
    except Exception as exc:
        raise ImageError(f"decode: {_reason(exc)}") from None
