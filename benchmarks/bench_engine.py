"""What `--engine ray` costs per image on one machine: hashing, local engine vs Ray.

Same JPEGs (CG-like scenes, 1920x1080 and 1200x1600, q90), same cores, same
per-shard function (`curate.dataset.dedupe.hash_rows`: sha256, draft decode, borders, phash
+ dhash + colour):
  local: one call over every row, a process pool of --workers (what `curate dedupe` runs);
  ray:   a local Ray with --workers CPUs, one task per shard of --shard-rows rows, each
         writing its Parquet result, then the driver's merge (what `--engine ray` runs).
Best of --repeat alternating runs each; Ray's start-up is timed apart (once per
run, not per image). Also the CPU cost per
image of the tagger's decode + resize to 448 px (`curate.dataset.tag.Images`), one core: with
the hash cost, the inputs of the paper estimate for 9M images in the README.

    python benchmarks/bench_engine.py [--images 768] [--workers N] [--shard-rows 128] [--repeat 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).parent))
from bench_dedupe_synth import scene  # noqa: E402

from curate import engine
from curate.dataset import dedupe  # noqa: E402

SIZES = [(1920, 1080), (1200, 1600)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=768)
    ap.add_argument("--workers", type=int, default=dedupe.default_workers())
    ap.add_argument("--shard-rows", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        names = []
        for k in range(args.images):
            w, h = SIZES[k % len(SIZES)]
            scene(k, k, w, h).save(base / f"cg{k:04d}.jpg", quality=90)
            names.append(f"cg{k:04d}.jpg")
        rows = pa.table({"key": [f"local/{n}" for n in names], "path": names,
                         "error": pa.nulls(len(names), pa.string())})
        fn = partial(dedupe.hash_rows, base=base, cached=False)
        for n in names:  # page cache warm for both
            (base / n).read_bytes()

        fn(rows.slice(0, 2))  # imports warm
        t0 = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        t_start = time.perf_counter() - t0
        t_local = t_ray = float("inf")
        try:
            with engine.connect(engine.RayOptions(shard_rows=args.shard_rows)) as cluster:
                cluster.map(fn, rows.slice(0, 2 * args.workers), base / "warm", desc="warm-up")  # workers up
                for r in range(args.repeat):  # alternating, best of each: the machine's noise spread evenly
                    t0 = time.perf_counter()
                    local, _ = dedupe.hash_rows(rows, base, False, args.workers, "local")
                    t_local = min(t_local, time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    out, _ = cluster.map(fn, rows, base / f"work{r}", desc="ray")
                    t_ray = min(t_ray, time.perf_counter() - t0)
        finally:
            ray.shutdown()
        assert out.equals(local), "the engines disagree"

        from curate.dataset.tag import Images

        ds = Images(list(enumerate(str(base / n) for n in names)), 448, "bicubic", 1.0)
        m = min(len(ds), 64)
        t0 = time.perf_counter()
        for i in range(m):
            ds[i]
        t_decode = (time.perf_counter() - t0) / m

    n = args.images
    shards = -(-n // args.shard_rows)
    print(f"{n} JPEGs ({', '.join(f'{w}x{h}' for w, h in SIZES)}, q90), {args.workers} CPUs, "
          f"ray: {shards} shards of {args.shard_rows} rows")
    print(f"{'hashing':<40}{'images/s':>10}{'ms/image':>10}{'core-ms/image':>15}")
    for name, t in (("local engine (process pool)", t_local), ("ray engine (tasks, shard files, merge)", t_ray)):
        print(f"{name:<40}{n / t:>10.1f}{1000 * t / n:>10.2f}{1000 * t * args.workers / n:>15.2f}")
    print(f"ratio ray / local: {t_ray / t_local:.2f}x the wall time "
          f"({1000 * (t_ray - t_local) / n:+.2f} ms/image, {1000 * (t_ray - t_local) / shards:+.0f} ms/shard)")
    print(f"ray start-up (once per run): {t_start:.1f} s")
    print(f"tagger decode + resize to 448 px, one core: {1000 * t_decode:.1f} ms/image")


if __name__ == "__main__":
    main()
