"""Two measures of how much detail an image really holds, for the keeper (curate.dataset.keeper).

`sharpness(grey)`: Laplacian energy of the small greyscale copy dedupe already hashes,
over that copy's variance (no model, ~1 ms). Only comparable between copies of one size and format, which
is how the keeper uses it: among frames of equal size and quality (video screenshots),
the motion-blurred or mid-transition ones score lower. Measured on drawn frames at
half size: a Gaussian blur of 1 px takes it to 0.28-0.33 of the sharp frame's, 2 px to
0.05, a box (motion) blur of 3 px to 0.05; a subtitle line moves it 3-13%, a 8%
brightness change 1-2%, so the keeper counts within SHARP_TIE (a third) as a tie.

`effective_pixels(path)`: the resolution the picture was drawn at. An upscaled copy holds
no detail above its source's scale: in the power spectrum along its rows, the band above
1/s of the Nyquist frequency is near empty up to the upscale factor s. Each LADDER scale's
band is measured relative to the band above 1/REF_SCALE (the picture's coarse detail); the
largest scale whose band stays below UPSCALED_BELOW is the upscale factor. Spectra are
averaged over SEGMENT-sample pieces of up to ROWS rows (pieces start on the 8-px JPEG grid;
the grid's own harmonics are left out). A sequential JPEG is first measured on its top
STRIPS rows, decoded alone at full resolution (curate.common.jpeg_rows: ~0.2 ms for 64 rows
of a 6 MP file): when they show it genuine, that is the answer; otherwise (flat, soft, or
upscaled) the whole picture decides, decoded greyscale. Other files are decoded whole.
Measured on 12 drawn CGs at three sizes, PNG and JPEG q92/q75, Lanczos and bicubic
upscales (1.5x, 2x, 3x), 252 cases: a genuine picture's band at 1.25x is 0.23-0.29 of its
reference, an upscale's stays at 0.15 or less below its factor (at its factor the filter's
roll-off leaves up to 0.30, so a 3x upscale may read as 2.5x). A part of a picture decides
only "genuine" (GENUINE_ABOVE): a blurred background in the top rows would look upscaled.
"""

from __future__ import annotations

import numpy as np

LADDER = (1.25, 1.5, 2.0, 2.5, 3.0, 4.0)
REF_SCALE = 8.0
UPSCALED_BELOW = 0.19
GENUINE_ABOVE = 0.20   # a part of the picture (a JPEG's top rows) shows it genuine above this share
SEGMENT = 256          # samples per spectrum piece (a multiple of the 8-px JPEG grid)
CHUNK = 32             # pieces transformed at once
ROWS = 16              # rows sampled per measure, spread over what was decoded
FLAT_BELOW = 1.0       # grey levels (RMS) above 1/REF_SCALE: less is too flat to judge
STRIPS = (64, 512)     # a JPEG's top rows tried in turn before the whole picture
EVERY_ROW = 1 << 16    # past any JPEG's height (65535 at most): the whole picture


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


_WINDOW = np.hanning(SEGMENT)  # float64 throughout: numpy's float32 FFT is ~5x slower here
_GRID = [b + d for b in range(SEGMENT // 8, SEGMENT // 2 + 1, SEGMENT // 8)  # the 8-px grid's harmonics
         for d in (-1, 0, 1) if b + d <= SEGMENT // 2]


def measured_factor(grey: np.ndarray, genuine_only: bool = False) -> float | None:
    """The upscale factor of a greyscale array from its row spectrum; None: too flat or too
    narrow to judge. `genuine_only` (a part of a picture): 1.0 when its finest band is
    clearly full (GENUINE_ABOVE), else None, since a soft part (a blurred background)
    looks upscaled and only the whole picture may say so."""
    g = np.asarray(grey)
    pieces = g.shape[1] // SEGMENT if g.ndim == 2 else 0
    if pieces == 0 or g.shape[0] == 0:
        return None
    rows = ROWS // 2 if genuine_only else ROWS  # noise there only costs a look at the whole picture
    if g.shape[0] > rows:
        g = g[np.linspace(0, g.shape[0] - 1, rows).astype(np.intp)]
    x = g[:, : pieces * SEGMENT].reshape(-1, SEGMENT)
    power = np.zeros(SEGMENT // 2 + 1)
    for k in range(0, len(x), CHUNK):  # small pieces at a time: no temporary large enough to be mmap'd
        part = x[k: k + CHUNK].astype(np.float64)
        spec = np.fft.rfft((part - part.mean(axis=1, keepdims=True)) * _WINDOW, axis=1)
        power += (spec.real ** 2 + spec.imag ** 2).sum(axis=0)
    power /= len(x)
    power[_GRID] = 0.0
    above = np.cumsum(power[::-1])[::-1]  # power at or above each frequency bin
    ref = float(above[int(SEGMENT / 2 / REF_SCALE) + 1])
    if np.sqrt(2 * ref / (SEGMENT * float(np.square(_WINDOW).sum()))) < FLAT_BELOW:
        return None
    shares = [float(np.sqrt(above[int(SEGMENT / 2 / s) + 1] / ref)) for s in LADDER]
    if genuine_only:
        return 1.0 if shares[0] >= GENUINE_ABOVE else None
    factor = 1.0
    for s, share in zip(LADDER, shares):
        if share > UPSCALED_BELOW:
            break
        factor = s
    return factor


def sampled_rows(im) -> np.ndarray:
    """Up to ROWS rows of a PIL image, evenly spread, as a greyscale array."""
    from PIL import Image

    grey = im if im.mode == "L" else im.convert("L")
    if grey.height > ROWS:  # nearest-neighbour rows: no copy of the whole picture
        grey = grey.resize((grey.width, ROWS), Image.Resampling.NEAREST)
    return np.asarray(grey)


def upscale_factor(im) -> float:
    """How many times the picture was enlarged after it was drawn (1.0: not at all, or flat)."""
    return measured_factor(sampled_rows(im)) or 1.0


def effective_pixels(path: str) -> int | None:
    """Worker: the file's pixel count divided by its upscale factor squared (None: unreadable).
    A sequential JPEG's top rows may show it genuine; any other verdict is the whole picture's."""
    from curate.common.decode import ImageError, open_image
    from curate.common.jpeg_rows import top_strips

    try:
        for strip, height in top_strips(path, (*STRIPS, EVERY_ROW)):
            px = strip.width * height
            if strip.height >= height:  # the whole picture
                return int(round(px / upscale_factor(strip) ** 2))
            if measured_factor(sampled_rows(strip), genuine_only=True) == 1.0:
                return px
        im = open_image(path)  # not a sequential JPEG
        return int(round(im.width * im.height / upscale_factor(im) ** 2))
    except (ImageError, OSError):
        return None
