"""Thumbnails shared by the report and the review app: JPEGs named by the source file's
path, size and mtime, made once in parallel workers and indexed in `index.json`."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

from curate.errors import CurateError
from curate.pool import UNFINISHED, PoolStopped, default_workers, parallel_map

THUMB = 256  # long side, pixels


def thumb_job(job: tuple[str, str]) -> tuple[str, int, int, str | None]:
    """(source, target) -> (target, original width, height, error)."""
    from curate.common.decode import ImageError, open_image

    src, dst = job
    tmp = dst + ".part"
    try:
        im = open_image(src, draft_size=(THUMB, THUMB))
        w, h = _display_size(src, im)
        im.thumbnail((THUMB, THUMB))
        im.save(tmp, "JPEG", quality=82)
        os.replace(tmp, dst)
        return dst, w, h, None
    except (ImageError, OSError) as exc:
        try:
            os.unlink(tmp)  # a full disk leaves no half thumbnail behind
        except OSError:
            pass
        return dst, 0, 0, str(exc)


def _display_size(src: str, im) -> tuple[int, int]:
    """Display size of the original (a JPEG draft decode is smaller than the file)."""
    from curate.common.decode import probe

    try:
        return probe(src)[:2]
    except Exception:
        return im.size


class Thumbs:
    """Source file -> thumbnail name (relative to the page), made once and cached."""

    def __init__(self, folder: Path, workers: int | None = None):
        self.folder = folder
        self.index_file = folder / "index.json"
        try:
            self.index = json.loads(self.index_file.read_text())
        except (OSError, ValueError):
            self.index = {}
        self.wanted: dict[str, str] = {}   # source -> thumb file name
        self.workers = workers

    def want(self, path: Path | None) -> str | None:
        if path is None:
            return None
        src = str(path.resolve())
        if src not in self.wanted:
            try:
                st = os.stat(src)
            except OSError:
                return None
            digest = hashlib.sha1(f"{src}\0{st.st_size}\0{st.st_mtime_ns}\0{THUMB}".encode()).hexdigest()[:20]
            self.wanted[src] = digest + ".jpg"
        return self.wanted[src]

    def make(self, s) -> None:
        """Make the missing thumbnails; counts go to s.thumbs_reused / thumbs_made / thumbs_failed."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CurateError(f"cannot write the report's thumbnail folder {self.folder}: "
                              f"{exc.strerror or exc}") from None
        todo = [(src, str(self.folder / name)) for src, name in self.wanted.items()
                if name not in self.index or not (self.folder / name).exists()]
        s.thumbs_reused = len(self.wanted) - len(todo)
        workers = self.workers or default_workers()
        try:
            results, stopped = parallel_map(thumb_job, todo, workers if len(todo) > 16 else 1, "thumbnails"), None
        except PoolStopped as exc:  # a worker was killed: the finished thumbnails stay indexed
            results, stopped = [r for r in exc.results if r is not UNFINISHED], exc
        for dst, w, h, err in results:
            self.index[Path(dst).name] = {"w": w, "h": h, "error": err}
            s.thumbs_made += err is None
            s.thumbs_failed += err is not None
        if stopped:
            self._save_index()
            raise stopped
        full = next((e for _, _, _, e in results if e and f"[Errno {errno.ENOSPC}]" in e), None)
        if full:  # not a bad image: the disk; the thumbnails made so far stay for the re-run
            self._save_index()
            raise CurateError(f"cannot write thumbnails in {self.folder}: No space left on device; "
                              "free some space and run again")
        keep = set(self.wanted.values())
        for name in set(self.index) - keep:  # thumbnails this report made before and needs no more;
            if Path(name).name == name and name.endswith(".jpg"):  # never other files in the folder
                (self.folder / name).unlink(missing_ok=True)
        self.index = {k: v for k, v in self.index.items() if k in keep}
        self._save_index()

    def _save_index(self) -> None:
        """Atomically (a full disk leaves the old index, not an empty one); a one-line error."""
        tmp = self.index_file.with_name(self.index_file.name + ".part")
        try:
            tmp.write_text(json.dumps(self.index))
            os.replace(tmp, self.index_file)
        except OSError as exc:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            raise CurateError(f"cannot write {self.index_file}: {exc.strerror or exc}") from None

    def info(self, name: str | None) -> dict | None:
        got = self.index.get(name) if name else None
        return got if got and not got["error"] else None
