"""Duplicate removal: exact (same bytes, same pixels) and near (64-bit phash).

Pipeline: hash every usable row in a process pool (JPEG decoded in draft mode,
hashes taken inside detected borders) -> pairs within the threshold from a
multi-index hash table (`pairs_within`), confirmed by dhash and mean colour ->
exact pairs (digest; full-decode pixel digest for close same-size pairs) ->
clusters (connected components, i.e. union-find) -> in each cluster the row with
most pixels (ties: smallest key) is kept and the others get `dup_of`. With other
manifests (`--against`), rows of ours in a cluster with theirs get `dup_of` =
their key. Rows with an `error` or no `path` are skipped.

Hashes are cached in the manifest (`phash`, plus the extension columns `dhash`,
`colour`, `sha256`), so a re-run only hashes new rows; `dup_of` is recomputed.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa

from . import borders
from .errors import CurateError
from .images import ImageError, open_image
from .pool import UNFINISHED, PoolStopped, default_workers, parallel_map

# Measured with benchmarks/bench_dedupe_quality.py (its threshold sweep): at 10 bits
# recall is 0.99+ (8 bits: 0.98, variants with 2-5% crops need 10), and phash alone
# still keeps precision >= 0.98 (12 bits: 0.95), so the dhash/colour confirmation is
# a margin for real look-alikes rather than the only thing holding precision up.
DEFAULT_THRESHOLD = 10
DHASH_CONFIRM = 18   # a phash match must also be within this many dhash bits
COLOUR_CONFIRM = 48  # ... and its mean colour within this per channel (flat images all
                     # share one phash: a white page is no duplicate of a green one)
EXACT_RADIUS = 6     # same-size pairs this close get a full-decode pixel comparison
MAX_THRESHOLD = 24
DRAFT = (128, 128)   # JPEG draft decode target: ~1/8 scale for CG-sized images
HASH_SIDE = 256      # other images are box-reduced to about this before hashing
HASH_VERSION = "phash8+dhash8+colour/borders/draft128+reduce256/v1"  # bump when hashes change meaning


# --- hashing --------------------------------------------------------------------


def _bits(imagehash_obj) -> int:
    """imagehash's 8x8 bool grid -> signed int64 (row-major, first bit highest)."""
    v = int.from_bytes(np.packbits(imagehash_obj.hash.flatten()).tobytes(), "big")
    return v - (1 << 64) if v >= 1 << 63 else v


def image_hashes(im) -> tuple[int, int, int]:
    """(phash, dhash, mean colour 0xRRGGBB) of what lies inside the image's flat borders."""
    import imagehash
    from PIL import Image

    box = borders.detect(im)
    if box != (0, 0, im.width, im.height):
        im = im.crop(box)
    r, g, b = np.asarray(im.resize((16, 16), Image.Resampling.BOX)).reshape(-1, 3).mean(axis=0).round()
    return _bits(imagehash.phash(im)), _bits(imagehash.dhash(im)), int(r) << 16 | int(g) << 8 | int(b)


def hash_file(path: str) -> dict:
    """Worker: sha256 of the bytes, phash, dhash, mean colour; `error` instead on failure."""
    try:
        with open(path, "rb") as f:  # in chunks: a big file never sits in memory whole
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as exc:
        return {"error": f"dedupe: cannot read file: {exc.strerror or exc}"}
    try:
        im = open_image(path, draft_size=DRAFT)
        factor = max(im.size) // HASH_SIDE
        if factor >= 2:  # what JPEG draft mode does for JPEGs, the others get too: cheap and alike
            im = im.reduce(factor)
        ph, dh, colour = image_hashes(im)
    except ImageError as exc:
        return {"error": f"dedupe: {exc}"}
    return {"sha256": digest, "phash": ph, "dhash": dh, "colour": colour}


def pixel_digest(path: str) -> str | None:
    """Worker: digest of the fully decoded RGB pixels (same picture, other encoding)."""
    try:
        im = open_image(path)
    except ImageError:
        return None
    return hashlib.sha256(f"{im.width}x{im.height}".encode() + im.tobytes()).hexdigest()


# --- the index --------------------------------------------------------------------

if hasattr(np, "bitwise_count"):  # numpy >= 2
    popcount = np.bitwise_count
else:  # pragma: no cover - numpy 1.x
    _POP8 = np.array([bin(b).count("1") for b in range(256)], np.uint8)

    def popcount(x: np.ndarray) -> np.ndarray:
        return _POP8[np.ascontiguousarray(x).view(np.uint8).reshape(-1, 8)].sum(axis=1)


def _plan(n: int, threshold: int) -> tuple[list[int], int]:
    """Band widths and per-band search radius with the lowest estimated cost.

    Pigeonhole: with m bands and Hamming distance <= t, some band differs in at most
    t // m bits. Cost ~ sum over bands of (neighbours enumerated) x (1 + bucket
    load). Bands are at most 22 bits so a band's bucket table is a flat array.
    """
    best = None
    for m in range(3, 17):
        widths = [64 // m + (1 if i < 64 % m else 0) for i in range(m)]
        r = threshold // m
        cost = sum(sum(math.comb(b, k) for k in range(r + 1)) * (1 + n / 2**b) for b in widths)
        if best is None or cost < best[0]:
            best = (cost, widths, r)
    return best[1], best[2]


def _flip_masks(width: int, r: int) -> np.ndarray:
    masks = [0]
    for k in range(1, r + 1):
        masks += [sum(1 << c for c in combo) for combo in itertools.combinations(range(width), k)]
    return np.array(masks, dtype=np.int64)


def _band_pairs(h: np.ndarray, lo: int, width: int, masks: np.ndarray, threshold: int) -> np.ndarray:
    """Pairs (coded i * n + j, i < j) found through one band and some neighbour masks.

    Works in band-sorted order: a neighbour mask then maps runs of sorted values to
    nearby table slots, so the lookups stay in cache (about 4x faster at 1M).
    """
    n = len(h)
    vals = ((h >> np.uint64(lo)) & np.uint64((1 << width) - 1)).astype(np.int32)
    order = np.argsort(vals, kind="stable")
    vals, hs = vals[order], h[order]
    counts = np.bincount(vals, minlength=1 << width).astype(np.int32)  # int32: cache-friendly
    starts = (np.cumsum(counts) - counts).astype(np.int32)
    found = []
    for mask in masks:
        q = vals ^ np.int32(mask)
        cnt = counts[q]
        idx = np.flatnonzero(cnt)
        if not idx.size:
            continue
        cnt = cnt[idx].astype(np.int64)
        first = np.cumsum(cnt) - cnt
        qj = np.repeat(starts[q[idx]] - first, cnt) + np.arange(int(first[-1] + cnt[-1]))
        qi = np.repeat(idx, cnt)
        keep = qi < qj  # each unordered pair once per mask (and never itself)
        qi, qj = qi[keep], qj[keep]
        ok = popcount(hs[qi] ^ hs[qj]) <= threshold
        a, b = order[qi[ok]], order[qj[ok]]
        found.append(np.minimum(a, b) * n + np.maximum(a, b))
    return np.concatenate(found) if found else np.empty(0, np.int64)


_POOL_HASHES = None  # the hashes, handed once to each index worker


def _init_worker(h: np.ndarray) -> None:
    global _POOL_HASHES
    _POOL_HASHES = h


def _band_task(args) -> np.ndarray:
    return _band_pairs(_POOL_HASHES, *args)


def pairs_within(hashes, threshold: int, workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """All index pairs (i < j) whose 64-bit hashes differ in <= threshold bits.

    Multi-index hashing: split the bits into bands; some band of a matching pair
    differs in at most threshold // bands bits (pigeonhole), so look up each hash's
    band neighbours within that radius in a counting-sorted bucket table and verify
    each candidate by popcount of the full XOR. Vectorized per neighbour mask; the
    (band, masks) tasks spread over `workers` processes for large inputs.
    """
    h = np.ascontiguousarray(np.asarray(hashes).astype(np.int64).view(np.uint64))
    n = len(h)
    if n < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    widths, r = _plan(n, threshold)
    tasks, lo = [], 0
    for width in widths:
        masks = _flip_masks(width, r)
        for chunk in np.array_split(masks, max(1, min(workers, len(masks)))):
            tasks.append((lo, width, chunk, threshold))
        lo += width
    if workers > 1 and n >= 100_000:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(h,)) as pool:
            found = list(pool.map(_band_task, tasks))
    else:
        found = [_band_pairs(h, *t) for t in tasks]
    code = np.unique(np.concatenate(found))  # a pair can show up in several bands
    return code // n, code % n


def hamming(a, b) -> np.ndarray:
    a = np.asarray(a).astype(np.int64).view(np.uint64)
    b = np.asarray(b).astype(np.int64).view(np.uint64)
    return popcount(a ^ b)


def clusters(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Component label per item for the undirected edges (i, j) (union-find result)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


# --- the stage --------------------------------------------------------------------


@dataclass
class Summary:
    rows: int = 0
    hashed: int = 0
    reused: int = 0
    failed: int = 0
    skipped: int = 0
    exact_bytes: int = 0
    exact_pixels: int = 0
    near_pairs: int = 0
    clusters: int = 0
    duplicates: int = 0
    against: int = 0
    threshold: int = DEFAULT_THRESHOLD
    against_rows: int = 0
    errors: list = field(default_factory=list)


HASH_COLUMNS = {"phash": pa.int64(), "dhash": pa.int64(), "colour": pa.int32(), "sha256": pa.string()}


def _column(table: pa.Table, name: str) -> list:
    return table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows


def _stored_hash_ok(meta: dict) -> bool:
    return HASH_VERSION in (meta.get("stages", {}).get("dedupe", {}).get("hash"),
                            meta.get("checkpoints", {}).get("dedupe"))


def _original(base: Path, path: str, source: str | None) -> str:
    """The file to hash: the original (source_path) when it is still there."""
    if source and (base / source).is_file():
        return str(base / source)
    return str(base / path)


def hash_rows(rows: pa.Table, base: Path, cached: bool, workers: int = 1,
              desc: str = "hashing") -> tuple[pa.Table, dict]:
    """The per-shard work of both engines: hash the usable rows (stored hashes kept when `cached`).

    -> (key, the hash columns, `file` that was hashed (null: unusable or failed),
    `hash_error` new this run), {hashed, reused}.
    """
    error, path, src = _column(rows, "error"), _column(rows, "path"), _column(rows, "source_path")
    h = {c: _column(rows, c) for c in HASH_COLUMNS}
    files = [_original(base, p, sp) if p and e is None else None for e, p, sp in zip(error, path, src)]
    todo = [k for k, f in enumerate(files)
            if f and not (cached and all(h[c][k] is not None for c in HASH_COLUMNS))]
    stats = {"hashed": 0, "reused": sum(1 for f in files if f) - len(todo)}
    new_errors = [None] * len(files)
    try:
        results, stopped = parallel_map(hash_file, [files[k] for k in todo], workers, desc), None
    except PoolStopped as exc:  # a worker was killed: keep what finished (the caller checkpoints it)
        results, stopped = exc.results, exc
    for k, res in zip(todo, results):
        if res is UNFINISHED:
            for c in HASH_COLUMNS:  # no stale hash of another version survives the checkpoint
                h[c][k] = None
            continue
        if "error" in res:
            new_errors[k], files[k] = res["error"], None
            continue
        for c in HASH_COLUMNS:
            h[c][k] = res[c]
        stats["hashed"] += 1
    cols = {"key": rows.column("key"), **{c: pa.array(h[c], t) for c, t in HASH_COLUMNS.items()},
            "file": pa.array(files, pa.string()), "hash_error": pa.array(new_errors, pa.string())}
    if stopped:
        stopped.hashes = pa.table(cols)
        raise stopped
    return pa.table(cols), stats


def _hash_rows(table: pa.Table, base: Path, cached: bool, workers: int, desc: str, s: Summary, shards=None):
    """Hash a table's usable rows, here (a process pool) or with `shards(fn, rows)` (the Ray engine).

    Returns (file per row or None when unusable, {hash column: values}, new errors).
    """
    if shards is None:
        out, stats = hash_rows(table, base, cached, workers, desc)
    else:
        need = [c for c in ("key", "error", "path", "source_path", *HASH_COLUMNS) if c in table.column_names]
        out, stats = shards(partial(hash_rows, base=Path(base).resolve(), cached=cached), table.select(need))
    s.hashed += stats["hashed"]
    s.reused += stats["reused"]
    new_errors = out.column("hash_error").to_pylist()
    for key, e in zip(_column(table, "key"), new_errors):
        if e is not None:
            s.failed += 1
            s.errors.append(f"{key}: {e}")
    return out.column("file").to_pylist(), {c: out.column(c).to_pylist() for c in HASH_COLUMNS}, new_errors


def _exact_pairs(usable, own, sha, files, pixels, i, j, dist, workers, s: Summary):
    """Same bytes (by digest), or same pixels (full decode of close same-size pairs)."""
    first: dict[str, int] = {}
    ei, ej = [], []
    for pos, k in enumerate(usable):
        d = sha[k]
        if d not in first:
            first[d] = pos
        elif own[pos] == 0 or own[first[d]] == 0:
            ei.append(first[d]); ej.append(pos)
    s.exact_bytes = len(ei)
    same = [(a, b) for a, b, d in zip(i.tolist(), j.tolist(), dist.tolist())
            if d <= EXACT_RADIUS and sha[usable[a]] != sha[usable[b]]
            and pixels[usable[a]] == pixels[usable[b]] > 0]
    if same:
        need = sorted({x for pair in same for x in pair})
        found = parallel_map(pixel_digest, [files[usable[x]] for x in need], workers, "comparing pixels")
        digests = dict(zip(need, found))
        for a, b in same:
            if digests[a] is not None and digests[a] == digests[b]:
                ei.append(a); ej.append(b)
                s.exact_pixels += 1
    return np.array(ei, np.int64), np.array(ej, np.int64)


def confirm(dhash: np.ndarray, colour: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Which phash-close pairs (i, j) the second hash and the mean colour agree with."""
    a, b = colour[i], colour[j]
    off = np.maximum.reduce([np.abs(((a >> sh) & 255) - ((b >> sh) & 255)) for sh in (16, 8, 0)])
    return (hamming(dhash[i], dhash[j]) <= DHASH_CONFIRM) & (off <= COLOUR_CONFIRM)


def dedupe(
    table: pa.Table,
    base: Path,
    meta: dict,
    others: list[tuple[pa.Table, Path, dict]] = (),
    threshold: int = DEFAULT_THRESHOLD,
    workers: int | None = None,
    shards=None,
) -> tuple[pa.Table, Summary]:
    """Fill the hash columns and dup_of. `base` is the manifest's folder.

    `shards(fn, rows, name)`: hash on another engine (curate.engine's Ray.map); the
    clustering below always runs here, on every hash at once.
    """
    from .manifest import with_column

    if not 0 <= threshold <= MAX_THRESHOLD:
        raise CurateError(f"--threshold must be between 0 and {MAX_THRESHOLD} bits, got {threshold}")
    workers = workers or default_workers()
    n = table.num_rows
    s = Summary(rows=n, threshold=threshold)
    files, h, new_err = _hash_rows(table, base, _stored_hash_ok(meta), workers, "hashing", s,
                                   shards and partial(shards, name="dedupe"))
    mine = {c: list(v) for c, v in h.items()}  # what gets written back

    # Rows of the other manifests join the same index; their hashes are used as
    # stored when that manifest was deduped with this hash version, else computed
    # here (in memory: the other manifest is never written).
    keys, owner = _column(table, "key"), [0] * n
    pixels = [(w or 0) * (ht or 0) for w, ht in zip(_column(table, "width"), _column(table, "height"))]
    for num, (other, obase, ometa) in enumerate(others, 1):
        of, oh, _ = _hash_rows(other, obase, _stored_hash_ok(ometa), workers, f"hashing --against #{num}",
                               Summary(), shards and partial(shards, name=f"dedupe-against-{num}"))
        files += of
        for c in HASH_COLUMNS:
            h[c] += oh[c]
        keys += _column(other, "key")
        owner += [num] * other.num_rows
        pixels += [(w or 0) * (ht or 0) for w, ht in zip(_column(other, "width"), _column(other, "height"))]
        s.against_rows += other.num_rows

    usable = np.flatnonzero([f is not None for f in files])
    s.skipped = sum(1 for k in range(n) if files[k] is None) - s.failed
    ph, dh, colour = (np.array([h[c][k] for k in usable], np.int64) for c in ("phash", "dhash", "colour"))
    own = np.array([owner[k] for k in usable], np.int64)
    i, j = pairs_within(ph, max(threshold, EXACT_RADIUS), workers)
    keep = (own[i] == 0) | (own[j] == 0)  # pairs inside another manifest are not ours
    i, j = i[keep], j[keep]
    dist = hamming(ph[i], ph[j])
    near = (dist <= threshold) & confirm(dh, colour, i, j)
    s.near_pairs = int(near.sum())
    ei, ej = _exact_pairs(usable, own, h["sha256"], files, pixels, i, j, dist, workers, s)
    labels = clusters(len(usable), np.concatenate([i[near], ei]), np.concatenate([j[near], ej]))

    # Keeper per cluster: most pixels, then smallest key; a row of another manifest
    # wins over ours, so ours point at theirs.
    dup_of = [None] * n
    order = np.argsort(labels, kind="stable")
    for group in np.split(order, np.flatnonzero(np.diff(labels[order])) + 1):
        if len(group) < 2:
            continue
        rows = [int(usable[g]) for g in group]
        theirs = [r for r in rows if owner[r] != 0]
        keeper = min(theirs or rows, key=lambda r: (-pixels[r], keys[r]))
        marked = [r for r in rows if owner[r] == 0 and r != keeper]
        if marked:
            s.clusters += 1
            s.duplicates += len(marked)
            s.against += len(marked) if theirs else 0
            for r in marked:
                dup_of[r] = keys[keeper]

    errors = [e if e is not None else new_err[k] for k, e in enumerate(_column(table, "error"))]
    table = with_column(table, "error", errors)
    for c, typ in HASH_COLUMNS.items():
        table = with_column(table, c, pa.array(mine[c], typ))
    table = with_column(table, "dup_of", dup_of)
    return table, s


def run(manifest: Path, against: list[Path] = (), threshold: int = DEFAULT_THRESHOLD,
        workers: int | None = None, ray=None) -> Summary:
    """Read the manifest (and the others), dedupe, write it back atomically.

    `ray`: curate.engine.RayOptions to hash on Ray (None: here, in a process pool).
    """
    from . import manifest as mf
    from .review import decisions

    manifest = Path(manifest)
    table, meta = mf.read(manifest)
    others = []
    for other in against:
        if Path(other).resolve() == manifest.resolve():
            raise CurateError(f"--against names the manifest itself: {other}")
        ot, ometa = mf.read(other)
        others.append((ot, Path(other).parent, ometa))
    if ray is None:
        try:
            table, s = dedupe(table, manifest.parent, meta, others, threshold, workers)
        except PoolStopped as exc:  # keep the hashes that finished: the re-run reuses them
            part = getattr(exc, "hashes", None)
            if part is not None and part.column("key").equals(table.column("key")):  # ours, not --against's
                for c in HASH_COLUMNS:
                    table = mf.with_column(table, c, part.column(c))
                meta.setdefault("checkpoints", {})["dedupe"] = HASH_VERSION
                mf.write(table, manifest, meta)
            raise
    else:
        from . import engine

        with engine.connect(ray) as cluster:
            def shards(fn, rows, name):
                out, stats = cluster.map(fn, rows, engine.work_dir(manifest, name), desc=name)
                return out, engine.sum_stats(stats) or {"hashed": 0, "reused": 0}

            table, s = dedupe(table, manifest.parent, meta, others, threshold, workers, shards)
    meta.get("checkpoints", {}).pop("dedupe", None)
    table = decisions.current(manifest).applied(table)  # a person's keepers and splits win
    mf.record_stage(meta, "dedupe", hash=HASH_VERSION, threshold=threshold,
                    dhash_confirm=DHASH_CONFIRM, against=[str(p) for p in against])
    mf.write(table, manifest, meta)
    if ray is not None:
        engine.clean(manifest, "dedupe")
    return s
