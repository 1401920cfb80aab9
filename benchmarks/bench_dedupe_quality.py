"""Near-duplicate quality: precision and recall of duplicate pairs on generated images.

Each source scene gets variants (resize 50-200%, JPEG q60-95, letterbox, 2-5% crop,
subtitle strip, colour jitter) -> the labelled duplicate pairs. Sources come in
pairs that share a layout (same background and composition, other character and
props): distinct images that look alike, the hard negatives. Files go to disk
(PNG, and JPEG for the JPEG variant and every 3rd source) and are hashed the way
`curate dedupe` does. Baseline: imagehash.phash on the fully decoded image, no
border handling, same threshold. Also prints the threshold sweep that chose
dedupe.DEFAULT_THRESHOLD (target at the default: precision >= 0.95, recall >= 0.90).

    python benchmarks/bench_dedupe_quality.py [--sources 48]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from itertools import combinations
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from bench_dedupe_synth import scene, variants  # noqa: E402

from curate.dataset import dedupe  # noqa: E402


def full_phash(path: str) -> int:
    import imagehash

    return dedupe._bits(imagehash.phash(Image.open(path).convert("RGB")))


def write_set(folder: Path, n_sources: int, seed: int):
    rng = np.random.default_rng(seed)
    files, label = [], []
    for k in range(n_sources):
        w = int(rng.integers(640, 1280))
        src = scene(k // 2, k, w, int(w * 9 / 16))  # k//2: two sources share each layout
        items = [("source", src)] + variants(src, rng)
        for name, im in items:
            jpeg = name == "jpeg" or (name == "source" and k % 3 == 0)
            p = folder / f"s{k:03d}_{name}.{'jpg' if jpeg else 'png'}"
            im.save(p, quality=int(rng.integers(60, 96)) if jpeg else None) if jpeg else im.save(p)
            files.append(str(p))
            label.append(k)
    return files, np.array(label)


def score(pred: set, truth: set) -> tuple[float, float]:
    tp = len(pred & truth)
    return tp / max(len(pred), 1), tp / max(len(truth), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sources", type=int, default=48)
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files, label = write_set(Path(tmp), args.sources, args.seed)
        workers = dedupe.default_workers()
        ours = dedupe.parallel_map(dedupe.hash_file, files, workers, "curate hash")
        base = dedupe.parallel_map(full_phash, files, workers, "imagehash.phash")
    ph, dh, colour = (np.array([r[c] for r in ours], np.int64) for c in ("phash", "dhash", "colour"))
    bp = np.array(base, np.int64)
    truth = {(i, j) for i, j in combinations(range(len(files)), 2) if label[i] == label[j]}
    hard = sum(1 for i, j in combinations(range(len(files)), 2)
               if label[i] != label[j] and label[i] // 2 == label[j] // 2)
    print(f"{len(files)} images: {args.sources} sources x (1 + 6 variants); "
          f"{len(truth)} duplicate pairs; {hard} same-layout distinct pairs")

    def pairs(h, t, confirm=False):
        i, j = dedupe.pairs_within(h, t)
        if confirm:  # what `curate dedupe` does: dhash and mean colour must agree too
            keep = dedupe.confirm(dh, colour, i, j)
            i, j = i[keep], j[keep]
        return set(zip(i.tolist(), j.tolist()))

    print("\nthreshold sweep (pairs): precision / recall")
    print(f"{'bits':>5} {'curate (+dhash+colour)':>22} {'curate (phash only)':>22} {'baseline phash':>18}")
    best = None
    for t in range(4, 17):
        a = score(pairs(ph, t, True), truth)
        b = score(pairs(ph, t), truth)
        c = score(pairs(bp, t), truth)
        print(f"{t:>5} {a[0]:>11.3f} / {a[1]:.3f} {b[0]:>11.3f} / {b[1]:.3f} {c[0]:>9.3f} / {c[1]:.3f}")
        f1 = 2 * a[0] * a[1] / max(a[0] + a[1], 1e-9)
        if a[0] >= 0.95 and (best is None or f1 > best[1]):
            best = (t, f1)
    t = dedupe.DEFAULT_THRESHOLD
    a, c = score(pairs(ph, t, True), truth), score(pairs(bp, t), truth)
    print(f"\nat the default threshold {t} bits (confirmed: dhash <= {dedupe.DHASH_CONFIRM} bits, "
          f"mean colour <= {dedupe.COLOUR_CONFIRM} per channel):")
    print(f"  curate:   precision {a[0]:.3f}  recall {a[1]:.3f}   (target >= 0.95 / >= 0.90)")
    print(f"  baseline: precision {c[0]:.3f}  recall {c[1]:.3f}   (imagehash.phash, full decode, no borders)")
    print(f"  ratio curate/baseline: precision {a[0] / max(c[0], 1e-9):.2f}x  recall {a[1] / max(c[1], 1e-9):.2f}x")
    if best:
        print(f"  best F1 with precision >= 0.95 in this run: {best[0]} bits")
    per = {}
    for name in ("resize", "jpeg", "letterbox", "crop", "subtitle", "jitter"):
        idx = [k for k, f in enumerate(files) if f.endswith(f"_{name}.png") or f.endswith(f"_{name}.jpg")]
        srcs = [k for k, f in enumerate(files) if "_source." in f]
        d = [int(dedupe.hamming(ph[s], ph[v])) for s, v in zip(srcs, idx)]
        db = [int(dedupe.hamming(bp[s], bp[v])) for s, v in zip(srcs, idx)]
        per[name] = (np.mean(d), np.max(d), np.mean(db), np.max(db))
    print("\nphash distance source -> variant (curate mean/max | baseline mean/max):")
    for name, (m, x, mb, xb) in per.items():
        print(f"  {name:<10} {m:5.1f} / {x:2d}   | {mb:5.1f} / {xb:2d}")


if __name__ == "__main__":
    main()
