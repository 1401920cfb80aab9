"""Process pools for the per-image stages (ingest, dedupe, crop, report thumbnails).

`parallel_map(fn, items, workers, desc)` runs fn over items in worker processes,
in order, with a progress bar. When a worker is killed (the OOM killer, kill -9)
or the user presses Ctrl-C, it raises `PoolStopped`, a one-line CurateError that
carries every result finished so far (`UNFINISHED` for the others): the stage
writes those rows into the manifest and re-raises, so a re-run only does the rest.

Workers die with the parent: on Linux each asks the kernel for SIGKILL when the
process that started it dies (prctl PR_SET_PDEATHSIG), so a `kill -9 curate`
leaves no worker running on.

Memory: a worker holds one image at a time, at most DEFAULT_MAX_PIXELS (the
guard, 150 MP) decoded; `default_workers` runs no more workers than available
memory / WORKER_MEMORY.

Test hook: CURATE_POOL_KILL=N makes the worker given item N kill itself with
SIGKILL, as the OOM killer would.
"""

from __future__ import annotations

import os
import signal
import sys

from curate.errors import CurateError

KILL_ENV = "CURATE_POOL_KILL"
WORKER_MEMORY = 2 << 30  # bytes one worker may take at the pixel guard's limit (see docs/guide-safety.md, "Memory")
UNFINISHED = object()
_PR_SET_PDEATHSIG = 1


class PoolStopped(CurateError):
    """The pool stopped early; `results` has UNFINISHED where an item did not finish."""

    def __init__(self, message: str, results: list, exit_code: int = 2):
        super().__init__(message, exit_code)
        self.results = results
        self.finished = sum(r is not UNFINISHED for r in results)


def default_workers() -> int:
    """One per core, but no more than available memory allows at WORKER_MEMORY each."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    avail = available_memory()
    return cores if avail is None else max(1, min(cores, avail // WORKER_MEMORY))


def available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def parallel_map(fn, items: list, workers: int, desc: str) -> list:
    """fn over items in a process pool, in order, with a progress bar (see PoolStopped)."""
    from tqdm import tqdm

    if not items:
        return []
    results = [UNFINISHED] * len(items)
    bar = tqdm(total=len(items), desc=desc, unit="img", leave=False, disable=None)
    try:
        if workers <= 1 or len(items) < 4:
            for i, x in enumerate(items):
                results[i] = fn(x)
                bar.update(1)
        else:
            _pooled(fn, items, workers, results, bar, desc)
    except KeyboardInterrupt:
        raise PoolStopped(f"{desc}: interrupted; {_kept(results)}", results, 130) from None
    finally:
        bar.close()
    return results


def _pooled(fn, items, workers, results, bar, desc: str) -> None:
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    chunk = max(1, min(16, len(items) // (workers * 8)))
    pool = ProcessPoolExecutor(max_workers=workers, initializer=_worker_init, initargs=(os.getpid(),))
    try:
        pending = {pool.submit(_run_chunk, fn, items[i:i + chunk], i): i for i in range(0, len(items), chunk)}
        while pending:
            wait(pending, return_when=FIRST_COMPLETED)
            # every finished chunk is kept before a broken one is reported: under load one
            # wake-up sees many futures done, the killed worker's among them
            broken = False
            for fut in [f for f in pending if f.done()]:
                i = pending.pop(fut)
                if isinstance(fut.exception(), BrokenProcessPool):
                    broken = True
                    continue
                got = fut.result()
                results[i:i + len(got)] = got
                bar.update(len(got))
            if broken:
                raise PoolStopped(f"{desc}: a worker process was killed (out of memory? see docs/guide-safety.md "
                                  f"'Memory', or use --workers); {_kept(results)}", results)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _kept(results: list) -> str:
    done = sum(r is not UNFINISHED for r in results)
    return f"{done} of {len(results)} finished and are kept, re-run to do the rest"


def _run_chunk(fn, chunk: list, start: int) -> list:
    kill = os.environ.get(KILL_ENV)
    out = []
    for n, x in enumerate(chunk, start):
        if kill and int(kill) == n:
            os.kill(os.getpid(), signal.SIGKILL)
        out.append(fn(x))
    return out


def _worker_init(parent: int) -> None:
    """In each worker: die with the parent, and leave Ctrl-C to the parent."""
    die_with_parent(parent)


def die_with_parent(parent: int) -> None:
    """For every pool's worker initializer: SIGKILL when the parent (pid `parent`) dies,
    Ctrl-C left to the parent. Without it a kill -9'd stage leaves workers holding its files."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
