"""Sizes the source listed before EXIF rotation: re-check the size rules after download.

Posts uploaded before Danbooru applied EXIF orientation list the stored (unrotated)
width and height; download measures the upright image and corrects the row. A row
whose corrected size breaks its subset's size rules (a portrait image in
`horizontal`, a min_width it no longer meets) is marked with an error
(`orientation changed: ...` / `size changed: ...`; the file stays, later stages skip
the row), and, where a source is at hand, the subset's quota is refilled with the
next eligible posts in the subset's own order, none already in the manifest
(max_per_artist counts the rows that stay).

    recheck_sizes(manifest, source=None) -> SizeCheck   (the new rows have no images
    yet: the caller downloads them and checks again)
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from curate import manifest as mf
from curate.errors import CurateError
from curate.metadata import query as query_mod

ORIENTATION = "orientation changed"
SIZE = "size changed"


@dataclass
class SizeCheck:
    marked: Counter = field(default_factory=Counter)  # subset -> rows marked this time
    refilled: Counter = field(default_factory=Counter)  # subset -> rows added
    reasons: Counter = field(default_factory=Counter)
    note: str | None = None  # why no refill

    def lines(self) -> list[str]:
        if not self.marked and not self.refilled:
            return [f"  {self.note}"] if self.note else []
        out = [f"  size check: {sum(self.marked.values())} rows no longer fit their subset after download "
               f"measured the upright image ({', '.join(f'{k} {v}' for k, v in sorted(self.reasons.items())) or 'none new'}; "
               "marked as errors)"]
        for name in sorted(set(self.marked) | set(self.refilled)):
            out.append(f"    {name}: {self.marked[name]} marked, {self.refilled[name]} refilled from the next eligible posts")
        if self.note:
            out.append(f"    {self.note}")
        return out


def misfit(w, h, s) -> str | None:
    """The error for an upright size that breaks subset `s`'s size rules, else None."""
    if w is None or h is None:
        return None
    shape = "horizontal" if w > h else "vertical" if h > w else "square"
    if s.orientation in ("horizontal", "vertical", "square") and s.orientation != shape:
        return f"{ORIENTATION}: {w}x{h} is {shape}, subset {s.name} is {s.orientation}"
    for what, bad in (("min_width", s.min_width and w < s.min_width), ("min_height", s.min_height and h < s.min_height),
                      ("min_pixels", s.min_pixels and w * h < s.min_pixels)):
        if bad:
            return f"{SIZE}: {w}x{h} upright is below {what} of subset {s.name}"
    return None


def open_recorded_source(meta: dict):
    """The source a manifest was selected from (its provenance), or None where it cannot
    be opened here (a dump moved away, no network needed yet: opening makes no request)."""
    from curate.metadata.sources import open_source

    spec = meta.get("source")
    scale = (meta.get("rating_scale") or {}).get("option", "auto")
    try:
        return open_source(spec, rating_scale=scale) if isinstance(spec, str) else None
    except CurateError:
        return None


def _artists_kept(table: pa.Table, errors: list) -> dict[str, Counter]:
    """Subset -> posts per artist among the rows that stay (no error): a refill's picks
    count against max_per_artist together with them."""
    if "tags_artist" not in table.column_names:
        return {}
    kept: dict[str, Counter] = {}
    subsets, artists_of = table.column("subset").to_pylist(), table.column("tags_artist").to_pylist()
    for name, artists, error in zip(subsets, artists_of, errors):
        if not error and artists:
            kept.setdefault(name, Counter()).update(artists)
    return kept


def recheck_sizes(path, source=None, aliases=None) -> SizeCheck:
    """`source`: where to refill from; "recorded": the one the manifest's provenance names."""
    path = Path(path)
    table, meta = mf.read(path)
    check = SizeCheck()
    text = meta.get("query_text")
    if not text or "subset" not in table.column_names:
        return check
    try:
        q = query_mod.parse(text, base_dir=Path(meta.get("query_path") or ".").parent, outside_files=True)
    except CurateError as exc:  # e.g. its artists_file moved: the rules are unknown here
        check.note = f"no size check: the manifest's query no longer reads ({exc})"
        return check
    if isinstance(meta.get("seed"), int):  # fetch --seed overrides the query's
        q.seed = meta["seed"]
    rules = {s.name: s for s in q.subsets}
    errors = table.column("error").to_pylist()
    cols = {c: table.column(c).to_pylist() for c in ("subset", "width", "height", "path")}
    for i, name in enumerate(cols["subset"]):
        s = rules.get(name)
        if s is None or errors[i] or not cols["path"][i]:
            continue
        why = misfit(cols["width"][i], cols["height"][i], s)
        if why:
            errors[i] = why
            check.marked[name] += 1
            check.reasons[why.split(":")[0]] += 1
    # What each subset lacks: rows taken out (this time or by an earlier run, which a
    # fetch re-run carries over) against its quota. A refill adds that many.
    rows, out = Counter(cols["subset"]), Counter(n for n, e in zip(cols["subset"], errors) if e and e.startswith((ORIENTATION, SIZE)))
    need = {s.name: max(0, min(out[s.name], s.count - (rows[s.name] - out[s.name])))
            for s in q.subsets if s.count is not None}
    if not check.marked and not any(need.values()):
        return check
    table = mf.with_column(table, "error", errors)
    added = None
    if any(need.values()) and source == "recorded":
        source = open_recorded_source(meta)
        aliases = aliases or meta.get("renamed_artists") or None  # as fetch resolved them
    if not any(need.values()):
        pass
    elif source is None or source == "recorded":
        check.note = "the manifest's source cannot be opened here: not refilled, the subsets are short by the rows marked"
    else:
        wanted = [dataclasses.replace(s, count=need.get(s.name, 0)) for s in q.subsets]
        from curate.metadata.select import select

        sel = select(dataclasses.replace(q, subsets=wanted), source, aliases=aliases,
                     exclude_ids=table.column("post_id").to_pylist(),
                     artists_taken=_artists_kept(table, errors))
        added = sel.table
        check.refilled.update(added.column("subset").to_pylist())
        if added.num_rows < sum(need.values()):
            check.note = "fewer eligible posts left than rows taken out: the subset stays short"
    if added is not None and added.num_rows:
        table = pa.concat_tables([mf.conform(table), mf.conform(added)], promote_options="default")
    before = meta.get("stages", {}).get("size-check", {})  # earlier rounds of this run
    mf.record_stage(meta, "size-check", marked=dict(Counter(before.get("marked", {})) + check.marked),
                    refilled=before.get("refilled", 0) + sum(check.refilled.values()))
    mf.write(table, path, meta)
    return check
