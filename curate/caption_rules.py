"""Tag rules for captions: pure functions on tag lists and pixels, no file I/O.

Tags come in Danbooru spelling (underscores). The rules follow the Kohaku-XL /
HakuBooru caption recipe: count tags first, quality from fav_count percentiles per
rating, period tags from the post year, short emoticons keep their underscores.
"""

from __future__ import annotations

import bisect
import functools
import re
import unicodedata
from collections.abc import Sequence

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


@functools.lru_cache(maxsize=64)
def compile_patterns(patterns: tuple[str, ...]) -> re.Pattern | None:
    """One case-insensitive regex that must match a whole tag; None for no patterns."""
    parts = [f"(?:{p.replace('_', ' ')})" for p in patterns]
    return re.compile("|".join(parts), re.IGNORECASE) if parts else None


def is_banned(tag: str, pattern: re.Pattern | None) -> bool:
    return bool(pattern and pattern.fullmatch(tag.replace("_", " ")))


def is_count_tag(tag: str) -> bool:
    return bool(COUNT_TAG.fullmatch(tag))


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
                labels: Sequence[str] = QUALITY_LABELS) -> str | None:
    """The quality label for a post, or None when rating or fav_count is unknown."""
    if fav_count is None or rating not in thresholds:
        return None
    return labels[bisect.bisect_left(list(thresholds[rating]), fav_count)]


def year_tag(year: int | None) -> str | None:
    """Kohaku-XL's period tags: old (<=2010), early, mid, recent, newest (2021+)."""
    if year is None:
        return None
    for last, name in ((2010, "old"), (2014, "early"), (2017, "mid"), (2020, "recent")):
        if year <= last:
            return name
    return "newest"


def format_tag(tag: str, separator: str = "") -> str | None:
    """Danbooru spelling -> prompt spelling that cannot split or break a caption.

    Underscores become spaces except in short emoticons (`^_^`, `o_o`: three
    characters or fewer, as HakuBooru does); parentheses are escaped; commas,
    line breaks, control characters and the keep separator become spaces.
    None when nothing printable is left.
    """
    text = unicodedata.normalize("NFC", str(tag))
    text = "".join(" " if unicodedata.category(c) in _UNSAFE_CATEGORIES else c for c in text)
    text = " ".join(text.split())
    if len(text) > 3:
        text = text.replace("_", " ")
    text = text.replace(",", " ")
    if separator:
        while separator in text:
            text = text.replace(separator, " ")
    text = _UNESCAPED_PAREN.sub(r"\\\1", " ".join(text.split()))
    return text or None


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
