"""The train config: the recipe file, sd-scripts key names, one-line errors for bad input."""

import subprocess
import sys
from pathlib import Path

import pytest

from curate.common import train_config
from curate.dataset import export
from curate.errors import CurateError
from tests.inproc import run_curate

REPO = Path(__file__).resolve().parents[2]
MINIMAL = 'pretrained = "tiny-random"\noutput_dir = "run"\nmax_train_steps = 10\n'
DATASET = '\n[[datasets]]\nmanifest = "m.parquet"\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_recipe_config_reproduces_design():
    cfg = train_config.load(REPO / "configs" / "baxl_v3.toml")
    assert (cfg.resolution, cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps) == (1024, 256, 4096, 32)
    assert (cfg.train_batch_size, cfg.gradient_accumulation_steps) == (2, 32)
    assert cfg.learning_rate == 7.5e-6 and cfg.learning_rate_te1 == cfg.learning_rate_te2 == 0
    assert (cfg.lr_scheduler, cfg.lr_warmup_steps) == ("constant_with_warmup", 100)
    assert cfg.optimizer_type == "Lion8bit"
    assert cfg.optimizer_args == {"weight_decay": 0.1, "betas": [0.9, 0.95]}
    assert cfg.min_snr_gamma == 5 and cfg.mixed_precision == "fp16" and cfg.full_fp16
    assert (cfg.max_train_epochs, cfg.save_every_n_steps, cfg.seed) == (25, 200, 42)
    train, reg = cfg.datasets
    assert train.manifest.name == "official_cg.parquet" and train.shuffle_caption
    assert train.caption_tag_dropout_rate == 0.1 and train.keep_tokens == 0 and not train.is_reg
    assert reg.manifest.name == "baxl_v3_reg.parquet" and reg.is_reg


def test_export_reads_the_same_file_and_resolves_the_same_paths():
    path = REPO / "configs" / "baxl_v3.toml"
    dataset, per_manifest = export.load_train_config(path)
    cfg = train_config.load(path)
    assert dataset["batch_size"] == cfg.train_batch_size and dataset["bucket_reso_steps"] == 32
    assert list(per_manifest) == [d.manifest for d in cfg.datasets]


def test_minimal_config_gets_sd_scripts_defaults(tmp_path):
    cfg = train_config.load(write(tmp_path, MINIMAL + DATASET))
    assert cfg.optimizer_type == "AdamW" and cfg.mixed_precision == "no" and cfg.bucket_reso_steps == 64
    assert cfg.datasets[0].is_reg is None  # decided by the manifest's provenance
    assert cfg.datasets[0].manifest.is_absolute() and cfg.datasets[0].manifest.name == "m.parquet"


@pytest.mark.parametrize("text,message", [
    (MINIMAL + "learning_rat = 1e-5\n" + DATASET, "unknown key 'learning_rat'"),
    (MINIMAL + "shuffle_caption = true\n" + DATASET, "'shuffle_caption' (it belongs in a [[datasets]] table)"),
    (MINIMAL + DATASET + "tag_dropout = 0.1\n", "[[datasets]] #1: unknown key 'tag_dropout'"),
    (MINIMAL + DATASET + "learning_rate = 1.0\n", "learning_rate is a top-level key"),
    (MINIMAL + DATASET + "color_aug = true\n", "color_aug is not supported by curate train"),
    (MINIMAL + 'learning_rate = "fast"\n' + DATASET, "learning_rate: unexpected value 'fast'"),
    (MINIMAL + "train_batch_size = true\n" + DATASET, "train_batch_size: expected a number"),
    ('output_dir = "x"\nmax_train_steps = 1\n' + DATASET, "missing pretrained"),
    ('pretrained = "tiny-random"\noutput_dir = "x"\n' + DATASET, "set max_train_steps or max_train_epochs"),
    (MINIMAL, "needs [[datasets]]"),
    (MINIMAL + 'optimizer_type = "SGD"\n' + DATASET, "optimizer_type must be one of"),
    (MINIMAL + "full_fp16 = true\n" + DATASET, "full_fp16 needs mixed_precision"),
    (MINIMAL + "min_bucket_reso = 100\n" + DATASET, "min_bucket_reso must be divisible"),
    (MINIMAL + DATASET + "caption_tag_dropout_rate = 2\n", "between 0 and 1"),
    (MINIMAL + DATASET + "is_reg = true\n", "every [[datasets]] is a reg set"),
    (MINIMAL + "resolution = [512]\n" + DATASET, "resolution must be a number or [width, height]"),
    ("pretrained = \n", "not valid TOML"),
    (MINIMAL + "enable_bucket = false\n" + DATASET, "enable_bucket = false is not supported"),
    (MINIMAL + "sample_every_n_steps = 5\n" + DATASET, "sample_every_n_steps / sample_every_n_epochs / sample_at_first need sample_prompts"),
    (MINIMAL + "stochastic_rounding = true\n" + DATASET, "stochastic_rounding is for half-precision weights"),
    (MINIMAL + "stop_text_encoder_training = 1.5\n" + DATASET, "stop_text_encoder_training must be a step"),
    (MINIMAL + "stop_text_encoder_training = 10\n" + DATASET, "needs learning_rate_te1 or learning_rate_te2"),
    (MINIMAL + "log_with = \"comet\"\n" + DATASET, "log_with must be one of"),
    (MINIMAL + "sample_sampler = \"ddim\"\n" + DATASET, "sample_sampler must be one of"),
    (MINIMAL + DATASET + "validation_split = 1.0\n", "validation_split must be in [0, 1)"),
    (MINIMAL + "lr_scheduler_num_cycles = 0\n" + DATASET, "lr_scheduler_num_cycles must be >= 1"),
])
def test_bad_configs_are_one_line_errors(tmp_path, text, message):
    with pytest.raises(CurateError) as err:
        train_config.load(write(tmp_path, text))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(CurateError, match="cannot read train config"):
        train_config.load(tmp_path / "nope.toml")


def test_cli_bad_config_exits_2_with_one_line(tmp_path):
    path = write(tmp_path, MINIMAL + "warmup = 3\n" + DATASET)
    r = run_curate("train", path, "--dry-run")  # the command's entry point, in this process
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {path}: unknown key 'warmup'"]
    assert "Traceback" not in r.stderr


def test_cli_help_stays_torch_free():
    code = ("import sys; from typer.testing import CliRunner; from curate.cli import app; "
            "r = CliRunner().invoke(app, ['train', '--help']); assert r.exit_code == 0, r.output; "
            "assert '--dry-run' in r.output and '--resume' in r.output; "
            "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)


BUCKET_KEYS = "resolution = 1024\nmin_bucket_reso = 256\nmax_bucket_reso = 4096\nbucket_reso_steps = 32\n"


@pytest.mark.parametrize("keys", [BUCKET_KEYS, "", "bucket_reso_steps = 32\n"])
def test_export_buckets_equal_the_dry_run_buckets(tmp_path, keys):
    """The same config gives the same buckets in sd-scripts (the exported TOML) and curate train."""
    import pyarrow as pa
    from PIL import Image

    from curate import manifest
    from curate.common.buckets import Buckets
    from curate.train import data as train_data

    sizes = [(1920, 1080), (1080, 1920), (1000, 1000), (3000, 1000), (700, 1500)]  # CGs, a banner
    rows = []
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (i * 40, 90, 160)).save(tmp_path / f"{i}.png")
        rows.append({"key": f"local/{i}", "subset": "cg", "path": f"{i}.png", "caption": "1girl"})
    manifest.write(pa.Table.from_pylist(rows), tmp_path / "m.parquet", manifest.new_provenance(kind="ingest"))
    config = write(tmp_path, MINIMAL + keys + '\n[[datasets]]\nmanifest = "m.parquet"\n')
    export.run([], tmp_path / "out", config)
    dataset = train_config.read_toml(tmp_path / "out" / "dataset_config.toml")["datasets"][0]
    res = dataset["resolution"]
    sd = Buckets((res, res), dataset["min_bucket_reso"], dataset["max_bucket_reso"], dataset["bucket_reso_steps"],
                 dataset.get("bucket_no_upscale", False))
    exported = sorted(sd.place(w, h).bucket for w, h in sizes)
    summary = train_data.plan(train_config.load(config)).summary()
    dry_run = sorted(tuple((b["width"], b["height"])) for b in summary["buckets"] for _ in range(b["images"]))
    assert exported == dry_run
    if keys == BUCKET_KEYS:
        assert (1344, 768) in exported  # the recipe: a 16:9 CG at 1344x768
    if keys == "":
        assert (dataset["max_bucket_reso"], dataset["bucket_reso_steps"]) == (1024, 64)  # curate train's defaults
        assert dataset["batch_size"] == train_config.load(config).train_batch_size
