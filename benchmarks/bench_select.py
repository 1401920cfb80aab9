"""Selection speed: curate's store vs a HakuBooru-schema SQLite, same posts, one run.

Generates N posts (default 8M) with realistic tag statistics (Zipf tag
popularity, ~30-40 tags a post, 1girl ~60%, solo ~50%, heavy-tailed fav_count),
writes them as a curate store and as a HakuBooru SQLite database with its
indexes, then runs the BAXL v3 build-reg selection (queries/baxl_v3_reg.toml,
both subsets) on each and prints time, peak RSS and the ratio. Also measures sync
throughput from a JSON-lines dump and from a HakuBooru database.

    python benchmarks/bench_select.py [--posts 8000000] [--workdir bench-data] [--sync-posts 100000]

The corpus is cached in --workdir and reused by later runs with the same size.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from curate.demo.synthetic import HAKU_TYPE, HAKUBOORU_SCHEMA  # noqa: E402
from curate.metadata.query import load  # noqa: E402
from curate.metadata.select import keyed_hash  # noqa: E402
from curate.metadata.store import TagDict, store_rows, write_generation  # noqa: E402
from curate.schema import POST_SCHEMA  # noqa: E402

QUERY = ROOT / "queries" / "baxl_v3_reg.toml"
N_GENERAL, N_ARTIST, N_CHARACTER, N_COPYRIGHT = 200_000, 60_000, 20_000, 4_000
SPECIAL = {"1girl": 0.60, "solo": 0.50, "comic": 0.04, "monochrome": 0.05, "greyscale": 0.05,
           "sketch": 0.03, "4koma": 0.01, "text_focus": 0.005, "speech_bubble": 0.03,
           "english_text": 0.03, "lineart": 0.01, "highres": 0.5, "absurdres": 0.1}


# --- corpus ---------------------------------------------------------------------


def vocabulary() -> TagDict:
    tags = TagDict()
    for name in SPECIAL:
        tags.encode([name], 4 if name in ("highres", "absurdres") else 0)
    tags.encode([f"tag_{i}" for i in range(N_GENERAL)], 0)
    tags.encode([f"artist_{i}" for i in range(N_ARTIST)], 3)
    tags.encode([f"character_{i}" for i in range(N_CHARACTER)], 1)
    tags.encode([f"copyright_{i}" for i in range(N_COPYRIGHT)], 2)
    return tags


def zipf_ids(rng, n, first, size, s=1.1):
    """n draws from ids first..first+size-1 with Zipf(s) popularity."""
    cdf = np.cumsum(1.0 / np.arange(1, size + 1) ** s)
    return (first + np.searchsorted(cdf / cdf[-1], rng.random(n))).astype(np.int32)


def generate(n: int, seed: int = 0, chunk: int = 500_000):
    """(store rows table, TagDict) for n posts, built chunk by chunk to bound memory."""
    rng = np.random.default_rng(seed)
    tags = vocabulary()
    parts = [_chunk(rng, start, min(chunk, n - start), tags) for start in range(0, n, chunk)]
    return pa.concat_tables(parts), tags


def _chunk(rng, start: int, n: int, tags: TagDict) -> pa.Table:
    base = {c: tags.ids[f"{c}_0"] for c in ("tag", "artist", "character", "copyright")}
    k = rng.integers(32, 43, n)  # general draws (Zipf repeats drop ~5); + special, artist, character, copyright: ~35 tags
    parts_r = [np.repeat(np.arange(n, dtype=np.int64), k)]
    parts_t = [zipf_ids(rng, len(parts_r[0]), base["tag"], N_GENERAL)]
    girl = rng.random(n) < SPECIAL["1girl"]
    solo = girl & (rng.random(n) < SPECIAL["solo"] / SPECIAL["1girl"])
    for name, p in SPECIAL.items():
        m = {"1girl": girl, "solo": solo}.get(name)
        if m is None:
            m = rng.random(n) < p
        r = np.flatnonzero(m)
        parts_r.append(r)
        parts_t.append(np.full(len(r), tags.ids[name], np.int32))
    for cat, size in (("artist", N_ARTIST), ("character", N_CHARACTER), ("copyright", N_COPYRIGHT)):
        r = np.flatnonzero(rng.random(n) < 0.93)
        parts_r.append(r)
        parts_t.append(zipf_ids(rng, len(r), base[cat], size, 1.05))
    key = np.unique(np.concatenate(parts_r) * 400_000 + np.concatenate(parts_t))  # sorted, repeats dropped
    rows, ids = key // 400_000, (key % 400_000).astype(np.int32)

    long_side = rng.integers(600, 4000, n)
    ratio = rng.choice([0.56, 0.67, 0.75, 1.0, 1.33, 1.5, 1.78], n)
    wide = ratio >= 1
    width = np.where(wide, long_side, long_side * ratio).astype(np.int32)
    height = np.where(wide, long_side / ratio, long_side).astype(np.int32)
    hexed = _hex(rng.integers(0, 256, (n, 16), dtype=np.uint8))
    ext = pa.array(rng.choice(["jpg"] * 70 + ["png"] * 25 + ["webp", "gif", "zip", "mp4", "webm"], n))
    post_id = (start + np.arange(1, n + 1, dtype=np.int64)) * 3 // 2
    batch = pa.table({
        "post_id": pa.array(post_id), "md5": hexed, "width": pa.array(width), "height": pa.array(height),
        "rating": pa.array(rng.choice(np.array(["g", "s", "q", "e"]), n, p=[0.45, 0.35, 0.12, 0.08])),
        "fav_count": pa.array((rng.pareto(1.2, n) * 10).astype(np.int32)),
        "score": pa.array((rng.pareto(1.3, n) * 8).astype(np.int32)),
        "created_at": pa.array(1_420_070_400_000_000 + post_id * 20_000_000).cast(pa.timestamp("us", tz="UTC")),
        "updated_at": pa.nulls(n, pa.timestamp("us", tz="UTC")),
        "file_url": pc.binary_join_element_wise("https://cdn.donmai.us/original/", hexed, ".", ext, ""),
        "file_ext": ext, "file_size": pa.array((width.astype(np.int64) * height) // 3),
        "parent_id": pa.nulls(n, pa.int64()), "source": pa.nulls(n, pa.string()),
        "is_deleted": pa.array(rng.random(n) < 0.03), "is_banned": pa.array(rng.random(n) < 0.005),
        "is_pending": pa.array(np.zeros(n, bool)), "variants": pa.nulls(n, POST_SCHEMA.field("variants").type),
    })
    return store_rows(batch, rows, ids, n)


def _hex(raw: np.ndarray) -> pa.Array:
    """(n, 16) random bytes -> n md5-like hex strings, vectorized."""
    digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    out = np.empty((len(raw), 32), np.uint8)
    out[:, 0::2] = digits[raw >> 4]
    out[:, 1::2] = digits[raw & 15]
    return pa.array(out.view("S32").ravel()).cast(pa.string())


def write_sqlite(posts: pa.Table, tags: TagDict, path: Path) -> None:
    """The same posts in HakuBooru's schema, with its indexes (peewee creates them)."""
    path.unlink(missing_ok=True)
    db = sqlite3.connect(path)
    db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-2000000;")
    ddl = HAKUBOORU_SCHEMA.split(";")
    db.executescript(";".join(s for s in ddl if "INDEX" not in s or "tag_name" in s))
    cat = {0: "general", 1: "character", 2: "copyright", 3: "artist", 4: "meta"}
    db.executemany("INSERT INTO tag VALUES (?,?,?,0)",
                   ((i + 1, name, HAKU_TYPE[cat[c]]) for i, (name, c) in enumerate(zip(tags.names, tags.categories))))
    for part in posts.to_batches(max_chunksize=250_000):  # bounded memory: one slice at a time
        c = {name: part.column(name).to_pylist() for name in
             ("post_id", "md5", "width", "height", "fav_count", "score", "file_ext", "file_url", "rating", "flags")}
        db.executemany(
            f"INSERT INTO post VALUES ({','.join('?' * 26)})",
            ((c["post_id"][i], "2020-01-01T00:00:00", 0, "", c["md5"][i], None, 0, c["flags"][i] & 1, int(c["flags"][i] & 2 > 0),
              None, 0, 0, 1, 0, c["width"][i], c["height"][i], 0, c["file_ext"][i], c["rating"][i], c["score"][i], 0, 0,
              c["fav_count"][i], c["file_url"][i], None, None) for i in range(part.num_rows)))
        lists = part.column("tag_ids")
        lengths = pc.list_value_length(lists).to_numpy()
        owners = np.repeat(part.column("post_id").to_numpy(), lengths)
        db.executemany("INSERT INTO posttagrelation (post_id, tag_id) VALUES (?,?)",
                       zip(owners.tolist(), (lists.flatten().to_numpy() + 1).tolist()))
    db.commit()
    for s in ddl:
        if "INDEX" in s and "tag_name" not in s:
            db.execute(s)
    db.execute("ANALYZE")
    db.commit()
    db.close()


# --- the two selections (each run in a fresh process for a fair peak RSS) -------


def sqlite_eligible(db, s, aliases=None) -> np.ndarray:
    """HakuBooru's way: join posttagrelation, GROUP BY/HAVING for required tags."""
    exts = ",".join(f"'{e}'" for e in s.exts)
    where = [f"p.file_ext IN ({exts})"]
    if not s.include_deleted:
        where.append("p.is_deleted = 0")
    if not s.include_banned:
        where.append("p.is_banned = 0")
    if s.fav_count is not None:
        if s.fav_count.lo is not None:
            where.append(f"p.fav_count >= {s.fav_count.lo}")
        if s.fav_count.hi is not None:
            where.append(f"p.fav_count <= {s.fav_count.hi}")
    if s.rating:
        where.append(f"p.rating IN ({','.join(str('gsqe'.index(r)) for r in s.rating)})")
    if s.orientation == "horizontal":
        where.append("p.image_width > p.image_height")
    elif s.orientation == "vertical":
        where.append("p.image_height > p.image_width")
    if s.min_pixels:
        where.append(f"p.image_width * p.image_height >= {s.min_pixels}")
    q = lambda names: ",".join("'" + n.replace("'", "''") + "'" for n in names)  # noqa: E731
    if s.exclude_tags:
        where.append(f"NOT EXISTS (SELECT 1 FROM posttagrelation x JOIN tag xt ON xt.id = x.tag_id "
                     f"WHERE x.post_id = p.id AND xt.name IN ({q(s.exclude_tags)}))")
    if s.artists:
        where.append(f"EXISTS (SELECT 1 FROM posttagrelation a JOIN tag at ON at.id = a.tag_id "
                     f"WHERE a.post_id = p.id AND at.type = 1 AND at.name IN ({q(s.artists)}))")
    sql = (f"SELECT p.id FROM post p JOIN posttagrelation r ON r.post_id = p.id JOIN tag t ON t.id = r.tag_id "
           f"WHERE t.name IN ({q(s.tags)}) AND {' AND '.join(where)} "
           f"GROUP BY p.id HAVING COUNT(DISTINCT t.id) = {len(set(s.tags))}")
    return np.array([r[0] for r in db.execute(sql)], dtype=np.int64)


def run_sqlite(db_path: str) -> list[str]:
    """Eligible sets from SQL, then the same ranking rules curate applies."""
    query = load(QUERY)
    db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    taken, keys = set(), []
    for s in query.subsets:
        ids = sqlite_eligible(db, s)
        ids = ids[np.lexsort((ids, keyed_hash(query.seed, ids)))]
        per_artist, chosen = {}, []
        for pid in ids.tolist():
            if len(chosen) >= s.count:
                break
            if pid in taken:
                continue
            if s.max_per_artist is not None:
                arts = [r[0] for r in db.execute(
                    "SELECT t.name FROM posttagrelation r JOIN tag t ON t.id = r.tag_id WHERE r.post_id = ? AND t.type = 1", (pid,))]
                if any(per_artist.get(a, 0) >= s.max_per_artist for a in arts):
                    continue
                for a in arts:
                    per_artist[a] = per_artist.get(a, 0) + 1
            chosen.append(pid)
            taken.add(pid)
        keys += [f"danbooru/{i}" for i in chosen]
    return keys


def run_curate(store_path: str) -> list[str]:
    from curate.metadata.select import select
    from curate.metadata.sources import open_source

    return select(load(QUERY), open_source(f"store:{store_path}")).table.column("key").to_pylist()


CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
from benchmarks.bench_select import run_curate, run_sqlite
fn = {{"curate": run_curate, "sqlite": run_sqlite}}[sys.argv[1]]
times = []
for _ in range(int(sys.argv[3])):
    t = time.perf_counter(); keys = fn(sys.argv[2]); times.append(time.perf_counter() - t)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent.
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({{"times": times, "rss_mb": int(hwm) / 1024, "keys": keys}}))
"""


def measure(kind: str, path: Path, repeats: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT)), kind, str(path), str(repeats)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


# --- sync throughput ------------------------------------------------------------


def bench_sync(work: Path, n: int) -> dict:
    from curate.demo.synthetic import make_posts, write_hakubooru_db
    from curate.metadata.sources import open_source
    from curate.metadata.sync import sync

    dump, db = work / f"sync_{n}.jsonl", work / f"sync_{n}.db"
    if not dump.exists() or not db.exists():
        posts = make_posts(n, seed=1)
        dump.write_text("\n".join(json.dumps(p) for p in posts) + "\n")
        db.unlink(missing_ok=True)
        write_hakubooru_db(posts, db)
        del posts
    out = {}
    for name, spec in (("jsonl", f"dump:{dump}"), ("hakubooru", f"hakubooru:{db}")):
        target = work / f"sync_store_{name}"
        import shutil

        shutil.rmtree(target, ignore_errors=True)
        t = time.perf_counter()
        sync(open_source(spec), target)
        out[name] = n / (time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--posts", type=int, default=8_000_000)
    ap.add_argument("--sync-posts", type=int, default=100_000)
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench-data")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    store, db = work / f"store_{args.posts}", work / f"haku_{args.posts}.db"
    if not (store / "CURRENT").exists() or not db.exists():
        t = time.perf_counter()
        posts, tags = generate(args.posts)
        print(f"generated {args.posts:,} posts, {len(posts.column('tag_ids').combine_chunks().values):,} tags "
              f"in {time.perf_counter() - t:.0f}s", flush=True)
        t = time.perf_counter()
        write_generation(store, posts, tags, {}, [{"source": "bench"}])
        print(f"wrote curate store in {time.perf_counter() - t:.0f}s", flush=True)
        t = time.perf_counter()
        write_sqlite(posts, tags, db)
        print(f"wrote HakuBooru SQLite in {time.perf_counter() - t:.0f}s", flush=True)
        del posts, tags

    cur = measure("curate", store, args.repeats)
    base = measure("sqlite", db, 1)
    same = cur["keys"] == base["keys"]
    c, b = min(cur["times"]), min(base["times"])
    print(f"\nBAXL v3 build-reg selection on {args.posts:,} posts ({len(cur['keys'])} rows selected, same rows: {same})")
    print(f"  {'':<28} {'curate store':>14} {'HakuBooru SQLite':>18}")
    print(f"  {'query time (best of runs)':<28} {c:>13.3f}s {b:>17.3f}s   ratio {b / c:.1f}x")
    print(f"  {'query time (first run)':<28} {cur['times'][0]:>13.3f}s")
    print(f"  {'peak RSS':<28} {cur['rss_mb']:>12.0f}MB {base['rss_mb']:>16.0f}MB")
    if args.sync_posts:
        rates = bench_sync(work, args.sync_posts)
        print(f"\nsync throughput ({args.sync_posts:,} posts): JSON lines {rates['jsonl']:,.0f} posts/s, "
              f"HakuBooru SQLite {rates['hakubooru']:,.0f} posts/s")


if __name__ == "__main__":
    main()
