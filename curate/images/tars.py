"""Images from the public Danbooru archive datasets: tar archives with hfutils JSON indexes.

Layouts read (ROOT may be the dataset root or any folder below it; archives are
found by walking it, never by guessing one shard from the post id):

    danbooru2023            original/data-0XXX.tar, recent/data-1XXX.tar, updates/**/*-D.tar
    danbooru2023 WebP       images/data-0XXX.tar, images/data-1XXX.tar, updates (index in a separate repo)
    danbooru2024 (+ sfw)    images/0XXX.tar, index beside each archive
    older flat copies       data-0XXX.tar

XXX = post id % 1000, D = post id % 10: an archive whose name ends in 3-4 digits can
only hold ids of that residue mod 1000, one ending in `-D` ids of that residue mod 10,
any other name is searched for every id. Index (hfutils): `<archive stem>.json`
beside the archive or, with `index=DIR`, the file in DIR whose path ends the same way
(`{"filesize", "hash", "hash_lfs", "files": {"<member>": {"offset", "size", "sha256"}}}`);
an archive without one is indexed by reading its tar headers once. Members are
`<id>.<ext>`, also `./<id>.<ext>` or inside a folder.

Remote archives (ROOT an http(s) URL) need indexes: a local `index` folder names the
archives; otherwise the usual names of every layout above are tried for each residue
(a missing one is a 404, not an error). Members are then read with Range requests.

The id -> (archive, offset, size, sha256) lookup is kept in a SQLite file (`cache`,
beside the manifest), per archive, with the archive's and its index's size and mtime
(remote: the index's Content-Length / ETag / Last-Modified); a changed archive or
index is read again, so a second run starts at once.

A missing, unreadable or inconsistent index or archive is a CurateError naming the file.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path

from curate.errors import CurateError

CHUNK = 1 << 18
LOCAL_READ = 8 << 20  # most members come in one read; a huge one in pieces, memory stays flat
_REMOTE_NAMES = ("data-0{r:03d}", "data-1{r:03d}", "0{r:03d}")
_REMOTE_FOLDERS = ("", "original/", "recent/", "images/")
_CACHE_VERSION = "5"


class TarError(Exception):
    """This member cannot be had; str(exc) is the manifest's `error` text."""


@dataclass(frozen=True)
class Member:
    archive: str  # local path or URL of the tar
    label: str  # the archive as users name it (path below ROOT), for messages
    name: str  # member name inside the tar
    ext: str  # lower-case extension from the name (a hint; content decides)
    offset: int  # of the data, in the tar
    size: int
    sha256: str | None


@dataclass
class _Archive:
    location: str  # path or URL of the .tar
    label: str
    index: str | None  # path or URL of the .json (None: scan the tar)
    residue: tuple[int, int] | None  # (modulus, remainder) of the ids it can hold
    optional: bool = False  # a guessed remote name: a 404 means "not there"


def residue(stem: str) -> tuple[int, int] | None:
    """Which ids an archive named `stem` can hold: data-0123 / 1123 / 0123 -> id % 1000 == 123,
    posts-2024-7 -> id % 10 == 7; None: any id."""
    m = re.search(r"(\d+)$", stem)
    if not m:
        return None
    digits = m[1]
    if len(digits) in (3, 4):
        return 1000, int(digits) % 1000
    if len(digits) == 1 and stem[: m.start()].endswith(("-", "_")):
        return 10, int(digits)
    return None


class Archives:
    def __init__(self, root: str | os.PathLike, index: str | os.PathLike | None = None,
                 cache: str | os.PathLike | None = None, session_factory=None):
        self.root = str(root)
        self.remote = self.root.startswith(("http://", "https://"))
        self.index = str(index) if index else None
        self._session_factory = session_factory
        self._local = threading.local()
        self._reader = LocalMembers()
        if not self.remote and not Path(self.root).is_dir():
            raise CurateError(f"--from-tars: no such folder: {self.root}")
        if self.index and not self.index.startswith(("http://", "https://")) and not Path(self.index).is_dir():
            raise CurateError(f"--tar-index: no such folder: {self.index}")
        self.archives = self._discover()
        self._db = _open_cache(cache)

    # -- the lookup ------------------------------------------------------------

    def find(self, post_ids, progress=None) -> dict[int, Member]:
        """post id -> Member for every id some archive holds (first archive in path order wins)."""
        ids = sorted({int(i) for i in post_ids})
        need = {(m, i % m) for i in ids for m in (10, 1000)}
        wanted = [a for a in self.archives if a.residue is None or a.residue in need]
        rank = {}
        for a in wanted:
            try:
                key = self._load(a)
            except sqlite3.Error as exc:  # e.g. another process held the cache for a minute
                raise CurateError(f"archive lookup cache: {exc} (re-run; or delete the .archives.sqlite file)") from None
            if key is not None:
                rank[key] = (len(rank), a)
            if progress:
                progress(1)
        found: dict[int, tuple[int, Member]] = {}
        try:
            hits = self._lookup(ids)
        except sqlite3.Error as exc:
            raise CurateError(f"archive lookup cache: {exc} (re-run; or delete the .archives.sqlite file)") from None
        for pid, arch, name, offset, size, sha in hits:
            if arch not in rank:
                continue
            order, a = rank[arch]
            if pid in found and found[pid][0] <= order:
                continue
            ext = name.rsplit("/", 1)[-1].partition(".")[2].lower()
            found[pid] = (order, Member(a.location, a.label, name, ext, offset, size, sha.hex() if sha else None))
        return {pid: m for pid, (_, m) in found.items()}

    def _lookup(self, ids: list[int]) -> list[tuple]:
        out, cur = [], self._db.cursor()
        for start in range(0, len(ids), 900):
            chunk = ids[start : start + 900]
            q = f"SELECT post_id, archive, name, offset, size, sha256 FROM members WHERE post_id IN ({','.join('?' * len(chunk))})"
            out += cur.execute(q, chunk).fetchall()
        return out

    # -- reading members ---------------------------------------------------------

    def chunks(self, m: Member, session=None):
        if not self.remote:
            yield from self._reader.chunks(m)
            return
        end = m.offset + m.size - 1
        headers = {"Range": f"bytes={m.offset}-{end}"}
        with (session or self._session()).get(m.archive, headers=headers, stream=True) as r:
            if r.status_code != 206:  # 200 would be the whole multi-GB archive
                raise TarError(f"http {r.status_code}" if r.status_code >= 400 else "tar server ignored Range")
            if r.headers.get("Content-Range", "").split("/")[0] != f"bytes {m.offset}-{end}":
                raise TarError("tar server sent the wrong range")
            yield from r.iter_content(CHUNK)

    def hosts(self) -> set[str]:
        from urllib.parse import urlsplit

        return {urlsplit(u).hostname for u in (self.root, self.index) if u and u.startswith("http")}

    def close(self) -> None:
        self._reader.close()
        self._db.close()

    def _session(self):
        s = getattr(self._local, "s", None)
        if s is None:
            s = self._local.s = self._session_factory()
        return s

    # -- which archives exist ----------------------------------------------------

    def _discover(self) -> list[_Archive]:
        if self.remote:
            return self._discover_remote()
        root = Path(self.root).resolve()  # absolute: the cache is keyed by location
        tars = sorted(p for p in root.rglob("*.tar") if p.is_file())
        if not tars:
            raise CurateError(f"--from-tars: no .tar archives under {root}")
        indexes = _IndexFolder(Path(self.index)) if self.index and not self.index.startswith("http") else None
        out = []
        for t in tars:
            label = t.relative_to(root).as_posix()
            if self.index and indexes is None:  # an index URL: same relative path there
                idx = f"{self.index.rstrip('/')}/{label[:-4]}.json"
            else:
                found = indexes.match(t) if indexes else None
                beside = t.with_suffix(".json")
                idx = str(found) if found else str(beside) if beside.is_file() else None
            out.append(_Archive(str(t), label, idx, residue(t.stem)))
        return out

    def _discover_remote(self) -> list[_Archive]:
        root = self.root.rstrip("/")
        if self.index and not self.index.startswith(("http://", "https://")):
            folder = Path(self.index)
            out = []
            for js in sorted(folder.rglob("*.json")):
                rel = js.relative_to(folder).as_posix()[:-5]
                out.append(_Archive(f"{root}/{rel}.tar", f"{rel}.tar", str(js), residue(js.stem)))
            if not out:
                raise CurateError(f"--tar-index: no .json indexes under {folder}")
            return out
        base = (self.index or root).rstrip("/")
        out = []
        for folder in _REMOTE_FOLDERS:
            for pattern in _REMOTE_NAMES:
                for r in range(1000):
                    rel = folder + pattern.format(r=r)
                    out.append(_Archive(f"{root}/{rel}.tar", f"{rel}.tar", f"{base}/{rel}.json", (1000, r), True))
        return out

    # -- loading one archive's index into the cache -----------------------------

    def _load(self, a: _Archive) -> int | None:
        """The archive's cache id, (re)reading its index when it changed; None: not there."""
        cur = self._db.execute("SELECT id, signature FROM archives WHERE location = ?", (a.location,))
        row = cur.fetchone()
        if a.index and a.index.startswith(("http://", "https://")):
            got = self._remote_index(a, row[1] if row else None)
            if got is None:
                return None
            signature, files = got
            if files is None:
                return row[0]
        else:
            signature = _local_signature(a)
            if row and row[1] == signature:
                return row[0]
            files = _read_index(a) if a.index else _scan(a)
        members = _members(files)
        with self._db:
            if row:
                self._db.execute("DELETE FROM members WHERE archive = ?", (row[0],))
                self._db.execute("UPDATE archives SET signature = ? WHERE id = ?", (signature, row[0]))
                key = row[0]
            else:
                key = self._db.execute("INSERT INTO archives (location, signature) VALUES (?, ?)",
                                       (a.location, signature)).lastrowid
            self._db.executemany("INSERT INTO members VALUES (?, ?, ?, ?, ?, ?)",
                                 [(pid, key, *rest) for pid, rest in members.items()])
        return key

    def _remote_index(self, a: _Archive, cached: str | None):
        """(signature, files or None when the cached copy is current), or None for a 404 on a guessed name."""
        import requests

        from curate import http

        try:
            r = self._session().get(a.index, stream=True)
        except requests.exceptions.RequestException as exc:
            raise CurateError(f"cannot read tar index {a.index}: {type(exc).__name__}") from None
        with r:
            if r.status_code == 404 and a.optional:
                return None
            if r.status_code != 200:
                raise CurateError(f"cannot read tar index {a.index}: http {r.status_code}")
            h = r.headers
            signature = f"{h.get('Content-Length')}|{h.get('ETag')}|{h.get('Last-Modified')}"
            if cached == signature and (h.get("ETag") or h.get("Last-Modified") or h.get("Content-Length")):
                return signature, None
            try:
                raw = http.read_body(r)  # capped and timed: an index is small, a lying server's is not
            except requests.exceptions.RequestException as exc:
                raise CurateError(f"cannot read tar index {a.index}: {type(exc).__name__}") from None
        return signature, _parse_index(a.index, raw, None)


class LocalMembers:
    """Reads members of local archives (found by `Archives.find`); what worker processes use."""

    remote = False

    def __init__(self):
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()

    def chunks(self, m: Member, session=None):
        fd = self._fd(m.archive)  # pread: threads share one descriptor per archive
        for at in range(m.offset, m.offset + m.size, LOCAL_READ):
            data = os.pread(fd, min(LOCAL_READ, m.offset + m.size - at), at)
            if not data:
                raise TarError(f"truncated archive: {m.label} ends inside {m.name}")
            yield data

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    try:
                        fd = self._fds[path] = os.open(path, os.O_RDONLY)
                    except OSError as exc:
                        raise TarError(f"archive unreadable: {Path(path).name}: {exc.strerror}") from None
        return fd


class _IndexFolder:
    """Index files of a separate folder, matched to archives by the longest common path tail."""

    def __init__(self, folder: Path):
        self.by_name: dict[str, list[tuple[str, ...]]] = {}
        self.folder = folder
        for js in folder.rglob("*.json"):
            parts = js.relative_to(folder).with_suffix("").parts
            self.by_name.setdefault(parts[-1], []).append(parts)

    def match(self, tar: Path) -> Path | None:
        options = self.by_name.get(tar.stem)
        if not options:
            return None
        mine = tar.resolve().with_suffix("").parts

        def tail(parts):
            n = 0
            while n < min(len(parts), len(mine)) and parts[-1 - n] == mine[-1 - n]:
                n += 1
            return n

        best = max(sorted(options), key=tail)
        return self.folder.joinpath(*best).with_suffix(".json")


def _open_cache(cache) -> sqlite3.Connection:
    path = str(cache) if cache else ":memory:"
    try:
        db = sqlite3.connect(path, timeout=60, check_same_thread=False)
        # A cache: rebuilt from the indexes if ever lost, so no fsync per archive loaded.
        db.execute("PRAGMA synchronous = OFF")
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        v = db.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
        if v and v[0] != _CACHE_VERSION:
            db.executescript("DROP TABLE IF EXISTS members; DROP TABLE IF EXISTS archives;")
        db.executescript(
            "CREATE TABLE IF NOT EXISTS archives (id INTEGER PRIMARY KEY, location TEXT UNIQUE, signature TEXT);"
            "CREATE TABLE IF NOT EXISTS members (post_id INTEGER, archive INTEGER, name TEXT, offset INTEGER,"
            " size INTEGER, sha256 BLOB);"
            "CREATE INDEX IF NOT EXISTS members_post ON members (post_id);"
            "CREATE INDEX IF NOT EXISTS members_archive ON members (archive);")  # a changed archive's rows go fast
        with db:
            db.execute("INSERT OR REPLACE INTO meta VALUES ('version', ?)", (_CACHE_VERSION,))
    except sqlite3.Error as exc:
        raise CurateError(f"archive lookup cache {path} is unusable ({exc}); delete it to rebuild") from None
    return db


def _local_signature(a: _Archive) -> str:
    try:
        sig = "remote"
        if not a.location.startswith(("http://", "https://")):
            st = os.stat(a.location)
            sig = f"{st.st_size}:{st.st_mtime_ns}"
        if a.index:
            si = os.stat(a.index)
            sig += f"|{a.index}:{si.st_size}:{si.st_mtime_ns}"
    except OSError as exc:
        raise CurateError(f"cannot read {exc.filename}: {exc.strerror}") from None
    return sig


def _read_index(a: _Archive) -> dict:
    try:
        raw = Path(a.index).read_bytes()
    except OSError as exc:
        raise CurateError(f"cannot read tar index {a.index}: {exc.strerror}") from None
    remote = a.location.startswith(("http://", "https://"))
    return _parse_index(a.index, raw, None if remote else os.path.getsize(a.location))


def _parse_index(where: str, raw: bytes, tar_size: int | None) -> dict:
    try:
        data = json.loads(raw)
        files = data["files"]
        if not isinstance(files, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise CurateError(f"not an hfutils tar index (no \"files\" object): {where}") from None
    size = data.get("filesize")
    if tar_size is not None and isinstance(size, int) and size != tar_size:
        raise CurateError(f"tar index {where} is for another version of its archive "
                          f"(filesize {size}, the archive has {tar_size} bytes)")
    return files


def _scan(a: _Archive) -> dict:
    """No index: read the tar headers once (tarfile seeks over the data)."""
    try:
        with tarfile.open(a.location, "r:") as t:
            return {ti.name: {"offset": ti.offset_data, "size": ti.size} for ti in t if ti.isreg()}
    except (tarfile.TarError, OSError) as exc:
        raise CurateError(f"unreadable tar archive {a.location}: {exc}") from None


def _sha_bytes(value) -> bytes | None:
    if not isinstance(value, str) or len(value) != 64:
        return None
    try:
        return bytes.fromhex(value)
    except ValueError:
        return None


_BEYOND = 2**61  # bytes: past every archive, and offset + size still fits an off_t


def _members(files: dict) -> dict[int, tuple]:
    """post id -> (name, offset, size, sha256); names are `<id>.<ext>`, maybe `./` or in a folder."""
    out: dict[int, tuple] = {}
    for name, info in files.items():
        base = str(name).rsplit("/", 1)[-1]
        stem, dot, ext = base.partition(".")
        if not dot or not stem.isdigit() or not isinstance(info, dict):
            continue
        pid = int(stem)
        if pid in out or pid >= 2**63:
            continue
        try:
            offset, size = int(info["offset"]), int(info["size"])
        except (KeyError, TypeError, ValueError):
            continue
        if offset < 0 or size < 0:
            continue
        # SQLite (and pread) hold 64-bit signed integers: a value past what any archive reaches
        # (a lying index) is clamped, so the row fails cleanly when read ("too large" /
        # "truncated archive"), never a traceback
        offset, size = min(offset, _BEYOND), min(size, _BEYOND)
        sha = _sha_bytes(info.get("sha256"))
        out[pid] = (str(name), offset, size, sha)  # sha256 as 32 bytes: the cache stays small
    return out
