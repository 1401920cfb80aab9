"""HakuBooru's database as Parquet tables, read as `hakubooru:` reads the SQLite file.

HakuBooru's export_parquet notebook writes each SQLite table with pandas
(`pd.read_sql_query("SELECT * FROM t").to_parquet("t.parquet")`): post.parquet,
tag.parquet, posttagrelation.parquet (and localpost.parquet, unused). The tables
are told apart by their columns, not their names: post (id, md5, image_width,
image_height, rating as an integer 0-3), tag (id, name, type), relation (post_id,
tag_id). A post table without both tag tables is an error naming what is missing:
read alone it would give tagless, unrated posts.

DuckDB reads the files in place: posts ordered by id in windows, the relation
table streamed once ordered by post_id and merged with the windows, so memory
stays at one window however big the relation table is.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curate.errors import CurateError
from curate.metadata.sources.hakubooru import POST_COLUMNS, HakuBooruSource
from curate.metadata.sources.rating_scale import check as check_scale

POST_KEYS = {"id", "md5", "image_width", "image_height", "rating"}
TAG_KEYS = {"id", "name", "type"}
REL_KEYS = {"post_id", "tag_id"}
NAMES = {"post": "post", "tag": "tag", "posttagrelation": "posttagrelation"}


def table_kind(f: Path) -> str | None:
    """'post', 'tag', 'posttagrelation' or None, from a Parquet file's columns."""
    try:
        schema = pq.read_schema(f)
    except (pa.ArrowException, OSError):
        return None
    names = set(schema.names)
    if POST_KEYS <= names and not any(n.startswith("tag_string") for n in names) and "tags" not in names \
            and pa.types.is_integer(schema.field("rating").type):
        return "post"
    if TAG_KEYS <= names and "md5" not in names:
        return "tag"
    if REL_KEYS <= names and "md5" not in names:
        return "posttagrelation"
    return None


def find_tables(files: list[Path], root: Path):
    """(HakuBooruParquet or None, the files that are not its tables)."""
    from curate.metadata.sources.dump import sniff

    tables: dict[str, list[Path]] = {}
    rest = []
    for f in files:
        kind = table_kind(f) if sniff(f) == "parquet" else None
        if kind is None:
            rest.append(f)
        else:
            tables.setdefault(kind, []).append(f)
    if not tables:
        return None, rest
    return HakuBooruParquet(tables, root), rest


class HakuBooruParquet(HakuBooruSource):
    """The SQLite source's conversion (_posts_table, _attach_tags) over DuckDB views."""

    def __init__(self, tables: dict[str, list[Path]], root: Path, rating_scale: str = "auto"):
        import duckdb

        self.path = Path(root)
        self.old_scale = check_scale(rating_scale) == "old"
        self.skipped = Counter()
        missing = [k for k in NAMES if k not in tables]
        if missing:
            found = ", ".join(f"{k} ({', '.join(p.name for p in v)})" for k, v in sorted(tables.items()))
            raise CurateError(
                f"{root}: HakuBooru Parquet tables found: {found}; missing: {', '.join(missing)}. "
                "Its posts carry no tags or ratings without them: put post, tag and posttagrelation "
                "(as HakuBooru's export_parquet writes them) in one folder")
        self.db = duckdb.connect()
        for name, files in tables.items():
            paths = ", ".join("'" + str(p).replace("'", "''") + "'" for p in files)
            self.db.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet([{paths}])")
        cols = {d[0] for d in self.db.execute("SELECT * FROM post LIMIT 0").description}
        self.columns = {ours: theirs for ours, theirs in POST_COLUMNS.items() if theirs in cols}

    def describe(self) -> str:
        return f"hakubooru:{self.path}"

    def _tag_rows(self):
        return self.db.execute("SELECT id, name, type FROM tag").fetchall()

    def _windows(self, batch_size: int):
        select = ", ".join(f'"{c}"' for c in self.columns.values())
        posts = self.db.cursor()
        posts.execute(f"SELECT {select} FROM post WHERE id IS NOT NULL ORDER BY id")
        rel = self.db.cursor().sql("SELECT CAST(post_id AS BIGINT), CAST(tag_id AS BIGINT) FROM posttagrelation "
                                   "WHERE post_id IS NOT NULL AND tag_id IS NOT NULL ORDER BY post_id")
        stream = getattr(rel, "to_arrow_reader", None) or rel.fetch_arrow_reader  # duckdb 2 / 1
        reader = stream(200_000)
        pending, done = np.empty((0, 2), np.int64), False
        while True:
            rows = posts.fetchmany(batch_size)
            if not rows:
                return
            last = rows[-1][0]
            while not done and (not len(pending) or pending[-1, 0] <= last):
                try:
                    b = reader.read_next_batch()
                except StopIteration:
                    done = True
                    break
                got = np.stack([b.column(0).to_numpy(zero_copy_only=False),
                                b.column(1).to_numpy(zero_copy_only=False)], axis=1).astype(np.int64)
                pending = np.concatenate([pending, got])
            cut = np.searchsorted(pending[:, 0], last, side="right")
            yield rows, pending[:cut]
            pending = pending[cut:]
