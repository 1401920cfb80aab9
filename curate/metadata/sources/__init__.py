"""Sources of posts, by `--source` spelling (docs/design.md):

    danbooru         the live API (curate.metadata.sources.danbooru)
    hakubooru:PATH   a HakuBooru SQLite database, or a folder of its Parquet tables
    dump:PATH        API-shaped JSON / JSON lines (.gz) / Parquet, a gallery-dl folder
    store:PATH       curate's own store (curate sync)

Every source has `describe()` (no secrets), `batches()` yielding POST_SCHEMA
tables, and `skipped` (a Counter of posts left out and why).
"""

from __future__ import annotations

from curate.errors import CurateError


class StoreSource:
    def __init__(self, path: str):
        from curate.metadata.store import Store

        self.store = Store(path)
        self.skipped: dict = {}

    def describe(self) -> str:
        return f"store:{self.store.root}"

    def batches(self, batch_size: int = 50_000):
        return self.store.batches(batch_size)


def open_source(spec: str, rating_scale: str = "auto", **options):
    """`rating_scale` (auto|old|new): the scale of the source's files (sources.rating_scale);
    a store's ratings were settled when it was synced, the live site is on the new scale."""
    from curate.metadata.sources.rating_scale import check

    kind, _, arg = spec.partition(":")
    rating_scale = check(rating_scale)
    if kind in ("hakubooru", "dump", "store") and not arg:
        raise CurateError(f"--source {kind} needs a path: {kind}:PATH")
    if rating_scale == "old" and kind in ("store", "danbooru"):
        raise CurateError(f"--rating-scale old does not apply to {kind}: "
                          + ("its ratings were settled by `curate sync`" if kind == "store" else "the live site is on the new scale"))
    if kind == "dump":
        from curate.metadata.sources.dump import DumpSource

        return DumpSource(arg, rating_scale)
    if kind == "hakubooru":
        from pathlib import Path

        if Path(arg).is_dir():  # HakuBooru's export_parquet folder
            from curate.metadata.sources.hakubooru_parquet import find_tables

            found, _ = find_tables(sorted(p for p in Path(arg).rglob("*") if p.is_file()), Path(arg))
            if found is None:
                raise CurateError(f"{arg}: no HakuBooru Parquet tables (post, tag, posttagrelation) in this folder")
            found.old_scale = rating_scale == "old"
            return found
        from curate.metadata.sources.hakubooru import HakuBooruSource

        return HakuBooruSource(arg, rating_scale)
    if kind == "store":
        return StoreSource(arg)
    if kind == "danbooru":
        try:
            from curate.metadata.sources.danbooru import DanbooruSource
        except ImportError:
            raise CurateError("the live danbooru source is not available in this build") from None
        base_url = options.pop("base_url", None)
        return DanbooruSource(base_url=arg or base_url, **options)
    raise CurateError(f"unknown source {spec!r} (use danbooru, hakubooru:PATH, dump:PATH or store:PATH)")
