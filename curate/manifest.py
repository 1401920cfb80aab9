"""Manifest I/O: one Parquet file, one row per image, provenance under key `curate`.

Every stage reads a manifest with `read`, adds or fills its own columns, and saves
it with `write`, which conforms the table to MANIFEST_SCHEMA (extra columns are
kept after the known ones) and replaces the file atomically (temp file + rename).
"""

from __future__ import annotations

import json
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from . import __version__
from .errors import CurateError
from .schema import HEX64_FIELDS, MANIFEST_SCHEMA, hex64

META_KEY = b"curate"


def conform(table: pa.Table) -> pa.Table:
    """Order and cast columns to MANIFEST_SCHEMA; missing ones become nulls."""
    n = table.num_rows
    arrays, fields = [], []
    for field in MANIFEST_SCHEMA:
        if field.name in table.column_names:
            col = table.column(field.name)
            if field.name in HEX64_FIELDS and pa.types.is_integer(col.type):
                col = hex64(col)  # an old manifest's int64 hash
            elif col.type != field.type:
                col = col.cast(field.type)
        else:
            col = pa.nulls(n, field.type)
        arrays.append(col)
        fields.append(field)
    for name in table.column_names:  # extension columns a stage added
        if name not in MANIFEST_SCHEMA.names:
            arrays.append(table.column(name))
            fields.append(table.schema.field(name))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def new_provenance(**fields) -> dict:
    return {
        "tool": "curate",
        "version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "stages": {},
        **fields,
    }


def read(path: str | os.PathLike) -> tuple[pa.Table, dict]:
    """Return (table, provenance). A missing or unreadable file is a CurateError."""
    path = Path(path)
    if not path.is_file():
        raise CurateError(f"manifest not found: {path}")
    try:
        pf = pq.ParquetFile(path)
        table = pf.read()
    except (pa.ArrowException, OSError) as exc:
        raise CurateError(f"not a readable Parquet manifest: {path} ({exc})") from None
    raw = (pf.schema_arrow.metadata or {}).get(META_KEY)
    try:
        meta = json.loads(raw) if raw else {}
    except json.JSONDecodeError:
        raise CurateError(f"manifest {path} has unreadable provenance metadata") from None
    if "key" not in table.column_names:
        raise CurateError(f"not a curate manifest (no 'key' column): {path}")
    try:
        return conform(table), meta
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise CurateError(f"manifest {path} has a column of the wrong type ({exc})") from None


def write(table: pa.Table, path: str | os.PathLike, meta: dict) -> Path:
    """Write atomically: a crash leaves either the old file or the new one."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return _write(conform(table), path, meta)
    except OSError as exc:
        raise CurateError(f"cannot write manifest {path}: {exc.strerror or exc}") from None


def _write(table: pa.Table, path: Path, meta: dict) -> Path:
    md = dict(table.schema.metadata or {})
    md[META_KEY] = json.dumps(meta, default=str).encode()
    table = table.replace_schema_metadata(md)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def record_stage(meta: dict, stage: str, **info) -> dict:
    """Note in the provenance that a stage ran, with its settings."""
    meta.setdefault("stages", {})[stage] = {
        "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "version": __version__,
        **info,
    }
    return meta


def with_column(table: pa.Table, name: str, values) -> pa.Table:
    """Replace (or add) a column, typed as MANIFEST_SCHEMA says when it knows it."""
    typ = MANIFEST_SCHEMA.field(name).type if name in MANIFEST_SCHEMA.names else None
    arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values, type=typ)
    if typ is not None and arr.type != typ:
        arr = arr.cast(typ)
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, arr)
    return table.append_column(name, arr)
