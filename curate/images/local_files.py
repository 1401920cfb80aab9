"""Images the user already has on disk (a gallery-dl folder: `danbooru_<id>_<md5>.jpg`
beside its `.json`), found by md5 so `download` links or copies them instead of
fetching them again.

The index maps md5 -> file: from a 32-hex run in the file name (gallery-dl's default
`{category}_{id}_{filename}` has the md5 as `filename`), else from hashing the file.
A name is only a candidate: ImageStore hashes the bytes before it keeps them.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from curate.common import decode as img
from curate.errors import CurateError
from curate.images.image_store import hash_file

_MD5 = re.compile(r"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])")


def index(folders) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for folder in folders or ():
        folder = Path(folder)
        if not folder.is_dir():
            raise CurateError(f"--local-images: no such folder: {folder}")
        for f in sorted(folder.rglob("*")):
            if f.suffix[1:].lower() not in img.IMAGE_EXTS or not f.is_file():
                continue
            found = _MD5.findall(f.name.lower())
            if len(found) == 1:
                out.setdefault(found[0], f)
                continue
            try:
                out.setdefault(hash_file(f, hashlib.md5), f)
            except OSError:
                continue
    return out
