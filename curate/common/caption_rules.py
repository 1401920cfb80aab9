"""Tag rules for captions: pure functions on tag lists and pixels, no file I/O.

Tags come in Danbooru spelling (underscores). The rules follow HakuBooru's captioner
(`hakubooru.caption.make_caption`, which captioned Kohaku-XL's data): its special
tags lead the fixed group, meta tags with its blacklisted keywords are dropped, quality
comes from its fav_count percentile table per rating (none for posts past its id
cut-off), year and rating tags as it adds them, and names are written as it writes
them: underscores to spaces for names longer than 3 characters, no prompt escapes.
"""

from __future__ import annotations

import bisect
import functools
import re
import unicodedata
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

# HakuBooru's special tags (hakubooru.metainfo.special_tags): they lead the fixed
# group of a caption. `solo` is not one of them; it shuffles with the general tags.
SPECIAL_TAGS = frozenset(
    [f"{n}{who}" for who in ("girl", "boy", "other") for n in ("1",)]
    + [f"{n}{who}s" for who in ("girl", "boy", "other") for n in ("2", "3", "4", "5", "6+", "multiple_")]
    + ["male_focus"]
)
# Meta tags whose names contain one of these are dropped (hakubooru.metainfo).
META_BLACKLIST = ("(medium)", "commentary", "bad", "translat", "request", "mismatch",
                  "revision", "audio", "video")
BANNED_ARTIST_KEYWORD = "banned"  # `banned_artist`: HakuBooru filters artist tags with it
QUALITY_MAX_POST_ID = 7_000_000   # HakuBooru adds no quality tag to newer posts

# `1girl`, `6+girls`, `2boys`, `1other`, `multiple_girls`, `solo`: who is in the picture.
COUNT_TAG = re.compile(r"(?:\d+\+?(?:girl|boy|other)s?|multiple_(?:girls|boys|others)|solo)")

# The recipe's ban list and its known overfit-prone tags (regular expressions,
# matched against the whole tag; `_` and ` ` are the same character here).
DEFAULT_BAN = (
    "sketch", "comic", "flat color", ".*official.*", ".*boy.*", "mecha",
    "no humans", "text", "pixel art", "speech bubble",
)
DEFAULT_DROP = ("halo", "heterochromia", ".*focus.*")

# HakuBooru's Danbooru fav_count percentiles (p10, p25, p50, p75, p85, p95) per
# rating; a post above the n-th cut gets QUALITY_LABELS[n + 1].
QUALITY_LABELS = (
    "worst quality", "low quality", "normal quality", "good quality",
    "great quality", "best quality", "masterpiece",
)
QUALITY_THRESHOLDS = {
    "g": (1, 3, 8, 16, 22, 37),
    "s": (2, 6, 15, 30, 44, 81),
    "q": (8, 18, 38, 75, 105, 182),
    "e": (9, 22, 52, 106, 151, 262),
}
RATING_TAGS = {"g": ("safe",), "s": ("sensitive",), "q": ("nsfw",), "e": ("explicit", "nsfw")}

# Characters that could end a line or hide inside a caption: control, format,
# surrogate, private-use, unassigned, line and paragraph separators.
_UNSAFE_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"}
_UNESCAPED_PAREN = re.compile(r"(?<!\\)([()])")
_ESCAPED_PAREN = re.compile(r"\\([()])")
# Danbooru's timestamps are US Eastern; at New Year that is always UTC-5 (no DST), so
# the post's year is read there, as HakuBooru reads it from the API's own string.
_DANBOORU_NEW_YEAR = timezone(timedelta(hours=-5))


@functools.lru_cache(maxsize=64)
def compile_patterns(patterns: tuple[str, ...]) -> re.Pattern | None:
    """One case-insensitive regex that must match a whole tag; None for no patterns."""
    parts = [f"(?:{p.replace('_', ' ')})" for p in patterns]
    return re.compile("|".join(parts), re.IGNORECASE) if parts else None


def is_banned(tag: str, pattern: re.Pattern | None) -> bool:
    return bool(pattern and pattern.fullmatch(tag.replace("_", " ")))


def is_count_tag(tag: str) -> bool:
    return bool(COUNT_TAG.fullmatch(tag))


def is_special_tag(tag: str) -> bool:
    return tag in SPECIAL_TAGS


def meta_kept(tag: str) -> bool:
    """HakuBooru's meta filter: drop names holding a blacklisted keyword."""
    return not any(word in tag for word in META_BLACKLIST)


def artist_kept(tag: str) -> bool:
    return BANNED_ARTIST_KEYWORD not in tag


def prune_overlaps(tags: Sequence[str], source: set[str] | frozenset = frozenset()) -> list[str]:
    """Drop a tag whose words appear, in order and adjacent, inside another tag
    (`long_hair` inside `very_long_hair`, `holding` inside `holding_staff`).

    Source tags win: a tag in `source` is never dropped because of a tag that is
    not. Count tags are never dropped (`solo` is not implied by `solo_focus`).
    """
    words = {t: tuple(w for w in t.split("_") if w) for t in tags}
    containers: dict[tuple[str, ...], set[str]] = {}
    for tag, ws in words.items():
        for i in range(len(ws)):
            for j in range(i + 1, len(ws) + 1):
                if j - i < len(ws):
                    containers.setdefault(ws[i:j], set()).add(tag)
    kept = []
    for tag in tags:
        bigger = containers.get(words[tag], set()) - {tag}
        if tag in source:
            bigger = {b for b in bigger if b in source}
        if bigger and not is_count_tag(tag):
            continue
        kept.append(tag)
    return kept


def quality_tag(rating: str | None, fav_count: int | None,
                thresholds: dict = QUALITY_THRESHOLDS,
                labels: Sequence[str] = QUALITY_LABELS,
                post_id: int | None = None, max_post_id: int = 0) -> str | None:
    """The quality label for a post, or None when rating or fav_count is unknown or
    the post is newer than `max_post_id` (0: no cut-off)."""
    if fav_count is None or rating not in thresholds:
        return None
    if max_post_id and post_id is not None and post_id > max_post_id:
        return None
    return labels[bisect.bisect_left(list(thresholds[rating]), fav_count)]


def post_year(created_at: datetime | None) -> int | None:
    """The year of a Danbooru timestamp, in Danbooru's own time zone."""
    if created_at is None:
        return None
    if created_at.tzinfo is not None:
        created_at = created_at.astimezone(_DANBOORU_NEW_YEAR)
    return created_at.year


def year_tag(year: int | None) -> str | None:
    """HakuBooru's period tags: old (2005-2010), early (up to 2014, and anything before
    2005), mid (2015-2017), recent (2018-2020), newest (2021-2024); none after 2024."""
    if year is None:
        return None
    if 2005 <= year <= 2010:
        return "old"
    for last, name in ((2014, "early"), (2017, "mid"), (2020, "recent"), (2024, "newest")):
        if year <= last:
            return name
    return None


def format_tag(tag: str, separator: str = "", escape: bool = False) -> str | None:
    """Danbooru spelling -> caption spelling, as HakuBooru writes names.

    Underscores become spaces except in short names (`^_^`, `o_o`: three characters
    or fewer). No prompt escapes: `\\(` from a tagger's label list becomes `(`, since
    the text encoder should see what a prompt's `\\(` reaches it as; `escape=True`
    (for sd-scripts' weighted_captions) escapes parentheses instead. Commas, line
    breaks, control characters and the keep separator become spaces, so a tag can
    never split or break a caption. None when nothing printable is left.
    """
    text = unicodedata.normalize("NFC", str(tag))
    text = "".join(" " if unicodedata.category(c) in _UNSAFE_CATEGORIES else c for c in text)
    text = text.replace(",", " ")
    if separator:
        while separator in text:
            text = text.replace(separator, " ")
    text = " ".join(text.split())
    if len(text) > 3:
        text = text.replace("_", " ")
    text = _ESCAPED_PAREN.sub(r"\1", text)
    if escape:
        text = _UNESCAPED_PAREN.sub(r"\\\1", text)
    return text or None


def one_line(text: str) -> str:
    """A user's caption on one line (sd-scripts reads only the first): lines joined with
    ", " (a comma already ending a line is not doubled), control and invisible characters
    and runs of spaces made one space."""
    text = unicodedata.normalize("NFC", text)
    lines = ("".join(" " if unicodedata.category(c) in _UNSAFE_CATEGORIES else c for c in line)
             for line in text.splitlines())
    lines = (" ".join(line.split()).strip(", ") for line in lines)
    return ", ".join(line for line in lines if line)


def unescape(text: str) -> str:
    """`\\(` -> `(` and `\\)` -> `)`: what a prompt UI hands the text encoder."""
    return _ESCAPED_PAREN.sub(r"\1", text)


def person_text(text: str, escape: bool = False) -> str:
    """A caption a person wrote (a sidecar file, a review edit) as training text: one
    line, and escaped exactly as the generated captions are (none by default; every
    parenthesis with `escape=True`, since weighted_captions reads a bare one as emphasis)."""
    text = unescape(one_line(text))
    return _UNESCAPED_PAREN.sub(r"\\\1", text) if escape else text


def color_theme(rgb, share: float = 0.5) -> str | None:
    """A Danbooru colour-scheme tag (`blue_theme`, ...) from an RGB PIL image.

    Hue buckets are weighted by saturation x value; the image gets `<hue>_theme`
    when one bucket holds more than `share` of that weight and coloured pixels
    cover a quarter of the image. Nearly colourless images get black/white/grey.
    """
    import numpy as np

    small = rgb.resize((64, 64))
    hsv = np.asarray(small.convert("HSV"), dtype=np.float32) / 255.0
    h, s, v = hsv[..., 0] * 360.0, hsv[..., 1], hsv[..., 2]
    coloured = (s >= 0.2) & (v >= 0.2)
    if coloured.mean() < 0.03:
        mean_v = float(v.mean())
        return "black_theme" if mean_v <= 0.25 else "white_theme" if mean_v >= 0.85 else "grey_theme"
    if coloured.mean() < 0.25:
        return None
    names = np.select(
        [(h < 15) | (h >= 345), h < 45, h < 70, h < 165, h < 195, h < 255, h < 290],
        ["red", "orange", "yellow", "green", "aqua", "blue", "purple"],
        "pink",
    ).astype(object)
    warm = np.isin(names, ["red", "orange"])
    names[warm & (v < 0.55)] = "brown"
    names[(names == "red") & (s < 0.5) & (v >= 0.75)] = "pink"
    weight = (s * v)[coloured]
    picked = names[coloured]
    totals = {n: float(weight[picked == n].sum()) for n in set(picked)}
    best = max(sorted(totals), key=totals.get)
    return f"{best}_theme" if totals[best] > share * sum(totals.values()) else None
