"""Baseline for bench_borders.py: curate.dataset.borders before issue 17 (commit 5db1df3), code verbatim.

It took any two opposite flat runs of about the same colour, or a lone black/white run, for bars.
"""

from __future__ import annotations

import numpy as np

# Colours are compared in Y/Cb/Cr: JPEG smears chroma over 16 px blocks, luma stays sharp.
YCC = np.array([[0.299, 0.587, 0.114], [-0.169, -0.331, 0.5], [0.5, -0.419, -0.081]], np.float32)
TOL = 24               # luma distance to the bar colour still counted as bar (chroma: 2x)
LINE_FRACTION = 0.985  # share of a line's pixels that must be that close
DRIFT = 3.0            # a bar line's mean stays this close to the bar colour (chroma: 2x)
SPREAD = 6.0           # ... and its pixels' std (Y, Cb, Cr) below this: even along the line
EDGE_LINES = 10        # JPEG ringing may move the colour this close to the bar's edge,
STEP = 12.0            # by less than this from one line to the next
MATCH = 24             # two opposite bars are the same colour within this per channel
NEUTRAL = 16           # a lone bar is untinted (channels within this)
LONE_DARK = 40         # ... and within this of black or white
MIN_KEEP = 0.3         # never keep less than this share of width or height (16:9 in 9:16 keeps 0.32)
MIN_PX = 16            # nor fewer pixels than this


def _bar_run(lines: np.ndarray, tol: int, fraction: float, drift: float) -> int:
    """How many leading lines of `lines` (planes Y, Cb, Cr; N lines of L pixels) are bar."""
    ref = np.median(lines[:, 0], axis=1)[:, None, None]
    diffs = lines - ref
    near = (np.abs(diffs[0]) <= tol) & (np.abs(diffs[1:]) <= 2 * tol).all(axis=0)
    n, length = lines.shape[1:]
    count = near.sum(axis=1)
    off = np.flatnonzero(count < fraction * length)
    run = int(off[0]) if off.size else n
    if run in (0, n):
        return run
    kept, c = diffs[:, :run] * near[:run], np.maximum(count[:run], 1)
    means = kept.sum(axis=2) / c  # (3, run): per plane, per line
    spread = np.sqrt(np.maximum((kept * kept).sum(axis=2) / c - means * means, 0)).max(axis=0)
    moved = (np.abs(means) > drift * np.array([[1], [2], [2]])).any(axis=0)
    drifted = np.flatnonzero(moved | (spread > SPREAD))
    if not drifted.size:
        return run
    k = int(drifted[0])  # the colour moved before the edge: a step, a fade, or ringing?
    step = np.abs(means[:, k] - means[:, k - 1]).max() if k > 0 else 0.0
    if k >= run - EDGE_LINES:  # next to the edge: JPEG ringing, unless a clear step
        return k if step > STEP else run
    return k if step > drift else 0  # a step: the bar ends there; a fade: no bar


def _colour(line: np.ndarray) -> np.ndarray:
    return np.median(line.reshape(len(line), -1), axis=0)


def _plausible(run_a: int, run_b: int, edge_a: np.ndarray, edge_b: np.ndarray) -> tuple[int, int]:
    """Keep the runs of two opposite sides that look like bars (see detect)."""
    ca, cb = _colour(edge_a), _colour(edge_b)
    if run_a and run_b and np.abs(ca - cb).max() <= MATCH:
        return run_a, run_b

    def lone_bar(c):
        untinted = float(c.max() - c.min()) <= NEUTRAL
        return untinted and (c.max() <= LONE_DARK or c.min() >= 255 - LONE_DARK)

    return (run_a if lone_bar(ca) else 0), (run_b if lone_bar(cb) else 0)


def detect(
    image,
    tol: int = TOL,
    fraction: float = LINE_FRACTION,
    drift: float = DRIFT,
    min_keep: float = MIN_KEEP,
    min_px: int = MIN_PX,
) -> tuple[int, int, int, int]:
    """Content box (left, top, right, bottom) inside flat borders; the full box if none."""
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[2] >= 3:
        rgb = a[..., :3].astype(np.float32)
        ycc = np.stack([rgb @ row for row in YCC])  # (3, H, W)
    else:
        ycc = np.zeros((3,) + a.shape[:2], np.float32)
        ycc[0] = a.reshape(a.shape[:2])
    h, w = ycc.shape[1:]
    box = [0, 0, w, h]
    for _ in range(3):  # nested borders (a white frame around black bars) peel in turns
        left, top, right, bottom = box
        sub = ycc[:, top:bottom, left:right]
        sh, sw = sub.shape[1:]
        if sh < 2 or sw < 2:
            break
        t = _bar_run(sub, tol, fraction, drift)
        b = _bar_run(sub[:, ::-1], tol, fraction, drift)
        cols = sub.transpose(0, 2, 1)
        lt = _bar_run(cols, tol, fraction, drift)
        r = _bar_run(cols[:, ::-1], tol, fraction, drift)
        # a lone run of colour, or two runs of different colours, is more likely
        # sky and floor than bars
        t, b = _plausible(t, b, a[top, left:right], a[bottom - 1, left:right])
        lt, r = _plausible(lt, r, a[top:bottom, left], a[top:bottom, right - 1])
        new = [left + lt, top + t, right - r, bottom - b]
        if new[3] - new[1] < max(min_px, min_keep * h):  # vertical axis would collapse
            new[1], new[3] = top, bottom
        if new[2] - new[0] < max(min_px, min_keep * w):
            new[0], new[2] = left, right
        if new == box:
            break
        box = new
    return tuple(box)
