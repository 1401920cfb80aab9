"""Caption stage: build each row's caption, write `<image stem>.txt` beside the image.

A caption is tags in the order the recipe prompts them:

    colour theme, prefix, count tags (1girl, solo, ...), character, copyright,
    [artist] |||  general [, meta], quality, rating, year  |||  suffix

The `|||` groups appear only when `keep_separator` is set (kohya sd-scripts'
`keep_tokens_separator`: the first group stays fixed, the middle is shuffled and
dropped, the last stays at the end). Source tags and tagger tags (above their
threshold) are merged; a tag the source has wins over the tagger. Rows with `error`
or `dup_of` set, or without an image on disk, get no caption. Reg manifests
(provenance `kind = "reg"`) get the class token alone by default.

Settings: a `[caption]` table, from `--config FILE` or else from the query text the
manifest's provenance records (`query_text`). Per-subset overrides go in
`[caption.subsets.<subset name>]`, or in a query's `[[subsets]]` entry as its
`caption` table. Keys (default):

    keep_separator = ""            # e.g. "|||"; "" writes one flat list
    character = true               # character tags
    copyright = true               # copyright tags
    artist = false                 # artist tags (in the fixed group)
    general = true                 # general tags (count tags are always kept)
    meta = false                   # meta tags (absurdres, commentary, ...)
    quality = true                 # quality tag from fav_count percentiles per rating
    quality_labels = [7 labels]    # "worst quality" ... "masterpiece"
    quality_thresholds = { g = [1, 3, 8, 16, 22, 37], s = [...], q = [...], e = [...] }
                                   # fav_count above the n-th cut -> labels[n + 1]
    rating = false                 # safe / sensitive / nsfw / explicit, nsfw
    year = false                   # old / early / mid / recent / newest
    color_theme = false            # `<colour> theme` from the image's pixels, first
    color_theme_share = 0.5        # one hue must hold more than this share of colour
    ban = [recipe's list]          # regexes (whole tag, `_` = ` `) never captioned
    drop = ["halo", "heterochromia", ".*focus.*"]   # overfit-prone tags, same syntax
    prune_overlaps = true          # drop `long hair` when `very long hair` is there
    tagger = true                  # merge the `tagger` column
    tagger_threshold = 0.35        # general tags from the tagger
    tagger_character_threshold = 0.85
    prefix = []                    # tags put first (e.g. a style trigger)
    suffix = []                    # tags put last
    reg_caption = "class"          # reg manifests: "class" (token alone) | "class+tags"
    class_token = ""               # overrides the provenance's class_token

ban and drop apply to descriptive tags (general, meta, tagger); names (character,
copyright, artist), prefix, suffix and the class token are never filtered.
"""

from __future__ import annotations

import dataclasses
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from . import caption_rules as rules
from . import manifest
from .errors import CurateError
from .review import decisions

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REG_MODES = ("class", "class+tags")


@dataclass(frozen=True)
class CaptionSettings:
    keep_separator: str = ""
    character: bool = True
    copyright: bool = True
    artist: bool = False
    general: bool = True
    meta: bool = False
    quality: bool = True
    quality_labels: tuple = rules.QUALITY_LABELS
    quality_thresholds: dict = field(default_factory=lambda: dict(rules.QUALITY_THRESHOLDS))
    rating: bool = False
    year: bool = False
    color_theme: bool = False
    color_theme_share: float = 0.5
    ban: tuple = rules.DEFAULT_BAN
    drop: tuple = rules.DEFAULT_DROP
    prune_overlaps: bool = True
    tagger: bool = True
    tagger_threshold: float = 0.35
    tagger_character_threshold: float = 0.85
    prefix: tuple = ()
    suffix: tuple = ()
    reg_caption: str = "class"
    class_token: str = ""

    def updated(self, table: dict, where: str) -> "CaptionSettings":
        """A copy with the keys of a TOML table applied, each checked."""
        changes = {}
        for key, value in table.items():
            if key == "subsets":
                continue
            if key not in _FIELDS:
                raise CurateError(f"{where}: unknown caption key {key!r}")
            changes[key] = _checked(key, value, getattr(self, key), where)
        if "quality_thresholds" in changes:
            changes["quality_thresholds"] = {**self.quality_thresholds, **changes["quality_thresholds"]}
        new = dataclasses.replace(self, **changes)
        new.check(where)
        return new

    def check(self, where: str) -> None:
        if self.reg_caption not in REG_MODES:
            raise CurateError(f"{where}: reg_caption must be one of {', '.join(REG_MODES)}")
        for rating, cuts in self.quality_thresholds.items():
            if len(cuts) != len(self.quality_labels) - 1 or list(cuts) != sorted(cuts):
                raise CurateError(
                    f"{where}: quality_thresholds.{rating} needs {len(self.quality_labels) - 1}"
                    " ascending numbers, one fewer than quality_labels")
        for key in ("ban", "drop"):
            try:
                rules.compile_patterns(getattr(self, key))
            except Exception as exc:
                raise CurateError(f"{where}: {key}: bad regular expression ({exc})") from None


_FIELDS = {f.name for f in dataclasses.fields(CaptionSettings)}


def _checked(key: str, value, default, where: str):
    """Coerce a TOML value to the type of the setting's default, or explain."""
    bad = CurateError(f"{where}: caption key {key!r} expects {_kind(default)}, got {value!r}")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise bad
        return value
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise bad
        return tuple(value)
    if isinstance(default, dict):  # quality_thresholds: rating -> list of numbers
        if not isinstance(value, dict) or set(value) - set(rules.RATING_TAGS) or not all(
            isinstance(v, list) and all(isinstance(n, (int, float)) and not isinstance(n, bool) for n in v)
            for v in value.values()
        ):
            raise bad
        return {k: tuple(v) for k, v in value.items()}
    raise bad  # pragma: no cover


def _kind(default) -> str:
    return {bool: "true/false", float: "a number", str: "a string", tuple: "a list of strings",
            dict: "a table of number lists"}[type(default)]


# --- where settings come from --------------------------------------------------


@dataclass
class CaptionConfig:
    base: CaptionSettings
    subsets: dict[str, CaptionSettings]
    origin: str

    def for_subset(self, name: str | None) -> CaptionSettings:
        return self.subsets.get(name or "", self.base)


def load_config(config_path: str | Path | None, meta: dict) -> CaptionConfig:
    """The caption settings from `--config FILE`, else from the manifest's query text."""
    if config_path is not None:
        path = Path(config_path)
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise CurateError(f"cannot read caption config {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise CurateError(f"caption config {path} is not UTF-8 text") from None
        except tomllib.TOMLDecodeError as exc:
            raise CurateError(f"{path}: not valid TOML ({exc})") from None
        if "caption" not in doc:
            raise CurateError(f"{path}: no [caption] table")
        return _from_doc(doc, str(path))
    text = meta.get("query_text")
    if not text:
        return CaptionConfig(CaptionSettings(), {}, "defaults")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CurateError(f"manifest provenance: query_text is not valid TOML ({exc})") from None
    return _from_doc(doc, "query_text", default_name=meta.get("query_name", ""))


def _from_doc(doc: dict, origin: str, default_name: str = "") -> CaptionConfig:
    table = doc.get("caption", {})
    if not isinstance(table, dict):
        raise CurateError(f"{origin}: 'caption' must be a table")
    base = CaptionSettings().updated(table, f"{origin} [caption]")
    overrides: dict[str, dict] = {}
    per_subset = table.get("subsets", {})
    if not isinstance(per_subset, dict) or not all(isinstance(v, dict) for v in per_subset.values()):
        raise CurateError(f"{origin}: caption.subsets must hold one table per subset name")
    overrides.update(per_subset)
    subs = doc.get("subsets") if isinstance(doc.get("subsets"), list) else []
    for i, sub in enumerate(subs):  # unnamed subsets are named as curate.query names them
        if isinstance(sub, dict) and isinstance(sub.get("caption"), dict):
            name = sub.get("name", doc.get("name", default_name) if len(subs) == 1 else f"subset{i}")
            overrides.setdefault(str(name), {}).update(sub["caption"])
    subsets = {
        name: base.updated(t, f"{origin} [caption.subsets.{name}]") for name, t in overrides.items()
    }
    return CaptionConfig(base, subsets, origin)


# --- one caption ---------------------------------------------------------------


def build_caption(row: dict, s: CaptionSettings, *, is_reg: bool = False,
                  class_token: str = "", theme: str | None = None) -> str:
    """The caption for one manifest row (a dict of its columns). Deterministic."""
    token = s.class_token or class_token
    if is_reg:
        if not token:
            raise CurateError("reg manifest has no class token: set class_token in [caption]")
        if s.reg_caption == "class":
            return _join([list(s.prefix) + [token], [], list(s.suffix)], s.keep_separator)

    ban = rules.compile_patterns(s.ban)
    drop = rules.compile_patterns(s.drop)
    source = {c: list(row.get(f"tags_{c}") or []) for c in ("general", "character", "copyright", "artist", "meta")}
    known = {t for tags in source.values() for t in tags}
    general = list(source["general"]) + (list(source["meta"]) if s.meta else [])
    characters = list(source["character"])
    if s.tagger:
        extra_general, extra_character = _tagger_tags(row.get("tagger") or [], s, known)
        general += extra_general
        characters += extra_character
    general = [t for t in general if not (rules.is_banned(t, ban) or rules.is_banned(t, drop))]
    if s.prune_overlaps:
        general = rules.prune_overlaps(general, source=set(source["general"]) | set(source["meta"]))

    fixed = [theme] if theme else []  # the recipe's users put the colour scheme first
    fixed += list(s.prefix)
    if is_reg:
        fixed.append(token)
    fixed += [t for t in general if rules.is_count_tag(t)]
    fixed += characters if s.character else []
    fixed += source["copyright"] if s.copyright else []
    fixed += source["artist"] if s.artist else []

    shuffled = [t for t in general if not rules.is_count_tag(t)] if s.general else []
    if s.quality:
        shuffled += [q] if (q := rules.quality_tag(row.get("rating"), row.get("fav_count"),
                                                  s.quality_thresholds, s.quality_labels)) else []
    if s.rating:
        shuffled += list(rules.RATING_TAGS.get(row.get("rating"), ()))
    if s.year and row.get("created_at") is not None:
        shuffled += [y] if (y := rules.year_tag(row["created_at"].year)) else []
    return _join([fixed, shuffled, list(s.suffix)], s.keep_separator)


def _tagger_tags(entries: list, s: CaptionSettings, known: set[str]) -> tuple[list[str], list[str]]:
    """Tagger tags above threshold that the source does not have, best score first."""
    general, character = [], []
    for entry in sorted(entries, key=lambda e: (-(e.get("score") or 0.0), e.get("tag") or "")):
        tag = (entry.get("tag") or "").strip()
        tag = tag.replace(" ", "_") if len(tag) > 3 else tag  # some taggers print spaces
        category = str(entry.get("category") or "general").lower()
        score = entry.get("score") or 0.0
        if not tag or tag in known or category in ("rating", "9"):
            continue
        if category in ("character", "4"):
            if score >= s.tagger_character_threshold:
                character.append(tag)
        elif score >= s.tagger_threshold:
            general.append(tag)
        known.add(tag)
    return general, character


def _join(groups: list[list[str]], separator: str) -> str:
    """Format every tag, drop repeats (first wins), join groups with the separator."""
    seen: set[str] = set()
    texts = []
    for group in groups:
        out = []
        for tag in group:
            text = rules.format_tag(tag, separator or "|||")
            if text and text not in seen:
                seen.add(text)
                out.append(text)
        texts.append(", ".join(out))
    fixed, shuffled, tail = texts
    if not separator:
        return ", ".join(t for t in texts if t)
    caption = fixed
    if shuffled or tail:
        caption = f"{caption} {separator} {shuffled}".strip()
    if tail:
        caption = f"{caption} {separator} {tail}"
    return caption


# --- the stage -------------------------------------------------------------------


@dataclass
class CaptionSummary:
    manifest: Path
    origin: str
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    shared_txt: list = field(default_factory=list)
    per_subset: Counter = field(default_factory=Counter)
    example: str = ""

    def lines(self) -> list[str]:
        out = [f"captioned {self.written} rows of {self.manifest} (settings: {self.origin})"]
        for name, n in sorted(self.per_subset.items()):
            out.append(f"  {name}: {n}")
        for why, n in sorted(self.skipped.items()):
            out.append(f"  skipped {n}: {why}")
        for txt in self.shared_txt[:5]:
            out.append(f"  warning: two images share the caption file {txt} (kept the first)")
        if self.example:
            out.append(f"  e.g. {self.example}")
        out.append("captions: <image stem>.txt beside each image, and the manifest's caption column")
        return out


COLUMNS = ("key", "subset", "path", "error", "dup_of", "rating", "fav_count", "created_at",
           "tags_general", "tags_character", "tags_copyright", "tags_artist", "tags_meta", "tagger")


def caption_table(table: pa.Table, meta: dict, root: Path, config: CaptionConfig,
                  summary: CaptionSummary, edited: dict | None = None) -> pa.Table:
    """Fill `caption` (and `error` for undecodable images when colours are on).

    `edited`: key -> caption text a person wrote (curate review); kept as written.
    """
    from tqdm import tqdm

    from .images import ImageError, open_image

    edited = edited or {}

    is_reg = meta.get("kind") == "reg"
    class_token = str(meta.get("class_token") or "")
    rows = table.select(list(COLUMNS)).to_pylist()
    captions: list[str | None] = []
    errors = table.column("error").to_pylist()
    txt_owner: dict[Path, str] = {}
    for i, row in enumerate(tqdm(rows, desc="caption", unit="img", disable=None, leave=False)):
        captions.append(None)
        if row["error"]:
            summary.skipped["error set"] += 1
            continue
        if row["dup_of"]:
            summary.skipped["duplicate"] += 1
            continue
        image = root / row["path"] if row["path"] else None
        if image is None or not image.is_file():
            summary.skipped["no image on disk"] += 1
            continue
        s = config.for_subset(row["subset"])
        theme = None
        if s.color_theme and row["key"] not in edited and not (is_reg and s.reg_caption == "class"):
            try:
                theme = rules.color_theme(open_image(image, draft_size=(256, 256)), s.color_theme_share)
            except ImageError as exc:
                errors[i] = f"caption: {exc}"
                summary.skipped["image does not decode (error set)"] += 1
                continue
        text = edited.get(row["key"]) or build_caption(row, s, is_reg=is_reg, class_token=class_token, theme=theme)
        captions[i] = text
        txt = image.with_suffix(".txt")
        if txt_owner.setdefault(txt, row["key"]) != row["key"]:
            summary.shared_txt.append(str(txt))
        else:
            _write_text(txt, text)
        summary.written += 1
        summary.per_subset[row["subset"] or "(no subset)"] += 1
        summary.example = summary.example or text
    table = manifest.with_column(table, "caption", captions)
    return manifest.with_column(table, "error", errors)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    try:
        tmp.write_text(text, encoding="utf-8", newline="")
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise CurateError(f"cannot write caption file {path}: {exc.strerror}") from None


def run(manifest_path: str | Path, config_path: str | Path | None = None) -> CaptionSummary:
    """`curate caption`: read the manifest, caption every row, write it back."""
    manifest_path = Path(manifest_path)
    table, meta = manifest.read(manifest_path)
    config = load_config(config_path, meta)
    subsets = sorted({s or "" for s in table.column("subset").to_pylist()})
    if meta.get("kind") == "reg" and not meta.get("class_token"):
        for name in subsets:
            if not config.for_subset(name).class_token:
                raise CurateError("reg manifest has no class token: set class_token in [caption]")
    summary = CaptionSummary(manifest_path, config.origin)
    review = decisions.current(manifest_path)  # a person's keepers and caption edits win
    table = caption_table(review.applied(table), meta, manifest_path.parent, config, summary, review.captions())
    # export reads the separators back to set kohya's keep_tokens_separator per subset
    separators = {name: config.for_subset(name).keep_separator for name in subsets}
    manifest.record_stage(meta, "caption", settings=config.origin, written=summary.written,
                          keep_separators=separators)
    manifest.write(table, manifest_path, meta)
    return summary
