"""Manifest I/O: one Parquet file, one row per image, provenance under key `curate`.

Every stage reads a manifest with `read`, adds or fills its own columns, and saves
it with `write`, which conforms the table to MANIFEST_SCHEMA (extra columns are
kept after the known ones) and replaces the file atomically (temp file + rename).

Two processes on one manifest (caption while download runs) lose nothing: writes
are serialised by a lock on the manifest's folder, and when the file changed since
this process read it, `write` merges cell by cell (3-way, against what this process
read): the other process's changes are kept beside ours; the same cell changed to
different values by both, or rows added/removed by both, is a one-line error.
Under the lock, temp files of writers that died (`.part`) are removed. A rewritten
manifest keeps the previous file's mode (a new one gets the umask's).
`read` validates: provenance a JSON object, keys non-null and unique, hashes 16 hex
digits, crop boxes [left, top, right, bottom].
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curate import __version__
from curate.errors import CurateError
from curate.schema import HEX64_FIELDS, MANIFEST_SCHEMA, hex64

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


@dataclass
class _Seen:
    """What this process last read or wrote at a path (for the merge in `write`)."""
    identity: tuple
    base: pa.Table      # the table our in-memory work derives from
    base_meta: dict
    disk: pa.Table      # what the file held then
    disk_meta: dict
    merged: bool = False


_SEEN: dict[str, _Seen] = {}


def read(path: str | os.PathLike) -> tuple[pa.Table, dict]:
    """Return (table, provenance). A missing, unreadable or malformed file is a CurateError."""
    path = Path(path)
    if not path.is_file():
        raise CurateError(f"manifest not found: {path}")
    table, meta = _read(path)
    _remember(path, table, meta)
    return table, meta


def _read(path: Path) -> tuple[pa.Table, dict]:
    try:
        pf = pq.ParquetFile(path)
        table = pf.read()
    except (pa.ArrowException, OSError) as exc:
        raise CurateError(f"not a readable Parquet manifest: {path} ({_first_line(exc)})") from None
    raw = (pf.schema_arrow.metadata or {}).get(META_KEY)
    try:
        meta = json.loads(raw) if raw else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CurateError(f"manifest {path} has unreadable provenance metadata") from None
    stages = meta.get("stages", {}) if isinstance(meta, dict) else None
    if not isinstance(stages, dict) or not all(isinstance(v, dict) for v in stages.values()):
        raise CurateError(f"manifest {path} has malformed provenance metadata (not a JSON object of stages)")
    if "key" not in table.column_names:
        raise CurateError(f"not a curate manifest (no 'key' column): {path}")
    try:
        table = conform(table)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise CurateError(f"manifest {path} has a column of the wrong type ({_first_line(exc)})") from None
    _check_keys(table, path)
    _check_values(table, path)
    return table, meta


def _check_values(table: pa.Table, path: Path) -> None:
    """Hashes are 16 hex digits and crop boxes four ordered numbers, or null: a stage
    that trusts them would end in a traceback on a hand-edited or foreign file."""
    import pyarrow.compute as pc

    for name in ("phash", "dhash"):
        if name in table.column_names and pa.types.is_string(table.schema.field(name).type):
            col = table.column(name)
            bad = pc.sum(pc.invert(pc.match_substring_regex(col, r"^[0-9a-fA-F]{16}$"))).as_py() or 0
            if bad:
                raise CurateError(f"manifest {path}: {bad} rows have a malformed {name} (want 16 hex digits)")
    crop = table.column("crop")
    if crop.null_count < len(crop):
        lengths = pc.list_value_length(crop)
        bad = pc.sum(pc.not_equal(lengths, 4)).as_py() or 0
        if not bad:
            boxes = [b for b in crop.to_pylist() if b is not None]
            bad = sum(None in b or not 0 <= b[0] < b[2] or not 0 <= b[1] < b[3] for b in boxes)
        if bad:
            raise CurateError(f"manifest {path}: {bad} rows have a malformed crop (want [left, top, right, bottom])")


def _check_keys(table: pa.Table, path: Path) -> None:
    import pyarrow.compute as pc

    keys = table.column("key")
    missing = keys.null_count + (pc.sum(pc.equal(pc.utf8_length(keys), 0)).as_py() or 0)
    if missing:
        raise CurateError(f"manifest {path}: {missing} rows have no key")
    if pc.count_distinct(keys).as_py() != len(keys):
        counts = pc.value_counts(keys)
        dup = next(v["values"] for v in counts.to_pylist() if v["counts"] > 1)
        raise CurateError(f"manifest {path}: duplicate key {str(dup)[:80]!r}")


def write(table: pa.Table, path: str | os.PathLike, meta: dict) -> Path:
    """Write atomically: a crash leaves either the old file or the new one."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        ours = conform(table)
        with _folder_lock(path.parent):
            _clean_parts(path)
            merged, merged_meta = _merge_with_disk(path, ours, meta)
            _write(merged, path, merged_meta)
            seen = _remember(path, merged, merged_meta)
            if merged is not ours:  # later writes of ours go on merging against this file
                seen.base, seen.base_meta, seen.merged = ours, _copy(meta), True
        return path
    except OSError as exc:
        raise CurateError(f"cannot write manifest {path}: {exc.strerror or exc}") from None


def _remember(path: Path, table: pa.Table, meta: dict) -> _Seen:
    seen = _Seen(_identity(path), table, _copy(meta), table, _copy(meta))
    _SEEN[str(path.resolve())] = seen
    return seen


def _identity(path: Path) -> tuple:
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def _copy(meta: dict) -> dict:
    return json.loads(json.dumps(meta, default=str))


@contextmanager
def _folder_lock(folder: Path):
    """Serialise manifest writes in one folder (an flock on the folder; released if we die)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # a filesystem without locks: the merge below still guards the common race
            pass
        yield
    finally:
        os.close(fd)


def _clean_parts(path: Path) -> None:
    """Under the lock no writer is mid-write: a temp file of this manifest is a dead writer's."""
    ours = re.compile(re.escape(path.name) + r"\.[A-Za-z0-9_]{8}\.part")  # mkstemp's names in _write only
    for part in path.parent.glob(f"{path.name}.*.part"):
        if ours.fullmatch(part.name):
            part.unlink(missing_ok=True)


def _merge_with_disk(path: Path, ours: pa.Table, meta: dict) -> tuple[pa.Table, dict]:
    seen = _SEEN.get(str(path.resolve()))
    if seen is None or not path.exists():
        return ours, meta
    changed = _identity(path) != seen.identity
    if not changed and not seen.merged:
        return ours, meta  # nobody else wrote: the common case
    disk, disk_meta = _read(path) if changed else (seen.disk, seen.disk_meta)
    table = _merge_tables(seen.base, ours, disk, path)
    return table, _merge_meta(seen.base_meta, _copy(meta), disk_meta)


def _merge_tables(base: pa.Table, ours: pa.Table, disk: pa.Table, path: Path) -> pa.Table:
    """Cell-wise 3-way merge: a cell only one side changed takes that side's value."""
    if disk.equals(base):
        return ours
    if ours.equals(base):
        return disk
    keys = [t.column("key") for t in (base, ours, disk)]
    if not (keys[0].equals(keys[1]) and keys[0].equals(keys[2])):
        raise CurateError(f"manifest {path} was changed by another curate process while this one ran "
                          "(both changed its rows); re-run this stage")
    names = list(ours.column_names) + [n for n in disk.column_names if n not in ours.column_names]
    arrays, fields = [], []
    for name in names:
        b, o, d = (t.column(name) if name in t.column_names else None for t in (base, ours, disk))
        if _same(o, b):
            col = d
        elif _same(d, b) or _same(o, d):
            col = o
        else:
            col = _merge_cells(name, b, o, d, path)
        if col is not None:
            arrays.append(col)
            fields.append((ours if name in ours.column_names and col is not d else disk).schema.field(name))
    return conform(pa.Table.from_arrays(arrays, schema=pa.schema(fields)))


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a is b or (a.type == b.type and a.equals(b))


def _merge_cells(name, b, o, d, path):
    if b is None or o is None or d is None or not (b.type == o.type == d.type):
        raise CurateError(f"manifest {path} was changed by another curate process while this one ran "
                          f"(both changed column {name!r}); re-run this stage")
    out = []
    for bv, ov, dv in zip(b.to_pylist(), o.to_pylist(), d.to_pylist()):
        if ov == bv or ov == dv:
            out.append(dv)
        elif dv == bv:
            out.append(ov)
        else:
            raise CurateError(f"manifest {path} was changed by another curate process while this one ran "
                              f"(both changed column {name!r} of the same row); re-run this stage")
    return pa.chunked_array([pa.array(out, type=o.type)])


def _merge_meta(base: dict, ours: dict, disk: dict) -> dict:
    out = dict(disk)
    for k in set(ours) | set(base):
        if k == "stages":
            continue
        if ours.get(k) != base.get(k):
            if k in ours:
                out[k] = ours[k]
            else:
                out.pop(k, None)
    stages = dict(disk.get("stages", {}))
    for k, v in ours.get("stages", {}).items():
        if v != base.get("stages", {}).get(k):
            stages[k] = v
    out["stages"] = stages
    return out


def _write(table: pa.Table, path: Path, meta: dict) -> Path:
    md = dict(table.schema.metadata or {})
    md[META_KEY] = json.dumps(meta, default=str).encode()
    table = table.replace_schema_metadata(md)
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, _mode_for(path))  # mkstemp's 0600 would hide a shared dataset from its group
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _mode_for(path: Path) -> int:
    """The previous file's mode, else what the umask gives a new file."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _first_line(exc: Exception) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


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
