"""Border trim accuracy: recovered content box vs the truth on generated frames.

Frames: CG-like scenes letterboxed/pillarboxed into another aspect, or framed by a
uniform border, in black, white, grey or a random flat colour, half of them
JPEG-compressed (q 60-95); plus clean frames that must stay untouched (sky
gradients, dark scenes). Figure: share of frames whose box is within 2 px on every
side (target: all of them). Baseline: the usual Pillow recipe (difference from the
corner colour, getbbox), same frames.

    python benchmarks/bench_borders.py [--frames 120]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops

sys.path.insert(0, str(Path(__file__).parent))
from bench_dedupe_synth import jpeg, letterbox, scene  # noqa: E402

from curate import borders  # noqa: E402

# (content aspect, frame aspect): what video and game captures really do; 21:9 in a
# 9:16 phone frame would leave < 30% of the height, which the guard refuses on purpose.
PAIRS = [((16, 9), (4, 3)), ((16, 9), (1, 1)), ((16, 9), (9, 16)), ((4, 3), (16, 9)),
         ((4, 3), (1, 1)), ((21, 9), (16, 9)), ((21, 9), (4, 3)), ((1, 1), (16, 9))]
COLOURS = [(0, 0, 0), (255, 255, 255), (128, 128, 128)]


def baseline(im: Image.Image) -> tuple:
    """Stack Overflow's trim: difference from the corner pixel, thresholded, getbbox."""
    bg = Image.new(im.mode, im.size, im.getpixel((0, 0)))
    diff = ImageChops.difference(im, bg)
    diff = ImageChops.add(diff, diff, 2.0, -24)
    return diff.getbbox() or (0, 0, im.width, im.height)


def frames(n: int, rng):
    for k in range(n):
        cw = int(rng.integers(480, 1280))
        ca, fa = PAIRS[int(rng.integers(0, len(PAIRS)))]
        content = scene(k, k, cw, int(cw * ca[1] / ca[0]))
        colour = COLOURS[k % 3] if k % 4 else tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = k % 5
        if kind == 4:  # clean frame: nothing to trim
            im, box = content, (0, 0, content.width, content.height)
        elif kind == 3:  # uniform border all around
            b = int(rng.integers(4, 40))
            im = Image.new("RGB", (content.width + 2 * b, content.height + 2 * b), colour)
            im.paste(content, (b, b))
            box = (b, b, b + content.width, b + content.height)
        else:
            im, box = letterbox(content, colour, fa)
        if k % 2:
            im = jpeg(im, int(rng.integers(60, 96)))
        yield im, box, kind == 4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=120)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    res = {"curate.borders": [], "baseline (ImageChops getbbox)": []}
    clean_ok = {k: 0 for k in res}
    t = {k: 0.0 for k in res}
    n_clean = 0
    for im, truth, clean in frames(args.frames, rng):
        n_clean += clean
        for name, fn in (("curate.borders", borders.detect), ("baseline (ImageChops getbbox)", baseline)):
            t0 = time.perf_counter()
            box = fn(im)
            t[name] += time.perf_counter() - t0
            err = max(abs(a - b) for a, b in zip(box, truth))
            res[name].append(err)
            clean_ok[name] += clean and err == 0
    print(f"border trim on {args.frames} generated frames ({n_clean} clean), box error = max over 4 sides")
    print(f"{'method':<32}{'within 2 px':>12}{'mean err px':>13}{'max err px':>12}{'clean kept':>12}{'ms/frame':>10}")
    within = {}
    for name, errs in res.items():
        e = np.array(errs)
        within[name] = (e <= 2).mean()
        print(f"{name:<32}{within[name]:>12.1%}{e.mean():>13.2f}{e.max():>12d}"
              f"{clean_ok[name]:>7d}/{n_clean:<4d}{1000 * t[name] / len(e):>10.1f}")
    a, b = within.values()
    print(f"ratio (within-2px share, curate / baseline): {a / max(b, 1e-9):.2f}x   target: curate 100%")


if __name__ == "__main__":
    main()
