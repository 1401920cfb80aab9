"""The content-addressed image folder of `curate download`: fetch one file, verify it, place it.

ImageStore.run(job, base_dir) -> (relative path, w, h, fresh, bytes, file_sha256, derivative)
or the row's error string. Bytes go to DIR/.part/ and are renamed into place only once
checked, so a file under its final name is complete (the rules: curate.images.download's docstring).
Archive members: curate.images.archive_store.ArchiveStore, a subclass.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from curate.common import decode as img

CHUNK = 1 << 18
_HOST = socket.gethostname()


@dataclass
class Job:
    """One file to have, for the manifest rows that share it."""

    rows: list[int]
    stem: str | None  # final name without extension; None: md5 of the content
    md5: str | None  # expected md5 of the fetched bytes
    url: str | None = None
    post_id: int | None = None
    member: object = None  # curate.images.tars.Member
    file_size: int | None = None  # the post's, as the source reports them
    file_ext: str | None = None


class ItemFailed(Exception):
    """One item failed; str is the row's `error`."""


class ImageStore:
    """The content-addressed folder and the per-thread work on it. `opts`: curate.images.download.Options."""

    tars = None  # curate.images.tars.Archives / LocalMembers: ArchiveStore's

    def __init__(self, root: Path, opts):
        from curate import http

        self.root, self.opts = root, opts
        self.parts = root / ".part"
        self.parts.mkdir(exist_ok=True)
        self.stop = threading.Event()
        self.list_folders = False  # set for big runs (download_table)
        self._listings: dict[str, frozenset] = {}
        self._safe: set[str] = set()
        self._local = threading.local()
        self._counter = itertools.count()
        self.local: dict[str, Path] = {}  # md5 -> a file the user has (curate.images.local_files)
        self._new_session = lambda: _untrusting(http.session(
            retries=opts.retries, backoff=opts.backoff, timeout=opts.timeout, pool_size=2))
        self._clean_parts()

    def hosts(self) -> set[str]:
        return set()

    def close(self) -> None:
        pass

    def _check(self, path: Path, digest_ok: bool, head: bytes | None = None) -> tuple[int, int, str]:
        """(w, h, ext) of a file to keep: header only when a digest vouched for the bytes.
        `head`: the file's first bytes when the caller has them."""
        if not digest_ok or self.opts.verify == "decode":
            return img.verify(path, self.opts.guard_pixels)
        if head is None:
            with open(path, "rb") as f:
                head = f.read(64)
        kind = img.sniff(head[:64])
        if kind not in img.IMAGE_EXTS or (kind == "avif" and "AVIF" not in img.FORMAT_EXT):
            raise img.ImageError(f"unsupported: {kind}" if kind else "decode: not an image")
        try:
            w, h, fmt = img.probe(path, self.opts.guard_pixels)
        except img.ImageError:  # a header that does not read cleanly: the full check says why
            return img.verify(path, self.opts.guard_pixels)
        ext = img.FORMAT_EXT.get(fmt.upper())
        if ext != kind:  # the header disagrees with the magic bytes: the full check judges
            return img.verify(path, self.opts.guard_pixels)
        return w, h, ext

    def _clean_parts(self) -> None:
        """Remove .part files of dead processes of this host (other hosts may share DIR: Ray)."""
        for part in self.parts.glob("*.part"):
            pid, *rest = part.name[: -len(".part")].split("-", 3)  # pid-thread-n[-host]
            if pid.isdigit() and rest[2:] in ([], [_HOST]) and not _alive(int(pid)):
                part.unlink(missing_ok=True)

    def _find(self, name: str) -> Path | None:
        """The final file of a name stem, if DIR has it: looked up directly, never a scan of
        DIR, so each of many Ray shards costs its own rows only -- except in big runs
        (`list_folders`), where one listing per subfolder is cheaper than a stat per extension."""
        sub = os.path.join(self.root, name[:2])
        if self.list_folders:
            names = self._listing(name[:2])
            for ext in img.IMAGE_EXTS:
                if f"{name}.{ext}" in names:
                    return Path(sub, f"{name}.{ext}")
            return None
        if os.path.islink(sub) or not os.path.isdir(sub):
            return None
        for ext in img.IMAGE_EXTS:
            if os.path.isfile(f := os.path.join(sub, f"{name}.{ext}")):
                return Path(f)
        return None

    def _listing(self, sub: str) -> frozenset:
        """File names in DIR/sub when this run started looking (a run's jobs never share a name)."""
        names = self._listings.get(sub)
        if names is None:
            path = os.path.join(self.root, sub)
            try:
                names = frozenset() if os.path.islink(path) else frozenset(os.listdir(path))
            except (FileNotFoundError, NotADirectoryError):
                names = frozenset()
            self._listings[sub] = names
        return names

    def _session(self):
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = self._new_session()
        return s

    def run_batch(self, jobs: list, base_dir: Path) -> list:
        return [self.run(job, base_dir) for job in jobs]

    def run(self, job: Job, base_dir: Path):
        """-> (relative path, width, height, fresh, bytes, file_sha256, derivative) or an error string."""
        try:
            final, w, h, fresh, sha, derivative = self._obtain(job)
        except ItemFailed as exc:
            return str(exc)
        except img.ImageError as exc:
            return str(exc)
        except OSError as exc:  # disk full, permissions, a file where a folder should be
            return f"io: {exc.strerror or exc}"
        try:
            rel = os.path.relpath(final, base_dir)
        except ValueError:  # another drive (Windows)
            rel = str(final)
        return rel, w, h, fresh, (final.stat().st_size if fresh else 0), sha, derivative

    def _obtain(self, job: Job):
        """-> (final path, w, h, fresh, file_sha256, derivative); ArchiveStore adds members."""
        return (self._existing(job) or self._from_local(job) or self._fetch(job)) + (None, None)

    def _from_local(self, job: Job):
        """The user's own copy (by md5): hard-linked into DIR, or copied across file systems.
        fresh = "local". A file whose bytes are not the md5 its name claims is passed over."""
        src = self.local.get(job.md5) if job.md5 is not None and job.stem == job.md5 else None
        if src is None:
            return None
        part = self._new_part()
        try:
            try:
                os.link(src, part)
            except OSError:
                shutil.copyfile(src, part)
            if hash_file(part, hashlib.md5) != job.md5:
                return None
            w, h, ext = self._check(part, True)
            final, w, h = self._place(part, job.stem, w, h, ext)
            return final, w, h, "local"
        except (OSError, img.ImageError):
            return None
        finally:
            part.unlink(missing_ok=True)

    # -- files already on disk -------------------------------------------------

    def _stored(self, stem: str):
        """(name, path) of each file this stem may already have in DIR, downscaled copy first."""
        mp = self.opts.max_pixels
        for name in ([f"{stem}.max{mp}"] if mp else []) + [stem]:
            f = self._find(name)
            if f is not None:
                yield name, f

    def _verified(self, f: Path, digest: tuple | None):
        """(w, h, ext) of a stored file that still checks out, else None, the file removed (ours
        and bad: fetch again). `digest`: (hashlib algorithm, hex) when its name vouches for one."""
        try:
            if digest is not None and hash_file(f, digest[0]) != digest[1]:
                raise img.ImageError("digest mismatch")
            w, h, ext = self._check(f, digest is not None)
            if ext != f.suffix[1:]:
                raise img.ImageError("content is not its extension")
        except (img.ImageError, OSError):
            f.unlink(missing_ok=True)
            return None
        return w, h, ext

    def _existing(self, job: Job):
        if job.stem is None:
            return None
        for name, f in self._stored(job.stem):
            checked = self._verified(f, (hashlib.md5, job.md5) if name == job.md5 else None)
            if checked is None:
                continue
            w, h, ext = checked
            mp = self.opts.max_pixels
            if mp and w * h > mp:  # stored whole by an earlier run: downscale from it
                return self._place(f, job.stem, w, h, ext) + (False,)  # f stays
            return f, w, h, False
        return None

    # -- fetching ----------------------------------------------------------------

    def _new_part(self) -> Path:  # named by pid so a re-run can tell a dead run's leftovers
        return self.parts / f"{os.getpid()}-{threading.get_ident()}-{next(self._counter)}-{_HOST}.part"

    def _fetch(self, job: Job):
        part = self._new_part()
        try:
            digest = self._fetch_to(job, part)
            if job.md5 is not None and digest != job.md5:
                raise ItemFailed("md5 mismatch")
            w, h, ext = self._check(part, job.md5 is not None, getattr(self._local, "head", None))
            final, w, h = self._place(part, job.stem or digest, w, h, ext)
            return final, w, h, True
        finally:
            part.unlink(missing_ok=True)

    def _fetch_to(self, job: Job, part: Path) -> str:
        """Bytes into `part`, with bounded retries for transient errors; -> md5 hex."""
        import requests

        attempts = 1 + self.opts.retries
        for attempt in range(attempts):
            try:
                return self._write(job, part)
            except requests.exceptions.RequestException as exc:  # broke off inside the body
                if attempt + 1 == attempts or self.stop.is_set():
                    raise ItemFailed(net_reason(exc)) from None
                time.sleep(self.opts.backoff * 2**attempt)
        raise AssertionError("unreachable")

    def _write(self, job: Job, part: Path) -> str:
        import requests

        try:  # urllib3 already retried what happens before the body
            resp = self._session().get(job.url, stream=True)
        except requests.exceptions.RequestException as exc:
            raise ItemFailed(net_reason(exc)) from None
        with resp:
            if resp.status_code != 200:
                raise ItemFailed(f"http {resp.status_code}")
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > self.opts.max_bytes:
                raise ItemFailed("too large")
            md5, _, _, self._local.head = self._stream(resp.iter_content(CHUNK), part, sha=False)
        return md5

    def _stream(self, chunks, part: Path, sha: bool, md5: bool = True) -> tuple[str | None, str | None, int, bytes]:
        """Chunks into `part`, hashed on the way; -> (md5, sha256, size, first bytes), a digest
        not asked for None."""
        from curate.images.tars import TarError

        md5, sha256 = _NoHash() if not md5 else hashlib.md5(), hashlib.sha256() if sha else None
        deadline = time.monotonic() + self.opts.deadline
        size, head = 0, b""
        try:
            with open(part, "wb") as f:
                for data in chunks:
                    if len(head) < 64:
                        head += data[: 64 - len(head)]
                    size += len(data)
                    if size > self.opts.max_bytes:
                        raise ItemFailed("too large")
                    if self.stop.is_set():
                        raise ItemFailed("interrupted")
                    if time.monotonic() > deadline:
                        raise ItemFailed("timeout")
                    md5.update(data)
                    if sha256 is not None:
                        sha256.update(data)
                    f.write(data)
        except TarError as exc:
            raise ItemFailed(str(exc)) from None
        return md5.hexdigest(), sha256.hexdigest() if sha256 else None, size, head

    def _place(self, src: Path, stem: str, w: int, h: int, ext: str):
        """Move (or downscale) a verified file to its final name; -> (path, w, h)."""
        sub = self.root / stem[:2]
        if stem[:2] not in self._safe:  # checked once per run: a folder of ours, not a link
            sub.mkdir(exist_ok=True)
            if sub.is_symlink() or sub.resolve().parent != self.root:
                raise ItemFailed(f"unsafe images folder: {sub} is a link")
            self._safe.add(stem[:2])
        mp = self.opts.max_pixels
        if mp and w * h > mp:
            tmp = self._new_part()
            try:
                new_ext = img.DOWNSCALED_EXT[ext]
                w, h = img.save_downscaled(src, tmp, mp, ext, self.opts.guard_pixels)
                final = sub / f"{stem}.max{mp}.{new_ext}"
                os.replace(tmp, final)
            finally:
                tmp.unlink(missing_ok=True)
        else:
            final = sub / f"{stem}.{ext}"
            os.replace(src, final)
        return final, w, h


def _untrusting(session):
    """Without proxy variables, skip requests' per-request environment scan (proxies, netrc):
    ~1 ms of CPU per file, a tenth of a digest-verified download."""
    if not any(k.lower().endswith("_proxy") for k in os.environ):
        session.trust_env = False
    return session


def net_reason(exc: Exception) -> str:
    import requests

    text = str(exc)
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "truncated body"
    if isinstance(exc, requests.exceptions.Timeout) or "timed out" in text.lower():
        return "timeout"
    if isinstance(exc, requests.exceptions.ConnectionError):
        return "connection failed"
    return f"request failed: {type(exc).__name__}"



def hash_file(path: Path, algorithm) -> str:
    h = algorithm()
    with open(path, "rb") as f:
        while data := f.read(1 << 20):
            h.update(data)
    return h.hexdigest()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _NoHash:
    def update(self, data) -> None:
        pass

    def hexdigest(self) -> None:
        return None
