"""Trim flat borders (letterbox/pillarbox/frames) and downscale to a maximum area.

Derived images go to a separate folder (originals are never touched). Per row:
`crop` = the kept box [left, top, right, bottom] in original pixels, `path` -> the
derived file (or stays on the original when nothing changed), `source_path` = the
original. Duplicates (`dup_of` set), error rows and rows without a file are
skipped. A re-run with the same settings skips rows already done; with other
settings every row is redone from its original.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from curate.common.decisions import box_problem
from curate.common.decode import ImageError, open_image
from curate.dataset import borders
from curate.errors import CurateError
from curate.pool import UNFINISHED, PoolStopped, default_workers, parallel_map

JPEG_SUFFIXES = {".jpg", ".jpeg", ".jfif", ".jpe"}


def parse_max_pixels(text: str | int | None) -> int | None:
    """'1638400', '1280x1280' or '1280*1280' -> pixel count; None/'0' -> no downscale."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*(?:[x*×]\s*(\d+))?\s*", str(text))
    if not m:
        raise CurateError(f"--max-pixels wants a pixel count or WxH (e.g. 1280x1280), got {text!r}")
    n = int(m.group(1)) * (int(m.group(2)) if m.group(2) else 1)
    if 0 < n < 64 * 64:
        raise CurateError(f"--max-pixels {text} is too small (at least 4096 pixels)")
    return n or None


def target_size(w: int, h: int, max_pixels: int | None) -> tuple[int, int]:
    """Largest size with the same aspect ratio and at most max_pixels pixels."""
    if not max_pixels or w * h <= max_pixels:
        return w, h
    scale = math.sqrt(max_pixels / (w * h))
    return max(1, int(w * scale)), max(1, int(h * scale))


def crop_file(job: tuple) -> dict:
    """Worker: (original, derived stem, max_pixels, trim, chosen box or None) -> box, derived file or error."""
    from PIL import Image

    src, stem, max_pixels, trim, chosen = job
    try:
        im = open_image(src)
    except ImageError as exc:
        return {"error": f"crop: {exc}"}
    full = (0, 0, im.width, im.height)
    problem = chosen and box_problem(list(chosen), im.width, im.height)  # the file's pixels, not the row's word
    if problem:
        return {"error": f"crop: the box a person chose: {problem}"}
    box = tuple(chosen) if chosen else borders.detect(im) if trim else full  # a person's box wins
    if box != full:
        im = im.crop(box)
    size = target_size(im.width, im.height, max_pixels)
    if box == full and size == im.size:
        return {"box": list(box), "derived": None, "trimmed": False, "resized": False}
    if size != im.size:
        im = im.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    jpeg = Path(src).suffix.lower() in JPEG_SUFFIXES  # lossy stays lossy, lossless stays PNG
    out = stem + (".jpg" if jpeg else ".png")
    tmp = out + ".part"
    try:
        if jpeg:
            im.save(tmp, "JPEG", quality=95, subsampling=0)
        else:
            im.save(tmp, "PNG", compress_level=4)
        os.replace(tmp, out)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        return {"error": f"crop: cannot write {out}: {exc.strerror or exc}"}
    return {"box": list(box), "derived": out, "trimmed": box != full,
            "resized": size != (box[2] - box[0], box[3] - box[1])}


@dataclass
class Summary:
    rows: int = 0
    processed: int = 0
    trimmed: int = 0
    resized: int = 0
    unchanged: int = 0
    done_before: int = 0
    skipped_dups: int = 0
    skipped_other: int = 0
    failed: int = 0
    out_dir: str = ""
    errors: list = field(default_factory=list)


def crop(table: pa.Table, base: Path, out_dir: Path, max_pixels: int | None, trim: bool,
         redo: bool, workers: int | None = None, chosen: dict | None = None,
         chosen_before: dict | None = None) -> tuple[pa.Table, Summary]:
    """Crop/downscale the rows not done yet; `redo` ignores earlier results.

    `chosen`: key -> box a person chose (curate review); a row whose choice changed
    since the last run (`chosen_before`) is redone.
    """
    chosen, chosen_before = chosen or {}, chosen_before or {}
    from curate.manifest import with_column

    col = lambda name: table.column(name).to_pylist()  # noqa: E731
    keys, err, path, src, dup, box = (col(c) for c in
                                      ("key", "error", "path", "source_path", "dup_of", "crop"))
    s = Summary(rows=table.num_rows, out_dir=str(out_dir))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CurateError(f"cannot create the output folder {out_dir}: {exc.strerror or exc}") from None
    jobs, rows = [], []
    for k in range(table.num_rows):
        original = src[k] or path[k]
        if err[k] is not None or not original:
            s.skipped_other += 1
            continue
        if dup[k] is not None:
            s.skipped_dups += 1
            continue
        same_choice = chosen.get(keys[k]) == chosen_before.get(keys[k])
        if not redo and same_choice and box[k] is not None and path[k] and (base / path[k]).is_file():
            s.done_before += 1
            continue
        stem = str(out_dir / keys[k].replace("/", "_").replace("\\", "_"))
        jobs.append((str(base / original), stem, max_pixels, trim, chosen.get(keys[k])))
        rows.append(k)
    try:
        results, stopped = parallel_map(crop_file, jobs, workers or default_workers(), "cropping"), None
    except PoolStopped as exc:  # a worker was killed: the finished rows are kept (run() writes them)
        results, stopped = exc.results, exc
    for k, res in zip(rows, results):
        original = src[k] or path[k]
        if res is UNFINISHED:
            continue
        if "error" in res:
            err[k] = res["error"]
            s.failed += 1
            s.errors.append(f"{keys[k]}: {res['error']}")
            continue
        s.processed += 1
        box[k], src[k] = res["box"], original
        s.trimmed += res["trimmed"]
        s.resized += res["resized"]
        if res["derived"]:
            path[k] = os.path.relpath(res["derived"], base.resolve())
        else:
            path[k] = original
            s.unchanged += 1
    for name, values in (("error", err), ("path", path), ("source_path", src), ("crop", box)):
        table = with_column(table, name, values)
    if stopped:
        stopped.table = table
        raise stopped
    return table, s


def run(manifest: Path, max_pixels: str | int | None = None, trim: bool = True,
        out_dir: Path | None = None, workers: int | None = None) -> Summary:
    """Read, crop, write back atomically; settings are kept in the provenance."""
    from curate import manifest as mf
    from curate.common import decisions

    manifest = Path(manifest)
    table, meta = mf.read(manifest)
    review = decisions.current(manifest)
    table = review.applied(table)
    pixels = parse_max_pixels(max_pixels)
    out_dir = Path(out_dir) if out_dir else manifest.parent / f"{manifest.stem}_crops"
    settings = {"max_pixels": pixels, "trim_borders": trim, "out_dir": str(out_dir)}
    last = meta.get("stages", {}).get("crop", {})
    redo = bool(last) and {k: last.get(k) for k in settings} != settings
    review.check_boxes(table)  # a hand-edited or foreign log: one line naming its line
    chosen = review.boxes()
    try:
        table, s = crop(table, manifest.parent, out_dir.resolve(), pixels, trim, redo, workers,
                        chosen, last.get("chosen_boxes"))
    except PoolStopped as exc:  # settings not recorded: a changed-settings re-run redoes every row
        mf.write(exc.table, manifest, meta)
        raise
    mf.record_stage(meta, "crop", **settings, chosen_boxes=chosen)
    mf.write(table, manifest, meta)
    return s
