"""HakuBooru's Parquet tables (DuckDB) against its SQLite file (the baseline), same posts,
same run: posts/s of each and the ratio. `python benchmarks/bench_hakubooru_parquet.py [N]`"""

import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from curate.demo.synthetic import make_posts, write_hakubooru_db
from curate.metadata.sources import open_source


def main(n: int = 100_000) -> None:
    d = Path(tempfile.mkdtemp())
    db = write_hakubooru_db(make_posts(n, seed=1), d / "danbooru2023.db")
    (d / "data").mkdir()
    conn = sqlite3.connect(db)  # as HakuBooru's export_parquet notebook does
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall():
        pd.read_sql_query(f"SELECT * FROM {name}", conn).to_parquet(d / "data" / f"{name}.parquet")
    conn.close()
    rates = {}
    for label, spec in (("sqlite (baseline)", f"hakubooru:{db}"), ("parquet", f"hakubooru:{d / 'data'}")):
        t = time.perf_counter()
        rows = sum(b.num_rows for b in open_source(spec).batches())
        rates[label] = rows / (time.perf_counter() - t)
        print(f"{label:<18} {rows} posts  {rates[label]:>9.0f} posts/s")
    print(f"parquet / sqlite: {rates['parquet'] / rates['sqlite (baseline)']:.2f}x")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
