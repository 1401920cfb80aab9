"""`curate score --engine ray`: a real local Ray (2 CPUs) gives the scores the local engine gives."""

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402

from curate import engine  # noqa: E402
from curate.cli import app  # noqa: E402
from curate.dataset import score  # noqa: E402
from tests.dataset.test_dedupe import picture  # noqa: E402
from tests.dataset.test_score import make_model  # noqa: E402


def test_score_on_ray_matches_local(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    make_model(model)
    (tmp_path / "cg").mkdir()
    for k in range(5):
        picture(90 + k, 96, 72).save(tmp_path / "cg" / f"p{k}.png")
    local = tmp_path / "local" / "m.parquet"
    r = CliRunner().invoke(app, ["ingest", str(tmp_path / "cg"), "--out", str(local)])
    assert r.exit_code == 0, (r.output, r.exception)
    on_ray = tmp_path / "ray" / "m.parquet"
    on_ray.parent.mkdir()
    shutil.copy(local, on_ray)
    score.run(local, str(model), device="cpu")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=100 << 20)
    try:
        s = score.run(on_ray, str(model), device="cpu", ray=engine.RayOptions(shard_rows=2))
    finally:
        ray.shutdown()
    assert s.scored == 5 and "Ray actor" in s.device
    a, b = (pq.read_table(m).column("aesthetic").to_pylist() for m in (local, on_ray))
    np.testing.assert_allclose(b, a, rtol=1e-5)
    assert not (on_ray.parent / "m.parquet.work").exists()
