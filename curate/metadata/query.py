"""Query specs (TOML): subsets of posts chosen by rules, with quotas.

Top-level keys other than name/seed/class_token/caption/subsets are defaults for
every subset; `tags` and `exclude_tags` add up (top level + subset), every other
key in a subset replaces the top-level value. A spec with no [[subsets]] is one
subset named after the query. Unknown keys are errors that name the key.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path

from curate.common import toml_bounds
from curate.errors import CurateError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ORIENTATIONS = ("horizontal", "vertical", "square", "any")
ORDERS = ("random", "fav_count", "score", "id")
RATINGS = ("g", "s", "q", "e")
RATING_WORDS = {"general": "g", "sensitive": "s", "questionable": "q", "explicit": "e"}
IMAGE_EXTS = ("jpg", "jpeg", "png", "gif", "webp", "avif")  # default file_ext set

FILTER_KEYS = {
    "tags", "any_tags", "exclude_tags", "artists", "artists_file", "fav_count", "score",
    "rating", "orientation", "min_width", "min_height", "min_pixels", "created_after",
    "created_before", "file_ext", "max_per_artist", "order", "include_deleted",
    "include_banned", "caption", "count",
    "match_tags_of", "match_tags_share",  # issue 27: curate.metadata.match_tags
}
TOP_KEYS = {"name", "seed", "class_token", "description", "subsets"} | FILTER_KEYS
SUBSET_KEYS = {"name", "count"} | FILTER_KEYS
ADDITIVE = {"tags", "exclude_tags"}

_RANGE = re.compile(r"^\s*(>=|<=|>|<)?\s*(-?\d+)\s*$")
_SPAN = re.compile(r"^\s*(-?\d+)?\s*\.\.\s*(-?\d+)?\s*$")


@dataclass(frozen=True)
class Range:
    """Danbooru range syntax: N, >N, >=N, <N, <=N, N..M (both ends inclusive)."""

    lo: int | None = None
    hi: int | None = None

    @classmethod
    def parse(cls, value, where: str) -> "Range":
        if isinstance(value, bool):
            raise CurateError(f"{where}: expected a number or range, got {value!r}")
        if isinstance(value, int):
            return cls(value, value)
        if not isinstance(value, str):
            raise CurateError(f"{where}: expected a number or range, got {value!r}")
        m = _RANGE.match(value)
        if m:
            op, n = m.group(1), int(m.group(2))
            return {
                None: cls(n, n), ">": cls(n + 1, None), ">=": cls(n, None),
                "<": cls(None, n - 1), "<=": cls(None, n),
            }[op]
        m = _SPAN.match(value)
        if m and (m.group(1) or m.group(2)):
            lo = int(m.group(1)) if m.group(1) else None
            hi = int(m.group(2)) if m.group(2) else None
            if lo is not None and hi is not None and lo > hi:
                raise CurateError(f"{where}: empty range {value!r}")
            return cls(lo, hi)
        raise CurateError(
            f"{where}: bad range {value!r} (use N, >N, >=N, <N, <=N or N..M)"
        )

    def danbooru(self) -> str:
        if self.lo is not None and self.lo == self.hi:
            return str(self.lo)
        if self.lo is not None and self.hi is not None:
            return f"{self.lo}..{self.hi}"
        return f">={self.lo}" if self.lo is not None else f"<={self.hi}"


@dataclass
class Subset:
    name: str
    count: int | None = None
    tags: list[str] = field(default_factory=list)
    any_tags: list[str] = field(default_factory=list)
    exclude_tags: list[str] = field(default_factory=list)
    artists: list[str] = field(default_factory=list)
    artists_file: str | None = None  # where listed artists came from (warnings name it)
    file_artists: list[str] = field(default_factory=list)  # the artists that file lists
    fav_count: Range | None = None
    score: Range | None = None
    rating: list[str] | None = None
    orientation: str = "any"
    min_width: int | None = None
    min_height: int | None = None
    min_pixels: int | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    file_ext: list[str] | None = None
    max_per_artist: int | None = None
    order: str = "random"
    include_deleted: bool = False
    include_banned: bool = False
    caption: dict = field(default_factory=dict)
    match_tags_of: str | None = None  # a training manifest: draw part of the quota from its overfitting tags
    match_tags_share: float = 0.3
    match_shares: tuple = ()          # (tag -> share, rows) of that manifest, read at load

    @property
    def exts(self) -> tuple[str, ...]:
        return tuple(self.file_ext) if self.file_ext else IMAGE_EXTS


@dataclass
class Query:
    name: str
    seed: int
    class_token: str | None
    subsets: list[Subset]
    text: str
    path: str
    caption: dict = field(default_factory=dict)


def load(path: str | Path, outside_files: bool = False) -> Query:
    """`outside_files`: an artists_file may lie outside the query's folder (else an error)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM from Windows editors is not TOML
    except FileNotFoundError:
        raise CurateError(f"query file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CurateError(f"cannot read query file {path}: {exc}") from None
    return parse(text, base_dir=path.parent, label=str(path), outside_files=outside_files)


def parse(text: str, base_dir: Path = Path("."), label: str = "query", outside_files: bool = False) -> Query:
    toml_bounds.check(text, label)  # before parsing: tomllib has no depth or size limit
    try:
        doc = tomllib.loads(text)
    except (ValueError, RecursionError) as exc:  # TOMLDecodeError, and int() past 4300 digits
        raise CurateError(f"{label}: invalid TOML: {str(exc)[:200]}") from None
    _check_keys(doc, TOP_KEYS, label)
    name = _typed(doc.get("name", Path(label).stem), str, f"{label}: name")
    seed = _typed(doc.get("seed", 0), int, f"{label}: seed")
    class_token = doc.get("class_token")
    if class_token is not None:
        _typed(class_token, str, f"{label}: class_token")
    defaults = {k: v for k, v in doc.items() if k in FILTER_KEYS}
    raw_subsets = doc.get("subsets")
    if raw_subsets is None:
        raw_subsets = [{"name": name}]
    if not isinstance(raw_subsets, list) or not raw_subsets:
        raise CurateError(f"{label}: subsets must be a non-empty array of tables ([[subsets]])")
    subsets, seen = [], set()
    for i, raw in enumerate(raw_subsets):
        where = f"{label}: subsets[{i}]"
        if not isinstance(raw, dict):
            raise CurateError(f"{where}: must be a table")
        _check_keys(raw, SUBSET_KEYS, where)
        merged = dict(defaults)
        for k, v in raw.items():
            if k in ADDITIVE and k in merged:
                merged[k] = list(_str_list(merged[k], f"{label}: {k}")) + list(_str_list(v, f"{where}.{k}"))
            else:
                merged[k] = v
        sub = _subset(merged, where, base_dir, default_name=name if len(raw_subsets) == 1 else f"subset{i}",
                      outside_files=outside_files)
        if sub.name in seen:
            raise CurateError(f"{where}: duplicate subset name {sub.name!r}")
        seen.add(sub.name)
        subsets.append(sub)
    return Query(name, seed, class_token, subsets, text, label, doc.get("caption") or {})


def _subset(d: dict, where: str, base_dir: Path, default_name: str, outside_files: bool = False) -> Subset:
    s = Subset(name=_typed(d.get("name", default_name), str, f"{where}.name"))
    if "count" in d:
        s.count = _typed(d["count"], int, f"{where}.count")
        if s.count < 0:
            raise CurateError(f"{where}.count: must be >= 0")
    for key in ("tags", "any_tags", "exclude_tags", "artists"):
        if key in d:
            setattr(s, key, [_norm_tag(t) for t in _str_list(d[key], f"{where}.{key}")])
    if "artists_file" in d:
        s.artists_file = rel = _typed(d["artists_file"], str, f"{where}.artists_file")
        path = base_dir / rel
        if not outside_files and not path.resolve().is_relative_to(base_dir.resolve()):
            # its lines go to the API as tags: a query must not read any file it names
            raise CurateError(f"{where}.artists_file: {rel} lies outside the query's folder; "
                              "move it beside the query, or pass --allow-outside-files")
        s.file_artists = read_artists_file(path)
        s.artists = s.artists + s.file_artists
        if not s.artists:
            raise CurateError(f"{where}.artists_file: {d['artists_file']} lists no artists")
    for key in ("fav_count", "score"):
        if key in d:
            setattr(s, key, Range.parse(d[key], f"{where}.{key}"))
    if "rating" in d:
        words = [r.lower() for r in _str_list(d["rating"], f"{where}.rating")]
        bad = [r for r in words if r not in RATINGS and r not in RATING_WORDS]
        if bad:
            raise CurateError(f"{where}.rating: unknown rating {bad[0]!r} (use g, s, q, e)")
        s.rating = [RATING_WORDS.get(r, r) for r in words]
    if "orientation" in d:
        s.orientation = _choice(d["orientation"], ORIENTATIONS, f"{where}.orientation")
    for key in ("min_width", "min_height", "min_pixels", "max_per_artist"):
        if key in d:
            setattr(s, key, _typed(d[key], int, f"{where}.{key}"))
    if s.max_per_artist is not None and s.max_per_artist < 1:
        raise CurateError(f"{where}.max_per_artist: must be >= 1")
    for key in ("created_after", "created_before"):
        if key in d:
            setattr(s, key, _datetime(d[key], f"{where}.{key}"))
    if "file_ext" in d:
        s.file_ext = [e.lower().lstrip(".") for e in _str_list(d["file_ext"], f"{where}.file_ext")]
    if "order" in d:
        s.order = _choice(d["order"], ORDERS, f"{where}.order")
    for key in ("include_deleted", "include_banned"):
        if key in d:
            setattr(s, key, _typed(d[key], bool, f"{where}.{key}"))
    if "caption" in d:
        s.caption = _typed(d["caption"], dict, f"{where}.caption")
    if "match_tags_of" in d or "match_tags_share" in d:
        _match_tags(s, d, where, base_dir)
    return s


def _match_tags(s: Subset, d: dict, where: str, base_dir: Path) -> None:
    from curate.metadata.match_tags import load_shares

    if "match_tags_of" not in d:
        raise CurateError(f"{where}.match_tags_share: needs match_tags_of (the training manifest)")
    rel = _typed(d["match_tags_of"], str, f"{where}.match_tags_of")
    path = next((p for p in (base_dir / rel, Path(rel)) if p.is_file()), None)  # beside the query, or from here
    if path is None:
        raise CurateError(f"{where}.match_tags_of: manifest not found: {rel}")
    share = d.get("match_tags_share", s.match_tags_share)
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share <= 1:
        raise CurateError(f"{where}.match_tags_share: expected a number from 0 to 1, got {share!r}")
    s.match_tags_of, s.match_tags_share, s.match_shares = rel, float(share), load_shares(path)


def read_artists_file(path: Path) -> list[str]:
    """One artist tag per line; blank lines and `#` comments ignored."""
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()  # BOM and CRLF: read right
    except FileNotFoundError:
        raise CurateError(f"artists file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CurateError(f"cannot read artists file {path}: {exc}") from None
    out = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(_norm_tag(line))
    return out


def _norm_tag(tag: str) -> str:
    # Danbooru spelling: lower case, underscores; users often type spaces.
    return "_".join(tag.strip().lower().split())


def _check_keys(d: dict, allowed: set, where: str) -> None:
    for key in d:
        if key not in allowed:
            raise CurateError(f"{where}: unknown key {key!r}")


def _typed(value, typ, where: str):
    if typ is int and isinstance(value, bool) or not isinstance(value, typ):
        raise CurateError(f"{where}: expected {typ.__name__}, got {value!r}")
    return value


def _str_list(value, where: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CurateError(f"{where}: expected a list of strings")
    return value


def _choice(value, choices, where: str) -> str:
    if value not in choices:
        raise CurateError(f"{where}: {value!r} is not one of {', '.join(choices)}")
    return value


def _datetime(value, where: str) -> datetime:
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, date):
        dt = datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value)
        except ValueError:
            raise CurateError(f"{where}: bad date {value!r} (use YYYY-MM-DD)") from None
    else:
        raise CurateError(f"{where}: expected a date, got {value!r}")
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)
