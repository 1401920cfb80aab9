"""Which rating scale a file of posts is on: decided per file, not per post.

Danbooru's ratings changed on 2022-05-22: `g` (general) was added and `s` went from
"safe" to "sensitive". The lock flags had already left the API on 2022-01-06, so a
page saved between those dates carries neither the flags nor any `g`, and its `s`
means safe. The evidence, strongest first:

    a `g`/"general" rating                    new scale   (the first decisive post
    the words "safe"                         old ("sensitive": new)    settles it)
    lock flags / Danbooru2017-2021 tag lists  old (the file predates 2022-01-06)
    no `s` at all                             either: nothing to convert (new)
    newest updated_at/created_at < cutover    old
    otherwise (no g, newer or no dates)       new, with a warning naming the counts

`--rating-scale old|new` skips the judgement for every file of the source.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Iterable

from curate.errors import CurateError
from curate.metadata.sources.posts import post_looks_old, raw_rating, to_time

CUTOVER = datetime(2022, 5, 22, tzinfo=timezone.utc)
SCALES = ("auto", "old", "new")


def check(scale: str | None) -> str:
    scale = (scale or "auto").lower()
    if scale not in SCALES:
        raise CurateError(f"--rating-scale must be auto, old or new, not {scale!r}")
    return scale


@dataclass
class Verdict:
    scale: str  # old | new
    why: str
    warning: str | None = None
    ratings: Counter = field(default_factory=Counter)


def judge(posts: Iterable, name: str) -> Verdict:
    """Read a file's posts (raw dicts) once and say which scale it is on."""
    ratings, newest, n = Counter(), None, 0
    for post in posts:
        if not isinstance(post, dict):
            continue
        n += 1
        r = raw_rating(post)
        ratings[r] += 1
        if r in ("g", "sensitive"):  # decisive: no need to read on
            return Verdict("new", f"a {'g' if r == 'g' else 'sensitive'} rating", ratings=ratings)
        if r == "safe" or post_looks_old(post):  # as decisive (a big 2017-2021 dump stops here)
            return Verdict("old", "the word 'safe'" if r == "safe" else "lock flags or 2017-2021 metadata",
                           ratings=ratings)
        for key in ("updated_at", "created_at"):
            t = to_time(post.get(key))
            if t is not None and (newest is None or t > newest):
                newest = t
    counts = ", ".join(f"{k} {v}" for k, v in sorted(ratings.items(), key=lambda kv: str(kv[0])) if k)
    if not ratings["s"]:
        return Verdict("new", "no s rating: nothing to convert", ratings=ratings)
    if newest is not None and newest < CUTOVER:
        return Verdict("old", f"no g, newest date {newest.date()} before 2022-05-22", ratings=ratings)
    when = f"newest date {newest.date()}" if newest is not None else "no dates"
    return Verdict("new", f"no g, {when}", ratings=ratings, warning=(
        f"{name}: rating scale unclear ({n} posts: {counts}; no g, {when}); read on the new scale "
        "(s = sensitive). If the file was saved before 2022-05-22, pass --rating-scale old"))


def summary(option: str, verdicts: dict[str, str]) -> dict:
    """What provenance records: the option and how many files went to each scale."""
    counts = Counter(verdicts.values())
    applied = "mixed" if len(counts) > 1 else next(iter(counts), option if option != "auto" else "new")
    out = {"option": option, "applied": applied, "files": dict(counts)}
    old = sorted(f for f, s in verdicts.items() if s == "old")
    if old:
        out["old_files"] = old[:20]
    return out
