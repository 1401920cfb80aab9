"""curate.pool: real worker processes, a real SIGKILL, a real kill -9 of the parent."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from curate import pool
from curate.pool import UNFINISHED, PoolStopped


def square(x: int) -> int:
    return x * x


def test_results_in_order_in_workers_and_inline():
    items = list(range(50))
    assert pool.parallel_map(square, items, 2, "sq") == [x * x for x in items]
    assert pool.parallel_map(square, items, 1, "sq") == [x * x for x in items]
    assert pool.parallel_map(square, [], 2, "sq") == []


def test_killed_worker_is_one_line_error_with_finished_results(monkeypatch):
    monkeypatch.setenv(pool.KILL_ENV, "40")  # the worker given item 40 dies as by the OOM killer
    with pytest.raises(PoolStopped) as exc:
        pool.parallel_map(square, list(range(64)), 2, "squaring")
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith("squaring: a worker process was killed")
    assert "re-run" in msg
    res = exc.value.results
    assert res[40] is UNFINISHED
    done = [i for i, r in enumerate(res) if r is not UNFINISHED]
    assert done and all(res[i] == i * i for i in done)
    assert exc.value.finished == len(done) < 64


def test_default_workers_is_bounded_by_cores_and_memory():
    n = pool.default_workers()
    assert 1 <= n <= (os.cpu_count() or 1)
    avail = pool.available_memory()
    if avail is not None:
        assert n <= max(1, avail // pool.WORKER_MEMORY)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_workers_exit_when_the_parent_is_killed(tmp_path):
    script = ("import time\nfrom curate import pool\n"
              "pool.parallel_map(time.sleep, [60] * 8, 2, 'sleeping')\n")
    parent = subprocess.Popen([sys.executable, "-c", script], env={**os.environ},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc = psutil.Process(parent.pid)
        deadline = time.monotonic() + 60
        while len(workers := proc.children()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(workers) >= 2, "the pool never started"
        time.sleep(0.5)  # past the workers' initializer
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        gone, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, f"workers outlived their parent: {[p.pid for p in alive]}"
    finally:
        if parent.poll() is None:
            parent.kill()
