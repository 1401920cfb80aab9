"""Images from danbooru2023-style tar shards, in a local folder or over HTTP.

Layout (the HF datasets that HakuBooru and cheesechaser read): `data-XXXX.tar` with
XXXX = post id % 1000 (4 digits), members named `<post id>.<ext>`, and optionally
an index `data-XXXX.json` beside each tar (hfutils format):
`{"files": {"<name>": {"offset": <data offset>, "size": <bytes>, "sha256": <hex>}}}`.

Local shards are read with seek + read (index built by scanning the tar headers when
there is no JSON). Remote shards need the JSON index: each member is one HTTP Range
request. `TarShards.member(post_id)` says where the bytes are; `chunks(member)` yields
them; the caller stores and verifies them (size, and sha256 when the index has it).
"""

from __future__ import annotations

import json
import os
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path

SHARDS = 1000
CHUNK = 1 << 18


class TarError(Exception):
    """This member cannot be had; str(exc) is the manifest's `error` text."""

    transient = False  # a network hiccup: worth trying again for the next row


@dataclass(frozen=True)
class Member:
    shard: str  # "data-0123"
    name: str  # member name inside the tar
    ext: str  # lower-case extension from the name (a hint; content decides)
    offset: int  # of the data, in the tar
    size: int
    sha256: str | None


def shard_name(post_id: int) -> str:
    return f"data-{post_id % SHARDS:04d}"


class TarShards:
    def __init__(self, location: str | os.PathLike, session_factory=None):
        loc = str(location)
        self.remote = loc.startswith(("http://", "https://"))
        self.location = loc.rstrip("/") if self.remote else Path(loc)
        self._session_factory = session_factory
        self._index: dict[str, dict[str, Member] | TarError] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self._local = threading.local()  # one HTTP session per thread

    def member(self, post_id: int) -> Member:
        shard = shard_name(post_id)
        index = self._shard_index(shard)
        found = index.get(str(post_id))
        if found is None:
            raise TarError(f"not in tars: {shard}.tar has no {post_id}.*")
        return found

    def chunks(self, m: Member, session=None):
        if self.remote:
            yield from self._remote_chunks(m, session)
            return
        with open(self.location / f"{m.shard}.tar", "rb") as f:
            f.seek(m.offset)
            left = m.size
            while left > 0:
                data = f.read(min(CHUNK, left))
                if not data:
                    raise TarError(f"truncated tar: {m.shard}.tar ends inside {m.name}")
                left -= len(data)
                yield data

    # -- index ---------------------------------------------------------------

    def _shard_index(self, shard: str) -> dict[str, Member]:
        with self._guard:
            lock = self._locks.setdefault(shard, threading.Lock())
        with lock:  # one thread loads a shard's index; the others wait for it
            if shard not in self._index:
                try:
                    self._index[shard] = self._load_index(shard)
                except TarError as exc:
                    if exc.transient:
                        raise
                    self._index[shard] = exc  # remember: don't re-fetch for every row
            got = self._index[shard]
        if isinstance(got, TarError):
            raise got
        return got

    def _load_index(self, shard: str) -> dict[str, Member]:
        if self.remote:
            url = f"{self.location}/{shard}.json"
            try:
                r = self._session().get(url)
            except Exception as exc:  # requests' errors: connection, timeout
                err = TarError(f"tar index {shard}.json: {type(exc).__name__}")
                err.transient = True
                raise err from None
            if r.status_code != 200:
                raise TarError(f"tar index {shard}.json: http {r.status_code}")
            return _parse_index(shard, r.content)
        tar = self.location / f"{shard}.tar"
        if not tar.is_file():
            raise TarError(f"not in tars: no {shard}.tar")
        js = self.location / f"{shard}.json"
        if js.is_file():
            return _parse_index(shard, js.read_bytes())
        try:
            with tarfile.open(tar, "r:") as t:  # headers only: tarfile seeks over data
                files = {ti.name: {"offset": ti.offset_data, "size": ti.size} for ti in t if ti.isreg()}
        except (tarfile.TarError, OSError) as exc:
            raise TarError(f"bad tar {shard}.tar: {exc}") from None
        return _members(shard, files)

    def _session(self):
        s = getattr(self._local, "s", None)
        if s is None:
            s = self._local.s = self._session_factory()
        return s

    def _remote_chunks(self, m: Member, session):
        url = f"{self.location}/{m.shard}.tar"
        end = m.offset + m.size - 1
        headers = {"Range": f"bytes={m.offset}-{end}"}
        with (session or self._session()).get(url, headers=headers, stream=True) as r:
            if r.status_code != 206:  # 200 would be the whole multi-GB shard
                raise TarError(f"http {r.status_code}" if r.status_code >= 400 else "tar server ignored Range")
            if r.headers.get("Content-Range", "").split("/")[0] != f"bytes {m.offset}-{end}":
                raise TarError("tar server sent the wrong range")
            yield from r.iter_content(CHUNK)


def _parse_index(shard: str, raw: bytes) -> dict[str, Member]:
    try:
        files = json.loads(raw)["files"]
        if not isinstance(files, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise TarError(f"bad tar index {shard}.json") from None
    return _members(shard, files)


def _members(shard: str, files: dict) -> dict[str, Member]:
    """post id (as text) -> Member; names are `<id>.<ext>`, maybe under a folder."""
    out: dict[str, Member] = {}
    for name, info in files.items():
        base = str(name).rsplit("/", 1)[-1]
        stem, dot, ext = base.partition(".")
        if not dot or not stem.isdigit() or stem in out:
            continue
        try:
            offset, size = int(info["offset"]), int(info["size"])
        except (KeyError, TypeError, ValueError):
            continue
        if offset < 0 or size < 0:
            continue
        sha = info.get("sha256")
        out[stem] = Member(shard, str(name), ext.lower(), offset, size, sha if isinstance(sha, str) else None)
    return out
