"""Two measures of how much detail an image really holds, for the keeper (curate.dataset.keeper).

`sharpness(grey)`: Laplacian energy of the small greyscale copy dedupe already hashes,
over that copy's variance (no model, ~1 ms). Only comparable between copies of one size and format, which
is how the keeper uses it: among frames of equal size and quality (video screenshots),
the motion-blurred or mid-transition ones score lower. Measured on drawn frames at
half size: a Gaussian blur of 1 px takes it to 0.28-0.33 of the sharp frame's, 2 px to
0.05, a box (motion) blur of 3 px to 0.05; a subtitle line moves it 3-13%, a 8%
brightness change 1-2%, so the keeper counts within SHARP_TIE (a third) as a tie.

`effective_pixels(path)`: the resolution the picture was drawn at. An upscaled copy holds
no detail above its source's scale, so shrinking it by that factor and enlarging it back
changes almost nothing; a genuine image loses its finest detail already at 1.25x. The
round-trip error at each scale of LADDER is measured relative to the error at REF_SCALE
(the picture's coarse detail), and the largest scale that stays below UPSCALED_BELOW is
the upscale factor. It needs the full-resolution pixels (a JPEG draft decode has no high
frequencies left), so dedupe runs it only on rows of clusters whose copies differ in size.
Measured on drawn CGs, PNG and JPEG q90, Lanczos and bicubic upscales (1.5x, 2x, 3x): a
genuine image is at 0.17-0.20 at 1.25x, an upscale stays at 0.03-0.12 up to its factor.
"""

from __future__ import annotations

import numpy as np

LADDER = (1.25, 1.5, 2.0, 2.5, 3.0, 4.0)
REF_SCALE = 8.0
UPSCALED_BELOW = 0.125
CROP = 768  # the measure is local: a centred crop of at most this side at full resolution


def sharpness(grey: np.ndarray) -> float:
    """Laplacian energy of a 2-D greyscale array relative to its variance (a brighter or
    higher-contrast copy of one frame is not sharper), taken as the upper quartile over an
    8x8 grid of blocks: a subtitle or logo in a few blocks barely moves it, blur moves all."""
    g = np.asarray(grey, np.float32)
    spread = float(g.var()) if g.size else 0.0
    if g.shape[0] < 3 or g.shape[1] < 3 or spread < 1e-6:
        return 0.0
    lap = np.square(4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:])
    bh, bw = lap.shape[0] // 8, lap.shape[1] // 8
    if bh < 2 or bw < 2:
        return float(lap.mean()) / spread
    top, left = (lap.shape[0] - bh * 8) // 2, (lap.shape[1] - bw * 8) // 2  # centred: a mirror image scores alike
    blocks = lap[top: top + bh * 8, left: left + bw * 8].reshape(8, bh, 8, bw).mean(axis=(1, 3))
    return float(np.quantile(blocks, 0.75)) / spread


def _roundtrip(g, s: float) -> float:
    from PIL import Image

    w, h = g.size
    small = g.resize((max(1, round(w / s)), max(1, round(h / s))), Image.Resampling.LANCZOS)
    back = small.resize((w, h), Image.Resampling.LANCZOS)
    return float(np.abs(np.asarray(g, np.float32) - np.asarray(back, np.float32)).mean())


def upscale_factor(im) -> float:
    """How many times the picture was enlarged after it was drawn (1.0: not at all)."""
    g = im.convert("L")
    if g.width > CROP or g.height > CROP:
        left, top = max(0, (g.width - CROP) // 2), max(0, (g.height - CROP) // 2)
        g = g.crop((left, top, left + min(CROP, g.width), top + min(CROP, g.height)))
    if min(g.size) < 4 * REF_SCALE:
        return 1.0
    ref = _roundtrip(g, REF_SCALE)
    if ref <= 0.5:  # flat: nothing to judge detail by
        return 1.0
    factor = 1.0
    for s in LADDER:
        if _roundtrip(g, s) / ref > UPSCALED_BELOW:
            break
        factor = s
    return factor


def effective_pixels(path: str) -> int | None:
    """Worker: the file's pixel count divided by its upscale factor squared (None: unreadable)."""
    from curate.common.decode import ImageError, open_image

    try:
        im = open_image(path)
    except (ImageError, OSError):
        return None
    return int(round(im.width * im.height / upscale_factor(im) ** 2))
