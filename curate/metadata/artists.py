"""`curate artists`: rank artists by well-favourited posts in a copyright or tag set.

Building the list of style imitators for a reg set's vertical half is the hardest
manual step of the recipe; this turns it into a query whose output is an artists
file the query spec reads (`artists_file`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from curate.metadata.query import Range, Subset
from curate.metadata.select import BatchColumns, StoreColumns, eligible


@dataclass
class ArtistRow:
    artist: str
    posts: int
    median_fav: float


def rank_artists(source, copyright: str | None = None, tags: list[str] = (), fav_count: str = ">30",
                 min_posts: int = 1, top: int | None = None, progress=None) -> list[ArtistRow]:
    rule = Subset(name="artists", tags=([copyright] if copyright else []) + list(tags),
                  fav_count=Range.parse(fav_count, "--fav-count"))
    store = getattr(source, "store", None)
    aliases = store.aliases if store is not None else {}
    favs: dict[str, list[int]] = defaultdict(list)

    def collect(cols):
        rows = np.flatnonzero(eligible(cols, rule, aliases))
        for names, fav in zip(cols.artists(rows), cols.fav_count[rows].tolist()):
            for name in names:
                favs[name].append(fav)

    if store is not None:
        collect(StoreColumns(store))
    else:
        from curate.metadata.query import Query

        batches = source.batches_for(Query("artists", 0, None, [rule], "", "")) if hasattr(source, "batches_for") else source.batches()
        for batch in batches:
            collect(BatchColumns(batch))
            if progress is not None:
                progress(batch.num_rows)
    rows = [ArtistRow(a, len(f), float(np.median(f))) for a, f in favs.items() if len(f) >= min_posts]
    rows.sort(key=lambda r: (-r.posts, -r.median_fav, r.artist))
    return rows[:top] if top else rows


def write_artists_file(rows: list[ArtistRow], path: str | Path, header: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {line}" for line in header.splitlines()]
    lines.append("# one artist tag per line; edit freely (remove those whose style does not fit)")
    lines += [f"{r.artist:<40} # posts={r.posts} median_fav={r.median_fav:g}" for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
