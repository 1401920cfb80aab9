"""curate.common.jpeg_rows: a sequential JPEG's top rows decoded alone, on drawn files."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from curate.common.decode import MAX_METADATA_SEGMENTS, ImageError
from curate.common.jpeg_rows import HEAD, frame, strip_header, top_strips


def busy(seed: int, w: int = 640, h: int = 480) -> Image.Image:
    """Outlined shapes everywhere, top rows included."""
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (w, h), (200, 220, 240))
    d = ImageDraw.Draw(im)
    for _ in range(80):
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(8, 60)
        d.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 256, 3)),
                  outline=(10, 10, 10), width=2)
    return im


def whole_grey(path) -> np.ndarray:
    im = Image.open(path)
    im.draft("L", None)
    return np.asarray(im.convert("L"))


@pytest.mark.parametrize("subsampling, mcu", [(2, 16), (0, 8)])  # 4:2:0 and 4:4:4
def test_strips_are_the_top_rows_of_the_whole_decode(tmp_path, subsampling, mcu):
    p = tmp_path / "a.jpg"
    busy(1).save(p, quality=90, subsampling=subsampling)
    full = whole_grey(p)
    strips = [s for s, height in top_strips(p, (20, 100, 10_000, 20_000)) if height == 480]
    assert [s.height for s in strips] == [-(-20 // mcu) * mcu, -(-100 // mcu) * mcu, 480]  # stops at the whole
    for s in strips:
        assert s.mode == "L" and s.width == 640
        assert np.abs(np.asarray(s, np.int16) - full[: s.height]).max() <= 1


def test_other_files_yield_nothing(tmp_path):
    """Progressive JPEGs (their first scan is the whole picture, coarse) and other formats are
    decoded whole by the caller. Public report of the kind: python-pillow/Pillow#2717 (a cut-off
    progressive JPEG decodes completely black: its first bytes do not hold the top rows)."""
    im = busy(2)
    im.save(tmp_path / "p.jpg", quality=90, progressive=True)
    im.save(tmp_path / "a.png")
    assert list(top_strips(tmp_path / "p.jpg", (64,))) == []
    assert list(top_strips(tmp_path / "a.png", (64,))) == []
    assert strip_header(b"\xff\xd8\xff\xc2\x00\x11", 64) is None


def test_a_header_longer_than_the_first_read(tmp_path):
    """Large ICC / XMP / comment segments before the scan (real camera and editor files carry
    hundreds of KB) push the frame header past the first read."""
    p = tmp_path / "meta.jpg"
    busy(3).save(p, quality=90, icc_profile=b"\0" * (HEAD + 50_000))
    ((strip, _),) = top_strips(p, (64,))
    assert strip.height == 64 and np.abs(np.asarray(strip, np.int16) - whole_grey(p)[:64]).max() <= 1


def test_a_cut_off_scan_gives_its_top_then_a_clear_error(tmp_path):
    p = tmp_path / "cut.jpg"
    busy(4).save(p, quality=90)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    strips = top_strips(p, (32, 10_000))
    assert next(strips)[0].height == 32  # the top rows are all there
    with pytest.raises(ImageError, match="broken JPEG scan"):
        next(strips)


def test_decodes_guards_come_first(tmp_path):
    """The pixel guard and the metadata guard (curate.common.decode) run in the header walk,
    before Pillow parses or decodes anything."""
    p = tmp_path / "big.jpg"
    busy(5).save(p, quality=90)
    with pytest.raises(ImageError, match="too many pixels"):
        list(top_strips(p, (64,), max_pixels=1000))
    data = p.read_bytes()
    comments = b"".join(b"\xff\xfe\x00\x04hi" for _ in range(MAX_METADATA_SEGMENTS + 1))
    (tmp_path / "meta.jpg").write_bytes(data[:2] + comments + data[2:])
    with pytest.raises(ImageError, match="too much metadata"):
        list(top_strips(tmp_path / "meta.jpg", (64,)))
    assert frame(data[:100]) == ()  # a header cut off: read on
