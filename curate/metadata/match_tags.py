"""Reg subsets that keep showing the training set's over-represented tags (issue 27).

A subset with `match_tags_of = "manifests/official_cg.parquet"` draws `match_tags_share`
(default 0.3) of its quota from eligible posts that carry a tag flagged for that
manifest (curate.common.overfit: on RATIO times or more of its images than of this
subset's eligible posts), so the base model keeps seeing those tags outside the CG
style. The rest of the quota is ranked as usual. The manifest's tag shares are read
when the query is loaded (curate.metadata.query); the tags are flagged here, against
the eligible posts, when the subset is ranked (curate.metadata.select.top).
"""

from __future__ import annotations

import numpy as np

from curate.common import overfit

DEFAULT_SHARE = 0.3


def load_shares(path) -> tuple[dict[str, float], int]:
    """The training manifest's tag shares (what its usable images show)."""
    rows, _ = overfit.usable_rows(path)
    return overfit.shares(rows)


def reorder(cols, rows: np.ndarray, s) -> np.ndarray:
    """Ranked `rows` with the first share of the quota taken from posts carrying a flagged
    tag (in their rank order), then the rest in rank order. Notes on `s` the flagged tags
    and their shares in what plain ranking would have picked (`s.tag_before`)."""
    train, n_train = s.match_shares
    candidates = [t for t, v in train.items() if v >= overfit.MIN_SHARE]
    if not len(rows) or not candidates:
        s.match_tags, s.tag_before = [], {}
        return rows
    has = {t: cols.has_any([t])[rows] for t in candidates}
    base = {t: float(h.mean()) for t, h in has.items()}
    tags = [d["tag"] for d in overfit.flagged(train, n_train, base)]
    quota = len(rows) if s.count is None else min(s.count, len(rows))
    s.match_tags = tags
    s.tag_before = {t: float(has[t][:quota].mean()) if quota else 0.0 for t in tags}
    if not tags:
        return rows
    carry = np.zeros(len(rows), bool)
    for t in tags:
        carry |= has[t]
    first = np.flatnonzero(carry)[: int(round(s.match_tags_share * quota))]
    rest = np.ones(len(rows), bool)
    rest[first] = False
    return np.concatenate([rows[first], rows[rest]])


def record(query, selection) -> None:
    """selection.tag_shift: subset -> [{tag, before, after}] (shares of the subset's rows)."""
    import pyarrow.compute as pc

    t = selection.table
    for s in query.subsets:
        tags = getattr(s, "match_tags", None)
        if not tags:
            continue
        mine = t.filter(pc.equal(t.column("subset"), s.name))
        rows = [{c: v for c, v in r.items()} for r in mine.select([c for c in overfit.TAG_COLUMNS
                                                                    if c in mine.column_names]).to_pylist()]
        have = [overfit.image_tags(r) for r in rows]
        selection.tag_shift[s.name] = [
            {"tag": tag, "before": s.tag_before.get(tag, 0.0),
             "after": (sum(tag in h for h in have) / len(have)) if have else 0.0,
             "training": s.match_shares[0].get(tag, 0.0)} for tag in tags]
