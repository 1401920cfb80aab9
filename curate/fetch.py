"""`curate fetch` / `curate build-reg`: a query run against a source -> manifest.

build-reg is fetch for regularization sets: it records the class token and marks
the manifest as a reg set (captions and export read both from the provenance).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import manifest, query as query_mod
from .errors import CurateError
from .select import Selection, select


@dataclass
class FetchResult:
    out: Path
    selection: Selection
    source: str


def fetch(query_path: str | Path, source, out: str | Path, kind: str = "fetch",
          seed: int | None = None, progress=None) -> FetchResult:
    q = query_mod.load(query_path)
    if seed is not None:
        q.seed = seed
    if kind == "reg" and not q.class_token:
        raise CurateError(f"{query_path}: a regularization query needs class_token (e.g. class_token = \"solo\")")
    selection = select(q, source, progress=progress)
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
    )
    manifest.record_stage(meta, "build-reg" if kind == "reg" else "fetch", source=source.describe())
    path = manifest.write(selection.table, out, meta)
    return FetchResult(path, selection, source.describe())
