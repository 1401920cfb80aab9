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
from tests.dataset.test_caption import CURATE, HOSTILE, load_posts, post_row, write_manifest

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
    assert subprocess.run([CURATE, "export", str(train), "--kohya", "out"], capture_output=True).returncode == 0
    (subset_dir,) = [p for p in (root / "out").iterdir() if p.is_dir()]
    shutil.rmtree(subset_dir)
    subset_dir.write_text("in the way")  # the next export cannot make its folder
    proc = subprocess.run([CURATE, "export", str(train), "--kohya", "out"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert f"export to {root / 'out'} stopped" in proc.stderr
    subset_dir.unlink()
    assert subprocess.run([CURATE, "export", str(train), "--kohya", "out"], capture_output=True).returncode == 0


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
