"""The --dry-run peak-memory estimate: parameter counts of the real architecture, the
recipe's figures part by part, and the card table."""

from pathlib import Path

from typer.testing import CliRunner

from curate.cli import app
from curate.common import train_config
from curate.train import memory as train_memory
from curate.train.memory import GIB, SDXL_PARAMS
from tests.train.test_loop import write_config, write_images_manifest

REPO = Path(__file__).resolve().parents[2]


def test_parameter_counts_are_the_sdxl_architecture():
    from curate.train import sdxl

    model = sdxl.full_size_random("meta")  # the real shapes, no memory
    for name in ("unet", "te1", "te2", "vae"):
        assert sum(p.numel() for p in getattr(model, name).parameters()) == SDXL_PARAMS[name], name


def test_recipe_fits_24gb_with_full_fp16_and_not_without():
    cfg = train_config.load(REPO / "configs" / "baxl_v3.toml")
    assert cfg.full_fp16 and cfg.gradient_checkpointing and cfg.optimizer_type == "Lion8bit"
    est = train_memory.estimate(cfg)
    unet, te = SDXL_PARAMS["unet"], SDXL_PARAMS["te1"] + SDXL_PARAMS["te2"]
    assert est["weights"] * GIB == 2 * unet + 2 * te  # fp16 UNet, frozen fp16 text encoders, VAE off the GPU
    assert est["gradients"] * GIB == 2 * unet and est["optimizer"] * GIB == unet  # Lion8bit: 1 byte
    assert est["autocast_copies"] == 0 and est["ema"] == 0
    assert est["total"] < 24 < est["total_other_checkpointing"]
    cfg.full_fp16 = False  # fp32 master weights, fp32 grads: ~23 GB before anything else
    fp32 = train_memory.estimate(cfg)
    assert (fp32["weights"] * GIB, fp32["gradients"] * GIB) == (4 * unet + 2 * te, 4 * unet)
    assert fp32["autocast_copies"] * GIB == 2 * unet
    assert (fp32["weights"] - 2 * te / GIB + fp32["gradients"] + fp32["optimizer"]) * GIB / 1e9 > 23
    assert fp32["total"] > 24


def test_other_optimizers_and_trained_text_encoders():
    cfg = train_config.load(REPO / "configs" / "baxl_v3.toml")
    cfg.optimizer_type, cfg.full_fp16, cfg.mixed_precision, cfg.learning_rate_te1 = "AdamW", False, "no", 1e-6
    est = train_memory.estimate(cfg)
    trained = SDXL_PARAMS["unet"] + SDXL_PARAMS["te1"]
    assert est["optimizer"] * GIB == trained * 2 * 4  # two fp32 moments
    assert est["weights"] * GIB == trained * 4 + SDXL_PARAMS["te2"] * 4  # no mixed precision: all fp32


def test_dry_run_prints_the_estimate_beside_the_cards(tmp_path):
    write_images_manifest(tmp_path, "t", [(64, 64)] * 2)
    config = write_config(tmp_path / "c.toml", [{"manifest": "t.parquet"}], gradient_checkpointing=True)
    r = CliRunner().invoke(app, ["train", str(config), "--dry-run"], catch_exceptions=False)  # the output, in-process
    assert r.exit_code == 0, r.stderr
    est = train_memory.estimate(train_config.load(config))
    assert f"= {est['total']:.1f} GiB (with gradient checkpointing; without: {est['total_other_checkpointing']:.1f})" in r.stdout
    assert "    fits: 12 GB " in r.stdout and " 80 GB yes" in r.stdout
