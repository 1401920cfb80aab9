"""Issue 26.6: resource bombs under the header guard. A tiny WebP declaring 144 megapixels,
a JPEG with a thousand metadata segments, and a TIFF that must reach every route."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from curate.common import decode as images
from curate.common.decode import ImageError

CURATE = str(Path(sys.executable).parent / "curate")


def webp_vp8l_header(w: int, h: int) -> bytes:
    """A lossless WebP whose header declares w x h and whose data is a few zero bytes."""
    bits = (w - 1) | ((h - 1) << 14)
    payload = b"\x2f" + struct.pack("<I", bits) + b"\x00" * 5
    body = b"WEBP" + b"VP8L" + struct.pack("<I", len(payload)) + payload
    return b"RIFF" + struct.pack("<I", len(body)) + body


def jpeg_with_segments(n: int, segment: bytes = b"Exif\x00\x00" + b"\x00" * 200) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (10, 120, 200)).save(buf, "JPEG")
    data = buf.getvalue()
    app1 = b"\xff\xe1" + struct.pack(">H", len(segment) + 2) + segment
    return data[:2] + app1 * n + data[2:]


@pytest.fixture
def bomb(tmp_path) -> Path:
    p = tmp_path / "bomb.webp"
    p.write_bytes(webp_vp8l_header(12000, 12000))  # 144 MP: under the pixel guard, ~2.4 GB to decode
    return p


def test_a_tiny_webp_declaring_144_megapixels_is_refused_from_its_header(bomb):
    assert bomb.stat().st_size < 40
    for check in (images.probe, images.open_image, images.verify, images.stored_form):
        with pytest.raises(ImageError, match=r"too many pixels: 12000x12000 webp \(~2\.\d GiB to decode"):
            check(bomb)


def test_the_webp_bomb_stays_under_the_per_worker_bound_in_ingest(bomb, tmp_path):
    """Through the real CLI in its own process: an error row, and the process's peak memory
    stays far under the 2 GiB per worker that the default worker count assumes."""
    out = tmp_path / "m.parquet"
    script = ("import resource, sys\nfrom curate.cli import app\n"
              "try:\n    app([\"ingest\", sys.argv[1], \"--out\", sys.argv[2], \"--workers\", \"1\"])\n"
              "except SystemExit:\n    pass\n"
              # VmHWM: this process's own peak (ru_maxrss keeps a forking parent's size across exec)
              "import re\nhwm = int(re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read()).group(1))\n"
              "print(hwm + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    r = subprocess.run([sys.executable, "-c", script, str(bomb.parent), str(out)], capture_output=True, text=True)
    peak_kib = int(r.stdout.strip().splitlines()[-1])
    assert peak_kib < 1 << 20, f"peak {peak_kib >> 10} MiB"  # 1 GiB: far under 2 GiB, far over the ~200 MB a run takes
    from curate import manifest
    row = manifest.read(out)[0].to_pylist()[0]
    assert row["error"].startswith("ingest: too many pixels: 12000x12000 webp")


def test_a_raised_guard_raises_the_memory_bound_with_it(tmp_path):
    p = tmp_path / "big.webp"
    p.write_bytes(webp_vp8l_header(12000, 12000))
    assert images.probe(p, max_pixels=400_000_000)[:2] == (12000, 12000)  # the user's own choice


# Public report: python-pillow/Pillow #7495 / PR #7496 (multiple EXIF markers, against the spec,
# are concatenated since Pillow 10.2; each more is a copy of all before: quadratic in their number).
def test_a_jpeg_with_a_thousand_exif_segments_is_an_error_before_pillow_parses_them(tmp_path):
    p = tmp_path / "exif.jpg"
    p.write_bytes(jpeg_with_segments(1000))
    for check in (images.probe, images.open_image, images.verify, images.stored_form, images.jpeg_tables):
        with pytest.raises(ImageError, match=r"too much metadata \(over 100 segments"):
            check(p)


def test_a_jpeg_with_two_exif_markers_like_pillow_7495_still_opens(tmp_path):
    p = tmp_path / "two.jpg"
    p.write_bytes(jpeg_with_segments(2))
    assert images.open_image(p).size == (32, 24)
    split = tmp_path / "extended_xmp.jpg"  # 99 full segments (6.4 MB of extended XMP): within the bounds
    split.write_bytes(jpeg_with_segments(99, b"http://ns.adobe.com/xmp/extension/\x00" + b"x" * 65000))
    assert images.probe(split)[:2] == (32, 24)


def test_a_tiff_reaches_export_converted_to_png(tmp_path):
    """ingest accepts TIFF and train reads it; export used to leave it out silently."""
    from curate import manifest
    from curate.dataset import export

    folder = tmp_path / "cg"
    folder.mkdir()
    Image.new("RGB", (64, 48), (200, 30, 40)).save(folder / "a.tif")
    Image.new("RGB", (64, 48), (20, 130, 40)).save(folder / "b.png")
    m = tmp_path / "m.parquet"
    r = subprocess.run([CURATE, "ingest", str(folder), "--out", str(m), "--workers", "1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    table, meta = manifest.read(m)
    manifest.write(manifest.with_column(table, "caption", ["solo, red", "solo, green"]), m, meta)
    s = export.run([m], tmp_path / "out", link="copy")
    assert sum(n for _, n, _ in s.subsets) == 2 and not s.skipped
    pngs = sorted((tmp_path / "out").rglob("*.png"))
    assert len(pngs) == 2 and not list((tmp_path / "out").rglob("*.tif"))
    assert s.normalized.get("tiff converted to png") == 1
    assert {Image.open(p).getpixel((5, 5)) for p in pngs} == {(200, 30, 40), (20, 130, 40)}
    assert json.loads((tmp_path / "out" / export.MARKER).read_text())["files"]
