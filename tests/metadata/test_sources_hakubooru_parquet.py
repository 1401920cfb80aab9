"""HakuBooru's database as Parquet, written the way its export_parquet notebook does
(KohakuBlueleaf/HakuBooru export_parquet.ipynb: `pd.read_sql_query("SELECT * FROM t",
conn).to_parquet("t.parquet")` for every table), read like the SQLite file."""

import sqlite3

import pandas as pd
import pyarrow as pa
import pytest

from curate.demo.synthetic import make_posts, write_hakubooru_db
from curate.errors import CurateError
from curate.metadata.sources import open_source
from tests.metadata.test_sources_hakubooru import CORE


def export_parquet(db, folder):
    """The notebook's loop, verbatim in spirit: every table, SELECT *, pandas to_parquet."""
    folder.mkdir(exist_ok=True)
    conn = sqlite3.connect(db)
    for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall():
        pd.read_sql_query(f"SELECT * FROM {name}", conn).to_parquet(folder / f"{name}.parquet")
    conn.close()
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("haku")
    posts = make_posts(700, seed=21)
    db = write_hakubooru_db(posts, tmp / "danbooru2023.db")
    return db, export_parquet(db, tmp / "data")


def table(spec, **kw):
    return pa.concat_tables(list(open_source(spec).batches(**kw)))


def test_parquet_tables_read_as_the_sqlite_file(exported):
    db, folder = exported
    sqlite_rows = table(f"hakubooru:{db}").select(CORE).to_pylist()
    assert table(f"hakubooru:{folder}", batch_size=90).select(CORE).to_pylist() == sqlite_rows
    # dump: on the same folder finds the tables by their columns
    assert table(f"dump:{folder}").select(CORE).to_pylist() == sqlite_rows
    assert {r["rating"] for r in sqlite_rows} == {"g", "s", "q", "e"}
    assert all(r["tags_general"] for r in sqlite_rows)


def test_tables_found_by_columns_not_names(exported, tmp_path):
    _, folder = exported
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for src, dst in (("post", "a"), ("tag", "b"), ("posttagrelation", "c")):
        (renamed / f"{dst}.parquet").write_bytes((folder / f"{src}.parquet").read_bytes())
    assert table(f"dump:{renamed}").num_rows == 700


def test_a_lone_post_table_is_a_one_line_error(exported, tmp_path):
    _, folder = exported
    lone = tmp_path / "post.parquet"
    lone.write_bytes((folder / "post.parquet").read_bytes())
    for spec in (f"dump:{lone}", f"dump:{tmp_path}"):
        with pytest.raises(CurateError, match="missing: tag, posttagrelation") as e:
            open_source(spec)
        assert "\n" not in str(e.value)


def test_sync_of_a_lone_post_table_stores_nothing(exported, tmp_path):
    import subprocess
    import sys

    _, folder = exported
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "post.parquet").write_bytes((folder / "post.parquet").read_bytes())
    r = subprocess.run([sys.executable, "-m", "curate", "sync", f"dump:{tmp_path / 'only'}", "--store", str(tmp_path / "s")],
                       capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1
    assert "missing: tag, posttagrelation" in r.stderr and not (tmp_path / "s" / "CURRENT").exists()
    # the whole set syncs, tags and ratings included
    r = subprocess.run([sys.executable, "-m", "curate", "sync", f"hakubooru:{folder}", "--store", str(tmp_path / "s")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "700 new" in r.stdout
