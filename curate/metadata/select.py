"""Selection: which posts land in which subset of a query.

One rule set, two ways to feed it: `Columns` views over a streamed batch (any
source) or over the whole store (memory-mapped columns + inverted index). The
rules (`eligible`) and the ranking (`rank_keys`) are the same code for both, so a
query gives the same manifest on every source.

Order: `random` ranks by a keyed hash of (seed, post id) — the k smallest win — so
the sample depends only on the eligible set and the seed, never on the order a
source yields posts, and streams in O(k) memory. Subsets are disjoint: a post is
taken by the first subset (in query order) that picks it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.metadata import match_tags
from curate.metadata.query import Query, Subset
from curate.metadata.store import (
    CATEGORY_CODE,
    FLAG_BANNED,
    FLAG_DELETED,
    NULL_I32,
    NULL_I64,
    Store,
    rating_codes,
)
from curate.schema import RATINGS

_M64 = (1 << 64) - 1


# --- keyed hash (numpy and scalar versions give the same numbers) ---------------


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def keyed_hash(seed: int, post_ids: np.ndarray) -> np.ndarray:
    k = _mix(np.array([seed & _M64], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        return _mix(np.asarray(post_ids).astype(np.uint64) ^ k)


def keyed_hash_one(seed: int, post_id: int) -> int:
    """The same hash for one post, in plain Python (for streaming clients)."""

    def mix(x: int) -> int:
        x ^= x >> 30
        x = (x * 0xBF58476D1CE4E5B9) & _M64
        x ^= x >> 27
        x = (x * 0x94D049BB133111EB) & _M64
        return x ^ (x >> 31)

    return mix((post_id & _M64) ^ mix(seed & _M64))


# --- column views ---------------------------------------------------------------


class BatchColumns:
    """A POST_SCHEMA batch seen as numpy columns (nulls as sentinels)."""

    def __init__(self, batch: pa.Table):
        self.batch = batch
        self.n = batch.num_rows
        self.post_id = batch.column("post_id").to_numpy()
        for name in ("width", "height", "fav_count", "score"):
            setattr(self, name, pc.fill_null(batch.column(name), NULL_I32).to_numpy().astype(np.int64))
        self.created_at = pc.fill_null(batch.column("created_at").cast(pa.int64()), NULL_I64).to_numpy()
        self.rating = rating_codes(batch.column("rating"))
        self.deleted = pc.fill_null(batch.column("is_deleted"), False).to_numpy(zero_copy_only=False)
        self.banned = pc.fill_null(batch.column("is_banned"), False).to_numpy(zero_copy_only=False)

    def file_ext_in(self, rows: np.ndarray, exts) -> np.ndarray:
        return _ext_in(self.batch.column("file_ext"), rows, exts)

    def has_any(self, names: list[str], category: str | None = None) -> np.ndarray:
        cols = [f"tags_{category}"] if category else [c for c in self.batch.column_names if c.startswith("tags_")]
        mask = np.zeros(self.n, bool)
        values = pa.array(names, pa.string())
        for c in cols:
            lists = self.batch.column(c).combine_chunks()
            hit = pc.is_in(pc.list_flatten(lists), value_set=values).to_numpy(zero_copy_only=False)
            if hit.any():
                mask[pc.list_parent_indices(lists).to_numpy()[hit]] = True
        return mask

    def artists(self, rows: np.ndarray) -> list[list[str]]:
        return self.batch.column("tags_artist").take(pa.array(rows)).to_pylist()


class StoreColumns:
    """The whole store as numpy columns; tag tests go through the inverted index."""

    def __init__(self, store: Store):
        self.store = store
        self.n = len(store)
        self.post_id = store.col("post_id")
        for name in ("width", "height", "fav_count", "score"):
            setattr(self, name, store.col(name))
        self.created_at = store.col("created_at")
        self.rating = store.col("rating")
        flags = store.col("flags")
        self.deleted = (flags & FLAG_DELETED) > 0
        self.banned = (flags & FLAG_BANNED) > 0

    def file_ext_in(self, rows: np.ndarray, exts) -> np.ndarray:
        return _ext_in(self.store.posts.column("file_ext"), rows, exts)

    def has_any(self, names: list[str], category: str | None = None) -> np.ndarray:
        return self.store.mask_with_any(names, category)

    def artists(self, rows: np.ndarray) -> list[list[str]]:
        ids, owner = self.store.post_tags(rows)
        is_artist = self.store.tag_categories[ids] == CATEGORY_CODE["artist"]
        out = [[] for _ in rows]
        names = self.store.tag_names.take(pa.array(ids[is_artist])).to_pylist()
        for o, name in zip(owner[is_artist].tolist(), names):
            out[o].append(name)
        return out


def _ext_in(column, rows: np.ndarray, exts) -> np.ndarray:
    """Whether each of `rows` has a file_ext in `exts` (case-insensitive; null: no)."""
    col = pc.utf8_lower(column.take(pa.array(rows)))
    return pc.fill_null(pc.is_in(col, value_set=pa.array(list(exts))), False).to_numpy(zero_copy_only=False)


# --- rules ----------------------------------------------------------------------


def _in_range(values: np.ndarray, rng, null) -> np.ndarray:
    m = values != null
    if rng.lo is not None:
        m &= values >= rng.lo
    if rng.hi is not None:
        m &= values <= rng.hi
    return m


def eligible(cols, s: Subset, aliases: dict[str, str]) -> np.ndarray:
    """Boolean mask of rows that pass every rule of subset `s`."""
    resolve = lambda tags: [aliases.get(t, t) for t in tags]  # noqa: E731
    m = np.ones(cols.n, bool)
    if not s.include_deleted:
        m &= ~cols.deleted
    if not s.include_banned:
        m &= ~cols.banned
    if s.fav_count is not None:
        m &= _in_range(cols.fav_count, s.fav_count, NULL_I32)
    if s.score is not None:
        m &= _in_range(cols.score, s.score, NULL_I32)
    if s.rating is not None:
        allowed = np.zeros(256, bool)  # a lookup table beats np.isin on millions of codes
        allowed[[RATINGS.index(r) for r in s.rating]] = True
        m &= allowed[cols.rating]
    w, h = cols.width, cols.height
    known = (w != NULL_I32) & (h != NULL_I32)
    if s.orientation == "horizontal":
        m &= known & (w > h)
    elif s.orientation == "vertical":
        m &= known & (h > w)
    elif s.orientation == "square":
        m &= known & (h == w)
    if s.min_width is not None:
        m &= (w != NULL_I32) & (w >= s.min_width)
    if s.min_height is not None:
        m &= (h != NULL_I32) & (h >= s.min_height)
    if s.min_pixels is not None:
        m &= known & (np.multiply(w, h, dtype=np.int64) >= s.min_pixels)
    if s.created_after is not None:
        m &= (cols.created_at != NULL_I64) & (cols.created_at >= _micros(s.created_after))
    if s.created_before is not None:
        m &= (cols.created_at != NULL_I64) & (cols.created_at < _micros(s.created_before))
    for tag in resolve(s.tags):
        if not m.any():
            break
        m &= cols.has_any([tag])
    if s.any_tags and m.any():
        m &= cols.has_any(resolve(s.any_tags))
    if s.exclude_tags and m.any():
        m &= ~cols.has_any(resolve(s.exclude_tags))
    if s.artists and m.any():
        m &= cols.has_any(resolve(s.artists), "artist")
    rows = np.flatnonzero(m)
    if len(rows):  # videos/ugoira only when asked for: checked last, on few rows
        m[rows] = cols.file_ext_in(rows, s.exts)
    return m


def _micros(dt) -> int:
    return int(dt.timestamp() * 1_000_000)


def rank_keys(cols, rows: np.ndarray, s: Subset, seed: int) -> np.ndarray:
    """Positions of `rows` sorted best first; ties by post id."""
    pid = cols.post_id[rows]
    if s.order == "random":
        primary = keyed_hash(seed, pid)
    elif s.order == "fav_count":
        primary = -cols.fav_count[rows].astype(np.int64)
    elif s.order == "score":
        primary = -cols.score[rows].astype(np.int64)
    else:
        primary = pid
    return np.lexsort((pid, primary)), primary


def top(cols, rows: np.ndarray, s: Subset, seed: int, limit: int | None) -> np.ndarray:
    """The best `limit` rows (all when None), best first."""
    if limit == 0:
        return rows[:0]
    if limit is not None and len(rows) > limit:
        _, primary = rank_keys(cols, rows, s, seed)
        cut = np.partition(primary, limit - 1)[limit - 1]
        rows = rows[primary <= cut]  # ties at the cut stay; lexsort settles them
    order, _ = rank_keys(cols, rows, s, seed)
    rows = rows[order]
    if s.match_tags_of:  # part of the quota from the training set's overfitting tags
        rows = match_tags.reorder(cols, rows, s)
    return rows if limit is None else rows[:limit]


# --- the selection run ----------------------------------------------------------


@dataclass
class SubsetResult:
    name: str
    quota: int | None
    eligible: int = 0
    selected: int = 0
    unmatched_artists: list[str] = field(default_factory=list)  # from its artists_file, in no post at all
    renamed_artists: list[tuple[str, str, int]] = field(default_factory=list)  # (user's name, alias target, posts)
    artist_posts: Counter = field(default_factory=Counter)  # eligible posts per listed artist (resolved name)


@dataclass
class Selection:
    table: pa.Table  # POST_SCHEMA + key + subset, in manifest order
    subsets: list[SubsetResult]
    skipped: Counter = field(default_factory=Counter)
    tag_shift: dict = field(default_factory=dict)  # match_tags_of subsets: curate.metadata.match_tags.record


def candidate_limits(query: Query) -> list[int | None]:
    """How many ranked candidates each subset must keep so that, after earlier
    subsets take theirs, its quota can still be filled."""
    limits, taken_before = [], 0
    for s in query.subsets:
        if s.count is None or s.max_per_artist is not None or taken_before is None or s.match_tags_of:
            limits.append(None)
        else:
            limits.append(s.count + taken_before)
        taken_before = None if s.count is None or taken_before is None else taken_before + s.count
    return limits


def query_tags(query: Query) -> list[str]:
    """Every tag name a query tests (what aliases may have renamed)."""
    names = [t for s in query.subsets for t in (*s.tags, *s.any_tags, *s.exclude_tags, *s.artists)]
    return list(dict.fromkeys(names))


def select(query: Query, source, aliases: dict[str, str] | None = None, progress=None,
           exclude_ids=None, artists_taken: dict[str, Counter] | None = None) -> Selection:
    """`aliases`: antecedent -> consequent (--aliases); the store's alias table and the
    live site's active aliases of the query's tags are added (these win).
    `exclude_ids`: post ids no subset may take (a refill: the manifest's own rows).
    `artists_taken`: subset -> posts per artist it holds already (a refill: max_per_artist
    counts the manifest's rows too)."""
    store = getattr(source, "store", None)
    aliases = dict(aliases or {})
    if store is not None:
        aliases.update(store.aliases)
    elif hasattr(source, "aliases_for"):  # the live site: the renamed tags of this query only
        aliases.update(source.aliases_for(query_tags(query)))
    excluded = np.unique(np.asarray(list(exclude_ids or ()), dtype=np.int64))
    if store is not None:
        sel = _select_store(query, store, aliases, excluded, artists_taken)
    else:
        sel = _select_stream(query, source, aliases, progress, excluded, artists_taken)
    match_tags.record(query, sel)
    return sel


def _eligible_rows(cols, s: Subset, aliases, excluded: np.ndarray) -> np.ndarray:
    rows = np.flatnonzero(eligible(cols, s, aliases))
    return rows[~np.isin(cols.post_id[rows], excluded)] if len(excluded) else rows


def _select_store(query: Query, store: Store, aliases, excluded=np.empty(0, np.int64),
                  artists_taken=None) -> Selection:
    cols = StoreColumns(store)
    results, ranked = [], []
    for s, limit in zip(query.subsets, candidate_limits(query)):
        rows = _eligible_rows(cols, s, aliases, excluded)
        results.append(SubsetResult(s.name, s.count, eligible=len(rows)))
        _count_artists(results[-1], cols, rows, s, aliases)
        rows = top(cols, rows, s, query.seed, limit)
        ranked.append((rows, cols.post_id[rows], cols.artists(rows) if s.max_per_artist is not None else None))
        res = results[-1]
        _report_artists(res, s.file_artists, aliases, lambda name: _store_has_artist(store, name))
    picks = _assign(query, ranked, results, artists_taken)
    tables = [store.take(rows[p]) for (rows, _, _), p in zip(ranked, picks)]
    return Selection(_label(query, tables), results)


def _store_has_artist(store: Store, name: str) -> bool:
    ids = store.tag_ids([name])
    ids = ids[ids >= 0]
    ids = ids[store.tag_categories[ids] == CATEGORY_CODE["artist"]]
    return any(store.postings_offsets[t + 1] > store.postings_offsets[t] for t in ids.tolist())


def _count_artists(res: SubsetResult, cols, rows: np.ndarray, s: Subset, aliases) -> None:
    """Eligible posts per artist of the subset's artists file (by the name posts carry)."""
    if not s.file_artists or not len(rows):
        return
    listed = {aliases.get(a, a) for a in s.file_artists}
    for names in cols.artists(rows):
        res.artist_posts.update(n for n in names if n in listed)


def _report_artists(res: SubsetResult, names, aliases, in_source) -> None:
    """A renamed artist is reported with its new name and eligible post count; the
    'a typo?' warning is for names no post of the source carries and no alias explains."""
    for a in names:
        if a in aliases:
            res.renamed_artists.append((a, aliases[a], res.artist_posts[aliases[a]]))
        elif not in_source(a):
            res.unmatched_artists.append(a)


def _select_stream(query: Query, source, aliases, progress, excluded=np.empty(0, np.int64),
                   artists_taken=None) -> Selection:
    limits = candidate_limits(query)
    pools: list[list[pa.Table]] = [[] for _ in query.subsets]
    sizes = [0] * len(query.subsets)
    results = [SubsetResult(s.name, s.count) for s in query.subsets]
    # A remote source crawls only what the query can match (server-side search).
    batches = source.batches_for(query) if hasattr(source, "batches_for") else source.batches()
    listed = {aliases.get(a, a) for s in query.subsets for a in s.file_artists}
    seen_artists: set[str] = set()
    for batch in batches:
        cols = BatchColumns(batch)
        if listed - seen_artists:
            seen_artists |= listed & set(pc.unique(pc.list_flatten(batch.column("tags_artist"))).to_pylist())
        for i, (s, limit) in enumerate(zip(query.subsets, limits)):
            rows = _eligible_rows(cols, s, aliases, excluded)
            results[i].eligible += len(rows)
            _count_artists(results[i], cols, rows, s, aliases)
            rows = top(cols, rows, s, query.seed, limit)
            if len(rows):
                pools[i].append(batch.take(pa.array(rows)))
                sizes[i] += len(rows)
            if limit is not None and sizes[i] > 2 * max(limit, 1000):  # keep memory O(quota)
                pools[i] = [_best(pa.concat_tables(pools[i]), s, query.seed, limit)]
                sizes[i] = pools[i][0].num_rows
        if progress is not None:
            progress(batch.num_rows)
    ranked = []
    for s, limit, pool in zip(query.subsets, limits, pools):
        table = _best(pa.concat_tables(pool), s, query.seed, limit) if pool else None
        if table is None:
            ranked.append((None, np.empty(0, np.int64), []))
            continue
        cols = BatchColumns(table)
        everything = np.arange(table.num_rows)
        ranked.append((table, cols.post_id, cols.artists(everything) if s.max_per_artist is not None else None))
    for s, res in zip(query.subsets, results):
        _report_artists(res, s.file_artists, aliases, seen_artists.__contains__)
    picks = _assign(query, ranked, results, artists_taken)
    tables = [t.take(pa.array(p)) if t is not None else None for (t, _, _), p in zip(ranked, picks)]
    return Selection(_label(query, tables), results, Counter(getattr(source, "skipped", {})))


def _best(table: pa.Table, s: Subset, seed: int, limit: int | None) -> pa.Table:
    cols = BatchColumns(table)
    return table.take(pa.array(top(cols, np.arange(table.num_rows), s, seed, limit)))


def _assign(query: Query, ranked, results, artists_taken=None) -> list[np.ndarray]:
    """Walk each subset's ranked candidates: skip posts an earlier subset took and
    artists at their max_per_artist (counting `artists_taken`); stop at the quota."""
    taken: set[int] = set()
    picks = []
    for s, (_, post_ids, artists), res in zip(query.subsets, ranked, results):
        chosen, per_artist = [], Counter((artists_taken or {}).get(s.name, {}))
        for j, pid in enumerate(post_ids.tolist()):
            if s.count is not None and len(chosen) >= s.count:
                break
            if pid in taken:
                continue
            if s.max_per_artist is not None:
                names = artists[j]
                if any(per_artist[a] >= s.max_per_artist for a in names):
                    continue
                per_artist.update(names)
            chosen.append(j)
            taken.add(pid)
        res.selected = len(chosen)
        picks.append(np.asarray(chosen, dtype=np.int64))
    return picks


def _label(query: Query, tables) -> pa.Table:
    from curate.schema import POST_SCHEMA

    parts = []
    for s, t in zip(query.subsets, tables):
        if t is None or t.num_rows == 0:
            continue
        keys = pc.binary_join_element_wise("danbooru/", t.column("post_id").cast(pa.string()), "")
        t = t.append_column("key", keys).append_column("subset", pa.array([s.name] * t.num_rows, pa.string()))
        parts.append(t)
    if not parts:
        empty = POST_SCHEMA.empty_table()
        return empty.append_column("key", pa.array([], pa.string())).append_column("subset", pa.array([], pa.string()))
    return pa.concat_tables(parts)
