"""Danbooru API-shaped post dicts -> rows of the normalized post schema.

Accepts every schema era seen in the wild (2016-2025): lock flags and pool_string,
no media_asset, media_asset with variants; and the Danbooru2017-2021 public metadata
(JSON lines: numbers and booleans as strings, `tags` as a list of {id, name, category},
`favs` as a list of user ids, md5 but no file_url). Untrusted input: wrong types are
coerced or nulled, never crash. Posts without an id or without an md5 (hidden from
the account that saved them) are reported by `normalize` returning a skip reason
instead of a row; a post with md5 but no file_url stays (its image comes from the
archives, or the CDN by md5). A site-relative file_url (`/data/<md5>.<ext>`, old
API pages) becomes the CDN URL built from md5 and extension, or is resolved
against the site.
"""

from __future__ import annotations

from datetime import datetime, timezone
from urllib.parse import urljoin

import pyarrow as pa

from curate.common.cdn import cdn_url
from curate.schema import POST_SCHEMA, TAG_CATEGORIES

# Before 2022-05-22 Danbooru's rating `s` meant "safe"; it became `g` (general)
# when the four-level scale arrived and `s` took the meaning "sensitive". The
# response itself says which era it is from: the lock flags left the API before
# the cutover. (Dates are no guide: old posts fetched today carry new ratings.)
_OLD_SCHEMA_KEYS = ("is_rating_locked", "is_note_locked", "is_status_locked")
_RATING_WORDS = {"general": "g", "safe": "g", "sensitive": "s", "questionable": "q", "explicit": "e"}
# Danbooru2017-2021 metadata: tag category codes of its `tags` list.
_CATEGORY_CODES = {0: "general", 1: "artist", 3: "copyright", 4: "character", 5: "meta"}
SITE = "https://danbooru.donmai.us"
def normalize(post: dict, scale: str | None = None) -> tuple[dict | None, str | None]:
    """Return (row, None) or (None, skip_reason). `scale`: the rating scale of the file
    the post came from ("old": `s` is safe, read as `g`; "new": as is; None: by the
    post's own keys, see rating_scale)."""
    if not isinstance(post, dict):
        return None, "not an object"
    if not any(k in post for k in ("tag_string", "md5", "file_url", "image_width", "file_ext")):
        return None, "not a post"
    pid = to_int(post.get("id"))
    if pid is None or pid <= 0:
        return None, "no id"
    md5 = to_str(post.get("md5"))
    if not md5:
        return None, "hidden"
    file_ext = (to_str(post.get("file_ext")) or "").lower() or None
    file_url = to_str(post.get("file_url"))
    if file_url and file_url.startswith("/") and not file_url.startswith("//"):  # old API: site-relative
        file_url = cdn_url(md5, file_ext) or urljoin(SITE, file_url)
    created = to_time(post.get("created_at"))
    updated = to_time(post.get("updated_at"))
    row = {
        "post_id": pid,
        "md5": md5.lower(),
        "width": to_size(post.get("image_width")),
        "height": to_size(post.get("image_height")),
        "rating": _rating(post, scale),
        "fav_count": _fav_count(post),
        "score": to_int(post.get("score")),
        "created_at": created,
        "updated_at": updated,
        "file_url": file_url,
        "file_ext": file_ext,
        "file_size": to_size(post.get("file_size")),
        "parent_id": to_int(post.get("parent_id")) or None,  # the 2017-2021 dumps write 0 for none
        "source": to_str(post.get("source")),
        "is_deleted": to_bool(post.get("is_deleted")),
        "is_banned": to_bool(post.get("is_banned")),
        "is_pending": to_bool(post.get("is_pending")),
        "variants": _variants(post.get("media_asset")),
    }
    row.update(split_tags(post))
    for key in ("width", "height", "fav_count", "score"):
        if row[key] is not None and not -(2**31) <= row[key] < 2**31:
            row[key] = None
    return row, None


def split_tags(post: dict) -> dict:
    """tags_<category> lists from tag_string_<category>; whitespace splits tags."""
    if _is_tag_list(post.get("tags")):  # Danbooru2017-2021 metadata
        return _tags_from_list(post["tags"])
    out = {}
    any_category = False
    for cat in TAG_CATEGORIES:
        value = post.get(f"tag_string_{cat}")
        if isinstance(value, (str, list)):
            any_category = True
        out[f"tags_{cat}"] = _tags(value)
    if not any_category:  # very old dumps: one tag_string, no categories
        out["tags_general"] = _tags(post.get("tag_string"))
    return out


def _is_tag_list(value) -> bool:
    return isinstance(value, list) and any(isinstance(t, dict) for t in value)


def _tags_from_list(tags: list) -> dict:
    out = {f"tags_{c}": set() for c in TAG_CATEGORIES}
    for t in tags:
        if not isinstance(t, dict):
            continue
        name, cat = to_str(t.get("name")), _CATEGORY_CODES.get(to_int(t.get("category")))
        if name and cat:
            out[f"tags_{cat}"].update(_tags(name))
    return {k: sorted(v) for k, v in out.items()}


def _fav_count(post: dict) -> int | None:
    n = to_int(post.get("fav_count"))
    if n is None and isinstance(post.get("favs"), list):
        return len(post["favs"])
    return n


def to_bool(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "t", "1", "yes")
    return value is True or (isinstance(value, int) and not isinstance(value, bool) and value == 1)


def rows_to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=POST_SCHEMA)


def _tags(value) -> list[str]:
    if isinstance(value, list):
        value = " ".join(v for v in value if isinstance(v, str))
    if not isinstance(value, str):
        return []
    # Any whitespace (newlines too) separates tags, so none can hold one. Sorted,
    # as Danbooru's tag_string is, so every source gives the same lists.
    return sorted({tag.lower() for tag in value.split()})


def _rating(post: dict, scale: str | None = None) -> str | None:
    word = to_str(post.get("rating"))
    if not word:
        return None
    r = _RATING_WORDS.get(word.lower(), word.lower())
    if r not in ("g", "s", "q", "e"):
        return None
    if word.lower() in ("safe", "sensitive"):  # the word says its scale
        return r
    old = scale == "old" if scale is not None else post_looks_old(post)
    return "g" if r == "s" and old else r


def post_looks_old(post: dict) -> bool:
    """The post's own keys date it before the four-level scale: lock flags, or the
    Danbooru2017-2021 metadata (tags as a list of objects)."""
    return any(k in post for k in _OLD_SCHEMA_KEYS) or _is_tag_list(post.get("tags"))


def raw_rating(post: dict) -> str | None:
    """The rating letter as written (no scale applied); words as their letters."""
    word = to_str(post.get("rating"))
    if not word:
        return None
    r = _RATING_WORDS.get(word.lower(), word.lower())
    return "safe" if word.lower() == "safe" else "sensitive" if word.lower() == "sensitive" else r


def _variants(asset) -> list[dict] | None:
    if not isinstance(asset, dict) or not isinstance(asset.get("variants"), list):
        return None
    out = []
    for v in asset["variants"]:
        if isinstance(v, dict) and to_str(v.get("url")):
            out.append({
                "type": to_str(v.get("type")), "url": to_str(v.get("url")),
                "width": to_size(v.get("width"), 32), "height": to_size(v.get("height"), 32),
                "file_ext": to_str(v.get("file_ext")),
            })
    return out


def to_int(value, bits: int = 64) -> int | None:
    """An int that fits a signed `bits`-bit column, else None (never an overflow later)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            return None
    if isinstance(value, int):
        return value if -(2 ** (bits - 1)) <= value < 2 ** (bits - 1) else None
    return None


SIZE_COLUMNS = ("width", "height", "file_size")


def to_size(value, bits: int = 64) -> int | None:
    """A pixel or byte count: a positive int that fits the column, else None."""
    n = to_int(value, bits)
    return n if n is not None and n > 0 else None


def to_str(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return None


def to_time(value) -> datetime | None:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if not isinstance(value, str) or not value:
        return None
    value = value.strip()
    if value.endswith(" UTC"):  # "2005-05-24 03:35:31.25728 UTC" (the 2017-2021 dumps)
        value = value[:-4] + "+00:00"
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc)
