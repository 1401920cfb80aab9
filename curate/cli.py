"""The `curate` command line: a thin Typer shell over one module per stage.

Heavy imports happen inside each command so `curate --help` stays instant.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from curate.errors import CurateError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts are plain: [brackets] are text, not Rich markup
    help="Build fine-tuning datasets for anime image models, and train on them.",
)


def main() -> None:
    """Console entry point: user errors print one line and exit non-zero."""
    try:
        app()
    except CurateError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)


# --- commands -----------------------------------------------------------------
# Each command parses its options, calls its stage module, prints the summary.


def _bar(desc: str, unit: str = "post"):
    from tqdm import tqdm

    return tqdm(desc=desc, unit=unit, unit_scale=True, disable=None, leave=False)


def _source(spec: str, **options):
    from curate.metadata.sources import open_source

    return open_source(spec, **options)  # options reach the danbooru source only


# Options of the live danbooru source (ignored by the local sources).
def _range(lo: float | None = None, hi: float | None = None, above: float | None = None):
    """An option callback: a value outside the range is a one-line error, before any work."""
    def check(param: typer.CallbackParam, value):
        if value is None:
            return value
        name = max(param.opts, key=len)
        if above is not None and not value > above:
            raise CurateError(f"{name} must be more than {above:g}, got {value}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            want = f"between {lo:g} and {hi:g}" if hi is not None else f"at least {lo:g}"
            raise CurateError(f"{name} must be {want}, got {value}")
        return value
    return check


_RATE = typer.Option(2.0, "--rate", callback=_range(above=0), help="danbooru: requests per second to the API host.")
_USER_AGENT = typer.Option(None, "--user-agent", help="danbooru: User-Agent (default curate/<version>; make it unique if Cloudflare blocks you).")
_BASE_URL = typer.Option(None, "--base-url", help="danbooru: site URL (default https://danbooru.donmai.us, env CURATE_DANBOORU_URL).")
_RATING_SCALE = typer.Option("auto", "--rating-scale", help="auto | old | new: the rating scale of the source's files (old: before 2022-05-22, s = safe; auto: judged per file).")
_TAG_LIMIT = typer.Option(None, "--tag-limit", callback=_range(0), help="danbooru: plain tags per search (default: your account's, from /profile.json; 2 anonymous; 0: no limit).")


def _live(rate: float, user_agent: Optional[str], tag_limit: Optional[int], **more) -> dict:
    return {k: v for k, v in dict(rate=rate, user_agent=user_agent, tag_limit=tag_limit, **more).items() if v is not None}


@app.command()
def sync(
    source: str = typer.Argument(..., help="danbooru, hakubooru:PATH, dump:PATH or store:PATH"),
    store: Path = typer.Option(..., "--store", help="Folder of the local metadata store (created if missing)."),
    aliases: Optional[Path] = typer.Option(None, "--aliases", help="A /tag_aliases.json dump; active aliases are applied."),
    since_id: Optional[int] = typer.Option(None, "--since-id", callback=_range(0), help="danbooru: mirror posts after this id (default: the store's highest)."),
    rate: float = _RATE,
    base_url: Optional[str] = _BASE_URL,
    user_agent: Optional[str] = _USER_AGENT,
    tag_limit: Optional[int] = _TAG_LIMIT,
    rating_scale: str = _RATING_SCALE,
) -> None:
    """Build or update curate's local metadata store from a source.

    New posts are added, changed ones replaced, nothing duplicated. The store is
    written as a new generation and swapped in atomically: an interrupted sync
    leaves the previous store readable. Query it afterwards with --source store:PATH.
    """
    import time

    from curate.metadata.sync import sync as run_sync

    src = _source(source, rating_scale=rating_scale,
                  **_live(rate, user_agent, tag_limit, base_url=base_url, since_id=since_id, store=store))
    t0 = time.perf_counter()
    with _bar("sync") as bar:
        report = run_sync(src, store, aliases_file=str(aliases) if aliases else None, progress=bar.update)
    if hasattr(src, "committed"):  # the live source's spool is in the store now
        src.committed()
    dt = time.perf_counter() - t0
    typer.echo(f"synced {src.describe()} -> {report.store}")
    typer.echo(f"  read {report.read} posts in {dt:.1f}s ({report.read / max(dt, 1e-9):.0f} posts/s): "
               f"{report.added} new, {report.updated} updated, {report.unchanged} unchanged"
               + (f", {report.stale} older than the stored version (kept the stored one)" if report.stale else ""))
    if report.skipped:
        typer.echo("  skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(report.skipped.items())))
    _warn_scales(src)
    typer.echo(f"  store now holds {report.total} posts, {report.tags} tags, {report.aliases} aliases")


def _warn_scales(src) -> None:
    for line in getattr(src, "warnings", ()):
        typer.echo(f"  warning: {line}")
    if hasattr(src, "describe_scale"):
        rs = src.describe_scale()
        if rs.get("files", {}).get("old"):
            typer.echo(f"  rating scale: {rs['files']['old']} file(s) on the old scale (s = safe, read as g)")


def _run_query(query: Path, source: str, out: Optional[Path], kind: str, seed: Optional[int],
               images: Optional[Path], no_images: bool, live: Optional[dict] = None,
               outside_files: bool = False, rating_scale: str = "auto", aliases: Optional[Path] = None) -> None:
    from curate.metadata.fetch import fetch as run_fetch

    if out is None:
        out = Path("manifests") / f"{query.stem}.parquet"
    src = _source(source, rating_scale=rating_scale, **(live or {}))
    with _bar("select") as bar:
        result = run_fetch(query, src, out, kind=kind, seed=seed, progress=bar.update, outside_files=outside_files,
                           aliases_file=aliases)
    sel = result.selection
    typer.echo(f"{'build-reg' if kind == 'reg' else 'fetch'}: {result.source} -> {result.out}")
    typer.echo(f"  {'subset':<24} {'quota':>8} {'eligible':>10} {'selected':>9}")
    for r in sel.subsets:
        quota = "all" if r.quota is None else str(r.quota)
        short = "  (fewer than the quota: took all)" if r.quota is not None and r.selected < r.quota else ""
        typer.echo(f"  {r.name:<24} {quota:>8} {r.eligible:>10} {r.selected:>9}{short}")
    for name, shift in sel.tag_shift.items():  # match_tags_of subsets (issue 27)
        typer.echo(f"  {name}: share of its rows carrying the training set's overfitting tags, before -> after matching:")
        for d in shift:
            typer.echo(f"    {d['tag']:<28} {d['before']:>6.1%} -> {d['after']:>6.1%}   (training set {d['training']:.0%})")
    for r in sel.subsets:
        for old, new, n in r.renamed_artists:
            typer.echo(f"  artist {old!r} is now {new!r} (alias): {n} posts")
        for artist in r.unmatched_artists:
            typer.echo(f"  warning: artist {artist!r} (subset {r.name}'s artists file) matches no post in the source; a typo?")
    if sel.skipped:
        typer.echo("  skipped from source: " + ", ".join(f"{k} {v}" for k, v in sorted(sel.skipped.items())))
    _warn_scales(src)
    typer.echo(f"  {sel.table.num_rows} rows written")
    if not no_images:  # default: images/ beside the manifest
        from curate.images.download import download_manifest

        # a dump folder holds its images too (gallery-dl): found there by md5, not downloaded again
        local = [src.path] if getattr(src, "path", None) is not None and src.path.is_dir() and source.startswith("dump:") else None
        typer.echo(download_manifest(result.out, images, local_images=local).render())
        _size_check(result.out, src, lambda: download_manifest(result.out, images, local_images=local).render(), aliases)


def _size_check(manifest: Path, src, download_again, aliases: Optional[Path] = None) -> None:
    """Sizes listed before EXIF rotation: rows download found in the wrong subset are marked and
    their quota refilled from the source, the new rows downloaded; a few rounds at most."""
    from curate.metadata.refill import recheck_sizes
    from curate.metadata.sync import load_aliases

    alias_map = load_aliases(aliases) if aliases else None
    for _ in range(3):
        check = recheck_sizes(manifest, src, alias_map)
        for line in check.lines():
            typer.echo(line)
        if not sum(check.refilled.values()):
            return
        typer.echo("  refill: " + download_again().replace("\n", "\n  "))


_QUERY_HELP = "Query spec (TOML), see docs/design.md."
_SOURCE_HELP = "danbooru, hakubooru:PATH, dump:PATH or store:PATH."
# fetch and build-reg take the same options
_QUERY_ARG = typer.Argument(..., help=_QUERY_HELP)
_SOURCE_OPT = typer.Option(..., "--source", help=_SOURCE_HELP)
_OUT_OPT = typer.Option(None, "--out", help="Manifest to write (default manifests/<query>.parquet).")
_SEED_OPT = typer.Option(None, "--seed", help="Override the query's seed.")
_IMAGES_OPT = typer.Option(None, "--images", help="Download images into this folder (default: images/ beside the manifest).")
_NO_IMAGES_OPT = typer.Option(False, "--no-images", help="Write the manifest only.")
_OUTSIDE_OPT = typer.Option(False, "--allow-outside-files", help="Let an artists_file lie outside the query's folder.")


def _query_command(name: str, kind: str, doc: str) -> None:
    """fetch and build-reg: one signature, registered twice."""

    def command(
        query: Path = _QUERY_ARG,
        source: str = _SOURCE_OPT,
        out: Optional[Path] = _OUT_OPT,
        seed: Optional[int] = _SEED_OPT,
        images: Optional[Path] = _IMAGES_OPT,
        no_images: bool = _NO_IMAGES_OPT,
        rate: float = _RATE,
        base_url: Optional[str] = _BASE_URL,
        user_agent: Optional[str] = _USER_AGENT,
        tag_limit: Optional[int] = _TAG_LIMIT,
        allow_outside_files: bool = _OUTSIDE_OPT,
        rating_scale: str = _RATING_SCALE,
        aliases: Optional[Path] = typer.Option(None, "--aliases", help="A /tag_aliases.json dump: renamed tags (artists) of a local source resolve to their new names."),
    ) -> None:
        _run_query(query, source, out, kind, seed, images, no_images,
                   _live(rate, user_agent, tag_limit, base_url=base_url), allow_outside_files, rating_scale, aliases)

    command.__doc__ = doc
    app.command(name)(command)


_query_command("fetch", "fetch", "Select posts by a query spec and write a manifest (one row per post).")
_query_command("build-reg", "reg", """Build a regularization set: like fetch, and records the class token.

    Subsets are disjoint (first subset wins), random order is a seeded keyed-hash
    sample, so the same source + query + seed always gives the same rows.
    """)


@app.command()
def inspect(
    manifest: Path = typer.Argument(..., help="Manifest (Parquet)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts."),
    tags: bool = typer.Option(False, "--tags", help="List the tags that will overfit: on many times more of the training images than of Danbooru at large (or of the reg set)."),
    reg: Optional[Path] = typer.Option(None, "--reg", help="With --tags: the reg manifest the run balances with."),
    counts: Optional[Path] = typer.Option(None, "--counts", help="With --tags: a tagger's selected_tags.csv (Danbooru post counts); default: the tagger's that tagged the manifest, when on disk."),
) -> None:
    """Show what a manifest holds: rows per subset, stages done, failures, provenance."""
    import json

    from curate.report.inspect import inspect as run_inspect
    from curate.report.inspect import render, render_tags

    if tags:
        from curate.common.overfit import report

        info = report(manifest, reg, counts)
        typer.echo(json.dumps(info, indent=1, default=str) if as_json else render_tags(manifest, info))
        return
    info = run_inspect(manifest)
    typer.echo(json.dumps(info, indent=1, default=str) if as_json else render(info))


@app.command()
def artists(
    source: str = typer.Option(..., "--source", help=_SOURCE_HELP),
    copyright: Optional[str] = typer.Option(None, "--copyright", help="Copyright tag, e.g. blue_archive."),
    tags: Optional[str] = typer.Option(None, "--tags", help="Comma-separated tags every post must carry."),
    fav_count: str = typer.Option(">30", "--fav-count", help="Danbooru range a post's fav_count must be in."),
    min_posts: int = typer.Option(5, "--min-posts", callback=_range(0), help="Leave out artists with fewer matching posts."),
    top: Optional[int] = typer.Option(None, "--top", callback=_range(1), help="Keep the K artists with the most posts."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write an artists file for a query's artists_file."),
    rate: float = _RATE,
    base_url: Optional[str] = _BASE_URL,
    user_agent: Optional[str] = _USER_AGENT,
    tag_limit: Optional[int] = _TAG_LIMIT,
    like: Optional[Path] = typer.Option(None, "--like", help="A CG manifest: rank the artists by how much a sample of their posts looks like it (needs --model)."),
    model: Optional[str] = typer.Option(None, "--model", help="With --like: image-embedding model, a local folder or a hub id (CLIP vision; see docs/judgement.md)."),
    sample: int = typer.Option(8, "--sample", callback=_range(1), help="With --like: posts embedded per artist (chosen by --seed)."),
    seed: int = typer.Option(0, "--seed", help="With --like: which posts are sampled."),
    images: Optional[Path] = typer.Option(None, "--images", help="With --like: image folder to reuse (download's <md5[:2]>/<md5>.<ext> layout)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="With --like: where images and embeddings are cached (default: .curate_artists_like beside the CG manifest)."),
    max_requests: Optional[int] = typer.Option(None, "--max-requests", callback=_range(0), help="With --like: at most this many image requests (a re-run goes on from the cache)."),
) -> None:
    """Rank artists by well-favourited posts in a copyright (or tag set); with --like, by likeness to a CG set."""
    from curate.metadata.artists import rank_artists, write_artists_file

    tag_list = [t.strip() for t in tags.split(",") if t.strip()] if tags else []
    if not copyright and not tag_list:
        raise CurateError("give --copyright or --tags (ranking every artist on the site is rarely what you want)")
    src = _source(source, **_live(rate, user_agent, tag_limit, base_url=base_url))
    if like is not None:
        _artists_like(like, src, model, copyright, tag_list, fav_count, min_posts, top, sample, seed, images, cache,
                      max_requests, out)
        return
    with _bar("artists") as bar:
        rows = rank_artists(src, copyright, tag_list, fav_count, min_posts, top, progress=bar.update)
    typer.echo(f"{len(rows)} artists with >= {min_posts} posts (fav_count {fav_count}) in "
               f"{copyright or ''}{' + ' if copyright and tag_list else ''}{' '.join(tag_list)} from {src.describe()}")
    for r in rows[:20]:
        typer.echo(f"  {r.artist:<40} {r.posts:>6} posts  median fav {r.median_fav:g}")
    if len(rows) > 20:
        typer.echo(f"  ... {len(rows) - 20} more")
    if out is not None:
        header = (f"curate artists --source {src.describe()} --copyright {copyright or ''} "
                  f"--tags {','.join(tag_list)} --fav-count '{fav_count}' --min-posts {min_posts}")
        typer.echo(f"  written: {write_artists_file(rows, out, header)}")


def _artists_like(like, src, model, copyright, tag_list, fav_count, min_posts, top, sample, seed, images, cache,
                  max_requests, out) -> None:
    from curate.metadata.artists_like import rank_like, write_like_file, write_like_page

    if not model:
        raise CurateError("--like needs --model (an image-embedding model: folder or hub id)")
    s = rank_like(like, src, model, copyright, tag_list, fav_count, min_posts, top, sample, seed, images, cache,
                  max_requests)
    typer.echo(f"{len(s.rows)} artists ranked by likeness to {like} ({s.cg_images} CG images) from {src.describe()}")
    typer.echo(f"  images: {s.on_disk} on disk, {s.fetched} fetched, {s.missing} unreadable; "
               f"embeddings: {s.embedded} new, {s.cached} cached")
    for r in s.rows[:20]:
        typer.echo(f"  {r.artist:<40} like {r.score:.3f}  ({len(r.sample)} of {r.posts} posts)")
    if len(s.rows) > 20:
        typer.echo(f"  ... {len(s.rows) - 20} more")
    if out is not None:
        header = (f"curate artists --like {like} --model {model} --source {src.describe()} --copyright "
                  f"{copyright or ''} --tags {','.join(tag_list)} --fav-count '{fav_count}' --min-posts {min_posts} "
                  f"--sample {sample} --seed {seed}")
        typer.echo(f"  written: {write_like_file(s.rows, out, header)}")
        page = write_like_page(s.rows, s.cg_files, Path(out).with_suffix(".html"), f"artists like {Path(like).stem}")
        typer.echo(f"  samples beside scores: {page}")


@app.command()
def version() -> None:
    """Print curate's version."""
    from curate import __version__

    typer.echo(__version__)


# --- official CG set: ingest, dedupe, crop (issue 5) --------------------------------


def _show_errors(errors: list, limit: int = 5) -> None:
    for line in errors[:limit]:
        typer.echo(f"  failed: {line}")
    if len(errors) > limit:
        typer.echo(f"  ... {len(errors) - limit} more failures (see the error column)")


@app.command()
def ingest(
    folder: Path = typer.Argument(..., help="Folder of local images (searched recursively)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Manifest to create, or to grow if it exists (default manifests/<name>.parquet)."),
    name: Optional[str] = typer.Option(None, "--name", help="Subset name for the rows (default: the folder's name)."),
    workers: Optional[int] = typer.Option(None, "--workers", callback=_range(1), help="Processes (default: all cores)."),
    follow_external_links: bool = typer.Option(False, "--follow-external-links", help="Read symlinks whose target lies outside the folder (default: an error row each)."),
    include_housekeeping: bool = typer.Option(False, "--include-housekeeping", help="Also read NAS/OS housekeeping folders and files (@eaDir, #recycle, $RECYCLE.BIN, __MACOSX, .Trash-*, Thumbs.db, ...; default: skipped and counted)."),
    caption_ext: Optional[list[str]] = typer.Option(None, "--caption-ext", help="A further sidecar extension to read (repeatable; .txt and .caption always are, first found is user_caption)."),
) -> None:
    """Local images (official CG, screenshots) -> manifest rows.

    Every image type Pillow reads; key local/<sha256 prefix>; paths relative to the
    manifest's folder. Unreadable files become rows with an error. Re-running on a
    grown folder adds only the new files. A caption beside an image (<stem>.txt or
    <stem>.caption, UTF-8 with or without BOM) is read as the user's own (user_caption;
    re-read on every run, the file never changed); curate caption uses it by default.
    """
    from curate.dataset.ingest import run

    out = out or Path("manifests") / f"{name or folder.resolve().name}.parquet"
    s = run(folder, out, name, workers, follow_external_links, include_housekeeping, caption_ext or ())
    typer.echo(f"ingest: {s.found} image files in {folder}: {s.added} added, {s.existing} already in the "
               f"manifest, {s.failed} unreadable (error rows), {s.copies} byte-identical copies")
    if s.not_images:
        typer.echo(f"  {s.not_images} non-image files ignored")
    if s.housekeeping:
        typer.echo("  skipped housekeeping files (--include-housekeeping reads them): "
                   + ", ".join(f"{kind} {n}" for kind, n in sorted(s.housekeeping.items())))
    if s.several_sidecars:
        typer.echo(f"  {s.several_sidecars} images have several caption files ("
                   + ", ".join(f"{ext} {n}" for ext, n in sorted(s.sidecars.items()))
                   + "): all kept in user_sidecars; curate caption's user_caption setting combines or picks")
    if s.user_captions:
        typer.echo(f"  {s.user_captions} images have the user's own caption (.txt/.caption beside them; "
                   "read into user_caption, never changed)")
    if s.missing:
        typer.echo(f"  {s.missing} earlier rows point to files no longer there (rows kept)")
    if getattr(s, "changed", 0):
        typer.echo(f"  {s.changed} images were replaced under the same name: read again, and their crop, "
                   "hashes, duplicate mark, tags and caption cleared for those stages to redo")
    _show_errors(s.errors)
    typer.echo(f"  manifest: {out} ({s.rows} rows)")


# --engine ray (issue 7): the heavy per-row work of download / dedupe / tag in shards on Ray.
_ENGINE = typer.Option("local", "--engine", help="local | ray: shards of rows on a Ray cluster (pip install 'curate[ray]'); a re-run after a crash redoes only unfinished shards.")
_RAY_ADDRESS = typer.Option(None, "--ray-address", help="With --engine ray: the cluster to join (auto, or HEAD_IP:6379, from a node of it); default: a local Ray on this machine's cores. Workers need the manifest's folder at the same path.")
_SHARD_ROWS = typer.Option(1000, "--shard-rows", callback=_range(1), help="With --engine ray: rows per shard (the unit of work, retry and checkpoint).")


@app.command()
def dedupe(
    manifest: Path = typer.Argument(..., help="Manifest to deduplicate (written back in place)."),
    against: Optional[List[Path]] = typer.Option(None, "--against", help="Other manifest(s): rows here that duplicate theirs get dup_of = their key. Repeatable."),
    threshold: Optional[int] = typer.Option(None, "--threshold", help="Max phash Hamming distance (bits) for a near duplicate, 0-24 (default: 10, measured by benchmarks/bench_dedupe_quality.py)."),
    workers: Optional[int] = typer.Option(None, "--workers", callback=_range(1), help="Processes for hashing (default: all cores)."),
    engine: str = _ENGINE,
    ray_address: Optional[str] = _RAY_ADDRESS,
    shard_rows: int = _SHARD_ROWS,
    keep_mirrors: bool = typer.Option(False, "--keep-mirrors", help="A horizontally flipped copy is not a duplicate (for training without flip augmentation)."),
) -> None:
    """Mark exact and near duplicates (dup_of); the best copy of each cluster is kept.

    Exact: same bytes, or same pixels in another encoding. Near: 64-bit perceptual
    hash within --threshold bits (confirmed by a difference hash), taken inside
    detected borders so a letterboxed frame matches its clean twin. Keeper: most
    content pixels (inside borders), then colour over greyscale, lossless over lossy,
    higher JPEG quality or more bytes per pixel, an original over a derivative, no
    bars, key order; the column keeper_reason says which decided. Mirror images match
    too (dup_reason "mirrored copy"); an upscaled copy loses to its original
    ("upscaled copy"); among frames alike in size and quality the sharpest is kept.
    """
    from curate import engine as eng
    from curate.dataset.dedupe import DEFAULT_THRESHOLD, run

    t = DEFAULT_THRESHOLD if threshold is None else threshold
    s = run(manifest, against or [], t, workers, ray=eng.options(engine, ray_address, shard_rows),
            mirrors=not keep_mirrors)
    typer.echo(f"dedupe: {s.rows} rows: {s.hashed} hashed, {s.reused} hashes reused, {s.failed} failed, "
               f"{s.skipped} skipped (error or no file)")
    typer.echo(f"  exact pairs: {s.exact_bytes} same bytes, {s.exact_pixels} same pixels; "
               f"near pairs (<= {s.threshold} bits): {s.near_pairs}")
    typer.echo(f"  {s.duplicates} rows marked dup_of in {s.clusters} clusters"
               + (f"; {s.against} of them duplicate rows of --against ({s.against_rows} rows)" if against else ""))
    typer.echo(f"  mirrored copies: {s.mirrored} marked" if s.mirrors else "  mirrored copies: kept apart (--keep-mirrors)")
    if s.reasons:
        typer.echo("  keepers by what decided: " + ", ".join(f"{k} {v}" for k, v in sorted(s.reasons.items(), key=lambda kv: -kv[1])))
    _show_errors(s.errors)
    typer.echo(f"  manifest: {manifest} ({s.rows - s.duplicates - s.skipped - s.failed} distinct images kept)")


@app.command()
def crop(
    manifest: Path = typer.Argument(..., help="Manifest whose images to crop (written back in place)."),
    max_pixels: Optional[str] = typer.Option(None, "--max-pixels", help="Downscale to at most this area: a pixel count or WxH, e.g. 1280x1280."),
    trim_borders: bool = typer.Option(True, "--trim-borders/--no-trim-borders", help="Trim letterbox/pillarbox bars and flat borders."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="Folder for derived images (default: <manifest name>_crops beside the manifest)."),
    workers: Optional[int] = typer.Option(None, "--workers", callback=_range(1), help="Processes (default: all cores)."),
) -> None:
    """Trim borders and downscale into a separate folder (originals untouched).

    Records crop [left, top, right, bottom] in original pixels, points path at the
    derived file and keeps the original in source_path. Duplicates are skipped.
    """
    from curate.dataset.crop import run

    s = run(manifest, max_pixels, trim_borders, out_dir, workers)
    typer.echo(f"crop: {s.rows} rows: {s.processed} processed ({s.trimmed} trimmed, {s.resized} downscaled, "
               f"{s.unchanged} unchanged), {s.done_before} done before, {s.failed} failed")
    typer.echo(f"  skipped: {s.skipped_dups} duplicates, {s.skipped_other} with an error or no file")
    _show_errors(s.errors)
    typer.echo(f"  derived images: {s.out_dir}")
    typer.echo(f"  manifest: {manifest}")


@app.command()
def caption(
    manifest: Path = typer.Argument(..., help="Manifest to caption (written back in place)."),
    config: Optional[Path] = typer.Option(
        None, "--config", help="TOML file with a [caption] table (and [caption.subsets.NAME]); "
        "default: the caption tables of the query the manifest was built from."),
    images: Optional[List[Path]] = typer.Option(
        None, "--images", help="An image folder outside the manifest's folder whose images may get a "
        ".txt beside them (repeatable; a folder the manifest records counts only inside its own folder)."),
) -> None:
    """Choose each row's caption (the user's own, generated, or both merged) and keep a copy as a .txt file.

    Generated captions follow HakuBooru (Kohaku-XL's captioner): special tags (1girl ...), character,
    copyright, (artist), general, year/rating/quality; names with spaces, no prompt escapes;
    recipe = "hakubooru" gives make_caption's exact text. The .txt goes beside images curate
    wrote (downloads, crops), else to <manifest stem>.captions/; a file curate did not write is
    never replaced. See the curate.dataset.caption module for every key. Rows with error or dup_of are skipped.
    """
    from curate.dataset.caption import run

    for line in run(manifest, config, images or ()).lines():
        typer.echo(line)


@app.command()
def export(
    manifests: Optional[List[Path]] = typer.Argument(
        None, help="Captioned manifests; default: the manifests the train config lists."),
    kohya: Path = typer.Option(..., "--kohya", help="Output folder for sd-scripts (created; "
                               "a re-export replaces what the last one wrote)."),
    config: Optional[Path] = typer.Option(
        None, "--config", help="Train config (TOML, docs/design.md) whose values to use."),
    link: str = typer.Option("symlink", "--link", help="How images enter DIR: symlink | hardlink | copy."),
    portable: bool = typer.Option(False, "--portable", help="A folder that travels: real files (copies unless --link hardlink) and paths relative to DIR (run sd-scripts from inside it)."),
) -> None:
    """Write an sd-scripts dataset_config.toml, image folders with .txt captions (normalized copies where
    sd-scripts would read other pixels; reg subsets interleaved), and metadata.json for the fine-tune route."""
    from curate.dataset.export import run

    for line in run(manifests or [], kohya, config, link, portable).lines():
        typer.echo(line)


@app.command()
def download(
    manifest: Path = typer.Argument(..., help="Manifest whose images to download (written back in place)."),
    images: Optional[Path] = typer.Option(None, "--images", help="Image folder, content-addressed <md5 prefix>/<md5>.<ext> (default: images/ beside the manifest)."),
    from_tars: Optional[str] = typer.Option(None, "--from-tars", help="Archive dataset (danbooru2023 original/recent/updates, its WebP re-encode, danbooru2024 images/): its root or any subfolder, or an http(s) URL (Range requests). Members are found through the .json indexes, or the tar headers."),
    tar_index: Optional[str] = typer.Option(None, "--tar-index", help="Folder or URL of the archives' .json indexes when they are kept apart (a separate index repo)."),
    verify: str = typer.Option("digest", "--verify", help="digest: check md5/sha256 and the header (format, size, pixel guard), full decode only without a digest | decode: always decode fully."),
    variant: str = typer.Option("original", "--variant", help="Danbooru variant: original | sample | 720 (falls back to file_url when missing; not used with --from-tars)."),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", callback=_range(1), help="Downscale (Lanczos) images bigger than this many pixels when saving."),
    workers: int = typer.Option(8, "--workers", callback=_range(1), help="Parallel downloads."),
    rate: Optional[float] = typer.Option(None, "--rate", callback=_range(above=0), help="Requests per second per host (default: 2 for *.donmai.us, unlimited elsewhere)."),
    retries: int = typer.Option(3, "--retries", callback=_range(0), help="Retries per file for connection errors, 429 and 5xx (with backoff)."),
    engine: str = _ENGINE,
    ray_address: Optional[str] = _RAY_ADDRESS,
    shard_rows: int = _SHARD_ROWS,
    local_images: Optional[List[Path]] = typer.Option(None, "--local-images", help="Folder of images you already have (a gallery-dl download): found by md5 and hard-linked (or copied) instead of downloaded. Repeatable."),
) -> None:
    """Download and verify the images of a manifest; fill path, width, height, error.

    Files are checked (size, md5 or the archive index's sha256, header and pixel
    guard; a full decode without a digest or with --verify decode) before they get their
    final name, so a re-run -- even after kill -9 -- skips finished rows and never
    accepts a broken file. Failed rows stay, with the reason in the error column.
    """
    from curate import engine as eng
    from curate.images.download import download_manifest

    options = dict(ray=eng.options(engine, ray_address, shard_rows), variant=variant, max_pixels=max_pixels, from_tars=from_tars,
                   tar_index=tar_index, verify=verify, workers=workers, rate=rate, retries=retries,
                   local_images=local_images or None)
    s = download_manifest(manifest, images, **options)
    typer.echo("download: " + s.render())
    _size_check(manifest, "recorded", lambda: download_manifest(manifest, images, **options).render())


@app.command()
def tag(
    manifest: Path = typer.Argument(..., help="Manifest whose images to tag (written back in place)."),
    model: str = typer.Option(..., "--model", help="WD tagger: a local folder (config.json, model.safetensors, selected_tags.csv; or model.onnx) or a hub id, e.g. SmilingWolf/wd-vit-tagger-v3."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", callback=_range(1), help="Images per batch [default: 128 on cuda, 4 on cpu]."),
    device: str = typer.Option("auto", "--device", help="cpu | cuda | auto (cuda when present)."),
    general_threshold: float = typer.Option(0.35, "--general-threshold", callback=_range(0, 1), help="Keep general tags scoring above this."),
    character_threshold: float = typer.Option(0.85, "--character-threshold", callback=_range(0, 1), help="Keep character tags scoring above this."),
    use_mcut: bool = typer.Option(False, "--mcut", help="Per image MCut thresholds instead (largest gap in the scores; character >= 0.15)."),
    workers: Optional[int] = typer.Option(None, "--workers", callback=_range(0), help="Decoding processes [default: cores, at most 16, on cuda; half the cores on cpu]; 0: in-process."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model (pays off on long GPU runs)."),
    draft: bool = typer.Option(True, "--draft/--no-draft", help="Decode big JPEGs at reduced scale (much faster; --no-draft: bit-exact reference preprocessing)."),
    engine: str = _ENGINE,
    ray_address: Optional[str] = _RAY_ADDRESS,
    shard_rows: int = _SHARD_ROWS,
) -> None:
    """Auto-tag images with a WD v3 tagger into the `tagger` column (tag, category, score).

    Preprocessing as the models were trained (white alpha and padding to square,
    bicubic resize, BGR). Rating = the best of the four rating labels. A re-run with
    the same model and thresholds skips tagged rows; other ones re-tag every row.
    Rows with error or dup_of, or without a path, are skipped.
    """
    from curate import engine as eng
    from curate.dataset.tag import run

    s = run(manifest, model, ray=eng.options(engine, ray_address, shard_rows), batch_size=batch_size, device=device, general_threshold=general_threshold,
            character_threshold=character_threshold, use_mcut=use_mcut, workers=workers, compile=compile, draft=draft)
    for line in s.lines():
        typer.echo(line)
    if s.interrupted:
        raise typer.Exit(130)


@app.command()
def score(
    manifest: Path = typer.Argument(..., help="Manifest whose images to score (written back in place)."),
    model: str = typer.Option(..., "--model", help="Quality predictor: a local folder or a hub id holding a CLIP vision backbone and a small head (curate_score.json; see docs/judgement.md)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", callback=_range(1), help="Images per batch \\[default: 64 on cuda, 8 on cpu]."),
    device: str = typer.Option("auto", "--device", help="cpu | cuda | auto (cuda when present)."),
    min_aesthetic: Optional[float] = typer.Option(None, "--min-aesthetic", help="Leave rows scoring under this out of training: a review decision 'drop' each (by 'curate score'), which every stage obeys and a person can undo."),
    engine: str = _ENGINE,
    ray_address: Optional[str] = _RAY_ADDRESS,
    shard_rows: int = _SHARD_ROWS,
) -> None:
    """Score each image's aesthetic quality into the `aesthetic` column (float; higher is better).

    Rows with an error or without a path are skipped. Resumable: a re-run with the same
    model scores only rows without a score. Review sorts and thresholds by it; the
    report shows its histogram.
    """
    from curate import engine as eng
    from curate.dataset.score import drop_below, run

    with _bar("score", "image") as bar:
        s = run(manifest, model, batch_size=batch_size, device=device, progress=bar.update,
                ray=eng.options(engine, ray_address, shard_rows))
    if min_aesthetic is not None:
        drop_below(manifest, min_aesthetic, s)
    for line in s.lines():
        typer.echo(line)
    _show_errors(s.errors)


# --- training (issue 9) -------------------------------------------------------------


@app.command()
def train(
    config: Path = typer.Argument(..., help="Train config (TOML), e.g. configs/baxl_v3.toml; see curate.common.train_config."),
    checkpoint: Optional[Path] = typer.Argument(None, help="With --resume: the checkpoint folder to continue from.", show_default=False),
    dry_run: bool = typer.Option(False, "--dry-run", help="Resolve config and data, load no model: buckets, images per bucket, reg use per subset, steps, peak GPU memory estimate."),
    as_json: bool = typer.Option(False, "--json", help="With --dry-run: print JSON."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest checkpoint in output_dir (or from CHECKPOINT)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start over in an output_dir that holds a run (its checkpoints, metrics, logs and samples are removed)."),
) -> None:
    """Fine-tune SDXL on the config's manifests (kohya-style recipe; see docs/design.md).

    Writes output_dir/checkpoints/step-N (full state for --resume, plus the model),
    output_dir/metrics.jsonl, and at the end output_dir/diffusers/ and
    output_dir/<output_name>.safetensors (single file, ComfyUI/A1111 layout).
    Multi-GPU: accelerate launch -m curate train CONFIG.
    """
    import json

    from curate.common import train_config
    from curate.train.dryrun import dry_run as plan_run
    from curate.train.dryrun import render

    if checkpoint is not None and not resume:
        raise CurateError("a checkpoint path goes with --resume: curate train CONFIG --resume PATH")
    if as_json and not dry_run:
        raise CurateError("--json goes with --dry-run")
    cfg = train_config.load(config)  # a bad config is one line before torch is imported

    if dry_run:
        summary = plan_run(cfg)
        typer.echo(json.dumps(summary, indent=1) if as_json else "\n".join(render(summary)))
        return
    if overwrite and (resume or checkpoint):
        raise CurateError("--overwrite starts over; --resume continues: use one")
    from curate.train.loop import (
        train as run_train,  # torch, diffusers: not for a dry run
    )

    r = run_train(cfg, resume=str(checkpoint) if checkpoint else resume, progress=not quiet, log=typer.echo,
                  overwrite=overwrite)
    if not r["main_process"]:  # accelerate launch: one summary, from the main process
        return
    typer.echo(f"train: {r['steps']} optimizer steps, last loss {r['loss']:.4f}, {r['steps_per_s']:.2f} steps/s, "
               f"{100 * r['data_wait_share']:.1f}% of step time waiting for data")
    if r["val_loss"] == r["val_loss"]:  # not NaN: there is a held-out set
        typer.echo(f"  validation loss {r['val_loss']:.4f}")
    typer.echo(f"  checkpoint: {r['checkpoint']}  (continue with --resume)")
    for kind, path in r["exported"].items():
        typer.echo(f"  model ({kind}): {path}")
    typer.echo(f"  metrics: {r['metrics']}")


# --- LoRA: extract, merge (issue 24; training a LoRA is `curate train` with network = ...) ---

_MODEL_CONFIG = typer.Option(None, "--config", help="For a single-file model: a local diffusers SDXL folder with its configs and tokenizers (as pretrained_config).")
_PRECISION = typer.Option("fp16", "--precision", help="Saved weights: float, fp16 or bf16.")


@app.command("extract-lora")
def extract_lora(
    base: str = typer.Argument(..., help="The model that was fine-tuned: diffusers folder or single-file SDXL .safetensors."),
    tuned: str = typer.Argument(..., help="The fine-tune (same forms)."),
    dim: int = typer.Option(..., "--dim", callback=_range(1), help="Rank of each LoRA layer."),
    conv_dim: int = typer.Option(0, "--conv-dim", callback=_range(0), help="Rank for the 3x3 convs (0: left out, as sd-scripts' lora)."),
    out: Optional[Path] = typer.Option(None, "--out", help="LoRA file to write (default: <TUNED>-lora<dim>.safetensors beside TUNED)."),
    config: Optional[Path] = _MODEL_CONFIG,
    precision: str = _PRECISION,
) -> None:
    """A LoRA (kohya format) from a fine-tune: low-rank SVD of the weight differences (docs/lora.md).

    Prints, per block type, the share of the difference's norm the rank keeps, and warns where little is kept.
    """
    from curate.train.extract_lora import run

    path, result = run(base, tuned, dim, conv_dim, out, config, _precision(precision))
    for line in result.lines(path):
        typer.echo(line)


@app.command("merge-lora")
def merge_lora(
    base: str = typer.Argument(..., help="Checkpoint: diffusers folder or single-file SDXL .safetensors."),
    lora: Path = typer.Argument(..., help="LoRA/LyCORIS file (kohya format)."),
    out: Path = typer.Option(..., "--out", help="Single-file checkpoint to write (ComfyUI/A1111 layout)."),
    scale: float = typer.Option(1.0, "--scale", help="Multiplier of the LoRA's weight change."),
    config: Optional[Path] = _MODEL_CONFIG,
    precision: str = _PRECISION,
) -> None:
    """Bake a LoRA into a checkpoint (for sample checks and for sharing a merged model)."""
    from curate.train.merge_lora import run

    path, n = run(base, lora, out, scale, config, _precision(precision))
    typer.echo(f"merge-lora: {n} layers of {lora} x {scale:g} -> {path}")


def _precision(value: str) -> str:
    if value not in ("float", "fp16", "bf16"):
        raise CurateError(f"--precision must be float, fp16 or bf16, not {value!r}")
    return value


# --- review (issue 10) ------------------------------------------------------------------


@app.command()
def report(
    manifests: List[Path] = typer.Argument(..., help="Manifests to review (e.g. the CG set and the reg set)."),
    out: Path = typer.Option(Path("report.html"), "--out", help="HTML page to write; thumbnails go to <name>_files/ beside it."),
    config: Optional[Path] = typer.Option(None, "--config", help="Train config whose buckets to chart (default: the recipe's, 1024 px, 256-4096 step 32)."),
    title: Optional[str] = typer.Option(None, "--title", help="Page title."),
    max_per_subset: int = typer.Option(0, "--max-per-subset", callback=_range(0), help="Contact sheet images per subset (0: all; thumbnails load lazily)."),
    workers: Optional[int] = typer.Option(None, "--workers", callback=_range(1), help="Processes for thumbnails (default: all cores)."),
) -> None:
    """One HTML page to review manifests before training.

    Sections: counts per subset and failures by reason, contact sheets, duplicate
    clusters (keeper marked), crop boxes on the originals, top tags, aspect ratios and
    buckets, caption examples. Needs no network to view. Thumbnails are made once and reused by later runs.
    """
    from curate.report.html import build

    for line in build(manifests, out, title=title, config=config, max_per_subset=max_per_subset, workers=workers).lines():
        typer.echo(line)


@app.command()
def review(
    manifests: List[Path] = typer.Argument(..., help="Manifests to review (e.g. the CG set and the reg set)."),
    port: int = typer.Option(0, "--port", help="Port to serve on (default: a free one)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind. Anything but loopback shows your dataset to the network: a warning is printed."),
    no_browser: bool = typer.Option(False, "--no-browser", help="Print the URL only; do not open a browser."),
    apply: Optional[Path] = typer.Option(None, "--apply", help="Apply decisions from a JSONL file ('-': standard input; no server): all lines are checked first, nothing is applied from a file with an error."),
    export: Optional[Path] = typer.Option(None, "--export", help="Write the current decisions as JSONL ('-': standard output; no server)."),
) -> None:
    """A local web app to triage the dataset: drop/restore, pick keepers, split clusters, crop, edit captions.

    Decisions are kept beside each manifest (<manifest>.decisions.jsonl) and every stage obeys them: dedupe, crop, caption, export, train, report. The URL carries a random token; Ctrl-C stops the server.

    JSONL (--apply/--export), one object a line with "key" and "action": drop (optional "reason"), restore, keeper, split, crop ("box": left, top, right, bottom in original pixels), caption ("text"), seen.
    """
    from curate.common import decisions

    for m in manifests:
        if not m.is_file():
            raise CurateError(f"manifest not found: {m}")
    if apply is not None:
        done = decisions.apply_file(manifests, apply)
        typer.echo(f"applied {sum(done.values())} decisions from {apply}: "
                   + ", ".join(f"{m} {n}" for m, n in done.items()), err=str(export) == "-")
    if export is not None:
        n = decisions.export_file(manifests, export)
        typer.echo(f"exported {n} decisions to {'standard output' if str(export) == '-' else export}",
                   err=str(export) == "-")  # stdout holds the JSONL then
    if apply is not None or export is not None:
        return
    try:
        from curate.review.server import serve
    except ImportError as exc:
        raise CurateError(f"curate review's web app needs starlette and uvicorn ({exc}): pip install 'curate[review]'") from None
    serve(manifests, host=host, port=port, open_browser=not no_browser)
