"""`dump:PATH` — API-shaped posts from a JSON array, JSON lines (.gz too) or Parquet.

A folder is read recursively, each file by its content, not its name: JSON or JSON
lines (a gallery-dl folder: one `<image>.json` object beside each image), gzip of
those, Parquet. Anything else (the images themselves, notes) is skipped and counted
(`skipped["files not metadata"]`). HakuBooru's tables exported as Parquet (`post`,
`tag`, `posttagrelation`, told apart by their columns) are read as `hakubooru:`
reads the SQLite file (curate.metadata.sources.hakubooru_parquet).

Streams: JSON lines and Parquet are read batch by batch; a JSON array (or a
single post object, as /posts/N.json returns) is parsed whole, which is how such
files are made. Unparseable lines and hidden posts are counted, not fatal.

Ratings: each file's scale is judged on its own (curate.metadata.sources.rating_scale)
unless `rating_scale` says old or new; `scales` records the verdict per file.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from curate.errors import CurateError
from curate.metadata.sources import rating_scale as rating_scale_mod
from curate.metadata.sources.posts import normalize, rows_to_table

log = logging.getLogger("curate.dump")
NOT_METADATA = "files not metadata"


def sniff(f: Path) -> str | None:
    """'json', 'gzip', 'parquet' or None, from the first bytes."""
    try:
        with open(f, "rb") as fh:
            head = fh.read(512)
    except OSError:
        return None
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith(b"\x1f\x8b"):  # gzip of what? (a .tar.gz of images is not ours)
        try:
            with gzip.open(f, "rb") as fh:
                head = fh.read(512)
        except (OSError, EOFError):
            return None
        return "gzip" if _json_start(head) else None
    return "json" if _json_start(head) else None


def _one_object(f: Path, limit: int = 1 << 20) -> bool:
    """A small file holding one JSON object (not lines, not an array)."""
    try:
        if f.stat().st_size > limit:
            return False
        return isinstance(json.loads(f.read_text(encoding="utf-8-sig", errors="replace")), dict)
    except (OSError, ValueError):
        return False


def _json_start(head: bytes) -> bool:
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    return text[:1] in (b"[", b"{")


class DumpSource:
    def __init__(self, path: str, rating_scale: str = "auto"):
        from curate.metadata.sources.hakubooru_parquet import find_tables

        self.path = Path(path)
        if not self.path.exists():
            raise CurateError(f"dump not found: {self.path}")
        self.skipped: Counter = Counter()
        self.rating_scale = rating_scale
        self.scale_option = rating_scale_mod.check(rating_scale)
        self.scales: dict[str, str] = {}  # file -> old | new
        self.warnings: list[str] = []
        self.files = sorted(p for p in self.path.rglob("*") if p.is_file()) if self.path.is_dir() else [self.path]
        self.haku, self.files = find_tables(self.files, self.path)  # HakuBooru's Parquet tables, the rest
        if self.haku is not None:
            self.haku.old_scale = self.scale_option == "old"

    def describe(self) -> str:
        return f"dump:{self.path}"

    def batches(self, batch_size: int = 20_000) -> Iterator[pa.Table]:
        # A post seen twice (overlapping dump files) is read once, the first time;
        # `curate sync` is the way to merge versions by updated_at.
        rows, seen = [], set()
        if self.haku is not None:
            for table in self.haku.batches(batch_size):
                seen.update(table.column("post_id").to_pylist())
                yield table
            self.skipped.update(self.haku.skipped)
        for post, scale in self._posts():
            row, reason = normalize(post, scale)
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

    def _posts(self) -> Iterator[tuple[dict, str]]:
        for unit in self._units():
            scale = self.scale_option
            if scale == "auto":
                name = str(unit[0][0]) if len(unit) == 1 else f"{unit[0][0].parent} ({len(unit)} one-post files)"
                verdict = rating_scale_mod.judge((p for f, read in unit for p in read(f, Counter())), name)
                scale = verdict.scale
                if verdict.warning:
                    log.warning("%s", verdict.warning)
                    self.warnings.append(verdict.warning)
            for f, read in unit:
                self.scales[str(f)] = scale
                for post in read(f, self.skipped):
                    yield post, scale

    def _units(self) -> list[list]:
        """Files judged together for their rating scale: each file on its own, except
        one-post JSON files (gallery-dl writes one beside each image), judged per folder:
        one post says little, a folder saved in one run says more."""
        units, by_dir = [], {}
        for f in self.files:
            kind = sniff(f)
            if kind is None:
                if f == self.path:  # named on its own: the user meant it
                    raise CurateError(f"not JSON, JSON lines, gzip or Parquet: {f}")
                self.skipped[NOT_METADATA] += 1
                continue
            read = self._parquet if kind == "parquet" else self._json
            if kind == "json" and _one_object(f):
                if f.parent not in by_dir:
                    by_dir[f.parent] = []
                    units.append(by_dir[f.parent])
                by_dir[f.parent].append((f, read))
            else:
                units.append([(f, read)])
        return units

    def describe_scale(self) -> dict:
        scales = dict(self.scales)
        if self.haku is not None:
            scales[str(self.haku.path)] = "old" if self.haku.old_scale else "new"
        return rating_scale_mod.summary(self.scale_option, scales)

    def _parquet(self, f: Path, skipped: Counter) -> Iterator[dict]:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as exc:
            raise CurateError(f"not a readable Parquet dump: {f} ({exc})") from None
        for batch in pf.iter_batches(batch_size=10_000):
            yield from batch.to_pylist()

    def _json(self, f: Path, skipped: Counter) -> Iterator[dict]:
        opener = gzip.open if sniff(f) == "gzip" else open
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
                        skipped["bad json line"] += 1
        except json.JSONDecodeError as exc:
            raise CurateError(f"not JSON or JSON lines: {f} ({exc.msg}, line {exc.lineno})") from None
        except (OSError, EOFError) as exc:
            raise CurateError(f"cannot read dump {f}: {exc}") from None
