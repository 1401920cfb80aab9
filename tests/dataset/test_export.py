"""curate export --kohya: the TOML parsed back and checked against sd-scripts'
documented dataset-config schema; every referenced image exists with its caption."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from curate import manifest
from curate.cli import app
from curate.errors import CurateError
from tests.dataset.test_caption import (
    CURATE,
    HOSTILE,
    load_posts,
    post_row,
    write_manifest,
)

# sd-scripts docs/config_README: which key may appear where, and its type.
NUMBER = (int, float)
DATASET_ASCENDABLE = {
    "batch_size": int, "bucket_no_upscale": bool, "bucket_reso_steps": int, "enable_bucket": bool,
    "max_bucket_reso": int, "min_bucket_reso": int, "resolution": (int, list),
}
SUBSET_ASCENDABLE = {
    "color_aug": bool, "face_crop_aug_range": list, "flip_aug": bool, "num_repeats": int,
    "random_crop": bool, "shuffle_caption": bool, "keep_tokens": int, "keep_tokens_separator": str,
    "secondary_separator": str, "caption_separator": str, "enable_wildcard": bool,
    "caption_prefix": str, "caption_suffix": str, "resize_interpolation": str,
    "caption_dropout_every_n_epochs": int, "caption_dropout_rate": NUMBER,
    "caption_tag_dropout_rate": NUMBER,
    "caption_extension": str, "class_tokens": str, "cache_info": bool,  # DreamBooth
}
SUBSET_ONLY = {"image_dir": str, "is_reg": bool}
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


def check_sd_scripts_schema(config: dict) -> None:
    assert set(config) <= {"general", "datasets"}
    allowed_up = {**DATASET_ASCENDABLE, **SUBSET_ASCENDABLE}
    for key, value in config.get("general", {}).items():
        assert key in allowed_up and isinstance(value, allowed_up[key]), key
    for dataset in config["datasets"]:
        for key, value in dataset.items():
            if key != "subsets":
                assert key in allowed_up and isinstance(value, allowed_up[key]), key
        assert dataset["subsets"], "a dataset needs subsets"
        for subset in dataset["subsets"]:
            allowed = {**SUBSET_ASCENDABLE, **SUBSET_ONLY}
            for key, value in subset.items():
                assert key in allowed, f"{key} may not appear in [[datasets.subsets]]"
                assert isinstance(value, allowed[key]) and not (
                    isinstance(value, bool) and allowed[key] in (int, NUMBER)), key
            assert "image_dir" in subset and "metadata_file" not in subset
        res = dataset.get("resolution", 0)
        assert isinstance(res, int) or (len(res) == 2 and all(isinstance(r, int) for r in res))
        step = dataset.get("bucket_reso_steps", 64)
        assert dataset.get("min_bucket_reso", 256) % step == 0
        assert dataset.get("max_bucket_reso", 1024) % step == 0


def check_layout(config: dict, manifests: list[Path]) -> int:
    """Every image sd-scripts will glob has its caption; every exported row is there."""
    ext = config["general"]["caption_extension"]
    expected = {}
    for m in manifests:
        for row in manifest.read(m)[0].to_pylist():
            if row["caption"] and not row["error"] and not row["dup_of"]:
                expected[row["key"]] = row["caption"]
    found = 0
    for subset in config["datasets"][0]["subsets"]:
        folder = Path(subset["image_dir"])
        assert folder.is_absolute() and folder.is_dir()
        images = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS]
        assert images and not [p for p in folder.iterdir() if p.is_dir()]
        for image in images:
            assert image.resolve().is_file()  # the link resolves to a real image
            caption = image.with_suffix(ext).read_text(encoding="utf-8")
            stem = image.stem.split("_", 1)[1] if subset.get("is_reg") else image.stem  # rank prefix
            key = stem.replace("_", "/", 1)
            assert caption == expected[key] and len(caption.splitlines()) == 1
            found += 1
    assert found == len(expected)
    return found


@pytest.fixture
def project(shared_data, tmp_path, monkeypatch):
    """A training manifest and a reg manifest, captioned through the CLI."""
    monkeypatch.chdir(tmp_path)
    booru = load_posts(shared_data, "booru-rs_posts_2023-03.json")
    feed = load_posts(shared_data, "rust-any2feed_posts_2023-03_limit100.json")
    train_rows = [post_row(p, "official cg", path=f"cg/{p['id']}.png") for p in list(booru.values())[:6]]
    train_rows[0]["tags_general"] = train_rows[0]["tags_general"] + HOSTILE
    train_rows[5]["dup_of"] = train_rows[4]["key"]
    train = write_manifest(tmp_path / "manifests" / "official_cg.parquet", train_rows,
                           manifest.new_provenance(kind="ingest"))
    posts = list(feed.values())
    reg_rows = ([post_row(p, "horizontal", path=f"reg/h/{p['id']}.png") for p in posts[:5]]
                + [post_row(p, "vertical", path=f"reg/v/{p['id']}.png") for p in posts[5:9]])
    reg_rows[1]["error"] = "download: HTTP 404"
    query = '[caption]\nkeep_separator = "|||"\nreg_caption = "class+tags"\n'
    reg = write_manifest(tmp_path / "manifests" / "baxl_v3_reg.parquet", reg_rows,
                         manifest.new_provenance(kind="reg", class_token="solo", query_text=query))
    for m in (train, reg):
        result = CliRunner().invoke(app, ["caption", str(m)])
        assert result.exit_code == 0, result.output
    return tmp_path, train, reg


TRAIN_TOML = """
pretrained = "models/kohaku-xl-delta.safetensors"
output_dir = "runs/baxl_v3"
resolution = 1024
min_bucket_reso = 256
max_bucket_reso = 4096
bucket_reso_steps = 32
train_batch_size = 2
gradient_accumulation_steps = 32
learning_rate = 7.5e-6
lr_scheduler = "constant_with_warmup"
optimizer_type = "Lion8bit"
optimizer_args = { weight_decay = 0.1, betas = [0.9, 0.95] }
mixed_precision = "fp16"

[[datasets]]
manifest = "manifests/official_cg.parquet"
num_repeats = 3
shuffle_caption = true
keep_tokens = 1
caption_tag_dropout_rate = 0.1
flip_aug = true

[[datasets]]
manifest = "manifests/baxl_v3_reg.parquet"
is_reg = true
"""


def test_export_with_train_config(project):
    root, train, reg = project
    (root / "configs").mkdir()
    (root / "configs" / "baxl_v3.toml").write_text(TRAIN_TOML)
    result = CliRunner().invoke(app, ["export", "--kohya", "out", "--config", "configs/baxl_v3.toml"])
    assert result.exit_code == 0, result.output
    assert "exported 13 images in 2 subsets" in result.output
    assert "skipped 1: duplicate" in result.output and "skipped 1: error set" in result.output
    # 5 CGs x 3 repeats = 15 training samples: sd-scripts uses all 8 reg images
    assert "against 15 training samples): horizontal 4/4, vertical 4/4" in result.output
    config = tomllib.loads((root / "out" / "dataset_config.toml").read_text())
    check_sd_scripts_schema(config)
    assert check_layout(config, [train, reg]) == 13
    assert config["general"] == {"caption_extension": ".txt"}
    (dataset,) = config["datasets"]
    assert {k: dataset[k] for k in ("resolution", "batch_size", "min_bucket_reso",
                                    "max_bucket_reso", "bucket_reso_steps")} == {
        "resolution": 1024, "batch_size": 2, "min_bucket_reso": 256,
        "max_bucket_reso": 4096, "bucket_reso_steps": 32}
    cg, reg_subset = dataset["subsets"]  # the reg manifest's two subsets share one interleaved folder
    assert cg["image_dir"].endswith("official_cg/official_cg") and reg_subset["image_dir"].endswith("baxl_v3_reg/reg")
    assert (cg["num_repeats"], cg["keep_tokens"], cg["flip_aug"], cg["shuffle_caption"]) == (3, 1, True, True)
    assert cg["caption_tag_dropout_rate"] == 0.1 and "is_reg" not in cg
    assert reg_subset["is_reg"] is True and reg_subset["class_tokens"] == "solo"
    assert reg_subset["keep_tokens_separator"] == "|||"


def test_export_defaults_without_config_and_metadata_json(project):
    root, train, reg = project
    result = CliRunner().invoke(app, ["export", str(train), str(reg), "--kohya", str(root / "k")])
    assert result.exit_code == 0, result.output
    config = tomllib.loads((root / "k" / "dataset_config.toml").read_text())
    check_sd_scripts_schema(config)
    check_layout(config, [train, reg])
    cg, reg_subset = config["datasets"][0]["subsets"]
    assert (cg["shuffle_caption"], cg["caption_tag_dropout_rate"], cg["num_repeats"]) == (True, 0.1, 1)
    assert reg_subset["is_reg"] and reg_subset["class_tokens"] == "solo"
    metadata = json.loads((root / "k" / "metadata.json").read_text(encoding="utf-8"))
    assert len(metadata) == 5  # the training rows: sd-scripts' fine-tune route has no reg images
    for image, entry in metadata.items():
        assert Path(image).is_absolute() and Path(image).resolve().is_file()
        assert entry == {"caption": Path(image).with_suffix(".txt").read_text(encoding="utf-8"), "tags": ""}
    hostile = next(e["caption"] for e in metadata.values() if "初音ミク" in e["caption"])
    assert "\n" not in hostile and "a b" in hostile.split(", ")


def test_reexport_replaces_only_what_it_wrote(project):
    root, train, reg = project
    runner = CliRunner()
    assert runner.invoke(app, ["export", str(train), str(reg), "--kohya", "out"]).exit_code == 0
    (root / "out" / "notes.md").write_text("mine")
    # the train manifest loses a row: its exported files must go
    table, meta = manifest.read(train)
    errors = table.column("error").to_pylist()
    errors[1] = "rejected by hand"
    manifest.write(manifest.with_column(table, "error", errors), train, meta)
    result = runner.invoke(app, ["export", str(train), str(reg), "--kohya", "out", "--link", "copy"])
    assert result.exit_code == 0, result.output
    assert "removed 2 files" in result.output
    config = tomllib.loads((root / "out" / "dataset_config.toml").read_text())
    assert check_layout(config, [train, reg]) == 12
    assert (root / "out" / "notes.md").read_text() == "mine"
    copied = next(Path(config["datasets"][0]["subsets"][0]["image_dir"]).glob("*.png"))
    assert not copied.is_symlink()


def test_refuses_a_folder_it_did_not_write(project):
    root, train, _ = project
    (root / "theirs").mkdir()
    (root / "theirs" / "x.png").write_bytes(b"keep me")
    proc = subprocess.run([CURATE, "export", str(train), "--kohya", "theirs"], capture_output=True, text=True)
    assert proc.returncode == 2 and "not written by curate export" in proc.stderr
    assert "Traceback" not in proc.stderr and (root / "theirs" / "x.png").read_bytes() == b"keep me"


def test_an_unwritable_out_folder_is_a_one_line_error(project):
    """A file where the folder should go (a typo, a full disk): one line, exit 2, and the
    re-run after the fix still knows which files are curate's."""
    root, train, _ = project
    (root / "file").write_text("not a folder")
    proc = subprocess.run([CURATE, "export", str(train), "--kohya", "file/out"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: cannot write the export folder") and proc.stderr.count("\n") == 1
    assert CliRunner().invoke(app, ["export", str(train), "--kohya", "out"]).exit_code == 0  # in process
    (subset_dir,) = [p for p in (root / "out").iterdir() if p.is_dir()]
    shutil.rmtree(subset_dir)
    subset_dir.write_text("in the way")  # the next export cannot make its folder
    proc = subprocess.run([CURATE, "export", str(train), "--kohya", "out"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert f"export to {root / 'out'} stopped" in proc.stderr
    subset_dir.unlink()
    assert CliRunner().invoke(app, ["export", str(train), "--kohya", "out"]).exit_code == 0  # in process


@pytest.mark.parametrize("extra, message", [
    ('[[datasets]]\nmanifest = "manifests/official_cg.parquet"\nnum_repeat = 2\n', "unknown key 'num_repeat'"),
    ('[[datasets]]\nmanifest = "manifests/official_cg.parquet"\nresolution = 512\n', "top-level key"),
    ('[[datasets]]\nmanifest = "manifests/official_cg.parquet"\nnum_repeats = "2"\n', "num_repeats: unexpected value"),
    ('bucket_reso_steps = 64\nmin_bucket_reso = 96\n', "divisible by bucket_reso_steps"),
    ('[[datasets]]\nnum_repeats = 2\n', "needs manifest"),
    ('max_bucket_res = 2048\n', "unknown key 'max_bucket_res'"),  # curate train refuses it too
    ('[[datasets]]\nmanifest = "manifests/official_cg.parquet"\nnum_repeats = 0\n', "num_repeats must be >= 1"),
])
def test_bad_train_config_is_a_curate_error(project, extra, message):
    root, train, _ = project
    (root / "t.toml").write_text(extra)
    result = CliRunner().invoke(app, ["export", str(train), "--kohya", "out", "--config", "t.toml"])
    assert isinstance(result.exception, CurateError) and message in str(result.exception)
    assert "\n" not in str(result.exception) and not (root / "out").exists()


def test_uncaptioned_manifest_is_an_error(shared_data, tmp_path):
    booru = load_posts(shared_data, "booru-rs_posts_2023-03.json")
    m = write_manifest(tmp_path / "m.parquet", [post_row(booru[6148686], path="i/a.png")])
    result = CliRunner().invoke(app, ["export", str(m), "--kohya", str(tmp_path / "out")])
    assert "run curate caption first" in str(result.exception)


def test_formats_sd_scripts_cannot_read_are_converted(shared_data, tmp_path):
    booru = load_posts(shared_data, "booru-rs_posts_2023-03.json")
    rows = [post_row(booru[6148686], path="i/a.gif"), post_row(booru[6148687], path="i/b.JPG")]
    m = write_manifest(tmp_path / "m.parquet", rows)
    assert CliRunner().invoke(app, ["caption", str(m)]).exit_code == 0
    result = CliRunner().invoke(app, ["export", str(m), "--kohya", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "exported 2 images" in result.output and "normalized 1 " in result.output
    assert "gif converted to png 1" in result.output
    config = tomllib.loads((tmp_path / "out" / "dataset_config.toml").read_text())
    check_sd_scripts_schema(config)
    folder = Path(config["datasets"][0]["subsets"][0]["image_dir"])
    assert sorted(p.name for p in folder.iterdir() if p.suffix != ".txt") == [
        "danbooru_6148686.png", "danbooru_6148687.jpg"]
    assert (folder / "danbooru_6148687.jpg").is_symlink() and not (folder / "danbooru_6148686.png").is_symlink()


def test_a_failed_export_can_be_run_again(project, monkeypatch):
    root, train, reg = project
    real_link, calls = os.link, []

    def flaky_link(source, target):  # the 4th hard link crosses a device
        calls.append(target)
        if len(calls) > 3:
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        real_link(source, target)

    monkeypatch.setattr(os, "link", flaky_link)
    result = CliRunner().invoke(app, ["export", str(train), str(reg), "--kohya", "out", "--link", "hardlink"])
    assert isinstance(result.exception, CurateError) and "try --link copy" in str(result.exception)
    result = CliRunner().invoke(app, ["export", str(train), str(reg), "--kohya", "out", "--link", "copy"])
    assert result.exit_code == 0, result.output
    config = tomllib.loads((root / "out" / "dataset_config.toml").read_text())
    assert check_layout(config, [train, reg]) == 13


def test_tampered_marker_never_deletes_outside_the_folder(project):
    root, train, reg = project
    runner = CliRunner()
    assert runner.invoke(app, ["export", str(train), str(reg), "--kohya", "out"]).exit_code == 0
    victim = root / "victim.txt"
    victim.write_text("keep me")
    marker = root / "out" / ".curate-export.json"
    record = json.loads(marker.read_text())
    record["files"] += ["../victim.txt", str(victim)]
    marker.write_text(json.dumps(record))
    assert runner.invoke(app, ["export", str(train), str(reg), "--kohya", "out"]).exit_code == 0
    assert victim.read_text() == "keep me"


def test_a_killed_first_export_is_cleaned_up_by_the_rerun(project):
    """kill -9 in the middle of a first export (a real SIGKILL at the 4th file): the re-run
    accepts the folder as curate's, finishes it and removes what the killed run left over."""
    root, train, reg = project
    script = (
        "import os, signal, sys\n"
        "from curate.dataset import export\n"
        "real, n = os.link, []\n"
        "def link(a, b):\n"
        "    n.append(b)\n"
        "    if len(n) > 3:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real(a, b)\n"
        "os.link = link\n"
        "export.run(sys.argv[1:3], 'out', link='hardlink')\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(train), str(reg)], capture_output=True, text=True,
                          cwd=root)
    assert proc.returncode == -signal.SIGKILL
    left = [p for p in (root / "out").rglob("*") if p.is_file()]
    assert len(left) > 1  # the claim and the files linked before the kill
    stray = root / "out" / "official_cg" / "gone.png"  # a file of the killed run the re-run will not write
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"half")
    with open(root / "out" / ".curate-export.journal", "a") as f:  # as the killed run noted it
        f.write(json.dumps("official_cg/gone.png") + "\n")
    mine = root / "out" / "official_cg" / "mine.png"  # the user's, added in between: never curate's
    mine.write_bytes(b"keep me")
    result = CliRunner().invoke(app, ["export", str(train), str(reg), "--kohya", "out", "--link", "copy"])
    assert result.exit_code == 0, result.output
    assert not stray.exists() and mine.read_bytes() == b"keep me"
    config = tomllib.loads((root / "out" / "dataset_config.toml").read_text())
    assert check_layout(config, [train, reg]) == 13


# --- reg layout: what sd-scripts' own rule makes of it -------------------------------------


def small_manifest(path: Path, subsets: dict[str, int], kind: str, seed: int = 1) -> Path:
    """Real PNGs and captions: {subset: count}; reg manifests carry a class token and a seed."""
    import pyarrow as pa
    from PIL import Image

    rows = []
    for subset, n in subsets.items():
        for i in range(n):
            rel = f"img/{path.stem}-{subset}-{i:03d}.png"
            (path.parent / "img").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (48, 32) if subset != "vertical" else (32, 48), (i, 2 * i, 100)).save(path.parent / rel)
            rows.append({"key": f"danbooru/{seed * 10000 + len(rows)}", "subset": subset, "path": rel,
                         "caption": f"solo, tag{i}"})
    meta = manifest.new_provenance(kind=kind, class_token="solo", seed=seed)
    return manifest.write(pa.Table.from_pylist(rows), path, meta)


def sd_scripts_reg_use(config: dict, manifests: list[Path]) -> Counter:
    """sd-scripts' DreamBoothDataset on the written config: reg images in subset order, then
    file-name order, registered until they match the training images (with repeats)."""
    import glob

    subset_of = {r["key"]: r["subset"] for m in manifests for r in manifest.read(m)[0].to_pylist()}
    n_train, reg = 0, []
    for subset in config["datasets"][0]["subsets"]:
        paths = sorted({p for ext in IMAGE_EXTS for p in glob.glob(os.path.join(subset["image_dir"], "*" + ext))})
        if subset.get("is_reg"):
            reg += [(p, subset.get("num_repeats", 1)) for p in paths]
        else:
            n_train += len(paths) * subset.get("num_repeats", 1)
    used, n, first = Counter(), 0, True
    while reg and n < n_train:
        for path, repeats in reg:
            if first:
                used[path] += 1
            n += repeats if first else 1
            if n >= n_train:
                break
        first = False
    key = lambda p: Path(p).stem.split("_", 1)[1].replace("_", "/", 1)  # noqa: E731  (rank prefix)
    return Counter(subset_of[key(p)] for p in used)


def test_sd_scripts_takes_a_proportional_choice_of_every_reg_subset(tmp_path):
    train = small_manifest(tmp_path / "cg.parquet", {"cg": 10}, "ingest")
    reg = small_manifest(tmp_path / "reg.parquet", {"horizontal": 40, "vertical": 10}, "reg", seed=7)
    summary = run_export([train, reg], tmp_path / "out")
    config = tomllib.loads((tmp_path / "out" / "dataset_config.toml").read_text())
    check_sd_scripts_schema(config)
    assert sd_scripts_reg_use(config, [train, reg]) == {"horizontal": 8, "vertical": 2}  # 40:10 of 10
    assert summary.reg_use == {"horizontal": [8, 40], "vertical": [2, 10]}
    assert "against 10 training samples): horizontal 8/40, vertical 2/10" in "\n".join(summary.lines())
    # a seeded choice: the same layout again, and not simply the first rows of each subset
    names = sorted(p.name for p in Path(config["datasets"][0]["subsets"][1]["image_dir"]).glob("*.png"))
    again = run_export([train, reg], tmp_path / "out")
    assert names == sorted(p.name for p in Path(config["datasets"][0]["subsets"][1]["image_dir"]).glob("*.png"))
    assert again.reg_use == summary.reg_use and names[0].split("_", 1)[1] != "danbooru_70000.png"


def test_an_unused_reg_subset_gets_a_num_repeats_suggestion(tmp_path):
    train = small_manifest(tmp_path / "cg.parquet", {"cg": 10}, "ingest")
    first = small_manifest(tmp_path / "a.parquet", {"horizontal": 40}, "reg", seed=2)
    second = small_manifest(tmp_path / "b.parquet", {"vertical": 10}, "reg", seed=3)
    summary = run_export([train, first, second], tmp_path / "out")
    config = tomllib.loads((tmp_path / "out" / "dataset_config.toml").read_text())
    assert sd_scripts_reg_use(config, [train, first, second]) == {"horizontal": 10}
    assert summary.reg_use == {"horizontal": [10, 40], "vertical": [0, 10]}
    assert summary.suggestion.startswith("reg subset vertical would go unused; num_repeats = 5 on the training")
    # and the suggestion holds: with it, sd-scripts uses every reg subset
    toml = tmp_path / "t.toml"
    toml.write_text(f'[[datasets]]\nmanifest = "{train}"\nnum_repeats = 5\n')
    summary = run_export([train, first, second], tmp_path / "out", toml)
    config = tomllib.loads((tmp_path / "out" / "dataset_config.toml").read_text())
    assert sd_scripts_reg_use(config, [train, first, second]) == {"horizontal": 40, "vertical": 10}
    assert not summary.suggestion


def run_export(manifests, out, config=None):
    from curate.dataset import export

    return export.run(manifests, out, config)


def test_fine_tune_route_has_training_rows_only(project):
    root, train, reg = project
    result = CliRunner().invoke(app, ["export", str(train), str(reg), "--kohya", "out"])
    assert result.exit_code == 0, result.output
    assert "--cache_latents" in result.output
    config = tomllib.loads((root / "out" / "dataset_config_finetune.toml").read_text())
    assert set(config) == {"datasets"}
    (dataset,) = config["datasets"]
    (subset,) = dataset["subsets"]  # the one training subset; reg has no place in this route
    allowed = {**SUBSET_ASCENDABLE, "image_dir": str, "metadata_file": str}
    for key in ("caption_extension", "class_tokens", "cache_info"):  # DreamBooth-only keys
        del allowed[key]
    assert set(subset) <= set(allowed) and "is_reg" not in subset
    metadata = json.loads(Path(subset["metadata_file"]).read_text(encoding="utf-8"))
    whole = json.loads((root / "out" / "metadata.json").read_text(encoding="utf-8"))
    assert metadata == whole and len(metadata) == 5
    training_keys = {r["key"] for r in manifest.read(train)[0].to_pylist() if not r["dup_of"]}
    assert {Path(p).stem.replace("_", "/", 1) for p in metadata} == training_keys
    assert all(Path(p).parent == Path(subset["image_dir"]) for p in metadata)


# --- sd-scripts' caches beside the exported images (kohya_ss #1629: "npz will not update
# when resolution remain same" after editing an image) ------------------------------------


def sd_scripts_caches(image: Path, w: int, h: int) -> list[Path]:
    """Cache files with exactly sd-scripts' names (library/strategy_sd.py, strategy_sdxl.py)."""
    names = [f"{image.stem}.npz", f"{image.stem}_{w:04d}x{h:04d}_sd.npz", f"{image.stem}_{w:04d}x{h:04d}_sdxl.npz",
             f"{image.stem}_te_outputs.npz"]
    for name in names:
        (image.parent / name).write_bytes(b"PK\x03\x04 cached")
    return [image.parent / n for n in names]


def test_reexport_removes_only_the_changed_files_caches(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    cg = tmp_path / "cg"
    cg.mkdir()
    for i, name in enumerate("abc"):
        Image.new("RGB", (96, 64), (60 * i, 100, 200 - 60 * i)).save(cg / f"{name}.png")
        Image.new("RGB", (16, 64), (250, 250, 0)).save(cg / "stripe.png")
        with Image.open(cg / f"{name}.png") as im:  # a stripe: moving the box changes the pixels
            im.paste(Image.open(cg / "stripe.png"), (8 * i, 0))
            im.save(cg / f"{name}.png")
        (cg / f"{name}.txt").write_text(f"1girl, {name}", encoding="utf-8")  # the user's own captions
    (cg / "stripe.png").unlink()
    m = tmp_path / "m.parquet"
    run = lambda *a: CliRunner().invoke(app, [str(x) for x in a])  # noqa: E731
    assert run("ingest", cg, "--out", m).exit_code == 0
    keys = {Path(r["path"]).stem: r["key"] for r in manifest.read(m)[0].to_pylist()}

    def review(*lines):
        f = tmp_path / "d.jsonl"
        f.write_text("".join(json.dumps(x) + "\n" for x in lines))
        assert run("review", m, "--apply", f).exit_code == 0
        for stage in ("crop", "caption"):
            result = run(stage, m)
            assert result.exit_code == 0, result.output

    review({"key": keys["a"], "action": "crop", "box": [0, 0, 80, 64]})
    first = run("export", m, "--kohya", "out")
    assert first.exit_code == 0, first.output
    folder = tmp_path / "out" / "m" / "cg"
    images = {stem: folder / (key.replace("/", "_") + ".png") for stem, key in keys.items()}
    caches = {stem: sd_scripts_caches(p, *Image.open(p).size) for stem, p in images.items()}
    # a person moves a's box (same size) and rewrites b's caption; c stays as it was
    review({"key": keys["a"], "action": "crop", "box": [16, 0, 96, 64]},
           {"key": keys["b"], "action": "caption", "text": "1girl, rewritten"})
    again = run("export", m, "--kohya", "out")
    assert again.exit_code == 0, again.output
    assert Image.open(images["a"]).size == (80, 64)
    left = {stem: [p.name.removeprefix(images[stem].stem) for p in files if p.exists()] for stem, files in caches.items()}
    assert left == {"a": ["_te_outputs.npz"],                               # new pixels: latents gone
                    "b": [".npz", "_0096x0064_sd.npz", "_0096x0064_sdxl.npz"],  # new caption: TE outputs gone
                    "c": [".npz", "_0096x0064_sd.npz", "_0096x0064_sdxl.npz", "_te_outputs.npz"]}
    assert ("sd-scripts caches (.npz): removed 4 that no longer fit, kept 8 (2 images changed pixels or caption)"
            in again.output)
    assert images["b"].with_suffix(".txt").read_text(encoding="utf-8") == "1girl, rewritten"
    # nothing changed: nothing removed, and no unchanged image is hashed again
    from curate.dataset import sd_caches

    monkeypatch.setattr(sd_caches.hashlib, "file_digest", lambda *a: pytest.fail("an unchanged image was read"))
    quiet = run("export", m, "--kohya", "out")
    assert quiet.exit_code == 0, quiet.output
    assert "sd-scripts caches (.npz): removed 0 that no longer fit, kept 8 (no image or caption changed)" in quiet.output
    assert sum(p.exists() for files in caches.values() for p in files) == 8
    monkeypatch.undo()
    # a dropped image's caches leave with it
    monkeypatch.chdir(tmp_path)
    review({"key": keys["c"], "action": "drop"})
    dropped = run("export", m, "--kohya", "out")
    assert dropped.exit_code == 0, dropped.output
    assert not any(p.exists() for p in caches["c"]) and not images["c"].exists()
    assert "removed 4 that no longer fit, kept 4 (their images left the export)" in dropped.output


# --- an export that travels ------------------------------------------------------------------

# sdxl_train.py's argument names, as library/train_util.py, sdxl_train_util.py,
# custom_train_functions.py and config_util.py add them (sd-scripts main, 2026-02)
SD_SCRIPTS_ARGS = {
    "pretrained_model_name_or_path", "output_dir", "output_name", "dataset_config", "save_model_as",
    "gradient_accumulation_steps", "max_train_steps", "max_train_epochs", "seed", "max_data_loader_n_workers",
    "learning_rate", "learning_rate_te1", "learning_rate_te2", "train_text_encoder", "lr_scheduler",
    "lr_warmup_steps", "optimizer_type", "optimizer_args", "max_grad_norm", "min_snr_gamma", "noise_offset",
    "v_parameterization", "mixed_precision", "full_fp16", "full_bf16", "gradient_checkpointing",
    "cache_latents", "cache_latents_to_disk", "save_every_n_steps", "save_last_n_steps", "save_precision",
    "sample_every_n_steps", "sample_prompts", "sample_sampler", "weighted_captions",
}


def sd_scripts_dataset(config_file: Path) -> dict[str, str]:
    """What sd-scripts reads from a dataset config, run from the working folder: `image_dir`
    and `metadata_file` as given (relative ones against the working folder, as
    train_util's os.path.isdir / glob / open do), images globbed, the first caption line read
    (DreamBooth); metadata keys joined to image_dir when relative (fine-tune)."""
    import glob

    config = tomllib.loads(Path(config_file).read_text(encoding="utf-8"))  # sd-scripts: toml.load
    ext = config.get("general", {}).get("caption_extension", ".caption")
    found = {}
    for subset in config["datasets"][0]["subsets"]:
        assert os.path.isdir(subset["image_dir"]), subset["image_dir"]
        if "metadata_file" in subset:
            metadata = json.loads(Path(subset["metadata_file"]).read_text(encoding="utf-8"))
            for key, value in metadata.items():
                path = key if os.path.isabs(key) else os.path.join(subset["image_dir"], key)
                assert os.path.isfile(path) and not os.path.islink(path), path
                found[path] = value["caption"]
            continue
        for path in sorted(p for e in IMAGE_EXTS for p in glob.glob(os.path.join(subset["image_dir"], "*" + e))):
            assert os.path.isfile(path) and not os.path.islink(path), path
            with open(os.path.splitext(path)[0] + ext, "rt", encoding="utf-8") as f:
                found[path] = f.readlines()[0].strip()
    return found


def test_portable_export_travels_with_sd_scripts_arguments(project, tmp_path, monkeypatch):
    import ast
    import csv

    root, train, reg = project
    (root / "configs").mkdir()
    cfg = root / "configs" / "train.toml"
    cfg.write_text(TRAIN_TOML.replace('pretrained = "models/kohaku-xl-delta.safetensors"',
                                      'pretrained_model_name_or_path = "KBlueLeaf/Kohaku-XL-Delta"')
                   .replace("optimizer_args = { weight_decay = 0.1, betas = [0.9, 0.95] }",
                            'optimizer_args = ["weight_decay=0.1", "betas=0.9,0.95"]')
                   .replace("[[datasets]]", "max_train_steps = 100\nsave_every_n_steps = 50\n\n[[datasets]]", 1))
    result = CliRunner().invoke(app, ["export", "--config", str(cfg), "--kohya", "dist", "--portable"])
    assert result.exit_code == 0, result.output
    assert "accelerate launch sdxl_train.py --config_file sdxl_train_args.toml" in result.output
    # copied to "another machine": the folder alone, somewhere else, the originals gone
    moved = tmp_path / "gpu-box" / "dataset"
    moved.parent.mkdir()
    shutil.move(str(root / "dist"), moved)
    rows = {r["key"]: r for m in (train, reg) for r in manifest.read(m)[0].to_pylist()}
    for folder in ("cg", "reg"):
        shutil.rmtree(root / "manifests" / folder)
    monkeypatch.chdir(moved)
    seen = sd_scripts_dataset(Path("dataset_config.toml"))
    exported = {r["key"]: r["caption"] for r in rows.values() if r["caption"] and not r["error"] and not r["dup_of"]}
    assert len(seen) == len(exported) == 13
    assert all(not os.path.isabs(p) for p in seen)
    finetune = sd_scripts_dataset(Path("dataset_config_finetune.toml"))
    assert len(finetune) == 5 and set(finetune.values()) <= set(exported.values())

    # sd-scripts' --config_file: tables flattened, each key an argument of sdxl_train.py
    args = {}
    for key, value in tomllib.loads(Path("sdxl_train_args.toml").read_text(encoding="utf-8")).items():
        args.update(value if isinstance(value, dict) else {key: value})
    assert set(args) <= SD_SCRIPTS_ARGS, set(args) - SD_SCRIPTS_ARGS
    assert args["pretrained_model_name_or_path"] == "KBlueLeaf/Kohaku-XL-Delta"
    assert args["dataset_config"] == "dataset_config.toml" and os.path.isfile(args["dataset_config"])
    assert args["optimizer_type"] == "Lion8bit" and args["learning_rate"] == 7.5e-6
    assert args["save_last_n_steps"] == 150  # 3 checkpoints (curate's default) of every 50 steps
    kwargs = {}
    for arg in args["optimizer_args"]:  # as sd-scripts' get_optimizer reads them
        key, value = arg.split("=")
        kwargs[key] = ast.literal_eval(value)
    assert kwargs == {"weight_decay": 0.1, "betas": (0.9, 0.95)}

    # the original file names, beside the files
    with open("names.csv", newline="", encoding="utf-8") as f:
        names = list(csv.DictReader(f))
    assert len(names) == 13 and all(os.path.isfile(n["file"]) for n in names)
    assert {n["key"]: n["original_path"] for n in names} == {
        k: rows[k]["source_path"] or rows[k]["path"] for k in exported}
    assert {n["original_name"] for n in names} >= {"%s.png" % k.split("/")[1] for k in rows if k in exported}


def test_sd_scripts_spellings_in_the_train_config(tmp_path):
    from curate.common import train_config

    base = 'output_dir = "o"\nmax_train_steps = 1\n[[datasets]]\nmanifest = "m.parquet"\n'
    table = tmp_path / "a.toml"
    table.write_text('pretrained = "x/y"\noptimizer_args = { weight_decay = 0.1, betas = [0.9, 0.95] }\n' + base)
    spelled = tmp_path / "b.toml"
    spelled.write_text('pretrained_model_name_or_path = "x/y"\n'
                       'optimizer_args = ["weight_decay=0.1", "betas=(0.9, 0.95)"]\n' + base)
    a, b = train_config.load(table), train_config.load(spelled)
    assert a.pretrained == b.pretrained and a.optimizer_args == b.optimizer_args == {"weight_decay": 0.1,
                                                                                   "betas": [0.9, 0.95]}
    for text, message in (('pretrained = "x"\npretrained_model_name_or_path = "x"\n', "keep one"),
                          ('pretrained = "x"\noptimizer_args = ["weight_decay"]\n', "is not name=value")):
        bad = tmp_path / "bad.toml"
        bad.write_text(text + base)
        with pytest.raises(CurateError, match=message):
            train_config.load(bad)


# sdxl_train.py and the library/ modules it imports, verbatim from kohya-ss/sd-scripts
# (tests/fixtures/README.md: commit, files, licence); SD_SCRIPTS names another checkout.
SD_SCRIPTS_FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "sd-scripts"


# Public reports of the kind: bmaltais/kohya_ss#988 ("No caption file found for 66 images":
# sd-scripts read none of the captions beside the images) and Linaqruf/kohya-trainer#174 (the
# image count sd-scripts finds is lower than the folder holds): its own reader, on the moved
# export, must count every exported image and read each one's caption.
def test_portable_export_loads_in_sd_scripts_own_reader(project, tmp_path, monkeypatch):
    """sd-scripts' own argument parser and dataset-config reader on the moved folder: the
    vendored copy (or the checkout SD_SCRIPTS names), with its requirements from the test
    extra (voluptuous, imagesize, opencv) and the ml extra (torch, transformers, diffusers)."""
    monkeypatch.syspath_prepend(os.environ.get("SD_SCRIPTS") or str(SD_SCRIPTS_FIXTURE))
    transformers = pytest.importorskip("transformers")
    if "CLIPFeatureExtractor" not in dir(transformers):  # gone from newer transformers; sd-scripts imports it
        sys.modules["transformers"].__dict__["CLIPFeatureExtractor"] = transformers.CLIPImageProcessor
    root, train, reg = project
    cfg = root / "train.toml"
    cfg.write_text(TRAIN_TOML.replace('optimizer_args = { weight_decay = 0.1, betas = [0.9, 0.95] }',
                                      'optimizer_args = ["weight_decay=0.1", "betas=0.9,0.95"]')
                   .replace("[[datasets]]", "max_train_steps = 100\n\n[[datasets]]", 1))
    result = CliRunner().invoke(app, ["export", "--config", str(cfg), "--kohya", "dist", "--portable"])
    assert result.exit_code == 0, result.output
    moved = tmp_path / "gpu-box" / "dataset"
    moved.parent.mkdir()
    shutil.move(str(root / "dist"), moved)
    for folder in ("cg", "reg"):
        shutil.rmtree(root / "manifests" / folder)
    monkeypatch.chdir(moved)

    import sdxl_train
    from library import config_util, strategy_base, strategy_sd, train_util

    strategy_base.LatentsCachingStrategy.set_strategy(strategy_sd.SdSdxlLatentsCachingStrategy(False, True, 1, False))
    parser = sdxl_train.setup_parser()
    monkeypatch.setattr(sys, "argv", ["sdxl_train.py", "--config_file", "sdxl_train_args.toml"])
    args = train_util.read_config_from_file(parser.parse_args(), parser)
    assert args.optimizer_type == "Lion8bit" and args.optimizer_args == ["weight_decay=0.1", "betas=0.9,0.95"]
    expected = {r["caption"] for m in (train, reg) for r in manifest.read(m)[0].to_pylist()
                if r["caption"] and not r["error"] and not r["dup_of"]}
    for name, kind, n in (("dataset_config.toml", "DreamBoothDataset", 13),
                          ("dataset_config_finetune.toml", "FineTuningDataset", 5)):
        blueprint = config_util.BlueprintGenerator(config_util.ConfigSanitizer(True, True, False, True)).generate(
            config_util.load_user_config(args.dataset_config if kind == "DreamBoothDataset" else name), args)
        group, _ = config_util.generate_dataset_group_by_blueprint(blueprint.dataset_group)
        (dataset,) = group.datasets
        infos = list(dataset.image_data.values())
        assert type(dataset).__name__ == kind and len(infos) == n
        assert all(os.path.isfile(i.absolute_path) and not os.path.islink(i.absolute_path)
                   and not os.path.isabs(i.absolute_path) for i in infos)
        assert {i.caption for i in infos} <= expected


def test_curate_train_validation_keys_are_read_not_handed_to_sd_scripts(project):
    """`is_val` / `validation_split` belong to curate train: export accepts them (one config serves
    both), leaves a held-out manifest out of the training data and never writes the keys."""
    root, train, reg = project
    (root / "configs").mkdir()
    toml = TRAIN_TOML.replace("flip_aug = true\n", "flip_aug = true\nvalidation_split = 0.2\n")
    (root / "configs" / "baxl_v3.toml").write_text(toml.replace("is_reg = true\n", "is_reg = true\nis_val = true\n"))
    result = CliRunner().invoke(app, ["export", "--kohya", "out", "--config", "configs/baxl_v3.toml"])
    assert result.exit_code == 0, result.output
    assert "held out for validation (is_val)" in result.output
    config = tomllib.loads((root / "out" / "dataset_config.toml").read_text())
    (subset,) = config["datasets"][0]["subsets"]
    assert subset["image_dir"].endswith("official_cg/official_cg")
    assert "validation_split" not in subset and "is_val" not in subset
