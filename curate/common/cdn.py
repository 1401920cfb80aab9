"""Danbooru's CDN address of an original file, from its md5 and extension: sources
build file URLs with it, and download falls back to it when a row has none."""

from __future__ import annotations

import re

CDN = "https://cdn.donmai.us"
_MD5 = re.compile(r"[0-9a-f]{32}")
_EXT = re.compile(r"[a-z0-9]{1,5}")


def cdn_url(md5: str | None, ext: str | None, cdn: str = CDN) -> str | None:
    """The original file's CDN URL, built from md5 and extension (None when either is unusable)."""
    md5, ext = (md5 or "").strip().lower(), (ext or "").strip().lower()
    if not _MD5.fullmatch(md5) or not _EXT.fullmatch(ext):
        return None
    return f"{cdn.rstrip('/')}/original/{md5[:2]}/{md5[2:4]}/{md5}.{ext}"
