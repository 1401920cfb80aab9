"""curate.common.decode on real files written by Pillow (and a few hand-made hostile ones)."""

import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from curate.common import decode as images
from curate.common.decode import ImageError


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header_bomb(w=100_000, h=100_000) -> bytes:
    """A tiny PNG whose header claims w x h pixels."""
    raw = zlib.compress(b"\0" * 8)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def gradient(w=64, h=48) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.uint8)
    y = np.linspace(0, 255, h, dtype=np.uint8)
    rgb = np.stack([np.tile(x, (h, 1)), np.tile(y[:, None], (1, w)), np.full((h, w), 90, np.uint8)], -1)
    return Image.fromarray(rgb, "RGB")


def exif_rotated_jpeg() -> bytes:
    """Stored 60x20 (left half red); orientation 6 = display rotated 90 degrees clockwise."""
    im = Image.new("RGB", (60, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 30, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(im, "JPEG", exif=exif.tobytes(), quality=95)


def palette_png_transparent() -> bytes:
    im = Image.new("P", (10, 10), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.paste(1, (0, 0, 5, 10))  # left half red, right half index 0 = transparent
    return encode(im, "PNG", transparency=0)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def write(tmp_path, name, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


@pytest.mark.parametrize(
    "head, kind",
    [
        (b"\xff\xd8\xff\xe0....", "jpg"),
        (b"\x89PNG\r\n\x1a\n....", "png"),
        (b"GIF89a....", "gif"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "webp"),
        (b"\x00\x00\x00\x1cftypavif", "avif"),
        (b"\x00\x00\x00\x18ftypisom", "mp4"),
        (b"PK\x03\x04....", "zip"),
        (b"  <!DOCTYPE html><html>", "html"),
        (b"{\"success\": false}", "json"),
        (b"hello", None),
    ],
)
def test_sniff(head, kind):
    assert images.sniff(head) == kind


def test_verify_reports_display_size_and_format_by_content(tmp_path):
    assert images.verify(write(tmp_path, "a.jpg", encode(gradient(), "JPEG"))) == (64, 48, "jpg")
    # PNG bytes behind a .jpg name: the content decides
    assert images.verify(write(tmp_path, "b.jpg", encode(gradient(40, 30), "PNG"))) == (40, 30, "png")
    assert images.verify(write(tmp_path, "c.webp", encode(gradient(50, 20), "WEBP"))) == (50, 20, "webp")
    assert images.verify(write(tmp_path, "d.jpg", exif_rotated_jpeg())) == (20, 60, "jpg")
    assert images.verify(write(tmp_path, "e.gif", animated_gif())) == (8, 8, "gif")


@pytest.mark.parametrize(
    "data, error",
    [
        (b"<!DOCTYPE html><html><body>rate limited</body></html>", "decode: not an image (html)"),
        (b"PK\x03\x04" + b"\0" * 100, "unsupported: zip"),
        (png_header_bomb(), "too many pixels: 100000x100000"),
        (encode(gradient(), "BMP"), "unsupported: bmp"),
        (b"\x00" * 50, "decode: not an image"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "unsupported: eps"),
    ],
)
def test_verify_rejects(tmp_path, data, error):
    with pytest.raises(ImageError) as exc:
        images.verify(write(tmp_path, "x.jpg", data))
    assert str(exc.value).startswith(error)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_truncated_files_are_errors(tmp_path, fmt):
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8))
    data = encode(noisy, fmt)
    p = write(tmp_path, "t", data[: len(data) // 2])
    with pytest.raises(ImageError) as exc:
        images.verify(p)
    assert str(exc.value).startswith("decode: ")
    with pytest.raises(ImageError):
        images.open_image(p)


def test_real_decompression_bomb_is_refused_before_decoding(tmp_path):
    # 13000 x 13000 1-bit: a ~25 KB file that would decode to 169 Mpx (> the 150 Mpx guard)
    p = tmp_path / "bomb.png"
    Image.new("1", (13_000, 13_000)).save(p, "PNG")
    assert p.stat().st_size < 1_000_000
    for fn in (images.verify, images.open_image, images.probe):
        with pytest.raises(ImageError, match="too many pixels: 13000x13000"):
            fn(p)


def test_open_image_cmyk(tmp_path):
    p = write(tmp_path, "cmyk.jpg", encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95))
    im = images.open_image(p)
    assert im.mode == "RGB"
    r, g, b = im.getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60


def test_open_image_applies_exif_orientation(tmp_path):
    im = images.open_image(write(tmp_path, "rot.jpg", exif_rotated_jpeg()))
    assert im.size == (20, 60)
    assert images.probe(tmp_path / "rot.jpg")[:2] == (20, 60)
    # stored left half (red) is the top after a 90-degree clockwise turn
    top, bottom = im.getpixel((10, 5)), im.getpixel((10, 55))
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


def test_open_image_palette_transparency_on_white(tmp_path):
    im = images.open_image(write(tmp_path, "p.png", palette_png_transparent()))
    assert im.mode == "RGB"
    assert im.getpixel((2, 5)) == (255, 0, 0)
    assert im.getpixel((8, 5)) == (255, 255, 255)


def test_open_image_la_and_rgba_composite_on_white(tmp_path):
    la = Image.new("LA", (4, 4), (0, 0))  # fully transparent black
    la.putpixel((0, 0), (0, 255))
    im = images.open_image(write(tmp_path, "la.png", encode(la, "PNG")))
    assert im.getpixel((0, 0)) == (0, 0, 0) and im.getpixel((3, 3)) == (255, 255, 255)
    rgba = Image.new("RGBA", (4, 4), (0, 0, 255, 128))
    r, g, b = images.open_image(write(tmp_path, "rgba.webp", encode(rgba, "WEBP", lossless=True))).getpixel((1, 1))
    assert 120 <= r <= 135 and b == 255


def test_open_image_16_bit_scaled_not_clipped(tmp_path):
    a = np.full((4, 4), 32768, np.uint16)
    a[0, 0] = 65535
    im = images.open_image(write(tmp_path, "g16.png", encode(Image.fromarray(a), "PNG")))
    assert im.mode == "RGB"
    assert im.getpixel((1, 1)) == (128, 128, 128) and im.getpixel((0, 0)) == (255, 255, 255)


def test_open_image_animated_takes_first_frame(tmp_path):
    im = images.open_image(write(tmp_path, "anim.gif", animated_gif()))
    r, g, b = im.getpixel((4, 4))
    assert r > 200 and b < 60


def test_guard_is_configurable(tmp_path):
    p = write(tmp_path, "a.png", encode(gradient(100, 100), "PNG"))
    with pytest.raises(ImageError, match="too many pixels: 100x100"):
        images.open_image(p, max_pixels=9_999)
    with pytest.raises(ImageError, match="too many pixels"):
        images.verify(p, max_pixels=9_999)


@pytest.mark.parametrize("fmt, ext, out", [("JPEG", "jpg", "JPEG"), ("PNG", "png", "PNG"), ("GIF", "gif", "PNG")])
def test_save_downscaled_keeps_aspect_under_the_limit(tmp_path, fmt, ext, out):
    src = write(tmp_path, "big", encode(gradient(400, 200), fmt))
    w, h = images.save_downscaled(src, tmp_path / "small", 20_000, ext)
    assert w * h <= 20_000 and abs(w / h - 2) < 0.02
    with Image.open(tmp_path / "small") as im:
        assert im.size == (w, h) and im.format == out


def test_fit_pixels():
    assert images.fit_pixels(100, 50, 10_000) == (100, 50)
    w, h = images.fit_pixels(4000, 6000, 1024 * 1024)
    assert w * h <= 1024 * 1024 and (w, h) == (836, 1254)


def test_avif_is_accepted_when_pillow_reads_it(tmp_path):
    from PIL import features

    if not features.check("avif"):
        pytest.skip("this Pillow has no AVIF support")
    p = write(tmp_path, "a.avif", encode(gradient(32, 16), "AVIF", quality=80))
    assert images.sniff(p.read_bytes()[:64]) == "avif"
    assert images.verify(p) == (32, 16, "avif")


def eps_file() -> bytes:
    return (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"
            b"newpath 0 0 moveto 10 10 lineto stroke showpage\n%%EOF\n")


@pytest.mark.parametrize("name", ["evil.eps", "evil.jpg", "evil"])
def test_postscript_never_reaches_pillows_eps_plugin(tmp_path, name):
    p = write(tmp_path, name, eps_file())
    with Image.open(p) as im:  # what an open without the whitelist would do: EPS -> Ghostscript
        assert im.format == "EPS"
    for fn in (images.open_image, images.probe):
        with pytest.raises(ImageError, match="^unsupported format: eps$"):
            fn(p)
    with pytest.raises(ImageError, match="^unsupported: eps$"):
        images.verify(p)
    with pytest.raises(ImageError, match="^unsupported format: eps$"):
        images.save_downscaled(p, tmp_path / "out.png", 10_000, "png")


@pytest.mark.parametrize("fmt, error", [("ICO", "unsupported format: ico"), ("SGI", "unsupported format: sgi"),
                                        ("DDS", "unsupported format: dds"), ("PSD", "unsupported format: psd"),
                                        ("PCX", "decode: not an image"), ("TGA", "decode: not an image"),
                                        ("PPM", "decode: not an image")])
def test_formats_outside_the_whitelist_never_reach_their_plugin(tmp_path, fmt, error):
    if fmt == "PSD":  # Pillow cannot write PSD: the header is enough to be recognised
        data = b"8BPS\x00\x01" + b"\x00" * 6 + struct.pack(">HIIHH", 3, 16, 16, 8, 3) + b"\x00" * 64
    else:
        data = encode(gradient(16, 16), fmt)
    p = write(tmp_path, "x.png", data)
    with Image.open(p) as im:
        assert im.format == fmt  # Pillow itself would open it
    for fn in (images.open_image, images.probe):
        with pytest.raises(ImageError) as exc:
            fn(p)
        assert str(exc.value) == error


@pytest.mark.parametrize("fmt", ["BMP", "TIFF"])
def test_bmp_and_tiff_open_for_local_folders(tmp_path, fmt):
    p = write(tmp_path, "x.img", encode(gradient(40, 30), fmt))
    assert images.probe(p) == (40, 30, fmt.lower())
    assert images.open_image(p).size == (40, 30)


@pytest.fixture(scope="module")
def zeros_png_16k(tmp_path_factory) -> str:
    """A ~250 KB PNG of 16000x16000 real (all-zero) grey pixels: decoding it takes 256 MB."""
    side = 16_000
    z = zlib.compressobj(9)
    row = b"\0" * (side + 1)
    data = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    p = tmp_path_factory.mktemp("bomb") / "zeros.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return str(p)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="measures peak memory in /proc (Linux)")
def test_pixel_guard_comes_before_any_decode(zeros_png_16k):
    """Peak memory of a fresh process that tries every entry point on the file stays far
    below the 256 MB a decode (or PNG's getexif(), which loads) would take."""
    import subprocess
    import sys

    script = (
        "import re, sys\n"
        "from curate.common import decode as images\n"
        "for fn in (images.probe, images.open_image, images.verify, images.stored_form):\n"
        "    try:\n"
        "        fn(sys.argv[1])\n"
        "    except images.ImageError as e:\n"
        "        print(e)\n"
        "status = open('/proc/self/status').read()  # VmHWM: this process's peak, not its parent's\n"
        "print(int(re.search(r'VmHWM:\\s*(\\d+)', status).group(1)) // 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", script, zeros_png_16k], capture_output=True, text=True,
                         check=True).stdout.split("\n")
    assert out[:4] == ["too many pixels: 16000x16000"] * 4
    assert int(out[4]) < 150, f"peak RSS {out[4]} MB: something decoded before the guard"
    # the same file under a guard that lets it through does decode: the measure can see it
    script2 = script.replace("fn(sys.argv[1])", "fn(sys.argv[1], max_pixels=300_000_000)")
    out = subprocess.run([sys.executable, "-c", script2, zeros_png_16k], capture_output=True, text=True,
                         check=True).stdout.split("\n")
    assert int(out[-2]) > 250


def _patched(data: bytes, offset: int, fmt: str, *values) -> bytes:
    return data[:offset] + struct.pack(fmt, *values) + data[offset + struct.calcsize(fmt):]


def _webp_lossless_claiming(w: int, h: int) -> bytes:
    """VP8L keeps width-1 and height-1 in 14 bits each, at byte 21 (after the 0x2f signature)."""
    d = encode(gradient(8, 8), "WEBP", lossless=True)
    bits = int.from_bytes(d[21:25], "little") & ~((1 << 28) - 1) | (w - 1) | (h - 1) << 14
    return d[:21] + bits.to_bytes(4, "little") + d[25:]


@pytest.mark.parametrize("name, data", [
    ("bmp", lambda: _patched(encode(gradient(8, 8), "BMP"), 18, "<ii", 40_000, 40_000)),
    ("gif", lambda: _patched(encode(gradient(8, 8), "GIF"), 6, "<HH", 65_535, 65_535)),
    ("webp", lambda: _webp_lossless_claiming(16_384, 16_384)),
])
def test_header_bombs_of_every_whitelisted_format_stop_at_the_guard(tmp_path, name, data):
    p = write(tmp_path, f"bomb.{name}", data())
    for fn in (images.probe, images.open_image):
        with pytest.raises(ImageError, match="^too many pixels: "):
            fn(p, max_pixels=1_000_000)


@pytest.mark.parametrize("save", [{"lossless": True}, {"quality": 80}, {"quality": 80, "exif": "orientation 1"},
                                  {"quality": 80, "mode": "RGBA"}, {"save_all": True, "frames": 3}])
@pytest.mark.parametrize("size", [(1, 1), (17, 3), (640, 480), (16383, 2)])
def test_probe_reads_webp_sizes_as_pillow_does(tmp_path, save, size):
    """probe reads a still WebP's size from its first chunk (fast path); the answer is
    Pillow's, and EXIF / animated files still go through Pillow for orientation."""
    save = dict(save)
    mode, frames = save.pop("mode", "RGB"), save.pop("frames", 1)
    if "exif" in save:
        exif = Image.Exif()
        exif[0x0112] = 1
        save["exif"] = exif.tobytes()
    pics = [Image.new(mode, size, (i * 40, 2, 3)) for i in range(frames)]
    path = tmp_path / "x.webp"
    pics[0].save(path, "WEBP", append_images=pics[1:], **save)
    with Image.open(path) as im:
        assert images.probe(path) == (*im.size, "webp")
    with pytest.raises(ImageError, match="too many pixels"):
        images.probe(path, max_pixels=size[0] * size[1] - 1)


def test_probe_webp_fast_path_refuses_a_declared_bomb(tmp_path):
    vp8l = b"VP8L" + (5).to_bytes(4, "little") + b"\x2f" + (0x3FFF | 0x3FFF << 14).to_bytes(4, "little")
    path = tmp_path / "bomb.webp"
    path.write_bytes(b"RIFF" + (len(vp8l) + 4).to_bytes(4, "little") + b"WEBP" + vp8l + b"\0" * 16)
    with pytest.raises(ImageError, match="too many pixels: 16384x16384"):
        images.probe(path, max_pixels=100_000_000)


def test_probe_of_a_webp_declaring_a_zero_side_is_an_error(tmp_path):
    """A lossy WebP whose key frame says width 0: the fast path returned (0, 30); Pillow refuses it."""
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (9, 9, 9)).save(buf, "WEBP", quality=80)
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"VP8 " and data[23:26] == b"\x9d\x01\x2a"
    data[26:28] = (0).to_bytes(2, "little")
    p = write(tmp_path, "zero.webp", bytes(data))
    for fn in (images.probe, images.open_image):
        with pytest.raises(ImageError, match="^decode: "):
            fn(p)
