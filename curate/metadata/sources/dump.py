"""`dump:PATH` — API-shaped posts from a JSON array, JSON lines (.gz too) or Parquet.

Streams: JSON lines and Parquet are read batch by batch; a JSON array (or a
single post object, as /posts/N.json returns) is parsed whole, which is how such
files are made. Unparseable lines and hidden posts are counted, not fatal.
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from curate.errors import CurateError
from curate.metadata.sources.posts import normalize, rows_to_table


class DumpSource:
    def __init__(self, path: str):
        self.path = Path(path)
        if not self.path.exists():
            raise CurateError(f"dump not found: {self.path}")
        self.skipped: Counter = Counter()

    def describe(self) -> str:
        return f"dump:{self.path}"

    def batches(self, batch_size: int = 20_000) -> Iterator[pa.Table]:
        # A post seen twice (overlapping dump files) is read once, the first time;
        # `curate sync` is the way to merge versions by updated_at.
        rows, seen = [], set()
        for post in self._posts():
            row, reason = normalize(post)
            if row is None:
                self.skipped[reason] += 1
                continue
            if row["post_id"] in seen:
                self.skipped["repeated id"] += 1
                continue
            seen.add(row["post_id"])
            rows.append(row)
            if len(rows) >= batch_size:
                yield rows_to_table(rows)
                rows = []
        if rows:
            yield rows_to_table(rows)

    def _posts(self) -> Iterator[dict]:
        files = sorted(p for p in self.path.rglob("*") if p.is_file()) if self.path.is_dir() else [self.path]
        for f in files:
            if f.name.endswith(".parquet"):
                yield from self._parquet(f)
            else:
                yield from self._json(f)

    def _parquet(self, f: Path) -> Iterator[dict]:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as exc:
            raise CurateError(f"not a readable Parquet dump: {f} ({exc})") from None
        for batch in pf.iter_batches(batch_size=10_000):
            yield from batch.to_pylist()

    def _json(self, f: Path) -> Iterator[dict]:
        opener = gzip.open if f.name.endswith(".gz") else open
        try:
            # utf-8-sig: a BOM (Windows editors) would make the first line unparseable
            with opener(f, "rt", encoding="utf-8-sig", errors="replace") as fh:
                head = fh.read(1)
                while head and head.isspace():
                    head = fh.read(1)
                if head == "[":
                    data = json.loads(head + fh.read())
                    yield from data if isinstance(data, list) else [data]
                    return
                first = head + fh.readline()
                try:
                    yield json.loads(first)
                except json.JSONDecodeError:
                    # A pretty-printed single object: parse the whole file.
                    yield json.loads(first + fh.read())
                    return
                for line in fh:
                    if not line.strip():
                        continue
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        self.skipped["bad json line"] += 1
        except json.JSONDecodeError as exc:
            raise CurateError(f"not JSON or JSON lines: {f} ({exc.msg}, line {exc.lineno})") from None
        except (OSError, EOFError) as exc:
            raise CurateError(f"cannot read dump {f}: {exc}") from None
