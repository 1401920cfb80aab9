"""The sha256 of a file's bytes, read in chunks: an 800 MB file never sits in memory whole.
Ingest's identity, dedupe's byte-identical copies, the replaced-file check, the latent
cache and the export's content record all use this one."""

from __future__ import annotations

import hashlib
import os


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
