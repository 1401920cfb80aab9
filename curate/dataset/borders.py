"""Find letterbox/pillarbox bars and frames: how a picture was framed, never its content.

Used by `crop` (to trim them) and by `dedupe` (to hash only what lies inside, so a
letterboxed frame matches its clean twin). Takes a `PIL.Image` or an (H, W, 3) /
(H, W) uint8 array; returns the content box (left, top, right, bottom).

Runs, per side: the bar colour is the median of the outermost line; the run lasts
while nearly every pixel of a line is within `tol` of it (JPEG noise passes) and
ends at the first line with content. A run whose colour creeps or varies along its
lines (sky gradient, vignette) is no bar.

Which runs are bars. A wrong trim changes the composition a style model learns; a
missed bar costs a little training signal; so when unsure the pixels stay.
- Every bar ends at a sharp edge: content starts across at least EDGE_SHARE of the
  next lines. (A night sky "ends" where a lit subject begins, on a few pixels; a
  white field where a centred sprite's widest point is.)
- Two opposite runs are bars when equally wide (PAIR_TOL) and of one neutral colour
  (black, white, grey): letterbox, pillarbox, windowbox; unequal ones only when the
  shorter one is a bar with a caption in it (mostly bar colour up to its twin's width,
  then a sharp edge). Unequal runs that happen to leave a standard aspect are a field
  art sits on (about 1 in 8 such pictures would: ASPECTS are dense), so they stay.
- Runs of any colour are bars when all four sides are equal pairs of one colour: a frame.
- A lone run is a bar when black or white and what it leaves has a standard video or
  screen aspect: a letterbox cropped on one side, a subtitle band. Not lone: a run of
  the same colour on the opposite side (unequal, or it would be a pair) makes both a
  background, whatever aspect one of them happens to leave. A run of content
  lands on such an aspect only by chance, and must pass the edge test as well.
So a flat green or sky-blue field reaching both sides at different widths, a dark
scene with a subject off-centre, a sprite centred on white: all kept whole. A guard
never keeps less than MIN_KEEP of an axis.

Memory: a picture over WORK_PIXELS is scanned on a reduced copy (integer box
reduction to <= WORK_PIXELS pixels: <= 12 MB as RGB), and each edge found there is
refined at full resolution on a strip 4 x factor lines thick. Lines are scanned
CHUNK_PIXELS at a time (at least one line), ~60 bytes a pixel while scanned. So
beyond the caller's image detection holds at most 3 x WORK_PIXELS + 60 x
max(CHUNK_PIXELS, one line) bytes: ~28 MB for pictures up to ~260k pixels a line,
never a copy of the picture (bench_borders.py: 21 MB traced for 121 MP).
"""

from __future__ import annotations

import math

import numpy as np

# Colours are compared in Y/Cb/Cr: JPEG smears chroma over 16 px blocks, luma stays sharp.
YCC = np.array([[0.299, 0.587, 0.114], [-0.169, -0.331, 0.5], [0.5, -0.419, -0.081]], np.float32)
TOL = 24               # luma distance to the bar colour still counted as bar (chroma: 2x)
LINE_FRACTION = 0.985  # share of a line's pixels that must be that close
DRIFT = 3.0            # a bar line's mean stays this close to the bar colour (chroma: 2x)
SPREAD = 6.0           # ... and its pixels' std (Y, Cb, Cr) below this: even along the line
EDGE_LINES = 16        # JPEG ringing may move the colour this close to the bar's edge (an MCU),
STEP = 12.0            # by less than this from one line to the next
MATCH = 24             # two bars are the same colour within this per channel
NEUTRAL = 16           # a neutral (black/white/grey) bar is untinted: channels within this
LONE_DARK = 40         # a lone bar is also within this of black or white
EDGE_SHARE = 0.5       # share of a line off the bar colour where a bar ends (the sharp edge)
EDGE_DEPTH = 3         # ... in one of this many lines after the run (JPEG ringing blurs the first)
EDGE_TOL = 10          # off: luma this far from the bar colour (chroma 2x); a step edge counts too
PAIR_TOL = 4           # opposite bars are equally wide within this many pixels,
PAIR_REL = 0.005       # or this share of the axis (big frames, mod-16 video sizes)
CAPTION_BAR = 0.85     # a bar with a caption (subtitle) in it: this share of it still bar colour
# Standard frame aspects (width / height; their inverses too): TV, photo, 16:10
# monitors, widescreen and cinema, phone screens (18:9, 19.5:9, 20:9).
ASPECTS = (1.0, 5 / 4, 4 / 3, 3 / 2, 16 / 10, 16 / 9, 1.85, 2.0, 19.5 / 9, 20 / 9, 2.35, 21 / 9, 2.39, 2.76)
ASPECT_TOL = 0.005     # what a lone bar leaves is within this share (or 2 px) of one,
LONE_MIN = 0.03        # and it is at least this share of the axis: a thin line at the edge of a
                       # frame that already has a standard aspect is no letterbox
MIN_KEEP = 0.3         # never keep less than this share of width or height (16:9 in 9:16 keeps 0.32)
MIN_PX = 16            # nor fewer pixels than this
WORK_PIXELS = 4_000_000  # larger pictures are scanned on a reduced copy of at most this
CHUNK_PIXELS = 1 << 18  # pixels scanned at a time (64 lines of 4096): ~60 bytes each while scanned


def _ycc(px: np.ndarray) -> np.ndarray:
    """uint8 lines (n, L, 3) or (n, L) -> float32 planes (3, n, L)."""
    if px.ndim == 3:
        rgb = px[..., :3].astype(np.float32)
        return np.stack([rgb @ row for row in YCC])
    out = np.zeros((3,) + px.shape, np.float32)
    out[0] = px
    return out


def _strip(src, box, side: int, start: int, stop: int) -> np.ndarray:
    """Lines start..stop in from `side` (0 top, 1 bottom, 2 left, 3 right) of `box`,
    outermost first, as uint8 (n, L[, C]); `src` is an array or a PIL image."""
    l, t, r, b = box
    rect = [(l, t + start, r, t + stop), (l, b - stop, r, b - start),
            (l + start, t, l + stop, b), (r - stop, t, r - start, b)][side]
    if isinstance(src, np.ndarray):
        px = src[rect[1]:rect[3], rect[0]:rect[2]]
    else:
        px = np.asarray(src.crop(rect))
    if side >= 2:
        px = px.swapaxes(0, 1)
    return px[::-1] if side in (1, 3) else px


def _near(lines: np.ndarray, ref: np.ndarray, tol: int) -> tuple[np.ndarray, np.ndarray]:
    diffs = lines - ref[:, None, None]
    return diffs, (np.abs(diffs[0]) <= tol) & (np.abs(diffs[1:]) <= 2 * tol).all(axis=0)


def _bar_run(get, n: int, tol: int, fraction: float, drift: float) -> tuple[int, float, np.ndarray]:
    """(run, edge share, RGB bar colour) for the lines get(start, stop) of one side (n in all).

    run: how many leading lines are bar; edge share: the largest share of a line off
    the bar colour within EDGE_DEPTH lines after the run.
    """
    first = get(0, 1)
    colour = np.median(first.reshape(first.shape[1], -1), axis=0)
    ref = np.median(_ycc(first)[:, 0], axis=1)
    length = first.shape[1]
    counts, sums, squares, start = [], [], [], 0
    cap, chunk = max(1, CHUNK_PIXELS // length), 8
    while start < n:  # chunk by growing chunk up to the first line with content (mostly near the edge)
        chunk = min(cap, chunk * 2)
        stop = min(n, start + chunk)
        diffs, near = _near(_ycc(get(start, stop)), ref, tol)
        kept = diffs * near
        counts.append(near.sum(axis=1))
        sums.append(kept.sum(axis=2))
        squares.append((kept * kept).sum(axis=2))
        start = stop
        if (counts[-1] < fraction * length).any():
            break
    count = np.concatenate(counts)
    off = np.flatnonzero(count < fraction * length)
    run = int(off[0]) if off.size else n
    if run in (0, n):
        return run, 0.0, colour
    c = np.maximum(count[:run], 1)
    means = np.concatenate(sums, axis=1)[:, :run] / c  # (3, run): per plane, per line
    spread = np.sqrt(np.maximum(np.concatenate(squares, axis=1)[:, :run] / c - means * means, 0)).max(axis=0)
    moved = (np.abs(means) > drift * np.array([[1], [2], [2]])).any(axis=0)
    drifted = np.flatnonzero(moved | (spread > SPREAD))
    if drifted.size:
        k = int(drifted[0])  # the colour moved before the edge: a step, a fade, or ringing?
        step = np.abs(means[:, k] - means[:, k - 1]).max() if k > 0 else 0.0
        if k >= run - EDGE_LINES:  # next to the edge: JPEG ringing, unless a clear step
            run = k if step > STEP else run
        else:
            run = k if step > drift else 0  # a step: the bar ends there; a fade: no bar
    if run == 0:
        return 0, 0.0, colour
    _, near = _near(_ycc(get(run, min(n, run + EDGE_DEPTH))), ref, min(tol, EDGE_TOL))
    return run, float(1 - near.mean(axis=1).min()), colour


def _refine(image, box, side: int, est: int, n: int, tol: int, fraction: float, f: int) -> int:
    """The full-resolution edge of a bar found near `est` on the reduced copy (factor f)."""
    lo, hi = max(0, est - 2 * f), min(n, est + 2 * f)
    first = _ycc(_strip(image, box, side, lo, lo + 1))  # the bar's colour: f lines inside it or more
    ref = np.median(first[:, 0], axis=1)
    step = max(1, CHUNK_PIXELS // first.shape[2])
    for start in range(lo, hi, step):
        _, near = _near(_ycc(_strip(image, box, side, start, min(hi, start + step))), ref, tol)
        off = np.flatnonzero(near.sum(axis=1) < fraction * near.shape[1])
        if off.size:
            return start + int(off[0])
    return est


def _captioned(get, start: int, stop: int, tol: int) -> bool:
    """Are lines start..stop of a side mostly bar colour (a caption drawn in the bar), and
    does content start sharply right after them?"""
    first = _ycc(get(0, 1))
    ref = np.median(first[:, 0], axis=1)
    step, near_px, total = max(1, CHUNK_PIXELS // first.shape[2]), 0, 0
    for a in range(start, stop, step):
        _, near = _near(_ycc(get(a, min(stop, a + step))), ref, tol)
        near_px, total = near_px + int(near.sum()), total + near.size
    if not total or near_px < CAPTION_BAR * total:
        return False
    _, near = _near(_ycc(get(stop, stop + EDGE_DEPTH)), ref, min(tol, EDGE_TOL))
    return 1 - near.mean(axis=1).min() >= EDGE_SHARE


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    return float(np.abs(a - b).max()) <= MATCH


def _neutral(c: np.ndarray) -> bool:
    return float(c.max() - c.min()) <= NEUTRAL


def _black_or_white(c: np.ndarray) -> bool:
    return _neutral(c) and (c.max() <= LONE_DARK or c.min() >= 255 - LONE_DARK)


def standard_aspect(kept: int, other: int, vertical: bool) -> bool:
    """Is `kept` pixels on the trimmed axis (vertical: the height) by `other` a standard aspect?"""
    for a in ASPECTS:
        for ratio in (a, 1 / a):  # width / height
            want = other / ratio if vertical else other * ratio
            if abs(kept - want) <= max(2.0, ASPECT_TOL * want):
                return True
    return False


def _bars(runs, shares, colours, w: int, h: int) -> list[int]:
    """Which of the runs (top, bottom, left, right) of a w x h box are bars (see the module doc)."""

    def letterboxed(cut: int, size: int, other: int, vertical: bool) -> bool:
        return cut >= LONE_MIN * size and standard_aspect(size - cut, other, vertical)

    sharp = [run > 0 and s >= EDGE_SHARE for run, s in zip(runs, shares)]
    pair = [sharp[i] and sharp[i + 1] and _same(colours[i], colours[i + 1]) for i in (0, 2)]
    equal = [pair[0] and abs(runs[0] - runs[1]) <= max(PAIR_TOL, PAIR_REL * h),
             pair[1] and abs(runs[2] - runs[3]) <= max(PAIR_TOL, PAIR_REL * w)]
    frame = all(equal) and _same(colours[0], colours[2])
    keep = [0, 0, 0, 0]
    for axis, (i, size) in enumerate(((0, h), (2, w))):
        other = (w, h)[axis]
        if frame or (equal[axis] and _neutral(colours[i])):
            keep[i:i + 2] = runs[i:i + 2]
    for axis, (i, size) in enumerate(((0, h), (2, w))):  # lone bars, once pairs are settled
        if keep[i] or keep[i + 1] or pair[axis]:  # the same colour on both sides, unequal: a background
            continue
        other = (w - keep[2] - keep[3], h - keep[0] - keep[1])[axis]
        for j in (i, i + 1):
            if sharp[j] and _black_or_white(colours[j]) and letterboxed(runs[j], size, other, axis == 0):
                keep[j] = runs[j]
                break
    return keep


def detect(
    image,
    tol: int = TOL,
    fraction: float = LINE_FRACTION,
    drift: float = DRIFT,
    min_keep: float = MIN_KEEP,
    min_px: int = MIN_PX,
) -> tuple[int, int, int, int]:
    """Content box (left, top, right, bottom) inside bars and frames; the full box if none."""
    if isinstance(image, np.ndarray):
        h, w = image.shape[:2]
    else:
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        w, h = image.size
    f = math.ceil(math.sqrt(w * h / WORK_PIXELS)) if w * h > WORK_PIXELS else 1
    if f == 1:
        work = np.asarray(image)
    elif isinstance(image, np.ndarray):
        work = image[::f, ::f]
    else:
        work = np.asarray(image.reduce(f))  # box average; edge blocks average what is there
    wh, ww = work.shape[:2]
    box = [0, 0, w, h]
    for _ in range(3):  # nested borders (a white frame around black bars) peel in turns
        left, top, right, bottom = box
        # the reduced lines that lie inside the box
        rbox = (-(-left // f), -(-top // f), ww if right == w else right // f, wh if bottom == h else bottom // f)
        rw, rh = rbox[2] - rbox[0], rbox[3] - rbox[1]
        if rw < 2 or rh < 2:
            break
        runs, shares, colours, reduced = [], [], [], []
        for side in range(4):
            n = rh if side < 2 else rw
            run, share, colour = _bar_run(lambda a, b, s=side: _strip(work, rbox, s, a, b), n, tol, fraction, drift)
            reduced.append(run)
            if f > 1 and 0 < run < n:  # to full-resolution pixels, inside the full box
                est = [(rbox[1] + run) * f - top, bottom - (rbox[3] - run) * f,
                       (rbox[0] + run) * f - left, right - (rbox[2] - run) * f][side]
                full = bottom - top if side < 2 else right - left
                run = _refine(image, box, side, max(1, est), full, tol, fraction, f)
            elif f > 1 and run == n:
                run = (bottom - top) if side < 2 else (right - left)
            runs.append(run)
            shares.append(share)
            colours.append(colour)
        for i, size in ((0, bottom - top), (2, right - left)):
            for bar, other in ((i, i + 1), (i + 1, i)):  # a caption in a bar ends its run early:
                n = rh if i == 0 else rw                    # the bar is as wide as its twin
                if (shares[bar] >= EDGE_SHARE and _neutral(colours[bar]) and _same(colours[bar], colours[other])
                        and runs[bar] - runs[other] > max(PAIR_TOL, PAIR_REL * size)
                        and reduced[bar] + EDGE_DEPTH <= n
                        and _captioned(lambda a, b, s=other: _strip(work, rbox, s, a, b), reduced[other],
                                       reduced[bar], tol)):
                    runs[other], shares[other] = runs[bar], shares[bar]
        t, b, lt, r = _bars(runs, shares, colours, right - left, bottom - top)
        new = [left + lt, top + t, right - r, bottom - b]
        if new[3] - new[1] < max(min_px, min_keep * h):  # vertical axis would collapse
            new[1], new[3] = top, bottom
        if new[2] - new[0] < max(min_px, min_keep * w):
            new[0], new[2] = left, right
        if new == box:
            break
        box = new
    return tuple(box)
