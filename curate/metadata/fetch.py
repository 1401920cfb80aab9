"""`curate fetch` / `curate build-reg`: a query run against a source -> manifest.

build-reg is fetch for regularization sets: it records the class token and marks
the manifest as a reg set (captions and export read both from the provenance).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from curate import manifest
from curate.errors import CurateError
from curate.metadata import query as query_mod
from curate.metadata.select import Selection, select
from curate.schema import MANIFEST_SCHEMA, STAGE_FIELDS


@dataclass
class FetchResult:
    out: Path
    selection: Selection
    source: str


def fetch(query_path: str | Path, source, out: str | Path, kind: str = "fetch",
          seed: int | None = None, progress=None, outside_files: bool = False,
          aliases_file: str | Path | None = None) -> FetchResult:
    """`aliases_file`: a /tag_aliases.json dump (--aliases): renamed tags of a local source."""
    q = query_mod.load(query_path, outside_files)
    if seed is not None:
        q.seed = seed
    if kind == "reg" and not q.class_token:
        raise CurateError(f"{query_path}: a regularization query needs class_token (e.g. class_token = \"solo\")")
    aliases = None
    if aliases_file is not None:
        from curate.metadata.sync import load_aliases

        aliases = load_aliases(aliases_file)
    selection = select(q, source, aliases=aliases, progress=progress)
    meta = manifest.new_provenance(
        kind=kind,
        query_name=q.name,
        query_path=str(query_path),
        query_text=q.text,
        source=source.describe(),
        seed=q.seed,
        class_token=q.class_token,
        subsets={r.name: {"quota": r.quota, "eligible": r.eligible, "selected": r.selected}
                 for r in selection.subsets},
        skipped=dict(selection.skipped),
        renamed_artists={a: b for r in selection.subsets for a, b, _ in r.renamed_artists},
        rating_scale=describe_scale(source),
    )
    table = selection.table
    if Path(out).exists():  # a re-run keeps what later stages did for rows selected again
        table, meta = keep_stage_work(table, meta, *manifest.read(out))
    manifest.record_stage(meta, "build-reg" if kind == "reg" else "fetch", source=source.describe())
    path = manifest.write(table, out, meta)
    return FetchResult(path, selection, source.describe())


def describe_scale(source) -> dict:
    """Which rating scale the source's ratings were read on (a provenance key docs/design.md adds)."""
    if hasattr(source, "describe_scale"):
        return source.describe_scale()
    if source.describe().startswith("store:"):
        return {"option": "auto", "applied": "as synced"}
    return {"option": "auto", "applied": "new"}  # the live site


def keep_stage_work(table: pa.Table, meta: dict, old: pa.Table, old_meta: dict) -> tuple[pa.Table, dict]:
    """Carry stage columns (path, phash, crop, caption, ... and stage extensions)
    over from the previous manifest, by key, for the rows selected again."""
    where = {k: i for i, k in enumerate(old.column("key").to_pylist())}
    idx = pa.array([where.get(k) for k in table.column("key").to_pylist()], pa.int64())
    carried = [f.name for f in STAGE_FIELDS] + [c for c in old.column_names if c not in MANIFEST_SCHEMA.names]
    for name in carried:
        table = manifest.with_column(table, name, old.column(name).take(idx))
    meta["stages"] = {k: v for k, v in (old_meta.get("stages") or {}).items() if k not in ("fetch", "build-reg")}
    return table, meta
