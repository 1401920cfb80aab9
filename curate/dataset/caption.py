"""Caption stage: choose each row's caption text and keep a copy in a `.txt` file.

A generated caption is tags in the order HakuBooru (Kohaku-XL's captioner) writes them:

    colour theme, prefix, special tags (1girl, 2boys, male focus, ...), character,
    copyright, [artist] |||  general [, meta], year, rating, quality  |||  suffix

(`solo` is a general tag.) The `|||` groups appear only when `keep_separator` is set
(kohya sd-scripts' `keep_tokens_separator`: the first group stays fixed, the middle is
shuffled and dropped, the last stays at the end). Source tags and tagger tags (above
their threshold) are merged; a tag the source has wins over the tagger. Tag names are
written as HakuBooru writes them: underscores to spaces (names over 3 characters), no
prompt escapes. Rows with `error` or `dup_of` set, or without an image on disk, get no
caption. Reg manifests (provenance `kind = "reg"`) get the class token alone by default.

Recipes (`recipe = ...`) are presets for the keys below; keys set beside them win:

    "curate"     (default) the BAXL recipe: ban and drop lists, overlap pruning, no
                 artist / meta / rating / year, one flat list
    "hakubooru"  (alias "kohaku-xl") exactly `hakubooru.caption.make_caption`'s text for
                 a Danbooru post: artist, meta (minus HakuBooru's blacklist), year,
                 rating and quality tags, nothing banned or pruned, and its joint
                 `<fixed>, |||<general>`

A user's own caption (a `.txt` / `.caption` sidecar that ingest read into
`user_caption`) is chosen per subset with `user_caption`: "use" (default: the user's
text as it is; rows without one are generated), "merge" (the user's tags plus the
tagger's, deduplicated, ordered as above), "ignore" (always generate). A file of several
lines keeps them as alternatives, one caption line each (export writes them all where
the subset sets sd-scripts' `enable_wildcard`, else the first). With several sidecars
(`user_sidecars`), "use" takes the first (ingest's `--caption-ext` order: `.txt`,
`.caption`, ...) and the summary counts the ones left out; "merge" reads sd-scripts'
fine-tune pair as it does: `.caption` sentences, then the tags of the other files merged
with curate's, `<sentence>, <tags>` (one line per sentence line).

Caption files: `<image stem>.txt` beside an image curate wrote (a download, a crop);
for a user's own image, `<manifest stem>.captions/<key>.txt` in the manifest's folder.
The stage never replaces a file it did not write: `caption_file` and `caption_sha256`
record what it wrote, and a file that differs (a user's, or one a person edited) is left
alone (the caption goes to curate's folder instead and the summary lists it). Each write
is first noted in `<manifest>.caption-journal.jsonl` (key, file, digest), so a run killed
before it saved the manifest (Ctrl-C, SIGTERM, kill -9) is followed by a re-run that
knows those files as its own; the journal is removed once the manifest holds them.

Settings: a `[caption]` table, from `--config FILE` or else from the query text the
manifest's provenance records (`query_text`). Per-subset overrides go in
`[caption.subsets.<subset name>]`, or in a query's `[[subsets]]` entry as its
`caption` table. Keys (default):

    recipe = "curate"              # "curate" | "hakubooru" (see above)
    user_caption = "use"           # "use" | "merge" | "ignore"
    keep_separator = ""            # e.g. "|||"; "" writes one flat list
    character = true               # character tags
    copyright = true               # copyright tags
    artist = false                 # artist tags (in the fixed group; `banned_artist` never)
    general = true                 # general tags (special tags are always kept)
    meta = false                   # meta tags, minus HakuBooru's blacklist (commentary, ...)
    quality = true                 # quality tag from fav_count percentiles per rating
    quality_labels = [7 labels]    # "worst quality" ... "masterpiece"
    quality_thresholds = { g = [1, 3, 8, 16, 22, 37], s = [...], q = [...], e = [...] }
                                   # fav_count above the n-th cut -> labels[n + 1]
    quality_max_post_id = 7000000  # newer posts get no quality tag (0: no cut-off)
    quality_default = ""           # quality tag for rows with no fav_count (e.g. official CG)
    rating = false                 # safe / sensitive / nsfw / explicit, nsfw
    year = false                   # old / early / mid / recent / newest (2005-2024)
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
    copyright_tags = []            # the copyright slot for rows without one (e.g. ["blue_archive"] for CG)
    reg_caption = "class"          # reg manifests: "class" (token alone) | "class+tags"
    class_token = ""               # overrides the provenance's class_token
    escape_parentheses = false     # `\\(` escapes, only for sd-scripts --weighted_captions:
                                   # export and `curate train` then set weighted_captions

ban and drop apply to descriptive tags (general, meta, tagger); names (character,
copyright, artist), a user's own tags, prefix, suffix and the class token are never
filtered.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from curate import manifest
from curate.common import caption_rules as rules
from curate.common import decisions
from curate.dataset.caption_settings import (  # noqa: F401 (public)
    RECIPES,
    CaptionConfig,
    CaptionSettings,
    load_config,
)
from curate.errors import CurateError

# --- one caption ---------------------------------------------------------------


def build_caption(row: dict, s: CaptionSettings, *, is_reg: bool = False,
                  class_token: str = "", theme: str | None = None) -> str:
    """The generated caption for one manifest row (a dict of its columns). Deterministic."""
    return _compose(row, s, is_reg=is_reg, class_token=class_token, theme=theme)


def choose_caption(row: dict, s: CaptionSettings, *, is_reg: bool = False,
                   class_token: str = "", theme: str | None = None) -> tuple[str, str]:
    """(caption text, how: "user" | "merged" | "generated") as the subset's settings choose.

    A user's caption of several lines keeps them as alternatives, one per line (sd-scripts
    reads the first, or one at random per step with `enable_wildcard`; export and `curate
    train` decide). With `merge`, sd-scripts' fine-tune pair (BLIP sentences in `.caption`,
    tags in another sidecar) becomes `<sentence>, <tags>` per sentence line, its order."""
    return _choose(row, s, is_reg=is_reg, class_token=class_token, theme=theme)[:2]


SENTENCES = ".caption"  # sd-scripts' make_captions.py writes BLIP sentences there, the taggers .txt
SENTENCE_SEPARATOR = ", "  # sd-scripts: caption + caption_separator (",") + tags; it strips each piece


def sidecars_of(row: dict) -> list[dict]:
    """The row's sidecar captions [{ext, text}] (`user_sidecars`, else `user_caption` alone)."""
    found = [f for f in (row.get("user_sidecars") or []) if f.get("text") and user_lines(f["text"])]
    if not found and row.get("user_caption") and user_lines(row["user_caption"]):
        found = [{"ext": "", "text": row["user_caption"]}]
    return found


def user_lines(text: str) -> list[str]:
    """A user's caption file as its non-empty lines, each one clean line (split where
    sd-scripts' text-mode readlines splits: \n, \r\n, \r)."""
    return [line for line in (rules.one_line(x) for x in re.split(r"\r\n|\r|\n", text)) if line]


def _choose(row: dict, s: CaptionSettings, *, is_reg: bool = False, class_token: str = "",
            theme: str | None = None) -> tuple[str, str, str, list[str]]:
    """(text, how, the sidecar extension used, the extensions left out)."""
    found = sidecars_of(row) if s.user_caption != "ignore" else []
    if not found:
        return _compose(row, s, is_reg=is_reg, class_token=class_token, theme=theme), "generated", "", []
    exts = [f["ext"] for f in found]
    if s.user_caption == "use":  # the first sidecar (ingest's --caption-ext order), its lines kept
        lines = user_lines(found[0]["text"])
        return "\n".join(rules.person_text(x, s.escape_parentheses) for x in lines), "user", exts[0], exts[1:]
    sentences = [f for f in found if f["ext"] == SENTENCES] if len(found) > 1 else []
    tag_files = [f for f in found if f not in sentences]
    tag_lines = user_lines(tag_files[0]["text"]) if tag_files else []
    if sentences:  # every tag file's tags in one list, merged with curate's; then one line per sentence
        tags = [t for f in tag_files for line in user_lines(f["text"]) for t in user_tags(line, s.keep_separator)]
        merged = _compose(row, s, is_reg=is_reg, class_token=class_token, theme=theme, user_tags=tags)
        lines = [rules.person_text(x, s.escape_parentheses) + (SENTENCE_SEPARATOR + merged if merged else "")
                 for f in sentences for x in user_lines(f["text"])]
        return "\n".join(lines), "merged", "+".join(exts), []
    lines = [_compose(row, s, is_reg=is_reg, class_token=class_token, theme=theme,
                      user_tags=user_tags(line, s.keep_separator)) for line in tag_lines]
    return "\n".join(dict.fromkeys(lines)), "merged", exts[0], exts[1:]


def user_tags(text: str, separator: str = "") -> list[str]:
    """A user's caption as tags: split on commas, line breaks and the keep separator."""
    text = rules.one_line(text).replace(separator or "|||", ",")
    return [t for t in (" ".join(part.split()) for part in text.split(",")) if t]


def _compose(row: dict, s: CaptionSettings, *, is_reg: bool, class_token: str,
             theme: str | None, user_tags: list[str] | None = None) -> str:
    token = s.class_token or class_token
    if is_reg:
        if not token:
            raise CurateError("reg manifest has no class token: set class_token in [caption]")
        if s.reg_caption == "class":
            return _join([list(s.prefix) + [token], [], list(s.suffix)], s, {})

    ban = rules.compile_patterns(s.ban)
    drop = rules.compile_patterns(s.drop)
    source = {c: [t for t in (row.get(f"tags_{c}") or []) if t and t.strip()]
              for c in ("general", "character", "copyright", "artist", "meta")}
    artists = [t for t in source["artist"] if rules.artist_kept(t)]
    meta = [t for t in source["meta"] if rules.meta_kept(t)] if s.meta else []
    # a user's tags, in Danbooru spelling for the rules; `verbatim` keeps their own text
    verbatim: dict[str, str] = {}
    for text in user_tags or []:
        plain = rules.unescape(text)
        verbatim.setdefault(plain.replace(" ", "_") if len(plain) > 3 else plain,
                            rules.person_text(text, s.escape_parentheses))
    copyrights = source["copyright"] or list(s.copyright_tags)
    extras = {theme, *s.prefix, *s.suffix, *(copyrights if s.copyright else ())} - {None}  # shown anyway
    known = {t for tags in source.values() for t in tags} | set(verbatim) | extras
    characters = list(source["character"])
    general = list(source["general"])
    if s.tagger:
        extra_general, extra_character = _tagger_tags(row.get("tagger") or [], s, known, set(verbatim))
        general += extra_general
        characters = list(dict.fromkeys(characters + extra_character))
    general = [t for t in general if not (rules.is_banned(t, ban) or rules.is_banned(t, drop))]
    meta = [t for t in meta if not (rules.is_banned(t, ban) or rules.is_banned(t, drop))]
    # the user's tags, never filtered; one that names a shown character (etc.) sits there
    shown = extras | set(characters if s.character else ()) | set(artists if s.artist else ())
    general = [t for t in verbatim if t not in shown] + [t for t in general if t not in verbatim]
    if s.prune_overlaps:
        general = rules.prune_overlaps(general, source=set(source["general"]) | set(verbatim))

    fixed = [theme] if theme else []  # the recipe's users put the colour scheme first
    fixed += list(s.prefix)
    if is_reg:
        fixed.append(token)
    fixed += [t for t in general if rules.is_special_tag(t)]
    fixed += characters if s.character else []
    fixed += copyrights if s.copyright else []
    fixed += artists if s.artist else []

    shuffled = [t for t in general if not rules.is_special_tag(t)] + meta if s.general else []
    if s.year:
        shuffled += [y] if (y := rules.year_tag(rules.post_year(row.get("created_at")))) else []
    if s.rating:
        shuffled += list(rules.RATING_TAGS.get(row.get("rating"), ()))
    if s.quality:
        shuffled += [q] if (q := _quality(row, s)) else []
    return _join([fixed, shuffled, list(s.suffix)], s, verbatim)


def _quality(row: dict, s: CaptionSettings) -> str | None:
    if row.get("fav_count") is None or row.get("rating") is None:
        return s.quality_default or None
    return rules.quality_tag(row.get("rating"), row.get("fav_count"), s.quality_thresholds,
                             s.quality_labels, row.get("post_id"), s.quality_max_post_id)


def _tagger_tags(entries: list, s: CaptionSettings, known: set[str],
                 user: set[str] = frozenset()) -> tuple[list[str], list[str]]:
    """Tagger tags above threshold that the source does not have, best score first; a
    character the user's own tags name is returned too (it moves to the names)."""
    general, character = [], []
    for entry in sorted(entries, key=lambda e: (-(e.get("score") or 0.0), e.get("tag") or "")):
        tag = (entry.get("tag") or "").strip()
        tag = tag.replace(" ", "_") if len(tag) > 3 else tag  # some taggers print spaces
        category = str(entry.get("category") or "general").lower()
        score = entry.get("score") or 0.0
        if not tag or category in ("rating", "9") or (tag in known and tag not in user):
            continue
        if category in ("character", "4"):
            if score >= s.tagger_character_threshold and (tag not in known or tag in user):
                character.append(tag)
        elif score >= s.tagger_threshold and tag not in known:
            general.append(tag)
        known.add(tag)
    return general, character


def _join(groups: list[list[str]], s: CaptionSettings, verbatim: dict[str, str]) -> str:
    """Format every tag, drop repeats (first wins), join the groups: HakuBooru's
    `<fixed>, |||<general>` for its recipe, else `<fixed> ||| <general> ||| <suffix>`."""
    separator = s.keep_separator
    seen: set[str] = set()
    texts = []
    for group in groups:
        out = []
        for tag in group:
            text = verbatim.get(tag) or rules.format_tag(tag, separator or "|||", s.escape_parentheses)
            if text and (text not in seen or s.recipe == "hakubooru"):  # it repeats nothing
                seen.add(text)
                out.append(text)
        texts.append(", ".join(out))
    fixed, shuffled, tail = texts
    if not separator:
        return ", ".join(t for t in texts if t)
    if s.recipe == "hakubooru":  # make_caption: keep + ", " + "|||" + general
        return f"{fixed}, {separator}{shuffled}" + (f", {separator}{tail}" if tail else "")
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
    left_alone: list = field(default_factory=list)   # files curate did not write (or a person edited)
    chosen: Counter = field(default_factory=Counter)  # user / merged / generated
    per_subset: Counter = field(default_factory=Counter)
    folder: str = ""
    example: str = ""
    empty: int = 0  # rows with nothing to caption from (no tags, no tagger output, no user text)
    sidecar_used: Counter = field(default_factory=Counter)  # ext (or ".caption+.txt" merged) -> rows
    sidecar_left: Counter = field(default_factory=Counter)  # ext -> rows whose file `use` left out
    lines_kept: int = 0  # captions of several lines (a user's alternatives)

    def lines(self) -> list[str]:
        out = [f"captioned {self.written} rows of {self.manifest} (settings: {self.origin})"]
        for name, n in sorted(self.per_subset.items()):
            out.append(f"  {name}: {n}")
        if self.chosen:
            out.append("  text: " + ", ".join(f"{n} {how}" for how, n in sorted(self.chosen.items())))
        for why, n in sorted(self.skipped.items()):
            out.append(f"  skipped {n}: {why}")
        for used, n in sorted(self.sidecar_used.items()):
            if "+" in used:
                out.append(f"  merged {n} rows' sentences and tags ({used}) as sd-scripts' fine-tune does: "
                           "<sentence>, <tags>")
            else:
                out.append(f"  used {used} for {n} rows with several caption files")
        if self.sidecar_left:
            out.append("  left out (user_caption = \"use\" takes one file; \"merge\" combines them): "
                       + ", ".join(f"{ext} {n}" for ext, n in sorted(self.sidecar_left.items())))
        if self.lines_kept:
            out.append(f"  {self.lines_kept} captions keep the user's lines as alternatives (export writes them "
                       "where a subset sets enable_wildcard, else the first line, as sd-scripts reads it)")
        for txt in self.shared_txt[:5]:
            out.append(f"  warning: two images share the caption file {txt} (the first has it; the other's went to curate's folder)")
        if self.empty:
            out.append(f"  warning: {self.empty} captions are empty (no tags, no tagger output): "
                       "run curate tag first, or write them in curate review; export leaves them out")
        if self.left_alone:
            out.append(f"  left alone {len(self.left_alone)} caption files curate did not write "
                       f"(or a person edited), e.g. {self.left_alone[0]}; those captions went to {self.folder}")
        if self.example:
            out.append(f"  e.g. {self.example}")
        out.append("captions: the manifest's caption column, and <image stem>.txt beside each image curate "
                   f"wrote (downloads, crops), else in {self.folder}")
        return out


COLUMNS = ("key", "post_id", "subset", "path", "source_path", "error", "dup_of", "rating", "fav_count",
           "created_at", "tags_general", "tags_character", "tags_copyright", "tags_artist", "tags_meta",
           "tagger", "user_caption", "caption", "caption_file", "caption_sha256")
EXTRA_COLUMNS = ("user_sidecars",)  # extension columns read when a manifest has them


def caption_table(table: pa.Table, meta: dict, root: Path, config: CaptionConfig,
                  summary: CaptionSummary, folder: Path | None = None, edited: dict | None = None,
                  trusted: tuple = (), journal: "Journal | None" = None) -> pa.Table:
    """Fill `caption` (and `error` for undecodable images when colours are on), write
    the caption files, and record where they went (`caption_file`, `caption_sha256`).

    `edited`: key -> caption text a person wrote (curate review); kept as written, on one
    line and escaped as the subset's captions are (no `\\(` unless escape_parentheses).
    """
    from tqdm import tqdm

    from curate.common.decode import ImageError, open_image

    folder = folder or root / "captions"
    summary.folder = str(folder)
    edited = edited or {}
    is_reg = meta.get("kind") == "reg"
    class_token = str(meta.get("class_token") or "")
    rows = table.select(list(COLUMNS) + [c for c in EXTRA_COLUMNS if c in table.column_names]).to_pylist()
    captions: list[str | None] = []
    errors = table.column("error").to_pylist()
    files = [(r["caption_file"], r["caption_sha256"]) for r in rows]
    txt_owner: dict[Path, str] = {}
    owned = curate_folders(meta, root) + [Path(t).resolve() for t in trusted]  # the user's own word
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
        if edited.get(row["key"]) and rules.one_line(edited[row["key"]]):
            text, how = rules.person_text(edited[row["key"]], s.escape_parentheses), "edited by a person"
        else:
            text, how, used, left = _choose(row, s, is_reg=is_reg, class_token=class_token, theme=theme)
            if left:  # several sidecars and `use` took one: say which, and what was left out
                summary.sidecar_used[used] += 1
                summary.sidecar_left.update(left)
            elif "+" in used:
                summary.sidecar_used[used] += 1
        summary.lines_kept += "\n" in (text or "")
        captions[i] = text
        summary.chosen[how] += 1
        summary.empty += not text
        files[i] = _write_caption_file(row, image, text, root, folder, txt_owner, summary, owned, journal)
        summary.written += 1
        summary.per_subset[row["subset"] or "(no subset)"] += 1
        summary.example = summary.example or text
    table = manifest.with_column(table, "caption", captions)
    table = manifest.with_column(table, "caption_file", [f for f, _ in files])
    table = manifest.with_column(table, "caption_sha256", [d for _, d in files])
    return manifest.with_column(table, "error", errors)


def curate_folders(meta: dict, root: Path) -> list[Path]:
    """Folders curate writes images into: the manifest's, and the download/crop folders its
    provenance records (relative ones as given from the working folder or the manifest's).
    A recorded folder counts only inside the manifest's folder: a manifest from someone
    else may name `/` or `../..`, and nothing read from a file decides where curate writes
    (captions of images elsewhere go to the manifest's `<stem>.captions/` folder)."""
    home = root.resolve()
    out = [home]
    stages = meta.get("stages") if isinstance(meta.get("stages"), dict) else {}
    for stage, key in (("download", "images"), ("crop", "out_dir")):
        value = (stages.get(stage) or {}).get(key)
        if isinstance(value, str) and value and "\0" not in value:
            p = Path(value)
            found = [p.resolve()] if p.is_absolute() else [p.resolve(), (root / p).resolve()]
            out += [f for f in found if f.is_relative_to(home)]
    return out


def _write_caption_file(row: dict, image: Path, text: str, root: Path, folder: Path,
                        txt_owner: dict, summary: CaptionSummary,
                        owned: list[Path] | None = None, journal=None) -> tuple[str | None, str | None]:
    """Write the caption where it clobbers nothing; (file relative to root, digest) of
    what was written, or the row's old record when nothing was. Beside the image only when
    it lies in a folder curate writes images into (a hand-edited `path` reaching elsewhere
    gets its caption in curate's own folder)."""
    ours = row["source_path"] is None or row["source_path"] != row["path"]  # a download or a crop
    if ours and owned is not None:
        where = image.parent.resolve()
        ours = any(where.is_relative_to(f) for f in owned)
    own_file = folder / (_file_name(row["key"]) + ".txt")
    for target in ((image.with_suffix(".txt"), own_file) if ours else (own_file,)):
        if txt_owner.setdefault(target, row["key"]) != row["key"]:
            summary.shared_txt.append(str(target))
            continue
        rel = os.path.relpath(target, root)
        if not _written_by_us(target, rel, row, journal):
            summary.left_alone.append(rel)
            continue
        data = text.encode("utf-8")
        digest = hashlib.sha256(data).hexdigest()
        if journal is not None:
            journal.note(row["key"], rel, digest)  # before the file: a kill after it loses nothing
        _write_bytes(target, data)
        return rel, digest
    return row["caption_file"], row["caption_sha256"]


def _written_by_us(target: Path, rel: str, row: dict, journal=None) -> bool:
    """True when the target is free, or holds exactly what this row's record (or the journal
    of a run that did not get to save the manifest) says curate wrote."""
    if not target.is_symlink() and not target.exists():
        return True
    if target.is_symlink() or not target.is_file():
        return False
    try:
        digest = hashlib.sha256(target.read_bytes()).hexdigest()
    except OSError:
        return False
    if journal is not None and digest in journal.written.get((row["key"], rel), ()):
        return True
    if row["caption_file"] is None and row["caption"] is not None:  # captioned before records were kept
        return digest == hashlib.sha256(row["caption"].encode("utf-8")).hexdigest()
    return row["caption_file"] == rel and digest == row["caption_sha256"]


class Journal:
    """`<manifest>.caption-journal.jsonl`: what caption wrote, noted before each write."""

    def __init__(self, manifest_path: Path):
        self.path = manifest_path.with_name(manifest_path.name + ".caption-journal.jsonl")
        self.written: dict[tuple[str, str], set[str]] = {}
        try:
            lines = self.path.read_text(encoding="utf-8").split("\n")
        except FileNotFoundError:
            lines = []
        except (OSError, UnicodeDecodeError) as exc:
            raise CurateError(f"cannot read {self.path}: {exc}") from None
        for line in lines:
            try:
                entry = json.loads(line)
                key, rel, digest = entry["key"], entry["file"], entry["sha256"]
            except (ValueError, TypeError, KeyError):
                continue  # a torn last line: its file was never written
            if all(isinstance(v, str) for v in (key, rel, digest)):
                self.written.setdefault((key, rel), set()).add(digest)
        self._f = None

    def note(self, key: str, rel: str, digest: str) -> None:
        try:
            if self._f is None:
                self._f = open(self.path, "a", encoding="utf-8")
            self._f.write(json.dumps({"key": key, "file": rel, "sha256": digest}) + "\n")
            self._f.flush()
        except OSError as exc:
            raise CurateError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        self.written.setdefault((key, rel), set()).add(digest)

    def done(self) -> None:
        """The manifest holds every record now."""
        if self._f is not None:
            self._f.close()
        self.path.unlink(missing_ok=True)


def _file_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._") or "row"


def _write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):  # (no folder to clean up in: a file stands in its place)
            tmp.unlink(missing_ok=True)
        raise CurateError(f"cannot write caption file {path}: {exc.strerror}") from None


def run(manifest_path: str | Path, config_path: str | Path | None = None, images: tuple = ()) -> CaptionSummary:
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
    folder = manifest_path.parent / f"{manifest_path.stem}.captions"
    review = decisions.current(manifest_path)  # a person's keepers and caption edits win
    journal = Journal(manifest_path)
    table = caption_table(review.applied(table), meta, manifest_path.parent, config, summary, folder,
                          review.captions(), trusted=tuple(images), journal=journal)
    # export reads the separators back to set kohya's keep_tokens_separator per subset, and
    # the escapes to set sd-scripts' weighted_captions (never one without the other)
    separators = {name: config.for_subset(name).keep_separator for name in subsets}
    escaped = {name: config.for_subset(name).escape_parentheses for name in subsets}
    manifest.record_stage(meta, "caption", settings=config.origin, written=summary.written,
                          keep_separators=separators, escaped=escaped,
                          left_alone=len(summary.left_alone))
    manifest.write(table, manifest_path, meta)
    journal.done()
    return summary
