"""Has an ingested image been replaced under the same name since ingest?

Ingest records each file's size and mtime (`source_size`, `source_mtime_ns`, extension
columns) beside the sha256 of its bytes. A file whose size differs has changed; one whose
mtime alone differs is hashed (cheap for one file) and has changed only if its bytes did,
so a `touch` or a copy that kept the bytes is no change. Rows without the record (older
manifests, downloads: content-addressed by md5) are never flagged.
"""

from __future__ import annotations

import os
from pathlib import Path

from curate.common.digest import file_sha256

COLUMNS = ("source_size", "source_mtime_ns")
REASON = "image changed since ingest"


def stat(path: str | os.PathLike) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def changed(path: str | os.PathLike, size, mtime_ns, sha256: str | None = None) -> bool:
    """True when the file at `path` is not what ingest recorded (missing files: False,
    the stages report those on their own)."""
    if size is None or mtime_ns is None:
        return False
    now = stat(path)
    if now is None or now == (size, mtime_ns):
        return False
    if now[0] != size or not sha256:
        return True
    try:
        return file_sha256(path) != sha256
    except OSError:
        return False


def changed_keys(table, base: Path) -> set[str]:
    """Keys of the rows whose original file changed since ingest recorded it."""
    if not all(c in table.column_names for c in COLUMNS):
        return set()
    cols = table.select(["key", "path", "source_path", *COLUMNS,
                         *(["sha256"] if "sha256" in table.column_names else [])]).to_pydict()
    shas = cols.get("sha256") or [None] * len(cols["key"])
    out = set()
    for key, path, src, size, mtime, sha in zip(cols["key"], cols["path"], cols["source_path"],
                                                 cols["source_size"], cols["source_mtime_ns"], shas):
        original = src or path
        if original and changed(base / original, size, mtime, sha):
            out.add(key)
    return out
