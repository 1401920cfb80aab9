"""Download a manifest's images into a content-addressed folder, every file verified.

    download_manifest(manifest, images=None, **options) -> Summary
        read the manifest, download, write it back (also every 30 s while running).
        fetch / build-reg call this after selection with their `--images DIR`.
    download_table(table, base_dir, Options, checkpoint=None) -> (table, Summary)
        the stage itself: manifest in -> manifest out.

This module plans (rows -> jobs, one per file) and schedules; the files themselves are
curate.images.image_store's (fetch, verify, place) and curate.images.archive_store's (archive members).

Storage: DIR/<md5[:2]>/<name>.<ext>. <name> is the post's md5 for the original
file, `<md5>.sample` / `<md5>.720` for a Danbooru variant, `<md5>.archive` for an
archive's re-encoded copy (a derivative: `derivative` = "archive", `file_sha256` =
its sha256, md5 stays the post's), plus `.max<N>` when --max-pixels N downscaled it;
without a source md5, the md5 of the content. <ext> comes from the content (jpg png
webp gif avif). Metadata (ids, md5, file_ext, URLs) is untrusted: names are built
only from validated hex and fixed words, so nothing is ever written outside DIR.

Verification (--verify): bytes go to DIR/.part/ and are checked before they are
renamed into place, so a file under its final name is complete. `digest` (default):
when the source gives a digest (the post's md5, an archive index's sha256) the digest
is checked and only the header is read (images.probe: format whitelist, size, pixel
guard); with no digest the file is fully decoded. `decode`: always a full decode.
Stages that need pixels decode anyway and record a file that fails then as an error
row. After kill -9 a re-run finds finished files (re-verifying them), drops the dead
process's .part files, and fetches the rest. Failed rows keep their place with `error`.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa

from curate.common import decode as img
from curate.common.cdn import CDN, cdn_url
from curate.errors import CurateError
from curate.images.archive_store import (
    CAN_FORK,
    NOT_IN_ARCHIVES,
    ArchiveStore,
    archive_batch,
    archive_processes,
    find_members,
)
from curate.images.image_store import ImageStore, Job

VARIANTS = {"original": "original", "sample": "sample", "720": "720x720"}
CHECKPOINT_SECONDS = 30
_MD5 = re.compile(r"[0-9a-f]{32}")
# Rows curate.metadata.refill took out of their subset (the upright size breaks its rules).
SETTLED_ERRORS = ("orientation changed", "size changed")


@dataclass
class Options:
    images: Path
    variant: str = "original"  # original | sample | 720 (Danbooru media_asset variants)
    max_pixels: int | None = None  # downscale bigger images on save
    from_tars: str | None = None  # folder or http(s) URL of archive datasets (curate.images.tars)
    tar_index: str | None = None  # folder or URL of their JSON indexes, when kept apart
    lookup_cache: Path | None = None  # SQLite id -> member lookup (None: in memory)
    verify: str = "digest"  # digest | decode
    cdn: str = CDN  # originals of posts with md5 but no file_url: <cdn>/original/ab/cd/<md5>.<ext>
    workers: int = 8
    rate: float | None = None  # requests/s per host; None: http.py's defaults
    retries: int = 3
    backoff: float = 0.5
    timeout: tuple[float, float] = (10.0, 60.0)  # connect, read (between bytes)
    deadline: float = 600.0  # seconds for one whole file, against slow-drip servers
    max_bytes: int = 512 << 20
    guard_pixels: int = img.DEFAULT_MAX_PIXELS
    progress: bool = True
    processes: bool = True  # local archive members in worker processes (big runs, >= 2 cores)
    local_images: list | None = None  # folders of images the user has (gallery-dl): linked by md5, not fetched


@dataclass
class Summary:
    rows: int = 0
    downloaded: int = 0  # fetched and stored this run
    reused: int = 0  # found in DIR (verified) without fetching
    local: int = 0  # found in --local-images (by md5) and linked or copied into DIR
    already: int = 0  # done in the manifest already, untouched
    failed: Counter = field(default_factory=Counter)  # reason -> rows
    derivatives: int = 0  # stored files that are an archive's re-encoded copy
    bytes: int = 0  # size of the files stored this run
    seconds: float = 0.0
    images: Path | None = None
    manifest: Path | None = None

    def render(self) -> str:
        ok = self.downloaded + self.reused + self.already + self.local
        lines = [
            f"{self.rows} rows: {ok} with images ({self.downloaded} downloaded, "
            + (f"{self.local} found locally, " if self.local else "")
            + f"{self.reused} found on disk, {self.already} already done), {sum(self.failed.values())} failed",
            f"{_size(self.bytes)} newly stored in {self.seconds:.1f} s",
        ]
        lines += [f"  {n:>6}  {reason}" for reason, n in self.failed.most_common()]
        if self.failed.get(NOT_IN_ARCHIVES):
            lines.append("  hint: not in archives: wrong --from-tars root? posts newer than the archive? "
                         "their images can come from the CDN: run without --from-tars")
        if self.derivatives:
            lines.append(f"  {self.derivatives} files are re-encoded archive copies (md5 kept, file_sha256 recorded)")
        if self.images:
            lines.append(f"images:   {self.images}")
        if self.manifest:
            lines.append(f"manifest: {self.manifest}")
        return "\n".join(lines)


ARCHIVE_BATCH = 16  # local archive members per task
PROCESSES_FROM = 512  # jobs: from here on, local archive members go to worker processes
LIST_FOLDERS_FROM = 4096  # jobs: from here on, one listing per subfolder beats ~14 stats per job


def download_manifest(manifest, images=None, ray=None, **options) -> Summary:
    """`ray`: curate.engine.RayOptions to download on Ray (None: here, in threads)."""
    from curate import manifest as mf

    path = Path(manifest)
    table, meta = mf.read(path)
    if options.get("from_tars") and "lookup_cache" not in options:
        options["lookup_cache"] = path.parent / f"{path.name}.archives.sqlite"
    opts = Options(images=Path(images) if images else path.parent / "images", **options)
    try:
        if ray is None:
            table, summary = download_table(table, path.parent, opts, checkpoint=lambda t: mf.write(t, path, meta))
        else:
            table, summary = _download_on_ray(table, path, opts, ray)
    except KeyboardInterrupt:
        raise CurateError(f"interrupted; finished rows are saved in {path}, re-run to go on", 130) from None
    mf.record_stage(meta, "download", images=str(opts.images), variant=opts.variant,
                    max_pixels=opts.max_pixels, from_tars=opts.from_tars, tar_index=opts.tar_index,
                    verify=opts.verify, local_images=[str(p) for p in opts.local_images or ()] or None,
                    found_locally=summary.local or None)
    mf.write(table, path, meta)
    if ray is not None:
        from curate import engine

        engine.clean(path, "download")
    summary.manifest = path
    return summary


OUT_COLUMNS = ["key", "path", "error", "width", "height", "file_sha256", "derivative"]
EXTRA_COLUMNS = ("file_sha256", "derivative")  # an extension of docs/design.md: derivative files' identity


def download_shard(rows, base_dir: str, opts: Options, rates: dict) -> tuple:
    """The per-shard work on Ray: download_table over some rows, host rates as the driver set them."""
    from curate import http

    for host, rate in rates.items():
        http.set_rate(host, rate)
    t, s = download_table(rows, base_dir, opts)
    stats = {"downloaded": s.downloaded, "reused": s.reused, "local": s.local, "already": s.already, "bytes": s.bytes,
             "failed": dict(s.failed), "derivatives": s.derivatives}
    for c in EXTRA_COLUMNS:
        if c not in t.column_names:
            t = t.append_column(c, pa.nulls(t.num_rows, pa.string()))
    return t.select(OUT_COLUMNS), stats


def _download_on_ray(table, path: Path, opts: Options, ray):
    """Shards of rows on Ray tasks; rate limits (per process) are split between the tasks in flight."""
    from dataclasses import replace
    from functools import partial

    from curate import engine, http
    from curate.manifest import with_column

    _check_options(opts)
    started = time.monotonic()
    opts = replace(opts, images=opts.images.resolve(), progress=False)
    opts.images.mkdir(parents=True, exist_ok=True)
    urls = table.column("file_url").to_pylist() + [v.get("url") for vs in table.column("variants").to_pylist()
                                                  for v in vs or () if v]
    hosts = {urlsplit(u).hostname for u in urls if u} | ({urlsplit(opts.from_tars).hostname}
                                                        if str(opts.from_tars).startswith("http") else set())
    need = ["key", "post_id", "md5", "file_url", "file_ext", "variants", "path", "error", "width", "height"]
    need += [c for c in ("file_size", *EXTRA_COLUMNS) if c in table.column_names]
    # Rows of one file (same md5) go to one shard as the first of them, as one job does here
    # locally: shards never race for a file, and the others take its result.
    first, lead = {}, []
    for i, m in enumerate(table.column("md5").to_pylist()):
        lead.append(first.setdefault(m.strip().lower(), i) if m and m.strip() else i)
    ship = [i for i, j in enumerate(lead) if i == j]
    with engine.connect(ray) as cluster:
        limits = {h: opts.rate if opts.rate is not None else http.limiter(h).rate for h in hosts if h}
        rates = {h: r / cluster.slots for h, r in sorted(limits.items()) if r}  # all tasks together: the rate
        shard_opts = replace(opts, rate=None, processes=False)  # the rates above rule; Ray is the parallelism
        fn = partial(download_shard, base_dir=str(path.parent.resolve()), opts=shard_opts, rates=rates)
        out, stats = cluster.map(fn, table.select(need).take(ship), engine.work_dir(path, "download"),
                                 desc="download", settings=f"download {path.parent.resolve()} {shard_opts!r}")
    at = {row: k for k, row in enumerate(ship)}
    for c in OUT_COLUMNS[1:]:
        values = out.column(c).to_pylist()
        table = with_column(table, c, [values[at[lead[i]]] for i in range(table.num_rows)])
    st = engine.sum_stats(stats)
    summary = Summary(rows=table.num_rows, images=opts.images, downloaded=st.get("downloaded", 0),
                      reused=st.get("reused", 0), local=st.get("local", 0), already=st.get("already", 0), bytes=st.get("bytes", 0),
                      derivatives=st.get("derivatives", 0),
                      failed=Counter(_reason(e) for e in table.column("error").to_pylist() if e),
                      seconds=time.monotonic() - started)
    return table, summary


def download_table(table, base_dir, opts: Options, checkpoint=None):
    """Fill path / width / height / error for every row that needs an image."""
    from tqdm import tqdm

    from curate import http
    from curate.manifest import with_column

    _check_options(opts)
    started = time.monotonic()
    base_dir = Path(base_dir).resolve()
    root = opts.images
    if root.exists() and not root.is_dir():
        raise CurateError(f"--images is not a folder: {root}")
    root.mkdir(parents=True, exist_ok=True)
    root = root.resolve()
    cols = {c: table.column(c).to_pylist() if c in table.column_names else [None] * table.num_rows for c in
            ("post_id", "md5", "file_url", "file_ext", "variants", "path", "error", "width", "height", "source_path",
             "file_size", *EXTRA_COLUMNS)}
    out = {c: list(cols[c]) for c in ("path", "error", "width", "height", *EXTRA_COLUMNS)}
    summary = Summary(rows=table.num_rows, images=root)

    jobs: dict[str, Job] = {}
    for i in range(table.num_rows):
        row = {c: v[i] for c, v in cols.items()}
        planned = _plan(row, base_dir, opts)
        if planned == "done":
            summary.already += 1
        elif isinstance(planned, str):
            if not planned.startswith(SETTLED_ERRORS):  # a settled row keeps its file
                out["error"][i], out["path"][i] = planned, None
        else:
            key = planned.stem or planned.url or f"post {planned.post_id}"
            jobs.setdefault(key, planned).rows.append(i)  # same file for several rows: one job

    store = ArchiveStore(root, opts) if opts.from_tars else ImageStore(root, opts)
    store.list_folders = len(jobs) >= LIST_FOLDERS_FROM
    if opts.local_images and not opts.from_tars:
        from curate.images.local_files import index

        store.local = index(opts.local_images)
    if store.tars is not None:
        find_members(store.tars, jobs, out, opts)
    if opts.rate is not None:
        for host in {urlsplit(j.url).hostname for j in jobs.values() if j.url} | store.hosts():
            http.set_rate(host, opts.rate)

    def apply(job, result):
        if isinstance(result, str):
            values = {"error": result, "path": None, "file_sha256": None, "derivative": None}
        else:
            rel, w, h, fresh, size, sha, derivative = result
            summary.bytes += size
            summary.derivatives += derivative is not None
            values = {"error": None, "path": rel, "width": w, "height": h, "file_sha256": sha,
                      "derivative": derivative}
            if fresh == "local":
                summary.local += 1
            elif fresh:
                summary.downloaded += 1
            else:
                summary.reused += 1
        for i in job.rows:
            for c, v in values.items():
                out[c][i] = v

    def updated():
        t = table
        for c, v in out.items():
            if c in EXTRA_COLUMNS:
                if c not in t.column_names and not any(v):
                    continue  # only manifests that hold derivatives get the columns
                v = pa.array(v, pa.string())
            t = with_column(t, c, v)
        return t

    # Local archive members take well under a millisecond each: handed out in batches, so the
    # scheduling here stays small beside the work, and in big runs to processes (the GIL would
    # otherwise hold the header parsing and Python glue to one core).
    local = store.tars is not None and not store.tars.remote
    per = ARCHIVE_BATCH if local else 1
    procs = min(opts.workers, os.cpu_count() or 1)
    if local and opts.processes and procs >= 2 and len(jobs) >= PROCESSES_FROM and CAN_FORK:
        pool, work = archive_processes(root, opts, store.list_folders, procs), archive_batch
    else:
        pool, work = ThreadPoolExecutor(max_workers=opts.workers, thread_name_prefix="curate-dl"), store.run_batch
    bar = tqdm(total=len(jobs), desc="download", unit="img", disable=not opts.progress, dynamic_ncols=True)
    jobs_left = iter(jobs.values())
    feed, in_flight = iter(lambda: list(itertools.islice(jobs_left, per)), []), {}
    last_save = time.monotonic()
    try:
        while True:  # a bounded number of futures in flight: memory stays flat
            for batch in itertools.islice(feed, opts.workers * 4 - len(in_flight)):
                in_flight[pool.submit(work, batch, base_dir)] = batch
            if not in_flight:
                break
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for fut in done:
                batch = in_flight.pop(fut)
                for job, result in zip(batch, fut.result()):
                    apply(job, result)
                bar.update(len(batch))
            if checkpoint and time.monotonic() - last_save > CHECKPOINT_SECONDS:
                checkpoint(updated())
                last_save = time.monotonic()
    except BaseException:  # Ctrl-C or a bug: abandon downloads, keep finished rows
        store.stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        if checkpoint:
            checkpoint(updated())
        raise
    finally:
        pool.shutdown()
        bar.close()
        store.close()

    for e in out["error"]:
        if e:
            summary.failed[_reason(e)] += 1
    summary.seconds = time.monotonic() - started
    return updated(), summary


def _check_options(opts: Options) -> None:
    if opts.variant not in VARIANTS:
        raise CurateError(f"--variant must be one of {', '.join(VARIANTS)}, not {opts.variant!r}")
    if opts.max_pixels is not None and opts.max_pixels < 64 * 64:
        raise CurateError(f"--max-pixels must be at least 4096, not {opts.max_pixels}")
    if opts.workers < 1:
        raise CurateError("--workers must be at least 1")
    if opts.rate is not None and opts.rate <= 0:
        raise CurateError("--rate must be > 0")
    if opts.verify not in ("digest", "decode"):
        raise CurateError(f"--verify must be digest or decode, not {opts.verify!r}")
    if opts.tar_index and not opts.from_tars:
        raise CurateError("--tar-index needs --from-tars")
    tars = opts.from_tars
    if tars and not str(tars).startswith(("http://", "https://")) and not Path(tars).is_dir():
        raise CurateError(f"--from-tars: no such folder: {tars}")


def _plan(row: dict, base_dir: Path, opts: Options):
    """'done', an error string, or a Job."""
    if row["error"] and row["error"].startswith(SETTLED_ERRORS):
        return row["error"]  # a decision about the row (its image is fine): never redone here
    md5 = (row["md5"] or "").strip().lower() or None
    if md5 is not None and not _MD5.fullmatch(md5):
        return "invalid md5"
    variant = "original" if opts.from_tars else opts.variant
    stem = md5 if md5 is None or variant == "original" else f"{md5}.{variant}"
    if row["path"] and not row["error"] and _still_good(row, base_dir, stem, opts):
        return "done"
    # A file a later stage derived (crop: source_path set) or a local image (ingest:
    # no URL, no md5) is not ours to replace while it is on disk.
    if row["path"] and not row["error"] and (row["source_path"] or (md5 is None and not row["file_url"])) \
            and (base_dir / row["path"]).is_file():
        return "done"
    ext = (row["file_ext"] or "").strip().lower()
    if ext in img.NOT_IMAGE_EXTS:
        return f"unsupported: {ext}"
    if opts.from_tars:
        pid = row["post_id"]
        if pid is None or pid < 0:
            return "no post id (needed for --from-tars)"
        return Job([], stem, md5, post_id=pid, file_size=row["file_size"], file_ext=ext or None)
    url, used = _choose_url(row, VARIANTS[opts.variant])
    if url is None and md5 is not None:  # dumps and databases without URLs: the CDN by md5
        url, used = cdn_url(md5, ext, opts.cdn), "original"
    if url is None:  # Danbooru drops md5 and URLs of posts the account may not see
        return "hidden" if md5 is None else "no url (images of this source need --from-tars)"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "bad url"
    if md5 is not None and used != "original":
        return Job([], stem, None, url=url)
    return Job([], md5, md5, url=url)


def _still_good(row, base_dir: Path, stem: str | None, opts: Options) -> bool:
    """A row done before counts as done if its file is there and fits this run's options."""
    p = Path(row["path"])
    if not (base_dir / p).is_file():
        return False
    name = re.sub(r"\.max\d+$", "", p.name.rpartition(".")[0])
    if stem is not None and name != stem and not (opts.from_tars and name == f"{stem}.archive"):
        return False  # another variant, or named by content
    if opts.max_pixels and (row["width"] or 0) * (row["height"] or 0) > opts.max_pixels:
        return False
    return True


def _choose_url(row: dict, variant_type: str) -> tuple[str | None, str]:
    for v in row["variants"] or ():
        if v and v.get("type") == variant_type and v.get("url"):
            return v["url"], variant_type
    return (row["file_url"] or None), "original"


def _reason(error: str) -> str:
    """Group errors for the summary: 'decode: truncated' -> 'decode'."""
    return error if error.startswith("unsupported") else error.split(":")[0]


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"

