"""Archive members (curate.images.tars) as files of the image store: found, checked, placed.

ArchiveStore is ImageStore whose jobs carry a curate.images.tars.Member: bytes come from the
archive, the index's sha256 (when it has one) vouches for them, and a member that is not
the post's file but that the index vouches for is kept as a derivative (`<md5>.archive`).
Big local runs hand members to forked worker processes (archive_processes).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

from curate.common import decode as img
from curate.images.image_store import ImageStore, ItemFailed, Job, net_reason

NOT_IN_ARCHIVES = "not in archives"
CAN_FORK = hasattr(os, "fork") and os.name == "posix"


class ArchiveStore(ImageStore):
    def __init__(self, root: Path, opts, tars=None):
        """`tars`: the member reader; None: curate.images.tars.Archives of opts.from_tars."""
        super().__init__(root, opts)
        if tars is None:
            from curate.images.tars import Archives

            tars = Archives(opts.from_tars, opts.tar_index, opts.lookup_cache, self._session)
        self.tars = tars

    def hosts(self) -> set[str]:
        return self.tars.hosts()

    def close(self) -> None:
        self.tars.close()

    def _obtain(self, job: Job):
        if job.member is None:
            return super()._obtain(job)
        return self._existing_member(job) or self._fetch_member(job)

    def _existing_member(self, job: Job):
        if job.stem is None:
            return None
        m = job.member
        for stem, derivative in ((job.stem, None), (f"{job.stem}.archive", "archive")):
            for name, f in self._stored(stem):
                digest = None  # what the name vouches for: the post's md5 for its own name, else the index's sha256
                if name == stem and derivative is None and (job.md5 or not m.sha256):
                    digest = hashlib.md5, job.md5
                elif name == stem and m.sha256:
                    digest = hashlib.sha256, m.sha256
                checked = self._verified(f, digest)
                if checked is None:
                    continue
                w, h, ext = checked
                sha, mp = (m.sha256 if derivative else None), self.opts.max_pixels
                if mp and w * h > mp:
                    return self._place(f, stem, w, h, ext) + (False, sha, derivative)
                return f, w, h, False, sha, derivative
        return None

    def _fetch_member(self, job: Job):
        """Read, check and place one archive member; -> (path, w, h, fresh, file_sha256, derivative)."""
        import requests

        m = job.member
        if m.ext in img.NOT_IMAGE_EXTS:
            raise ItemFailed(f"unsupported: {m.ext}")
        if m.size > self.opts.max_bytes:
            raise ItemFailed("too large")
        part = self._new_part()
        try:
            # The post's md5, when known, decides what is stored under its name: an index entry
            # alone (size + sha256) could vouch for any image of that size and extension.
            for attempt in range(1 + self.opts.retries):
                try:
                    session = self._session() if self.tars.remote else None
                    got_md5, got_sha, size, head = self._stream(self.tars.chunks(m, session), part,
                                                                m.sha256 is not None)
                    break
                except requests.exceptions.RequestException as exc:
                    if attempt == self.opts.retries or self.stop.is_set():
                        raise ItemFailed(net_reason(exc)) from None
                    time.sleep(self.opts.backoff * 2**attempt)
            if size != m.size:
                raise ItemFailed("truncated body")
            if m.sha256 is not None and got_sha != m.sha256:
                raise ItemFailed(f"checksum: {m.name} in {m.label} does not match its index's sha256")
            if job.md5 is None:  # nothing to compare with: named by content
                stem, derivative, digest_ok = got_md5, None, m.sha256 is not None
            elif got_md5 == job.md5:
                stem, derivative, digest_ok = job.md5, None, True
            elif m.sha256 is not None:  # the index vouches for bytes that are not the post's: a re-encode
                stem, derivative, digest_ok = f"{job.md5}.archive", "archive", True
            else:
                raise ItemFailed("md5 mismatch")
            w, h, ext = self._check(part, digest_ok, head)
            final, w, h = self._place(part, stem, w, h, ext)
            return final, w, h, True, (got_sha if derivative else None), derivative
        finally:
            part.unlink(missing_ok=True)


def find_members(tars, jobs: dict, out: dict, opts) -> None:
    """Attach each archive job's member; a post no archive holds is an error row."""
    from tqdm import tqdm

    ids = [j.post_id for j in jobs.values()]
    if not ids:
        return
    with tqdm(desc="archive index", unit="archive", disable=None if opts.progress else True, dynamic_ncols=True) as bar:
        found = tars.find(ids, progress=bar.update)
    for key in list(jobs):
        job = jobs[key]
        job.member = found.get(job.post_id)
        if job.member is None:
            for i in job.rows:
                out["error"][i], out["path"][i] = NOT_IN_ARCHIVES, None
            del jobs[key]


def archive_processes(root: Path, opts, list_folders: bool, n: int):
    """Worker processes for local archive members, forked: they start at once and never
    re-import the caller's main module (spawn would). They run only the store's code
    (os, hashlib, Pillow headers), so no lock of another thread is theirs to need."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(n, mp_context=mp.get_context("fork"), initializer=_init_archive_worker,
                               initargs=(str(root), opts, list_folders))


_WORKER = None  # the ArchiveStore of an archive worker process


def _init_archive_worker(root: str, opts, list_folders: bool) -> None:
    import signal

    from curate.images.tars import LocalMembers

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it stops the pool
    global _WORKER
    _WORKER = ArchiveStore(Path(root), opts, tars=LocalMembers())  # the parent found the members
    _WORKER.list_folders = list_folders


def archive_batch(jobs: list, base_dir: Path) -> list:
    return _WORKER.run_batch(jobs, base_dir)
