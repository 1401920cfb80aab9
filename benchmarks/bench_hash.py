"""Hashing throughput on 6 MP JPEGs: curate's hash vs imagehash.phash on a full decode.

curate (what `curate dedupe` runs per file): read + sha256 of the bytes, JPEG draft
decode (~1/8 scale), border detection, phash + dhash + mean colour inside the borders,
the mirrored phash + dhash (from the same DCT and grid) and the sharpness (issue 27).
phash is imagehash's bit for bit, computed as one matrix product (no scipy, no
imagehash import in the worker processes: with many workers that import was most of
a worker's start).
Baseline: Image.open(...).convert("RGB") at full size, then imagehash.phash.
Same files, same process pool, same number of workers (all cores). Also the mean
bit difference between the two phashes of each file (target: a few bits).

    python benchmarks/bench_hash.py [--files 48]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_dedupe_synth import scene  # noqa: E402

from curate.dataset import dedupe  # noqa: E402


def full_phash(path: str) -> int:
    import imagehash
    from PIL import Image

    return dedupe._bits(imagehash.phash(Image.open(path).convert("RGB")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=48)
    ap.add_argument("--workers", type=int, default=dedupe.default_workers())
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for k in range(args.files):
            p = Path(tmp) / f"cg{k:03d}.jpg"
            scene(k, k, 3000, 2000).save(p, quality=90)  # 6.0 MP
            files.append(str(p))
        for f in files:  # page cache warm for both
            Path(f).read_bytes()
        dedupe.parallel_map(full_phash, files[:2], args.workers, "warm-up")
        t0 = time.perf_counter()
        dedupe.warm()  # as dedupe.hash_rows does before its pool (timed: part of the whole process)
        ours = dedupe.parallel_map(dedupe.hash_file, files, args.workers, "curate")
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        base = dedupe.parallel_map(full_phash, files, args.workers, "imagehash")
        t_base = time.perf_counter() - t0
    diff = dedupe.hamming([r["phash"] for r in ours], base)
    n = len(files)
    print(f"{n} JPEGs of 3000x2000 (6.0 MP, q90), {args.workers} workers")
    print(f"{'method':<52}{'files/s':>10}{'s total':>10}")
    print(f"{'curate (draft, borders, hashes+mirrored, sharpness)':<52}{n / t_ours:>10.1f}{t_ours:>10.2f}")
    print(f"{'imagehash.phash on full decode (baseline)':<52}{n / t_base:>10.1f}{t_base:>10.2f}")
    print(f"ratio: {t_base / t_ours:.1f}x faster   (target >= 3x)")
    print(f"phash bit difference curate vs full decode: mean {diff.mean():.2f}, "
          f"max {diff.max()}, identical {np.mean(diff == 0):.0%} of files")


if __name__ == "__main__":
    main()
