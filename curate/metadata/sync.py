"""`curate sync`: build or update the local metadata store from a source.

New posts are added and changed ones replaced (newest `updated_at` wins, no
duplicates); active tag aliases are applied to stored posts. The result is
written as a new store generation (curate.metadata.store.write_generation), so an
interrupted sync leaves the previous store readable.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curate.errors import CurateError
from curate.metadata.store import (
    NULL_I64,
    Store,
    TagDict,
    dedupe_pairs,
    encode_posts,
    store_rows,
    utc_now,
    write_generation,
)
from curate.metadata.tables import list_parts, lists_from_pairs
from curate.schema import POST_SCHEMA


def load_aliases(path: str | os.PathLike) -> dict[str, str]:
    """Active aliases from a /tag_aliases.json dump (JSON array or JSON lines)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CurateError(f"cannot read aliases file {path}: {exc}") from None
    try:
        items = json.loads(text) if text.lstrip().startswith("[") else [
            json.loads(line) for line in text.splitlines() if line.strip()
        ]
    except json.JSONDecodeError as exc:
        raise CurateError(f"aliases file {path} is not JSON: {exc.msg} (line {exc.lineno})") from None
    out = {}
    for item in items:
        if not isinstance(item, dict) or item.get("status", "active") != "active":
            continue
        a, c = item.get("antecedent_name"), item.get("consequent_name")
        if isinstance(a, str) and isinstance(c, str) and a and c and a != c:
            out[a.lower()] = c.lower()
    return resolve_chains(out)


def resolve_chains(aliases: dict[str, str]) -> dict[str, str]:
    """a->b, b->c becomes a->c; cycles are dropped."""
    out = {}
    for start in aliases:
        seen, cur = {start}, aliases[start]
        while cur in aliases and cur not in seen:
            seen.add(cur)
            cur = aliases[cur]
        if cur not in seen:
            out[start] = cur
    return out


@dataclass
class SyncReport:
    store: Path
    read: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    stale: int = 0  # read again but older than the stored version: kept the stored one
    total: int = 0
    tags: int = 0
    aliases: int = 0
    skipped: Counter = field(default_factory=Counter)


def sync(source, store_path: str | os.PathLike, aliases_file: str | None = None, progress=None) -> SyncReport:
    """Add new posts from `source` and replace changed ones; write a new generation."""
    root = Path(store_path)
    old = Store(root) if (root / "CURRENT").is_file() else None
    if old is not None:
        tags = TagDict.from_table(pq.read_table(old.dir / "tags.parquet", columns=["name", "category"]))
        aliases = dict(old.aliases)
    else:
        tags, aliases = TagDict(), {}
    new_aliases = load_aliases(aliases_file) if aliases_file else {}
    aliases = resolve_chains({**aliases, **new_aliases})
    report = SyncReport(store=root)

    parts = []
    for batch in source.batches():
        parts.append(encode_posts(batch, tags, aliases))
        report.read += batch.num_rows
        if progress is not None:
            progress(batch.num_rows)
    report.skipped = Counter(getattr(source, "skipped", {}))
    new = _latest_per_id(pa.concat_tables(parts) if parts else None)

    if old is not None and len(old):
        prev = old.posts.select(new.column_names) if new is not None else old.posts
        if new_aliases:
            prev = _apply_aliases(prev, tags, aliases)
        if new is not None:
            merged, report.added, report.updated, report.unchanged, report.stale = _merge(prev, new)
        else:
            merged = prev
    else:
        merged = new if new is not None else None
        report.added = new.num_rows if new is not None else 0
    if merged is None:
        merged = store_rows(POST_SCHEMA.empty_table(), np.empty(0, np.int64), np.empty(0, np.int32), 0)
    merged = merged.sort_by("post_id")
    sources = (old.meta.get("sources", []) if old else []) + [
        {"source": source.describe(), "at": utc_now(), "read": report.read, "rating_scale": _scale(source)}
    ]
    write_generation(root, merged, tags, aliases, sources)
    report.total, report.tags, report.aliases = merged.num_rows, len(tags.names), len(aliases)
    return report


def _scale(source) -> dict:
    from curate.metadata.fetch import describe_scale

    return describe_scale(source)


def _latest_per_id(table: pa.Table | None) -> pa.Table | None:
    """Within one sync, a post seen twice keeps its newest version (last wins on ties)."""
    if table is None or table.num_rows == 0:
        return table
    ids = table.column("post_id").to_numpy()
    upd = pc.fill_null(table.column("updated_at").cast(pa.int64()), NULL_I64).to_numpy()
    order = np.lexsort((np.arange(len(ids)), upd, ids))
    last = np.ones(len(ids), bool)
    last[:-1] = ids[order][1:] != ids[order][:-1]
    return table.take(pa.array(order[last]))


def _merge(prev: pa.Table, new: pa.Table) -> tuple[pa.Table, int, int, int, int]:
    """Stored posts (sorted by id) + newly read ones: a post read again replaces the
    stored one unless it is older (by updated_at; unknown counts as oldest).
    Returns (merged, added, updated, unchanged, stale)."""
    old_ids = prev.column("post_id").to_numpy()
    new_ids = new.column("post_id").to_numpy()
    pos = np.searchsorted(old_ids, new_ids)
    in_old = pos < len(old_ids)
    in_old[in_old] = old_ids[pos[in_old]] == new_ids[in_old]
    old_upd = pc.fill_null(prev.column("updated_at").cast(pa.int64()), NULL_I64).to_numpy()
    new_upd = pc.fill_null(new.column("updated_at").cast(pa.int64()), NULL_I64).to_numpy()
    ou, nu = old_upd[pos[in_old]], new_upd[in_old]
    take_new = ~in_old
    take_new[in_old] = nu >= ou
    replaced = np.zeros(len(old_ids), bool)
    replaced[pos[in_old][nu >= ou]] = True
    merged = pa.concat_tables([prev.filter(pa.array(~replaced)), new.filter(pa.array(take_new))])
    return merged, int((~in_old).sum()), int((nu > ou).sum()), int((nu == ou).sum()), int((nu < ou).sum())


def _apply_aliases(table: pa.Table, tags: TagDict, aliases: dict[str, str]) -> pa.Table:
    """Re-point old posts' tags when new aliases arrived."""
    remap = np.arange(len(tags.names), dtype=np.int32)
    for ante, cons in aliases.items():
        a = tags.ids.get(ante)
        if a is not None:
            remap[a] = tags.encode([cons], tags.categories[a])[0]
    parents, flat = list_parts(table.column("tag_ids"))
    rows, ids = dedupe_pairs(parents, remap[flat.to_numpy()])
    col = lists_from_pairs(rows, pa.array(ids, pa.int32()), table.num_rows)
    return table.set_column(table.column_names.index("tag_ids"), "tag_ids", col)

