"""Sources of posts, by `--source` spelling (DESIGN.md):

    danbooru         the live API (curate.metadata.sources.danbooru)
    hakubooru:PATH   a HakuBooru SQLite database
    dump:PATH        API-shaped JSON / JSON lines (.gz) / Parquet
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


def open_source(spec: str, **options):
    kind, _, arg = spec.partition(":")
    if kind in ("hakubooru", "dump", "store") and not arg:
        raise CurateError(f"--source {kind} needs a path: {kind}:PATH")
    if kind == "dump":
        from curate.metadata.sources.dump import DumpSource

        return DumpSource(arg)
    if kind == "hakubooru":
        from curate.metadata.sources.hakubooru import HakuBooruSource

        return HakuBooruSource(arg)
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
