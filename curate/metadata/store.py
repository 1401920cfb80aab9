"""curate's local metadata store: its layout, reading it, writing a generation.
(`curate sync`, which fills it from a source, is curate/metadata/sync.py.)

Layout (one generation folder is live; `CURRENT` names it):

    STORE/CURRENT               name of the live generation, swapped atomically
    STORE/gen-000007/
        posts.parquet           every post, sorted by post_id, tags as tag ids
                                (the interchange copy: DuckDB, pandas, Spark)
        tags.parquet            tag_id, name, category, post_count
        aliases.parquet         antecedent -> consequent (active aliases)
        posts.arrow             the same posts, uncompressed Arrow IPC with
                                query-friendly columns; memory-mapped at query time
        postings.arrow          tag_id -> rows (inverted index), memory-mapped
        tags.arrow              tag names, categories and name order, memory-mapped
        meta.json               counts, sources, format version

A sync writes a whole new generation next to the live one and then swaps
CURRENT, so an interrupted sync leaves the previous store readable.
"""

from __future__ import annotations

import bisect
import json
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate import __version__
from curate.errors import CurateError
from curate.metadata.tables import csr_gather, list_parts, lists_from_pairs
from curate.schema import POST_SCHEMA, RATINGS, TAG_CATEGORIES, TAG_COLUMNS

FORMAT = 1
NULL_I32 = np.iinfo(np.int32).min
NULL_I64 = np.iinfo(np.int64).min
FLAG_DELETED, FLAG_BANNED, FLAG_PENDING = 1, 2, 4
CATEGORY_CODE = {c: i for i, c in enumerate(TAG_CATEGORIES)}

# Columns kept as they are (nullable) for output rows.
DETAIL_COLUMNS = ("md5", "updated_at", "file_url", "file_ext", "file_size", "parent_id", "source", "variants")


# --- tag dictionary and aliases -------------------------------------------------


@dataclass
class TagDict:
    names: list[str] = field(default_factory=list)
    categories: list[int] = field(default_factory=list)
    ids: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_table(cls, table: pa.Table) -> "TagDict":
        names = table.column("name").to_pylist()
        cats = [CATEGORY_CODE.get(c, 0) for c in table.column("category").to_pylist()]
        return cls(names, cats, {n: i for i, n in enumerate(names)})

    def encode(self, names: list[str], category: int) -> np.ndarray:
        out = np.empty(len(names), dtype=np.int32)
        for i, name in enumerate(names):
            tid = self.ids.get(name)
            if tid is None:
                tid = self.ids[name] = len(self.names)
                self.names.append(name)
                self.categories.append(category)
            else:
                self.categories[tid] = category  # the newest source decides
            out[i] = tid
        return out


# --- the store ------------------------------------------------------------------


class Store:
    """A read-only view of the live generation."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        current = self.root / "CURRENT"
        if not current.is_file():
            raise CurateError(f"no curate store at {self.root} (run `curate sync SOURCE --store {self.root}`)")
        self.dir = self.root / current.read_text().strip()
        try:
            self.meta = json.loads((self.dir / "meta.json").read_text())
            self.posts = pa.ipc.open_file(pa.memory_map(str(self.dir / "posts.arrow"))).read_all()
            self._postings = pa.ipc.open_file(pa.memory_map(str(self.dir / "postings.arrow"))).read_all()
            tags = pa.ipc.open_file(pa.memory_map(str(self.dir / "tags.arrow"))).read_all()
            aliases = pq.ParquetFile(self.dir / "aliases.parquet").read()  # read_table would import pandas
        except (OSError, pa.ArrowException, json.JSONDecodeError) as exc:
            raise CurateError(f"store at {self.root} is damaged: {exc}") from None
        self.tag_names = one_chunk(tags.column("name"))
        self.tag_categories = one_chunk(tags.column("category")).to_numpy()
        self.tag_name_rank = one_chunk(tags.column("rank")).to_numpy()
        self._by_name = one_chunk(tags.column("by_name")).to_numpy()
        self.aliases = dict(zip(aliases.column("antecedent").to_pylist(), aliases.column("consequent").to_pylist()))
        lists = one_chunk(self._postings.column("rows"))
        self.postings_offsets = lists.offsets.to_numpy()
        self.postings_rows = lists.values.to_numpy()
        tag_lists = one_chunk(self.posts.column("tag_ids"))
        self.post_tag_offsets = tag_lists.offsets.to_numpy()
        self.post_tag_ids = tag_lists.values.to_numpy()

    def __len__(self) -> int:
        return self.posts.num_rows

    def col(self, name: str) -> np.ndarray:
        """A query column as numpy (zero-copy from the memory map)."""
        if not self.posts.num_rows:
            return np.empty(0, self.posts.schema.field(name).type.to_pandas_dtype())
        return self.posts.column(name).chunk(0).to_numpy()

    def tag_ids(self, names: list[str]) -> np.ndarray:
        """Store ids of the given (alias-resolved) names; -1 where unknown.

        Binary search in name order: a handful of lookups among millions of tags
        without building a hash table per query."""
        sorted_names = _NameView(self.tag_names, self._by_name)
        out = np.full(len(names), -1, np.int64)
        for i, name in enumerate(names):
            j = bisect.bisect_left(sorted_names, name)
            if j < len(sorted_names) and sorted_names[j] == name:
                out[i] = self._by_name[j]
        return out

    def mask_with_any(self, names: list[str], category: str | None = None) -> np.ndarray:
        """Boolean mask over rows: the post carries at least one of the tags."""
        ids = self.tag_ids(names)
        ids = ids[ids >= 0]
        if category is not None:
            ids = ids[self.tag_categories[ids] == CATEGORY_CODE[category]]
        mask = np.zeros(len(self), bool)
        for tid in ids.tolist():  # scatter each posting list: no sort, no copy of the index
            mask[self.postings_rows[self.postings_offsets[tid]:self.postings_offsets[tid + 1]]] = True
        return mask

    def post_tags(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(tag ids, owner position in `rows`) for the given rows."""
        return csr_gather(self.post_tag_offsets, self.post_tag_ids, np.asarray(rows, np.int64))

    def take(self, rows: np.ndarray) -> pa.Table:
        """Normalized posts (POST_SCHEMA) for the given rows, in that order."""
        part = self.posts.take(pa.array(np.asarray(rows, np.int64)))
        return decode_posts(part, self.tag_names, self.tag_categories, self.tag_name_rank)

    def batches(self, batch_size: int = 50_000) -> Iterator[pa.Table]:
        for start in range(0, len(self), batch_size):
            yield self.take(np.arange(start, min(start + batch_size, len(self))))


class _NameView:
    """Tag names in name order, as a sequence `bisect` can search."""

    def __init__(self, names: pa.Array, by_name: np.ndarray):
        self.names, self.by_name = names, by_name

    def __len__(self) -> int:
        return len(self.by_name)

    def __getitem__(self, i: int) -> str:
        return self.names[int(self.by_name[i])].as_py()


def rating_codes(column) -> np.ndarray:
    """g/s/q/e -> 0..3 as uint8; anything else (null) -> 255."""
    values = column.to_numpy(zero_copy_only=False)
    codes = np.full(len(values), 255, np.uint8)
    for code, r in enumerate(RATINGS):
        codes[values == r] = code
    return codes


def one_chunk(col: pa.ChunkedArray) -> pa.Array:
    """The column as one Array, without a copy when it already is one chunk
    (combine_chunks copies even then, which defeats the memory map)."""
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


# --- conversions between normalized posts and store rows ------------------------


def encode_posts(batch: pa.Table, tags: TagDict, aliases: dict[str, str]) -> pa.Table:
    """POST_SCHEMA table -> store rows (query columns + tag_ids + details)."""
    n = batch.num_rows
    parents, ids = [], []
    for cat, column in zip(TAG_CATEGORIES, TAG_COLUMNS):
        p, flat = list_parts(batch.column(column))
        if len(flat) == 0:
            continue
        uniq = pc.unique(flat)
        names = [aliases.get(t, t) for t in uniq.to_pylist()]
        codes = tags.encode(names, CATEGORY_CODE[cat])
        parents.append(p)
        ids.append(codes[pc.index_in(flat, value_set=uniq).to_numpy()])
    p = np.concatenate(parents) if parents else np.empty(0, np.int64)
    t = np.concatenate(ids) if ids else np.empty(0, np.int32)
    return store_rows(batch, *dedupe_pairs(p, t), n)


def dedupe_pairs(rows: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort (row, tag id) pairs and drop repeats (aliases can merge two tags)."""
    order = np.lexsort((ids, rows))
    rows, ids = rows[order], ids[order]
    keep = np.ones(len(rows), bool)
    keep[1:] = (rows[1:] != rows[:-1]) | (ids[1:] != ids[:-1])
    return rows[keep], ids[keep]


def store_rows(batch: pa.Table, rows: np.ndarray, ids: np.ndarray, n: int) -> pa.Table:
    def i32(name):
        return pc.fill_null(batch.column(name), NULL_I32).combine_chunks().cast(pa.int32())

    rating = rating_codes(batch.column("rating"))
    flags = np.zeros(n, np.uint8)
    for flag, name in ((FLAG_DELETED, "is_deleted"), (FLAG_BANNED, "is_banned"), (FLAG_PENDING, "is_pending")):
        flags[pc.fill_null(batch.column(name), False).to_numpy(zero_copy_only=False)] |= flag
    created = pc.fill_null(batch.column("created_at").cast(pa.int64()), NULL_I64)
    cols = {
        "post_id": batch.column("post_id").combine_chunks(),
        "width": i32("width"), "height": i32("height"),
        "fav_count": i32("fav_count"), "score": i32("score"),
        "rating": pa.array(rating), "flags": pa.array(flags),
        "created_at": created.combine_chunks(),
        "tag_ids": lists_from_pairs(rows, pa.array(ids, pa.int32()), n),
    }
    for name in DETAIL_COLUMNS:
        cols[name] = batch.column(name).combine_chunks()
    return pa.table(cols)


def rank_of(names: pa.Array) -> np.ndarray:
    """Position of each tag in name order (tags come out sorted, as Danbooru's)."""
    rank = np.empty(len(names), np.int64)
    rank[pc.sort_indices(names).to_numpy()] = np.arange(len(names))
    return rank


def decode_posts(part: pa.Table, tag_names: pa.Array, tag_categories: np.ndarray, name_rank: np.ndarray) -> pa.Table:
    """Store rows -> POST_SCHEMA table."""
    n = part.num_rows
    parents, flat = list_parts(part.column("tag_ids"))
    flat = flat.to_numpy() if len(flat) else np.empty(0, np.int32)
    order = np.lexsort((name_rank[flat], parents)) if len(flat) else np.empty(0, np.int64)
    parents, flat = parents[order], flat[order]
    cats = tag_categories[flat] if len(flat) else np.empty(0, np.int8)
    out = {}
    for code, column in enumerate(TAG_COLUMNS):
        m = cats == code
        out[column] = lists_from_pairs(parents[m], tag_names.take(pa.array(flat[m])), n)

    def nullable(name, sentinel, typ):
        arr = part.column(name).combine_chunks()
        return pc.if_else(pc.equal(arr, sentinel), pa.scalar(None, arr.type), arr).cast(typ)

    rating = part.column("rating").to_numpy()
    flags = part.column("flags").to_numpy()
    out.update(
        post_id=part.column("post_id"),
        width=nullable("width", NULL_I32, pa.int32()), height=nullable("height", NULL_I32, pa.int32()),
        fav_count=nullable("fav_count", NULL_I32, pa.int32()), score=nullable("score", NULL_I32, pa.int32()),
        rating=pa.array([RATINGS[r] if r < 4 else None for r in rating], pa.string()),
        created_at=nullable("created_at", NULL_I64, pa.int64()).cast(POST_SCHEMA.field("created_at").type),
        is_deleted=pa.array(flags & FLAG_DELETED > 0), is_banned=pa.array(flags & FLAG_BANNED > 0),
        is_pending=pa.array(flags & FLAG_PENDING > 0),
    )
    for name in DETAIL_COLUMNS:
        out[name] = part.column(name)
    return pa.table({f.name: out[f.name] for f in POST_SCHEMA}).cast(POST_SCHEMA)


def write_generation(root: Path, posts: pa.Table, tags: TagDict, aliases: dict[str, str], sources: list) -> Path:
    """Write a complete generation folder, then make it live."""
    root.mkdir(parents=True, exist_ok=True)
    current = root / "CURRENT"
    gens = sorted(int(p.name[4:]) for p in root.glob("gen-*") if p.name[4:].isdigit())
    gen = root / f"gen-{(gens[-1] + 1 if gens else 1):06d}"
    shutil.rmtree(gen, ignore_errors=True)
    gen.mkdir()

    posts = posts.combine_chunks()
    tag_lists = posts.column("tag_ids").chunk(0) if posts.num_rows else pa.array([], pa.list_(pa.int32()))
    flat = tag_lists.flatten().to_numpy() if len(tag_lists.flatten()) else np.empty(0, np.int32)
    counts = np.bincount(flat, minlength=len(tags.names)) if len(tags.names) else np.empty(0, np.int64)
    pq.write_table(posts, gen / "posts.parquet", compression="zstd", row_group_size=256_000)
    names = pa.array(tags.names, pa.string())
    pq.write_table(pa.table({
        "tag_id": pa.array(np.arange(len(tags.names), dtype=np.int32)),
        "name": names,
        "category": pa.array([TAG_CATEGORIES[c] for c in tags.categories], pa.string()),
        "post_count": pa.array(counts.astype(np.int64)),
    }), gen / "tags.parquet")
    rank = rank_of(names)
    by_name = np.empty(len(rank), np.int32)
    by_name[rank] = np.arange(len(rank), dtype=np.int32)
    _write_arrow(pa.table({"name": names, "category": pa.array(np.asarray(tags.categories, np.int8)),
                           "rank": pa.array(rank), "by_name": pa.array(by_name)}), gen / "tags.arrow")
    pq.write_table(pa.table({"antecedent": pa.array(list(aliases), pa.string()),
                             "consequent": pa.array(list(aliases.values()), pa.string())}), gen / "aliases.parquet")
    _write_arrow(posts, gen / "posts.arrow")
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    post_offsets = tag_lists.offsets.to_numpy() if posts.num_rows else np.zeros(1, np.int32)
    rows = _postings(flat, post_offsets - post_offsets[0], offsets)
    postings = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(rows, pa.int32()))
    _write_arrow(pa.table({"rows": postings}), gen / "postings.arrow")
    (gen / "meta.json").write_text(json.dumps({
        "format": FORMAT, "version": __version__, "written": utc_now(), "posts": posts.num_rows,
        "tags": len(tags.names), "aliases": len(aliases),
        "max_post_id": int(posts.column("post_id").to_numpy().max()) if posts.num_rows else None,
        "sources": sources,
    }, indent=1))

    tmp = root / "CURRENT.tmp"
    tmp.write_text(gen.name)
    _fsync_dir(gen)
    os.replace(tmp, current)
    _fsync_dir(root)
    for old in root.glob("gen-*"):  # the previous and any half-written generations
        if old.name != gen.name:
            shutil.rmtree(old, ignore_errors=True)
    return gen


def _postings(flat: np.ndarray, post_offsets: np.ndarray, tag_offsets: np.ndarray, chunk: int = 8_000_000) -> np.ndarray:
    """Inverted index rows: for each tag, the rows carrying it, ascending.

    A counting sort in chunks of the (row, tag) pairs, so memory stays near the
    size of the output instead of a full argsort's int64 index."""
    rows = np.empty(len(flat), np.int32)
    fill = tag_offsets[:-1].copy()
    for start in range(0, len(flat), chunk):
        ids = flat[start:start + chunk]
        owner = (np.searchsorted(post_offsets, np.arange(start, start + len(ids)), side="right") - 1).astype(np.int32)
        order = np.argsort(ids, kind="stable")
        ids_sorted = ids[order]
        first = np.searchsorted(ids_sorted, ids_sorted, side="left")  # rank within its tag in this chunk
        rows[fill[ids_sorted] + (np.arange(len(ids)) - first)] = owner[order]
        fill += np.bincount(ids, minlength=len(fill))
    return rows


def _write_arrow(table: pa.Table, path: Path) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table.combine_chunks(), max_chunksize=max(table.num_rows, 1))


def _fsync_dir(path: Path) -> None:
    for f in [path, *path.iterdir()] if path.is_dir() else [path]:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
