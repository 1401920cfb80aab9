"""`--engine ray`: a stage's per-shard function over a manifest's rows on Ray (shard, run, retry, merge).

The local engine is each stage's own code. With Ray the stage hands the same
per-shard function, `fn(rows: pa.Table) -> (result table, stats dict)` (one result
row per input row, a `key` column included), to `Ray.map`:

- shard: the rows are cut into slices of `shard_rows`; each slice's result file is
  named by its index and a digest of (fn's settings, the slice's data), so a result
  on disk belongs to exactly this input.
- run: one Ray task per shard (`num_cpus=1`), or with `actors=N` a pool of N actors
  that build their per-shard function once (a tagger model) and take shards as
  they free up (`num_gpus` each). The worker writes its result as Parquet into the
  work folder beside the manifest (`<manifest>.work/<stage>/`), so the cluster needs
  that folder (and the images) on a shared filesystem at the same path.
- retry: Ray retries a failed shard (`max_retries` / `max_task_retries` with
  `retry_exceptions`); a shard that still fails stops the run with one line once the
  shards in flight are done. Finished shards stay on disk (the checkpoint): a re-run,
  also after a crash of the driver, only does the shards without a result.
- merge: the driver reads the shard files in order; the stage writes the manifest
  atomically as always, then `clean` drops the work folder.

Test hook: CURATE_ENGINE_FAIL="SHARD[:TIMES]" makes the first TIMES (default 1)
attempts of shard number SHARD raise (attempts are counted in the work folder).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curate import __version__
from curate.errors import CurateError

ENGINES = ("local", "ray")
FAIL_ENV = "CURATE_ENGINE_FAIL"
STATS_KEY = b"curate-shard-stats"
INSTALL_HINT = "pip install 'curate[ray]'"


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: start a local Ray with this machine's cores
    shard_rows: int = 1000
    retries: int = 2  # extra attempts per shard


def options(engine: str, address: str | None = None, shard_rows: int = 1000) -> RayOptions | None:
    """Check the CLI's engine options: None for the local engine, else RayOptions."""
    if engine not in ENGINES:
        raise CurateError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if engine == "local":
        if address:
            raise CurateError("--ray-address needs --engine ray")
        return None
    try:
        found = importlib.util.find_spec("ray") is not None
    except ValueError:  # sys.modules["ray"] is None: import blocked
        found = False
    if not found:
        raise CurateError(f"--engine ray needs Ray, which is not installed: {INSTALL_HINT}")
    if shard_rows < 1:
        raise CurateError(f"--shard-rows must be at least 1, got {shard_rows}")
    return RayOptions(address, shard_rows)


def work_dir(manifest: str | os.PathLike, stage: str) -> Path:
    manifest = Path(manifest).resolve()
    return manifest.parent / f"{manifest.name}.work" / stage


def clean(manifest: str | os.PathLike, stage: str) -> None:
    """After the merged manifest is written: its shard results are no longer needed."""
    work = work_dir(manifest, stage)
    for d in work.parent.glob(f"{stage}*"):
        shutil.rmtree(d, ignore_errors=True)
    if work.parent.is_dir() and not any(work.parent.iterdir()):
        work.parent.rmdir()


@contextmanager
def connect(opts: RayOptions):
    """Join the cluster (or start a local Ray); a Ray started here is shut down after."""
    import ray

    from curate.pool import default_workers

    started = not ray.is_initialized()
    if started:
        address = opts.address or os.environ.get("RAY_ADDRESS")  # Ray's own variable, as `ray.init` reads it
        _check_reachable(address)
        try:
            ray.init(address=address, num_cpus=None if address else default_workers(),
                     include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise CurateError(f"cannot start or join Ray (--ray-address {address}): "
                              f"{str(exc).splitlines()[0][:160]}") from None
    try:
        yield Ray(opts)
    finally:
        if started:
            ray.shutdown()


class Ray:
    def __init__(self, opts: RayOptions):
        import ray

        self.opts = opts
        res = ray.cluster_resources()
        self.cpus, self.gpus = int(res.get("CPU", 1)), int(res.get("GPU", 0))
        gpu_nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("GPU")]
        # what a one-GPU actor may also reserve and still fit on every GPU node
        self.cpus_per_gpu = min((int(r.get("CPU", 0) // r["GPU"]) for r in gpu_nodes), default=0)
        self.slots = max(1, 2 * self.cpus)  # shard tasks in flight: keeps every core busy, memory bounded

    def map(self, fn, rows: pa.Table, work: Path, *, actors: int = 0, num_gpus: float = 0,
            num_cpus: float = 1, settings: str | None = None, desc: str = "shards") -> tuple[pa.Table, list[dict]]:
        """fn over shards of `rows` (with `actors`, fn is a factory of the per-shard function).

        `settings`: what else decides a shard's result (default: repr(fn), its arguments);
        part of each result's digest, so other settings never reuse a result.
        """
        import ray
        from tqdm import tqdm

        if rows.num_rows == 0 and not actors:  # nothing to shard: the result's columns, typed
            result, stats = fn(rows)
            return result, [stats]
        work.mkdir(parents=True, exist_ok=True)
        n = self.opts.shard_rows
        shards = [rows.slice(i, n).combine_chunks() for i in range(0, rows.num_rows, n)]
        settings = f"{__version__} {settings or repr(fn)}"
        outs = [work / f"{i:06d}-{_digest(settings, s)}.parquet" for i, s in enumerate(shards)]
        todo = [i for i, out in enumerate(outs) if not out.is_file()]
        self.reused, self.ran = len(shards) - len(todo), len(todo)
        fail = os.environ.get(FAIL_ENV)
        if actors:  # the factory goes inline (small), so a restarted actor can always rebuild
            worker = ray.remote(_Worker).options(num_cpus=num_cpus, num_gpus=num_gpus,
                                                 max_restarts=self.opts.retries, max_task_retries=self.opts.retries)
            slots = [worker.remote(fn) for _ in range(min(actors, len(todo)))]
        else:
            fn_ref = ray.put(fn)
            task = ray.remote(_run_shard).options(num_cpus=num_cpus, num_gpus=num_gpus,
                                                  max_retries=self.opts.retries, retry_exceptions=True)
            slots = [None] * self.slots
        feed, running = iter(todo), {}
        bar = tqdm(total=len(shards), initial=self.reused, desc=desc, unit="shard", disable=None, leave=False)
        try:
            while True:  # at most one shard per slot in flight
                while slots and (i := next(feed, None)) is not None:
                    slot = slots.pop()
                    args = (shards[i], str(outs[i]), i, fail)
                    ref = (slot.run.options(retry_exceptions=True).remote(*args) if slot is not None
                           else task.remote(fn_ref, *args))
                    running[ref] = (slot, i)
                if not running:
                    break
                done, _ = ray.wait(list(running), num_returns=1)
                slot, i = running.pop(done[0])
                try:
                    ray.get(done[0])
                except ray.exceptions.RayError as exc:
                    if running:  # let the shards in flight finish: their results are kept for the re-run
                        ray.wait(list(running), num_returns=len(running))
                    raise CurateError(f"{desc}: shard {i} failed after {1 + self.opts.retries} tries "
                                      f"({_first_line(exc)}); finished shards are kept in {work}, "
                                      "re-run to go on") from None
                slots.append(slot)
                bar.update(1)
        except KeyboardInterrupt:
            raise CurateError(f"interrupted; finished shards are kept in {work}, re-run to go on", 130) from None
        finally:
            bar.close()
        return _merge(shards, outs)


class _Worker:
    """An actor: builds the per-shard function once (loads a model), then runs shards."""

    def __init__(self, factory):
        self.fn = factory()

    def run(self, rows, out, shard, fail):
        return _run_shard(self.fn, rows, out, shard, fail)


def _run_shard(fn, rows: pa.Table, out: str, shard: int, fail: str | None) -> str:
    """On a worker: the stage's function over one shard, its result written atomically."""
    _injected_failure(fail, shard, out)
    result, stats = fn(rows)
    if result.num_rows != rows.num_rows:
        raise RuntimeError(f"shard {shard}: {result.num_rows} result rows for {rows.num_rows}")
    result = result.replace_schema_metadata({STATS_KEY: json.dumps(stats, default=str)})
    tmp = f"{out}.{os.getpid()}.tmp"
    pq.write_table(result, tmp)
    os.replace(tmp, out)
    return out


def _merge(shards: list[pa.Table], outs: list[Path]) -> tuple[pa.Table, list[dict]]:
    tables, stats = [], []
    for rows, out in zip(shards, outs):
        t = pq.read_table(out)
        if t.column("key") != rows.column("key"):
            raise CurateError(f"shard result {out} does not match its rows; delete it and re-run")
        stats.append(json.loads((t.schema.metadata or {}).get(STATS_KEY, b"{}")))
        tables.append(t.replace_schema_metadata(None))
    return pa.concat_tables(tables, promote_options="permissive"), stats


def _injected_failure(spec: str | None, shard: int, out: str) -> None:
    if not spec:
        return
    which, _, times = spec.partition(":")
    if int(which) != shard:
        return
    count = Path(out).with_suffix(".failures")
    n = int(count.read_text()) if count.is_file() else 0
    if n < int(times or 1):
        count.write_text(str(n + 1))
        raise RuntimeError(f"{FAIL_ENV}: injected failure of shard {shard}, attempt {n + 1}")


def _digest(settings: str, rows: pa.Table) -> str:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, rows.schema) as w:
        w.write_table(rows)
    return hashlib.sha256(settings.encode() + sink.getvalue().to_pybytes()).hexdigest()[:16]


def _check_reachable(address: str | None) -> None:
    """HOST:PORT must answer: Ray itself keeps retrying a dead address for minutes."""
    import socket

    host, _, port = (address or "").rpartition(":")
    if "://" in (address or "") or not host or not port.isdigit():
        return  # none (start one), "auto", ray://: left to Ray
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise CurateError(f"--ray-address {address}: no Ray there ({exc.strerror or exc})") from None


def _first_line(exc: Exception) -> str:
    cause = getattr(exc, "cause", None) or exc
    lines = [ln for ln in str(cause).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(cause).__name__)[:200]


def sum_stats(stats: list[dict]) -> dict:
    """Add up the shards' stats: numbers summed, dicts (reason -> count) merged, lists joined."""
    total: dict = {}
    for st in stats:
        for k, v in st.items():
            if isinstance(v, dict):
                d = total.setdefault(k, {})
                for r, c in v.items():
                    d[r] = d.get(r, 0) + c
            elif isinstance(v, list):
                total.setdefault(k, []).extend(v)
            else:
                total[k] = total.get(k, 0) + v
    return total
