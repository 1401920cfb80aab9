"""Caption settings: the `[caption]` keys (documented in curate.dataset.caption), recipes as
presets of them, and where they come from (`--config FILE` or the query text)."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

from curate.common import caption_rules as rules
from curate.common import toml_bounds
from curate.errors import CurateError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REG_MODES = ("class", "class+tags")
USER_CAPTION_MODES = ("use", "merge", "ignore")
RECIPE_NAMES = {"curate": "curate", "hakubooru": "hakubooru", "kohaku-xl": "hakubooru"}
# What a recipe changes from the defaults (the "curate" recipe is the defaults).
RECIPES = {
    "curate": {},
    "hakubooru": {"keep_separator": "|||", "artist": True, "meta": True, "rating": True,
                  "year": True, "ban": (), "drop": (), "prune_overlaps": False},
}


@dataclass(frozen=True)
class CaptionSettings:
    recipe: str = "curate"
    user_caption: str = "use"
    keep_separator: str = ""
    character: bool = True
    copyright: bool = True
    artist: bool = False
    general: bool = True
    meta: bool = False
    quality: bool = True
    quality_labels: tuple = rules.QUALITY_LABELS
    quality_thresholds: dict = field(default_factory=lambda: dict(rules.QUALITY_THRESHOLDS))
    quality_max_post_id: int = rules.QUALITY_MAX_POST_ID
    quality_default: str = ""
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
    copyright_tags: tuple = ()
    reg_caption: str = "class"
    class_token: str = ""
    escape_parentheses: bool = False

    @classmethod
    def of_recipe(cls, name: str = "curate") -> "CaptionSettings":
        return cls(recipe=name, **RECIPES[name])

    def updated(self, table: dict, where: str) -> "CaptionSettings":
        """A copy with the keys of a TOML table applied, each checked. A `recipe` key
        starts from that recipe's preset; the table's other keys apply on top."""
        base = self
        if "recipe" in table:
            name = table["recipe"]
            if not isinstance(name, str) or name not in RECIPE_NAMES:
                raise CurateError(f"{where}: recipe must be one of {', '.join(RECIPE_NAMES)}")
            base = CaptionSettings.of_recipe(RECIPE_NAMES[name])
        changes = {}
        for key, value in table.items():
            if key in ("subsets", "recipe"):
                continue
            if key not in _FIELDS:
                raise CurateError(f"{where}: unknown caption key {key!r}")
            changes[key] = _checked(key, value, getattr(base, key), where)
        if "quality_thresholds" in changes:
            changes["quality_thresholds"] = {**base.quality_thresholds, **changes["quality_thresholds"]}
        new = dataclasses.replace(base, **changes)
        new.check(where)
        return new

    def check(self, where: str) -> None:
        if self.reg_caption not in REG_MODES:
            raise CurateError(f"{where}: reg_caption must be one of {', '.join(REG_MODES)}")
        if self.user_caption not in USER_CAPTION_MODES:
            raise CurateError(f"{where}: user_caption must be one of {', '.join(USER_CAPTION_MODES)}")
        if self.quality_max_post_id < 0:
            raise CurateError(f"{where}: quality_max_post_id must be >= 0 (0: no cut-off)")
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
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
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
    return {bool: "true/false", int: "a whole number", float: "a number", str: "a string",
            tuple: "a list of strings", dict: "a table of number lists"}[type(default)]


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
            text = path.read_text(encoding="utf-8")
            toml_bounds.check(text, str(path))  # tomllib has no depth or size limit
            doc = tomllib.loads(text)
        except OSError as exc:
            raise CurateError(f"cannot read caption config {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise CurateError(f"caption config {path} is not UTF-8 text") from None
        except (ValueError, RecursionError) as exc:  # TOMLDecodeError, and int() past 4300 digits
            raise CurateError(f"{path}: not valid TOML ({str(exc)[:200]})") from None
        if "caption" not in doc:
            raise CurateError(f"{path}: no [caption] table")
        return _from_doc(doc, str(path))
    text = meta.get("query_text")
    if not text:
        return CaptionConfig(CaptionSettings(), {}, "defaults")
    toml_bounds.check(text, "manifest provenance: query_text")
    try:
        doc = tomllib.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CurateError(f"manifest provenance: query_text is not valid TOML ({str(exc)[:200]})") from None
    return _from_doc(doc, "query_text", default_name=meta.get("query_name", ""))


def _from_doc(doc: dict, origin: str, default_name: str = "") -> CaptionConfig:
    table = doc.get("caption", {})
    if not isinstance(table, dict):
        raise CurateError(f"{origin}: 'caption' must be a table")
    base_table = {k: v for k, v in table.items() if k != "subsets"}
    base = CaptionSettings().updated(base_table, f"{origin} [caption]")
    overrides: dict[str, dict] = {}
    per_subset = table.get("subsets", {})
    if not isinstance(per_subset, dict) or not all(isinstance(v, dict) for v in per_subset.values()):
        raise CurateError(f"{origin}: caption.subsets must hold one table per subset name")
    overrides.update(per_subset)
    subs = doc.get("subsets") if isinstance(doc.get("subsets"), list) else []
    for i, sub in enumerate(subs):  # unnamed subsets are named as curate.metadata.query names them
        if isinstance(sub, dict) and isinstance(sub.get("caption"), dict):
            name = sub.get("name", doc.get("name", default_name) if len(subs) == 1 else f"subset{i}")
            overrides.setdefault(str(name), {}).update(sub["caption"])
    # a subset = defaults <- recipe (its own, else the base's) <- base keys <- its keys
    subsets = {name: CaptionSettings().updated({**base_table, **t}, f"{origin} [caption.subsets.{name}]")
               for name, t in overrides.items()}
    return CaptionConfig(base, subsets, origin)
