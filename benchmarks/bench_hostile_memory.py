"""Peak memory on hostile and big files: curate's path vs the naive one, in fresh processes.

1. A ~250 KB PNG declaring 16000x16000 (real zero pixels). curate: `images.probe`,
   `images.open_image`, `images.verify` (guard right after the header). Baseline: what
   probing did before (`Image.open` with every plugin, then `getexif()`, which loads a
   PNG's pixels looking for a late eXIf chunk).
2. A big file hashed for its digest (default 400 MB). curate: `common.digest.file_sha256` (in
   chunks). Baseline: `hashlib.sha256(f.read())`.

Each figure is the child process's own peak RSS (VmHWM, Linux), so the parent's size
never counts. Prints curate and baseline side by side, and their ratio.

    python benchmarks/bench_hostile_memory.py [--hash-mb 400]
"""

from __future__ import annotations

import argparse
import os
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

PEAK = ("import re\n"
        "def peak():\n"
        "    s = open('/proc/self/status').read()\n"
        "    return int(re.search(r'VmHWM:\\s*(\\d+)', s).group(1)) / 1024\n")

PROBE_CURATE = PEAK + """
import sys
from curate.common import decode as images
for fn in (images.probe, images.open_image, images.verify):
    try:
        fn(sys.argv[1])
    except images.ImageError:
        pass
print(peak())
"""

PROBE_BASELINE = PEAK + """
import sys
from PIL import Image
Image.MAX_IMAGE_PIXELS = None
with Image.open(sys.argv[1]) as im:
    im.getexif()
print(peak())
"""

HASH_CURATE = PEAK + """
import sys
from curate.common.digest import file_sha256
file_sha256(sys.argv[1])
print(peak())
"""

HASH_BASELINE = PEAK + """
import hashlib, sys
with open(sys.argv[1], "rb") as f:
    hashlib.sha256(f.read()).hexdigest()
print(peak())
"""


def zeros_png(path: Path, side: int = 16_000) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\0" * (side + 1)
    data = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def peak_mb(script: str, arg: Path) -> float:
    out = subprocess.run([sys.executable, "-c", script, str(arg)], capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hash-mb", type=int, default=400)
    args = ap.parse_args()
    if not Path("/proc/self/status").exists():
        sys.exit("needs Linux (/proc/self/status)")
    with tempfile.TemporaryDirectory() as tmp:
        png, big = Path(tmp) / "zeros_16k.png", Path(tmp) / "big.bin"
        zeros_png(png)
        with open(big, "wb") as f:
            for _ in range(args.hash_mb):
                f.write(os.urandom(1 << 20))
        rows = [
            (f"16000x16000 PNG ({png.stat().st_size // 1024} KB)", peak_mb(PROBE_CURATE, png),
             peak_mb(PROBE_BASELINE, png)),
            (f"sha256 of a {args.hash_mb} MB file", peak_mb(HASH_CURATE, big), peak_mb(HASH_BASELINE, big)),
        ]
    print(f"{'peak RSS (MB)':<34} {'curate':>8} {'baseline':>9} {'ratio':>7}")
    for name, ours, base in rows:
        print(f"{name:<34} {ours:>8.0f} {base:>9.0f} {base / ours:>6.1f}x")


if __name__ == "__main__":
    main()
