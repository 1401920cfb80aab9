"""Tags that will overfit: a tag on many times more of the training images than of the
images the base model knows gets baked into the style, unless it is captioned (the
model can tie it to the word) and balanced (the reg set keeps showing it elsewhere).
The recipe's own model card reports `halo`, `heterochromia` and `*focus*` overfitting.

Shares are per row: the share of a manifest's usable rows (no error, not a duplicate,
not dropped by a person) that carry the tag. A training manifest's tags are what its
images show (source tags and tagger output) and, separately, what its final captions
say; a reg manifest's are what its images show (its captions are the class token).
Danbooru at large comes from a tagger's `selected_tags.csv` (post count per tag; its
four rating rows add up to the posts counted). Tags are compared in Danbooru spelling.

Used by `curate inspect --tags`, the report, the review app (the same list) and the
`match_tags_of` reg subsets (curate.metadata.select), which draw part of their quota
from posts carrying the flagged tags.
"""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

from curate.errors import CurateError

RATIO = 5.0        # flagged: on at least RATIO times the base share of the rows
MIN_SHARE = 0.05   # ... and on at least this share of the training rows (rarer tags cannot bake in)
MIN_ROWS = 3       # ... and on at least this many rows
TAG_COLUMNS = ("tags_general", "tags_character", "tags_copyright", "tags_meta")
NOT_CONTENT = {"|||"}  # HakuBooru's separator between the kept and the shuffled tags


def spelling(tag: str) -> str:
    """Danbooru spelling: lower case, underscores (captions carry spaces)."""
    return "_".join(tag.strip().lower().split())


def image_tags(row: dict) -> set[str]:
    """What a row's image shows: source tags and tagger output (no rating, no artist)."""
    tags = {spelling(t) for c in TAG_COLUMNS for t in (row.get(c) or [])}
    tags |= {spelling(e["tag"]) for e in (row.get("tagger") or []) if e.get("tag") and e.get("category") != "rating"}
    return tags


def caption_tags(row: dict) -> set[str]:
    text = row.get("caption") or ""
    return {spelling(t) for t in text.replace("\n", ",").split(",") if t.strip() and t.strip() not in NOT_CONTENT}


def usable_rows(path) -> tuple[list[dict], dict]:
    """The rows a run trains on (a person's review applied), and the provenance."""
    from curate import manifest
    from curate.common import decisions

    table, meta = manifest.read(path)
    review = decisions.current(path)
    table = review.applied(table)
    cols = [c for c in ("key", "error", "dup_of", "caption", "tagger", *TAG_COLUMNS) if c in table.column_names]
    rows = [r for r in table.select(cols).to_pylist()
            if not r.get("error") and not r.get("dup_of") and r["key"] not in review.dropped]
    return rows, meta


def shares(rows: list[dict], tags_of=image_tags) -> tuple[dict[str, float], int]:
    counts: Counter = Counter()
    for r in rows:
        counts.update(tags_of(r))
    n = len(rows)
    return ({t: c / n for t, c in counts.items()} if n else {}), n


def danbooru_shares(csv_path) -> dict[str, float]:
    """selected_tags.csv -> tag -> share of Danbooru posts (its rating rows give the total)."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.DictReader(f) if r.get("name")]
    except OSError as exc:
        raise CurateError(f"cannot read {csv_path}: {exc.strerror or exc}") from None
    if not rows or "count" not in rows[0]:
        raise CurateError(f"{csv_path}: not a selected_tags.csv (columns tag_id,name,category,count)")

    def count(r):
        try:
            return int(str(r["count"]).strip())
        except ValueError:
            return 0

    total = sum(count(r) for r in rows if str(r.get("category", "")).strip() == "9")
    if total <= 0:  # no rating rows: the most common tag stands in for "every post" (an overestimate of shares)
        total = max(count(r) for r in rows) or 1
    return {spelling(r["name"]): count(r) / total for r in rows if str(r.get("category", "")).strip() != "9"}


def find_counts(meta: dict) -> Path | None:
    """The selected_tags.csv of the tagger that tagged the manifest, when it is on disk."""
    model = (meta.get("stages") or {}).get("tag", {}).get("model")
    if not model:
        return None
    local = Path(model) / "selected_tags.csv"
    if local.is_file():
        return local
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(model, "selected_tags.csv")
        return Path(found) if isinstance(found, str) else None
    except Exception:  # no hub library, or not a repo id: no base from Danbooru
        return None


def flagged(train: dict[str, float], n_train: int, base: dict[str, float], captions: dict[str, float] | None = None,
            reg: dict[str, float] | None = None, ratio: float = RATIO, min_share: float = MIN_SHARE) -> list[dict]:
    """Tags on `ratio` times their base share or more, most over-represented first.

    `base`: the share each tag has where the model learnt it (Danbooru at large, else
    the reg set); a tag missing from it counts at half a post in `n_train`.
    """
    out = []
    floor = 0.5 / max(1, n_train)
    for tag, share in train.items():
        if share < min_share or share * n_train < MIN_ROWS:
            continue
        b = max(base.get(tag, 0.0), floor)
        if share < ratio * b:
            continue
        cap = None if captions is None else captions.get(tag, 0.0)
        r = None if reg is None else reg.get(tag, 0.0)
        out.append({"tag": tag, "share": share, "base": base.get(tag, 0.0), "ratio": share / b,
                    "caption_share": cap, "reg_share": r, "meaning": meaning(share, cap, r, ratio)})
    out.sort(key=lambda d: (-d["ratio"], d["tag"]))
    return out


def meaning(share: float, caption_share: float | None, reg_share: float | None, ratio: float = RATIO) -> str:
    """What a flagged tag means for the run, in words."""
    if caption_share is None:
        return "no captions yet: unless captioned, baked into the style"
    if caption_share < share / 2:
        return "baked into the style: on the images but mostly not in the captions"
    if reg_share is None:
        return "captioned; no reg set given to balance it"
    if reg_share * ratio < share:
        return "captioned but not balanced: the reg set rarely shows it, so it pulls the style along"
    return "captioned and balanced by the reg set"


def report(path, reg=None, counts=None) -> dict:
    """The over-represented tags of a training manifest (path), against Danbooru at large
    (`counts`: a selected_tags.csv; else the tagger's when on disk) or else the reg manifest."""
    rows, meta = usable_rows(path)
    train, n = shares(rows)
    caps = shares(rows, caption_tags)[0] if any(r.get("caption") for r in rows) else None
    reg_shares, n_reg = (shares(usable_rows(reg)[0]) if reg else (None, 0))
    counts = counts or find_counts(meta)
    danbooru = danbooru_shares(counts) if counts else None
    base = danbooru if danbooru is not None else reg_shares
    if base is None:
        return {"rows": n, "base": None, "flagged": [],
                "note": "no base to compare with: give a reg manifest or a tagger's selected_tags.csv"}
    return {"rows": n, "reg_rows": n_reg if reg else None,
            "base": f"Danbooru ({counts})" if danbooru is not None else f"reg set ({reg})",
            "flagged": flagged(train, n, base, caps, reg_shares)}
