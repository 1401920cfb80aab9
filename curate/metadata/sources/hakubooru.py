"""`hakubooru:PATH` — a HakuBooru SQLite database (peewee schema).

Tables `post`, `tag` (type 0 general, 1 artist, 2 character, 3 copyright, 4 meta)
and `posttagrelation` (post_id, tag_id); post.rating 0..3 = g/s/q/e. Streams by
post-id windows: each window is one SELECT on `post` and one on the relation
table (indexed by post_id), turned into Arrow arrays with numpy, never one
Python object per tag.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.errors import CurateError
from curate.metadata.sources.posts import SIZE_COLUMNS, to_int, to_size
from curate.metadata.sources.rating_scale import check as check_scale
from curate.metadata.store import rank_of
from curate.metadata.tables import lists_from_pairs
from curate.schema import POST_SCHEMA

TYPE_TO_CATEGORY = {0: "general", 1: "artist", 2: "character", 3: "copyright", 4: "meta"}
RATINGS = np.array(["g", "s", "q", "e"], dtype=object)
POST_COLUMNS = {  # our name -> HakuBooru column
    "post_id": "id", "md5": "md5", "width": "image_width", "height": "image_height",
    "rating": "rating", "fav_count": "fav_count", "score": "score",
    "created_at": "created_at", "file_url": "file_url", "file_ext": "file_ext",
    "file_size": "file_size", "parent_id": "parent_id", "source": "source",
    "is_deleted": "is_deleted", "is_banned": "is_banned",
}


class HakuBooruSource:
    def __init__(self, path: str, rating_scale: str = "auto"):
        self.path = Path(path)
        self.old_scale = check_scale(rating_scale) == "old"  # HakuBooru's enum is the new scale
        if not self.path.is_file():
            raise CurateError(f"HakuBooru database not found: {self.path}")
        self.skipped: Counter = Counter()
        try:
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.DatabaseError as exc:
            raise CurateError(f"not a SQLite database: {self.path} ({exc})") from None
        missing = {"post", "tag", "posttagrelation"} - tables
        if missing:
            raise CurateError(f"{self.path} is not a HakuBooru database (missing tables: {', '.join(sorted(missing))})")
        cols = {r[1] for r in self.db.execute("PRAGMA table_info(post)")}
        self.columns = {ours: theirs for ours, theirs in POST_COLUMNS.items() if theirs in cols}
        indexed = {r[2] for idx in self.db.execute("PRAGMA index_list(posttagrelation)").fetchall()
                   for r in self.db.execute("SELECT * FROM pragma_index_info(?)", (idx[1],))}
        if "post_id" not in indexed:
            raise CurateError(
                f"{self.path}: posttagrelation has no index on post_id; create one with "
                "`CREATE INDEX posttagrelation_post_id ON posttagrelation(post_id)`"
            )

    def describe(self) -> str:
        return f"hakubooru:{self.path}"

    def describe_scale(self) -> dict:
        scale = "old" if self.old_scale else "new"
        return {"option": scale if self.old_scale else "auto", "applied": scale, "files": {scale: 1}}

    def _tag_table(self):
        """Tag ids sorted (looked up by binary search: no array sized by the largest id),
        with the row of each id's name (Arrow) and category index."""
        ids, names, types = [], [], []
        for tid, name, typ in self._tag_rows():
            if not isinstance(tid, int) or not isinstance(name, str):
                self.skipped["tag with a bad id or name"] += 1
                continue
            ids.append(tid)
            names.append(name)
            types.append(typ if typ in TYPE_TO_CATEGORY else 0)
        ids = np.asarray(ids, dtype=np.int64)
        order = np.argsort(ids, kind="stable")
        return (ids[order], order), pa.array(names, pa.string()), np.asarray(types, dtype=np.int8)

    def _tag_rows(self):
        return self.db.execute("SELECT id, name, type FROM tag")

    def _windows(self, batch_size: int):
        """(post rows, (post_id, tag_id) relation array) per window of post ids."""
        select = ", ".join(self.columns.values())
        last = -1
        while True:
            rows = self.db.execute(  # typeof: SQLite lets any column hold any type
                f"SELECT {select} FROM post WHERE id > ? AND typeof(id) = 'integer' ORDER BY id LIMIT ?",
                (last, batch_size),
            ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            rel = np.array(
                self.db.execute(
                    "SELECT post_id, tag_id FROM posttagrelation WHERE post_id BETWEEN ? AND ? "
                    "AND typeof(post_id) = 'integer' AND typeof(tag_id) = 'integer'",
                    (rows[0][0], last),
                ).fetchall(),
                dtype=np.int64,
            ).reshape(-1, 2)
            yield rows, rel

    def batches(self, batch_size: int = 50_000) -> Iterator[pa.Table]:
        slot, names, types = self._tag_table()
        name_rank = rank_of(names)
        for rows, rel in self._windows(batch_size):
            table = self._posts_table(rows)
            table = self._drop_hidden(self._attach_tags(table, rel, slot, names, types, name_rank))
            if table.num_rows:
                yield table

    def _posts_table(self, rows) -> pa.Table:
        """Untrusted values: a number of the wrong type or out of its column's range is
        nulled and counted (`skipped["bad <column>"]`), never the end of the run."""
        cols = list(zip(*rows))
        data = {}
        for i, ours in enumerate(self.columns):
            values = list(cols[i])
            typ = POST_SCHEMA.field(ours).type
            if pa.types.is_integer(typ):
                coerce = to_size if ours in SIZE_COLUMNS else to_int
                coerced = [coerce(v, typ.bit_width) for v in values]
                bad = sum(c is None and v is not None for c, v in zip(coerced, values))
                if bad:
                    self.skipped[f"bad {ours}"] += bad
                values = coerced
            elif pa.types.is_string(typ) and ours != "rating":  # rating: an int 0..3, below
                values = [v if isinstance(v, str) else None for v in values]
            if ours == "rating":
                r = np.array([v if isinstance(v, int) and 0 <= v <= 3 else -1 for v in values])
                if self.old_scale:  # the user says 1 meant safe
                    r = np.where(r == 1, 0, r)
                values = [RATINGS[v] if v >= 0 else None for v in r]
            elif ours == "created_at":
                values = _parse_times(values)
            elif ours in ("is_deleted", "is_banned"):
                values = [bool(v) for v in values]
            data[ours] = values
        return pa.table({f.name: pa.array(data[f.name], f.type) if f.name in data else pa.nulls(len(rows), f.type)
                         for f in POST_SCHEMA if not f.name.startswith("tags_")})

    def _attach_tags(self, table, rel, slot, names, types, name_rank) -> pa.Table:
        post_ids = table.column("post_id").to_numpy()
        sorted_ids, order = slot
        tid = rel[:, 1]
        pos = np.searchsorted(sorted_ids, tid)
        known = pos < len(sorted_ids)
        known[known] = sorted_ids[pos[known]] == tid[known]  # a relation to a missing tag is dropped
        rel, idx = rel[known], order[pos[known]]
        row = np.searchsorted(post_ids, rel[:, 0])
        found = row < len(post_ids)
        found[found] = post_ids[row[found]] == rel[found, 0]  # a relation to a missing post is dropped
        row, idx = row[found], idx[found]
        cat = types[idx]
        for code, category in TYPE_TO_CATEGORY.items():
            m = cat == code
            r, t = row[m], idx[m]
            order = np.lexsort((name_rank[t], r))
            lists = lists_from_pairs(r[order], names.take(pa.array(t[order])), len(post_ids))
            table = table.append_column(f"tags_{category}", lists)
        return table.select(POST_SCHEMA.names).cast(POST_SCHEMA)

    def _drop_hidden(self, table: pa.Table) -> pa.Table:
        # HakuBooru users take images from tar shards by id, so a missing file_url
        # alone does not hide a post here; missing both md5 and URL does.
        visible = pc.or_(pc.is_valid(table.column("md5")), pc.is_valid(table.column("file_url")))
        visible = pc.fill_null(visible, False)
        hidden = table.num_rows - pc.sum(visible).as_py() if table.num_rows else 0
        if hidden:
            self.skipped["hidden"] += hidden
        return table.filter(visible)


def _parse_times(values) -> pa.Array:
    from curate.metadata.sources.posts import to_time

    return pa.array([to_time(v) if isinstance(v, str) else None for v in values], pa.timestamp("us", tz="UTC"))
