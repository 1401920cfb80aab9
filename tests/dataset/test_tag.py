"""curate tag: tiny timm taggers of the real families, saved in the hub layout, run through the CLI.

Scores are checked against the reference recipe (SmilingWolf's wdv3-timm example:
RGB with alpha on white, pad to a white square, timm's eval transform, RGB->BGR,
sigmoid), computed here independently of curate's code.
"""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from curate import manifest as mf  # noqa: E402
from curate.cli import app  # noqa: E402
from curate.common.decode import open_image  # noqa: E402
from curate.dataset import tagger_model as tm  # noqa: E402
from curate.dataset.tag import Thresholds, mcut, pick  # noqa: E402
from tests.inproc import in_new_process as curate  # the command in a new interpreter

SIZE = 32
MEAN = STD = (0.5, 0.5, 0.5)
FAMILIES = {  # the WD v3 architectures, shrunk
    "vit": ("vit_base_patch16_224", dict(img_size=SIZE, patch_size=8, embed_dim=16, depth=1, num_heads=2,
                                         class_token=False, global_pool="avg", fc_norm=False, act_layer="gelu_tanh")),
    "convnext": ("convnext_base", dict(depths=[1, 1, 1, 1], dims=[8, 16, 32, 64])),
    "swinv2": ("swinv2_base_window8_256", dict(img_size=SIZE, window_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2])),
}
RATINGS = ["general", "sensitive", "questionable", "explicit"]


@pytest.fixture(autouse=True)
def _few_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


# --- building tiny taggers and images ---------------------------------------------------------


def small_labels() -> str:
    rows = [(9, r) for r in RATINGS] + [(0, f"tag_{i}") for i in range(40)] + [(4, f"character_{i}_(game)") for i in range(12)]
    return "tag_id,name,category,count\n" + "".join(f"{100 + i},{n},{c},{1000 - i}\n" for i, (c, n) in enumerate(rows))


def make_tagger(folder: Path, family: str, labels_csv: str, n_outputs: int | None = None, seed: int = 0):
    """Write config.json / model.safetensors / selected_tags.csv as the WD v3 repos have them."""
    arch, args = FAMILIES[family]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "selected_tags.csv").write_text(labels_csv)
    if n_outputs is None:
        n_outputs = len(tm.read_labels(folder / "selected_tags.csv"))
    model = timm.create_model(arch, pretrained=False, num_classes=n_outputs, **args).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        model.get_classifier().bias.copy_(torch.randn(n_outputs, generator=g) - 1.5)  # a few tags on, most off
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    config = {"architecture": arch, "num_classes": n_outputs, "num_features": model.num_features,
              "global_pool": "avg", "model_args": args,
              "pretrained_cfg": {"custom_load": False, "input_size": [3, SIZE, SIZE], "fixed_input_size": family == "swinv2",
                                 "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
                                 "mean": list(MEAN), "std": list(STD), "num_classes": n_outputs,
                                 "pool_size": None, "first_conv": None, "classifier": None}}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return model


def make_images(folder: Path) -> list[Path]:
    """Distinct colourful images: landscape, portrait, RGBA with transparency, a JPEG, a tiny one."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    out = []
    # the JPEG stays under twice the input size, so draft decoding leaves it alone (see test_jpeg_draft)
    for i, (w, h) in enumerate([(90, 50), (40, 120), (64, 64), (60, 50), (20, 13)]):
        yy, xx = np.mgrid[0:h, 0:w]
        a = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) % 64 * 4], -1) + rng.integers(0, 40, (h, w, 3))
        a = np.clip(a + i * 30, 0, 255).astype(np.uint8)
        if i == 2:
            alpha = np.where(xx < w // 2, 0, 200).astype(np.uint8)[..., None]
            p = folder / f"img{i}.png"
            Image.fromarray(np.concatenate([a, alpha], -1), "RGBA").save(p)
        elif i == 3:
            p = folder / f"img{i}.jpg"
            Image.fromarray(a).save(p, quality=90)
        else:
            p = folder / f"img{i}.png"
            Image.fromarray(a).save(p)
        out.append(p)
    return out


def make_manifest(path: Path, images: list[Path]) -> Path:
    rows = [{"key": f"local/{p.stem}", "path": os.path.relpath(p, path.parent)} for p in images]
    (path.parent / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows += [{"key": "local/broken", "path": "broken.jpg"},
             {"key": "local/gone", "path": "nowhere.png"},
             {"key": "local/nopath", "path": None},
             {"key": "local/failed", "path": rows[0]["path"], "error": "download: 404"},
             {"key": "local/dup", "path": rows[0]["path"], "dup_of": rows[0]["key"]}]
    rows = [{"error": None, "dup_of": None, **r} for r in rows]
    mf.write(pa.Table.from_pylist(rows), path, mf.new_provenance())
    return path


def reference_input(path: Path, size: int = SIZE, crop_pct: float = 1.0) -> "torch.Tensor":
    """SmilingWolf's wdv3-timm preprocessing, written out independently of curate."""
    from timm.data import create_transform

    img = Image.open(path)
    if img.mode not in ("RGB", "RGBA"):
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode == "RGBA":
        canvas = Image.new("RGBA", img.size, (255, 255, 255))
        canvas.alpha_composite(img)
        img = canvas.convert("RGB")
    px = max(img.size)
    square = Image.new("RGB", (px, px), (255, 255, 255))
    square.paste(img, ((px - img.width) // 2, (px - img.height) // 2))
    transform = create_transform(input_size=(3, size, size), interpolation="bicubic", crop_pct=crop_pct,
                                 crop_mode="center", mean=MEAN, std=STD)
    return transform(square).unsqueeze(0)[:, [2, 1, 0]]  # NCHW RGB -> BGR


def reference_probs(model, path: Path) -> np.ndarray:
    with torch.inference_mode():
        return torch.sigmoid(model(reference_input(path)))[0].numpy()


def tag(*args):
    result = CliRunner().invoke(app, ["tag", *map(str, args)])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.output


def rows_by_key(path: Path) -> dict:
    return {r["key"]: r for r in pq.read_table(path).to_pylist()}


def provenance(path: Path) -> dict:
    return json.loads(pq.ParquetFile(path).schema_arrow.metadata[b"curate"])


def check_against_reference(model, labels: tm.Labels, row: dict, image: Path, general=0.35, character=0.85):
    probs = reference_probs(model, image)
    got = {(e["tag"], e["category"]): e["score"] for e in row["tagger"]}
    names = labels.names
    want_general = {names[i] for i in labels.general if probs[i] > general}
    want_char = {names[i] for i in labels.index(4) if probs[i] > character}
    assert {t for t, c in got if c == "general"} == want_general
    assert {t for t, c in got if c == "character"} == want_char
    rating = labels.index(9)
    r = rating[np.argmax(probs[rating])]
    assert [(t, s) for (t, c), s in got.items() if c == "rating"] == [(names[r], pytest.approx(probs[r], abs=1e-5))]
    index = {n: i for i, n in enumerate(names)}
    for (t, _), score in got.items():
        assert score == pytest.approx(float(probs[index[t]]), abs=1e-5, rel=1e-5)
    scores = [e["score"] for e in row["tagger"] if e["category"] == "general"]
    assert scores == sorted(scores, reverse=True)
    return len(got)


# --- preprocessing ------------------------------------------------------------------------------


@pytest.mark.parametrize("crop_pct", [1.0, 0.875])
def test_preprocessing_is_the_reference_tensor(tmp_path, crop_pct):
    for p in make_images(tmp_path):
        ours = torch.from_numpy(tm.prepare(open_image(p), SIZE, "bicubic", crop_pct)).permute(2, 0, 1)[None]
        x = tm.normalize(ours, MEAN, STD)
        ref = reference_input(p, SIZE, crop_pct)
        assert x.shape == ref.shape == (1, 3, SIZE, SIZE)
        assert torch.equal(x, ref), p.name
        assert not torch.equal(ref[:, 0], ref[:, 2])  # colour images: the BGR order is really tested


def test_padding_is_white_and_centred(tmp_path):
    p = tmp_path / "strip.png"
    Image.new("RGBA", (40, 10), (0, 0, 0, 255)).save(p)
    a = tm.prepare(open_image(p), 40)
    assert a.shape == (40, 40, 3)
    assert (a[:15] == 255).all() and (a[25:] == 255).all() and (a[15:25] == 0).all()


# --- tags from scores -----------------------------------------------------------------------------


def test_thresholds_mcut_and_rating():
    labels = tm.Labels(["general", "sensitive", "questionable", "explicit", "a", "b", "c", "d", "", "x_(y)", "z"],
                       np.array([9, 9, 9, 9, 0, 0, 0, 0, -1, 4, 4]))
    p = np.array([[0.1, 0.7, 0.15, 0.05, 0.9, 0.36, 0.35, 0.2, 0.99, 0.86, 0.5]], dtype=np.float32)
    [fixed] = pick(p, labels, Thresholds(0.35, 0.85))
    assert [(e["tag"], e["category"]) for e in fixed] == [("a", "general"), ("b", "general"),
                                                          ("x_(y)", "character"), ("sensitive", "rating")]
    assert fixed[0]["score"] == pytest.approx(0.9)
    [strict] = pick(p, labels, Thresholds(0.5, 0.9))
    assert [e["tag"] for e in strict] == ["a", "sensitive"]
    # MCut: general scores .9 .36 .35 .2 -> largest gap .9|.36 -> threshold .63; characters .86|.5 -> .68
    assert mcut(np.array([0.9, 0.36, 0.35, 0.2])) == pytest.approx(0.63)
    [cut] = pick(p, labels, Thresholds(0.01, 0.99, mcut=True))
    assert [e["tag"] for e in cut] == ["a", "x_(y)", "sensitive"]
    low = np.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.1, 0.1, 0.1, 0.0, 0.12, 0.01]], dtype=np.float32)
    [floor] = pick(low, labels, Thresholds(mcut=True))  # character MCut never below 0.15
    assert [e["tag"] for e in floor] == ["a", "explicit"]


def test_labels_tolerate_a_messy_file(tmp_path):
    csv = tmp_path / "selected_tags.csv"
    csv.write_bytes("\ufefftag_id,name,category,count\r\n1,general,9,5\r\n2, 1girl ,0,4\r\n\r\n,,,\r\n"
                    "3,don't_say_\"lazy\",0,3\r\n4,hatsune_miku,4,2\r\n".encode())
    labels = tm.read_labels(csv)
    assert labels.names == ["general", "1girl", "", "don't_say_\"lazy\"", "hatsune_miku"]
    assert list(labels.categories) == [9, 0, -1, 0, 4]
    assert list(labels.general) == [1, 3]
    assert tm.fit_labels(labels, 5, "m") is labels
    assert tm.fit_labels(labels, 4, "m").names == ["general", "1girl", "don't_say_\"lazy\"", "hatsune_miku"]
    with pytest.raises(Exception, match="4 labels but the model has 7 outputs"):
        tm.fit_labels(labels, 7, "m")


# --- the command, end to end ------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["vit", "convnext", "swinv2"])
def test_scores_equal_a_direct_forward(tmp_path, family):
    model = make_tagger(tmp_path / "model", family, small_labels())
    images = make_images(tmp_path / "images")
    m = make_manifest(tmp_path / "m.parquet", images)
    out = tag(m, "--model", tmp_path / "model", "--device", "cpu", "--batch-size", 3, "--workers", "0" if family != "vit" else "1")
    assert "5 tagged" in out and "1 failed" in out and "failures by reason: decode 1" in out
    assert "1 duplicates, 1 with an error, 1 without a path, 1 files missing" in out
    rows = rows_by_key(m)
    labels = tm.read_labels(tmp_path / "model" / "selected_tags.csv")
    assert sum(check_against_reference(model, labels, rows[f"local/{p.stem}"], p) for p in images) > 5 * 3
    assert rows["local/broken"]["error"].startswith("tag: decode")
    for key in ("local/gone", "local/nopath", "local/failed", "local/dup"):
        assert rows[key]["tagger"] is None
    assert rows["local/gone"]["error"] is None and rows["local/failed"]["error"] == "download: 404"
    info = provenance(m)["stages"]["tag"]
    assert info["model"] == str((tmp_path / "model").resolve()) and info["backend"] == "timm"
    assert (info["general_threshold"], info["character_threshold"], info["mcut"], info["complete"]) == (0.35, 0.85, False, True)


@pytest.mark.parametrize("family", ["vit", "convnext"])
def test_real_wd_v3_label_list(tmp_path, shared_data, family):
    csv = (shared_data / "wd-tagger" / "selected_tags_wd-vit-tagger-v3.csv").read_text()
    model = make_tagger(tmp_path / "model", family, csv)
    labels = tm.read_labels(tmp_path / "model" / "selected_tags.csv")
    assert len(labels) == model.num_classes == 10861
    images = make_images(tmp_path / "images")[:3]
    m = make_manifest(tmp_path / "m.parquet", images)
    tag(m, "--model", tmp_path / "model", "--device", "cpu", "--workers", "0", "--character-threshold", "0.6")
    rows = rows_by_key(m)
    for p in images:
        row = rows[f"local/{p.stem}"]
        check_against_reference(model, labels, row, p, character=0.6)
        assert {e["category"] for e in row["tagger"]} == {"general", "character", "rating"}
        assert [e["tag"] for e in row["tagger"] if e["category"] == "rating"][0] in RATINGS


def test_messy_v2_label_list(tmp_path, shared_data):
    csv = shared_data / "wd-tagger" / "selected_tags_wd-v2_modified_messy.csv"
    labels = tm.read_labels(csv)
    assert len(labels) == 6914 and list(labels.categories).count(-1) == 1  # the `,,,` line keeps its slot
    assert labels.names[:4] == RATINGS and 'don\'t_say_"lazy"' in labels.names
    assert len(labels.index(4)) == 0 and len(labels.without_placeholders()) == 6913
    model = make_tagger(tmp_path / "model", "vit", csv.read_text(), n_outputs=6913)  # a list without the blank slot
    images = make_images(tmp_path / "images")[:2]
    m = make_manifest(tmp_path / "m.parquet", images)
    tag(m, "--model", tmp_path / "model", "--device", "cpu", "--workers", "0")
    dense = labels.without_placeholders()
    for p in images:
        row = rows_by_key(m)[f"local/{p.stem}"]
        check_against_reference(model, dense, row, p)
        assert all(e["tag"] for e in row["tagger"])


def test_rerun_skips_and_new_settings_retag(tmp_path):
    make_tagger(tmp_path / "model", "vit", small_labels())
    m = make_manifest(tmp_path / "m.parquet", make_images(tmp_path / "images"))
    tag(m, "--model", tmp_path / "model", "--device", "cpu", "--workers", "0")
    table, meta = mf.read(m)
    values = table.column("tagger").to_pylist()
    keys = table.column("key").to_pylist()
    marker = [{"tag": "kept_from_before", "category": "general", "score": 1.0}]
    values[keys.index("local/img0")] = marker
    values[keys.index("local/img1")] = None  # as if the run had stopped before it
    mf.write(mf.with_column(table, "tagger", values), m, meta)

    out = tag(m, "--model", tmp_path / "model", "--device", "cpu", "--workers", "0")
    assert "1 tagged" in out and "4 tagged before" in out
    rows = rows_by_key(m)
    assert rows["local/img0"]["tagger"] == marker and rows["local/img1"]["tagger"]
    out = tag(m, "--model", tmp_path / "model", "--device", "cpu")
    assert "0 tagged, 5 tagged before" in out

    out = tag(m, "--model", tmp_path / "model", "--device", "cpu", "--workers", "0", "--general-threshold", "0.5")
    assert "5 tagged" in out and "re-tagged" in out
    rows = rows_by_key(m)
    assert rows["local/img0"]["tagger"] != marker
    assert all(e["score"] > 0.5 for e in rows["local/img0"]["tagger"] if e["category"] == "general")
    assert provenance(m)["stages"]["tag"]["general_threshold"] == 0.5

    make_tagger(tmp_path / "model", "vit", small_labels(), seed=1)  # other weights, same folder
    out = tag(m, "--model", tmp_path / "model", "--device", "cpu", "--workers", "0", "--general-threshold", "0.5")
    assert "5 tagged" in out
    out = tag(m, "--model", tmp_path / "model", "--device", "cpu", "--workers", "0", "--general-threshold", "0.5", "--mcut")
    assert "5 tagged" in out and "MCut" in out
    assert provenance(m)["stages"]["tag"]["mcut"] is True


class WdOnnx(torch.nn.Module):  # the layout of the WD ONNX files: NHWC BGR 0..255 in, probabilities out
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        x = x.permute(0, 3, 1, 2) / 255.0
        return torch.sigmoid(self.net((x - 0.5) / 0.5))


def export_onnx(folder: Path, model, batch: int | None = None, nchw: bool = False) -> Path:
    """A tiny WD-layout ONNX tagger; `batch`: a fixed batch dimension (None: dynamic)."""
    pytest.importorskip("onnx")  # only to export the tiny model
    pytest.importorskip("onnxruntime")
    folder.mkdir()
    (folder / "selected_tags.csv").write_text(small_labels())
    net = model if nchw else WdOnnx(model)
    example = torch.zeros(batch or 1, *((3, SIZE, SIZE) if nchw else (SIZE, SIZE, 3)))
    torch.onnx.export(net, (example,), str(folder / "model.onnx"), dynamo=False, input_names=["input"],
                      output_names=["output"], dynamic_axes=None if batch else {"input": {0: "batch"}})
    return folder


def test_onnx_model_folder(tmp_path):
    model = make_tagger(tmp_path / "src", "vit", small_labels())
    folder = export_onnx(tmp_path / "onnx", model)
    images = make_images(tmp_path / "images")
    m = make_manifest(tmp_path / "m.parquet", images)
    out = tag(m, "--model", folder, "--device", "cpu", "--workers", "0", "--batch-size", "2")
    assert "onnx on cpu" in out and "batches of exactly" not in out
    labels = tm.read_labels(folder / "selected_tags.csv")
    for p in images:
        check_against_reference(model, labels, rows_by_key(m)[f"local/{p.stem}"], p)


# sd-scripts PR #864 (wd14 tagger --onnx): SmilingWolf/wd-v1-4-convnext-tagger-v2's model.onnx
# "can only use batch_size=1"; at curate's default batch size onnxruntime refused the batch.
# (sd-scripts' tag_images_by_wd14_tagger.py now reads the input's dim 0 and uses it likewise.)
@pytest.mark.parametrize("fixed, args", [(1, ()), (3, ("--batch-size", "8"))])
def test_onnx_fixed_batch_sets_the_batch_size(tmp_path, fixed, args):
    model = make_tagger(tmp_path / "src", "vit", small_labels(), seed=3)
    folder = export_onnx(tmp_path / "onnx", model, batch=fixed)
    assert tm.load(str(folder)).batch == fixed
    images = make_images(tmp_path / "images")  # 5 images: with 3, the last batch of 2 is padded
    m = make_manifest(tmp_path / "m.parquet", images)
    out = tag(m, "--model", folder, "--device", "cpu", "--workers", "0", *args)
    assert "5 tagged" in out and "1 failed" in out  # the broken JPEG the manifest holds
    note = f"the model takes batches of exactly {fixed}: batch size {fixed}"
    assert out.count(note) == 1 and (("not --batch-size 8" in out) == bool(args))
    labels = tm.read_labels(folder / "selected_tags.csv")
    for p in images:
        check_against_reference(model, labels, rows_by_key(m)[f"local/{p.stem}"], p)


def test_onnx_shape_that_cannot_work_is_one_line_before_decoding(tmp_path, capsys):
    model = make_tagger(tmp_path / "src", "vit", small_labels())
    folder = export_onnx(tmp_path / "onnx", model, batch=1, nchw=True)  # [1, 3, S, S]: not the WD layout
    m = make_manifest(tmp_path / "m.parquet", make_images(tmp_path / "images")[:1])
    code, err = run_main(["tag", m, "--model", folder, "--device", "cpu"], capsys)
    assert code == 2 and err.startswith("error: ") and "\n" not in err
    assert "[1, 3, 32, 32] is not the WD layout [N, S, S, 3]" in err
    assert rows_by_key(m)["local/img0"]["tagger"] is None and rows_by_key(m)["local/broken"]["error"] is None


# --- bad models: one line, exit 2 -------------------------------------------------------------------


def run_main(args, capsys):
    """The real entry point in-process: CurateError -> `error: ...` on stderr, exit 2."""
    from curate.cli import main

    argv = sys.argv
    sys.argv = ["curate", *map(str, args)]
    try:
        with pytest.raises(SystemExit) as exc:
            main()
    finally:
        sys.argv = argv
    err = capsys.readouterr().err.strip()
    return exc.value.code, err


def test_broken_model_folders(tmp_path, capsys):
    m = make_manifest(tmp_path / "m.parquet", make_images(tmp_path / "images")[:1])
    good = tmp_path / "good"
    make_tagger(good, "vit", small_labels())

    def broken(name, change):
        d = tmp_path / name
        d.mkdir()
        for f in good.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        change(d)
        return d

    cases = {
        "no_weights": (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors or model.onnx"),
        "corrupt_weights": (lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage"),
                            "model.safetensors is unreadable"),
        "bad_config": (lambda d: (d / "config.json").write_text("{not json"), "config.json"),
        "unknown_arch": (lambda d: (d / "config.json").write_text(json.dumps(
            {**json.loads((good / "config.json").read_text()), "architecture": "no_such_net"})), "no_such_net"),
        "wrong_labels": (lambda d: (d / "selected_tags.csv").write_text(small_labels() + "999,extra,0,1\n"),
                         "57 labels but the model has 56 outputs"),
        "no_labels": (lambda d: (d / "selected_tags.csv").unlink(), "no selected_tags.csv"),
    }
    for name, (change, message) in cases.items():
        code, err = run_main(["tag", m, "--model", broken(name, change), "--device", "cpu"], capsys)
        assert code == 2, name
        assert err.startswith("error: ") and "\n" not in err and message in err, (name, err)
    code, err = run_main(["tag", m, "--model", good, "--device", "cpu", "--general-threshold", "2"], capsys)
    assert code == 2 and "between 0 and 1" in err
    code, err = run_main(["tag", m, "--model", good, "--device", "tpu"], capsys)
    assert code == 2 and "--device must be cpu, cuda or auto" in err
    if not torch.cuda.is_available():
        code, err = run_main(["tag", m, "--model", good, "--device", "cuda"], capsys)
        assert code == 2 and "no CUDA device" in err
    assert rows_by_key(m)["local/img0"]["tagger"] is None  # nothing written by a failed start


def test_missing_model_and_hub_cache(tmp_path, monkeypatch):
    m = make_manifest(tmp_path / "m.parquet", make_images(tmp_path / "images")[:1])
    out = curate("tag", m, "--model", tmp_path / "no" / "such" / "folder", "--device", "cpu")
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert out.stderr.startswith("error: model folder not found") and "Traceback" not in out.stderr

    # A hub id resolves through huggingface_hub's cache; offline, nothing is fetched.
    cache = tmp_path / "hub"
    snap = cache / "models--tiny--wd-test-tagger" / "snapshots" / ("a" * 40)
    make_tagger(snap, "vit", small_labels())
    (cache / "models--tiny--wd-test-tagger" / "refs").mkdir()
    (cache / "models--tiny--wd-test-tagger" / "refs" / "main").write_text("a" * 40)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    with monkeypatch.context() as mp:  # in this process: huggingface_hub read its settings at import
        import huggingface_hub.constants as c

        for k, v in env.items():
            mp.setenv(k, v)
        mp.setattr(c, "HF_HUB_CACHE", str(cache))
        mp.setattr(c, "HF_HUB_OFFLINE", True)
        out = tag(m, "--model", "tiny/wd-test-tagger", "--device", "cpu", "--workers", "0")
    assert "1 tagged" in out and "tiny/wd-test-tagger@aaaaaaaaaa" in out
    info = provenance(m)["stages"]["tag"]
    assert (info["model"], info["revision"]) == ("tiny/wd-test-tagger", "a" * 40)

    out = curate("tag", m, "--model", "SmilingWolf/not-cached-tagger", "--device", "cpu", env=env)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr
    assert "not in the local Hugging Face cache (HF_HUB_OFFLINE is set)" in out.stderr
