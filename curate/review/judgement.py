"""What the review app shows of issue 27's judgement: per row the aesthetic score,
sharpness, effective resolution and how a duplicate matched its keeper; per training
manifest the tags that will overfit (curate.common.overfit). The page side is
static/judge.js (sort and threshold by score, the facts in the detail panel, the
over-represented tags beside the tag charts)."""

from __future__ import annotations

from pathlib import Path

from curate.common import overfit
from curate.errors import CurateError

ROW_COLUMNS = ("aesthetic", "sharpness", "effective_px", "dup_reason")
_cache: dict = {}


def columns(table) -> dict:
    """Column -> list per row (None where the stage did not run)."""
    n = table.num_rows
    return {c: (table.column(c).to_pylist() if c in table.column_names else [None] * n) for c in ROW_COLUMNS}


def overfit_tags(sources) -> list:
    """Per manifest: the over-represented tags (reg manifests and manifests with no base: [])."""
    reg = next((s.path for s in sources if s.meta.get("kind") == "reg"), None)
    out = []
    for s in sources:
        if s.meta.get("kind") == "reg":
            out.append([])
            continue
        stamp = (str(s.path), s.stamp, str(reg), _stamp(reg))
        if stamp not in _cache:
            try:
                _cache[stamp] = overfit.report(s.path, reg=reg)["flagged"]
            except CurateError:
                _cache[stamp] = []
        out.append(_cache[stamp])
    return out


def _stamp(path) -> tuple | None:
    try:
        st = Path(path).stat()
        return st.st_mtime_ns, st.st_size
    except (OSError, TypeError):
        return None
