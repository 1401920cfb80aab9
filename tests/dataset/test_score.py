"""`curate score` (issue 27): a tiny CLIP backbone + head built here, through the CLI, equal to
a direct transformers computation; the hub path (an offline cache) takes the same code."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402

from curate.cli import app  # noqa: E402
from curate.common import embedder  # noqa: E402
from curate.errors import CurateError  # noqa: E402
from tests.dataset.test_dedupe import picture  # noqa: E402


def make_model(folder, seed=0, activation="relu"):
    """A tiny CLIP vision model with projection, its image processor, and a 2-layer head."""
    from safetensors.torch import save_file
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, projection_dim=16)
    CLIPVisionModelWithProjection(cfg).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    head = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    save_file({f"layers.{k}.{p}": t.detach().contiguous() for k in (0, 2) for p, t in head[k].named_parameters()},
              str(folder / "head.safetensors"))
    (folder / "curate_score.json").write_text(json.dumps({"head": "head.safetensors", "activation": activation}))
    return head


def direct(folder, head, images) -> np.ndarray:
    """What transformers computes, by hand: processor -> image_embeds -> L2 norm -> head."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection.from_pretrained(folder).eval()
    px = CLIPImageProcessor.from_pretrained(folder)(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        e = model(pixel_values=px).image_embeds
        return head(e / e.norm(dim=-1, keepdim=True))[:, 0].numpy()


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    d = tmp_path_factory.mktemp("score")
    model = d / "tiny-scorer"
    model.mkdir()
    head = make_model(model)
    imgs = d / "cg"
    imgs.mkdir()
    for k in range(5):
        picture(40 + k, 96 + 8 * k, 64).save(imgs / f"p{k}.png")
    (imgs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n nope")
    m = d / "m.parquet"
    assert invoke("ingest", imgs, "--out", m).exit_code == 0
    r = invoke("score", m, "--model", model, "--batch-size", "2")
    assert r.exit_code == 0, (r.output, r.exception)
    return d, model, head, m, r.stdout


def invoke(*args):
    """The command in this process (these tests are about its output, not its process)."""
    return CliRunner().invoke(app, [*map(str, args)])


def test_scores_equal_a_direct_transformers_computation(scored):
    from PIL import Image

    d, model, head, m, out = scored
    rows = [r for r in pq.read_table(m).to_pylist() if r["aesthetic"] is not None]
    assert len(rows) == 5 and "5 scored" in out
    want = direct(model, head, [Image.open(m.parent / r["path"]).convert("RGB") for r in rows])
    np.testing.assert_allclose([r["aesthetic"] for r in rows], want, rtol=1e-4, atol=1e-5)
    assert len({round(r["aesthetic"], 6) for r in rows}) == 5  # not a constant


def test_rerun_with_the_same_model_scores_nothing_new(scored):
    d, model, head, m, _ = scored
    before = pq.read_table(m).column("aesthetic").to_pylist()
    r = invoke("score", m, "--model", model)
    assert r.exit_code == 0 and " 0 scored" in r.stdout and "5 kept from an earlier run" in r.stdout
    assert pq.read_table(m).column("aesthetic").to_pylist() == before


def test_a_hub_id_loads_through_the_same_code(scored, tmp_path, monkeypatch):
    """A hub id from the (offline) Hugging Face cache: the same folder, the same scores."""
    d, model, head, m, _ = scored
    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-scorer"
    snap = repo / "snapshots" / ("0" * 40)
    shutil.copytree(model, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)

    images = [picture(50, 80, 60), picture(51, 60, 80)]
    hub = embedder.load("someone/tiny-scorer", "cpu", need_head=True)
    assert hub.folder.resolve() == snap.resolve()
    np.testing.assert_allclose(hub.score(images), direct(model, head, images), rtol=1e-4, atol=1e-5)
    with pytest.raises(CurateError, match="cannot fetch from the hub"):
        embedder.load("someone/not-there", "cpu")


def test_bad_models_are_one_line_errors(scored, tmp_path):
    d, model, head, m, _ = scored
    no_head = tmp_path / "no_head"
    shutil.copytree(model, no_head)
    (no_head / "curate_score.json").unlink()
    for bad, msg in ((tmp_path / "missing", "not a folder"), (no_head, "no quality head")):
        r = subprocess.run([sys.executable, "-m", "curate", "score", m, "--model", bad],
                           capture_output=True, text=True)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_min_aesthetic_drops_through_review_decisions(scored, tmp_path):
    """--min-aesthetic: a drop decision per low row (every stage obeys it); a person's
    restore stands; a lower threshold restores what the command dropped."""
    from curate.common import decisions

    d, model, head, m2, _ = scored
    m = tmp_path / "m.parquet"
    shutil.copy(m2, m)
    values = sorted(v for v in pq.read_table(m).column("aesthetic").to_pylist() if v is not None)
    mid = (values[1] + values[2]) / 2  # two rows under it
    run = lambda t: invoke("score", m, "--model", model, "--min-aesthetic", t)  # noqa: E731
    r = run(mid)
    assert r.exit_code == 0 and "2 rows dropped, 0 restored" in r.stdout, (r.output, r.exception)
    dropped = decisions.current(m).dropped
    assert len(dropped) == 2 and all(v.startswith("aesthetic ") for v in dropped.values())
    person = sorted(dropped)[0]
    decisions.append(m, [{"key": person, "action": "restore"}], who="alice")  # a person keeps it
    r = run(values[-1] + 1)  # everything is under this: all but alice's row dropped
    assert "3 rows dropped" in r.stdout and person not in decisions.current(m).dropped
    r = run(values[0] - 1)  # nothing is under this: the command's drops come back
    assert "0 rows dropped, 4 restored" in r.stdout and decisions.current(m).dropped == {}
