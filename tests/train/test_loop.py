"""curate train on CPU with the tiny SDXL-shaped model, through the same code as a real one.

Manifests are real Parquet with real PNGs; one run goes through the real CLI.
"""

import hashlib
import json
import math
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import tomli_w
import torch
from PIL import Image
from typer.testing import CliRunner

from curate import manifest
from curate.cli import app
from curate.common import reg_balance, train_config
from curate.errors import CurateError
from curate.train import data as train_data
from curate.train import sdxl
from curate.train.loop import train

CURATE = str(Path(sys.executable).with_name("curate"))
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
SMALL = dict(resolution=64, min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32)


# --- helpers ------------------------------------------------------------------------


def write_images_manifest(root: Path, name: str, sizes, reg: bool = False, captions=None,
                          extra_rows=(), seed: int = 0) -> Path:
    """A manifest of real PNGs (smooth random colour fields) with captions."""
    rows = []
    for i, (w, h) in enumerate(sizes):
        rel = f"{name}/{i:03d}.png"
        (root / name).mkdir(parents=True, exist_ok=True)
        field = np.random.default_rng(seed * 1000 + i).integers(0, 256, (3, 3, 3), dtype=np.uint8)
        Image.fromarray(field).resize((w, h), Image.Resampling.BILINEAR).save(root / rel)
        caption = captions[i] if captions else f"1girl, solo, tag{i}, blue_hair, smile"
        rows.append({"key": f"local/{name}-{i}", "subset": "main", "path": rel, "width": w, "height": h,
                     "caption": caption})
    rows += list(extra_rows)
    names = list(dict.fromkeys(k for row in rows for k in row))  # from_pylist reads only row 0's keys
    meta = manifest.new_provenance(kind="reg", class_token="solo") if reg else manifest.new_provenance()
    table = pa.Table.from_pylist([{n: row.get(n) for n in names} for row in rows])
    return manifest.write(table, root / f"{name}.parquet", meta)


def write_config(path: Path, datasets: list, **values) -> Path:
    doc = {"pretrained": "tiny-random", "output_dir": str(path.parent / "run"), **SMALL,
           "train_batch_size": 2, "learning_rate": 1e-3, "optimizer_type": "AdamW", "max_train_steps": 2,
           "seed": 7, "max_data_loader_n_workers": 0, **values, "datasets": datasets}
    path.write_text(tomli_w.dumps(doc), encoding="utf-8")
    return path


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


SIZES = [(64, 64), (96, 64), (64, 96), (64, 64), (128, 64), (80, 64)]


# --- data: rows, captions, balance, buckets -----------------------------------------------


def test_plan_skips_bad_rows_and_finds_captions(tmp_path):
    write_images_manifest(tmp_path, "t", SIZES[:3], extra_rows=[
        {"key": "local/err", "subset": "main", "path": "t/000.png", "error": "decode: broken"},
        {"key": "local/dup", "subset": "main", "path": "t/001.png", "dup_of": "local/t-1", "caption": "x"},
        {"key": "local/gone", "subset": "main", "path": "t/missing.png", "caption": "x"},
    ])
    # a row without a caption column value but with a .txt beside its image
    Image.new("RGB", (64, 64), (9, 9, 9)).save(tmp_path / "t" / "txt.png")
    (tmp_path / "t" / "txt.png").with_suffix(".txt").write_text("\ufefffrom the \\(txt\\),\nfile\n", encoding="utf-8")
    (tmp_path / "t" / "002.txt").write_text("not this: curate caption gave this row no text", encoding="utf-8")
    table, meta = manifest.read(tmp_path / "t.parquet")
    table = pa.concat_tables([table, manifest.conform(pa.Table.from_pylist(
        [{"key": "local/txt", "subset": "main", "path": "t/txt.png", "caption": None},  # caption never ran
         {"key": "local/nocap", "subset": "main", "path": "t/002.png", "caption": ""}]))])
    manifest.write(table, tmp_path / "t.parquet", meta)
    write_images_manifest(tmp_path, "r", [(64, 64)] * 2, reg=True, captions=["", ""])  # reg: class token

    cfg = train_config.load(write_config(tmp_path / "c.toml", [{"manifest": "t.parquet"}, {"manifest": "r.parquet"}]))
    plan = train_data.plan(cfg)
    by_key = {s.key: s for s in plan.samples}
    assert set(by_key) == {"local/t-0", "local/t-1", "local/t-2", "local/txt", "local/r-0", "local/r-1"}
    assert by_key["local/txt"].caption == "from the (txt), file"  # as curate caption reads a user's file
    assert by_key["local/r-0"].caption == "solo" and by_key["local/r-0"].is_reg
    assert plan.skipped == {"error set": 1, "duplicate": 1, "no image on disk": 1, "no caption (column or .txt)": 1}
    assert by_key["local/t-1"].size == (96, 64)


def test_reg_balance_and_one_bucket_per_batch(tmp_path):
    write_images_manifest(tmp_path, "t", SIZES[:4])
    write_images_manifest(tmp_path, "r", SIZES * 2, reg=True, seed=1)
    cfg = train_config.load(write_config(tmp_path / "c.toml", [
        {"manifest": "t.parquet", "num_repeats": 3}, {"manifest": "r.parquet"}]))
    plan = train_data.plan(cfg)
    s = plan.summary()
    assert (s["train_images"], s["train_samples"]) == (4, 12)
    assert (s["reg_images_available"], s["reg_images_used"], s["reg_samples"]) == (12, 12, 12)
    assert sum(b["images"] for b in s["buckets"]) == 24
    assert sum(b["reg"] for b in s["buckets"]) == 12
    for epoch in range(3):
        batches = plan.epoch_batches(epoch)
        assert sorted(i for b in batches for i in b) == sorted(i for v in plan.epoch_items(epoch).values() for i in v)
        for b in batches:
            assert len({plan.samples[i].placement.bucket for i in b}) == 1
    assert plan.epoch_batches(0) != plan.epoch_batches(1)  # reshuffled each epoch
    # as many reg images as training samples: every one drawn once each epoch
    assert s["reg_subsets"] == {"main": {"available": 12, "per_epoch": [12, 12], "used_over_run": 12}}
    assert s["warnings"] == []
    assert plan.epoch_batches(1) == train_data.plan(cfg).epoch_batches(1)  # and reproducible


def test_resumed_data_is_the_uninterrupted_data(tmp_path):
    write_images_manifest(tmp_path, "t", SIZES)
    cfg = train_config.load(write_config(tmp_path / "c.toml", [
        {"manifest": "t.parquet", "shuffle_caption": True, "caption_tag_dropout_rate": 0.3, "flip_aug": True}],
        max_train_epochs=2))
    plan = train_data.plan(cfg)
    straight = train_data.RunData(plan, None, epoch=0, batch=0)
    resumed = train_data.RunData(train_data.plan(cfg), None, epoch=0, batch=2)  # a fresh process
    assert len(straight) == len(resumed) + 2 == 2 * plan.batches_per_epoch
    for i in range(len(resumed)):
        a, b = straight[i + 2], resumed[i]
        assert (a["epoch"], a["batch"], a["keys"], a["captions"]) == (b["epoch"], b["batch"], b["keys"], b["captions"])
        assert torch.equal(a["pixels"], b["pixels"]) and torch.equal(a["time_ids"], b["time_ids"])


def test_keep_separator_comes_from_the_caption_stage(tmp_path):
    write_images_manifest(tmp_path, "t", SIZES[:2], captions=["blue archive, 1girl ||| smile, halo"] * 2)
    table, meta = manifest.read(tmp_path / "t.parquet")
    manifest.record_stage(meta, "caption", keep_separators={"main": "|||"})
    manifest.write(table, tmp_path / "t.parquet", meta)
    cfg = train_config.load(write_config(tmp_path / "c.toml", [{"manifest": "t.parquet", "shuffle_caption": True}]))
    s = train_data.plan(cfg).samples[0]
    assert s.keep_separator == "|||"
    out = train_data.process_caption(s.caption, cfg.datasets[0], s.keep_separator, random.Random(0))
    assert out.startswith("blue archive, 1girl, ") and sorted(out.split(", ")[2:]) == ["halo", "smile"]


def reg_run(tmp_path, epochs: int = 10):
    """8 training images against 30 horizontal (two buckets) and 10 vertical reg images."""
    write_images_manifest(tmp_path, "t", [(64, 64)] * 8)
    write_images_manifest(tmp_path, "r", [(96, 64), (128, 64)] * 15 + [(64, 96)] * 10, reg=True, seed=1)
    table, meta = manifest.read(tmp_path / "r.parquet")
    manifest.write(manifest.with_column(table, "subset", ["horizontal"] * 30 + ["vertical"] * 10),
                   tmp_path / "r.parquet", meta)
    return train_config.load(write_config(tmp_path / "c.toml", [{"manifest": "t.parquet"}, {"manifest": "r.parquet"}],
                                          max_train_epochs=epochs))  # wins over max_train_steps


def test_reg_subsets_are_drawn_in_proportion_and_all_used_over_the_run(tmp_path):
    cfg = reg_run(tmp_path)
    plan = train_data.plan(cfg)
    subset_of = {i: s.subset for i, s in enumerate(plan.samples) if s.is_reg}
    per_epoch, seen = [], set()
    for epoch in range(plan.epochs):
        drawn = [i for b in plan.epoch_batches(epoch) for i in b if i in subset_of]
        assert len(drawn) == 8  # as many reg samples as training samples, as sd-scripts balances
        per_epoch.append(Counter(subset_of[i] for i in drawn))
        seen.update(drawn)
    assert all(c == {"horizontal": 6, "vertical": 2} for c in per_epoch)  # 30:10 of 8, every epoch
    assert seen == set(subset_of)  # 80 draws over 10 epochs: all 40 reg images, none left out
    first_half = {i for e in range(5) for b in plan.epoch_batches(e) for i in b if i in subset_of}
    assert len(first_half) == 40  # a stream: each image comes up once before any twice
    assert plan.epoch_items(0) != plan.epoch_items(1)  # a fresh draw per epoch
    s = plan.summary()
    assert s["reg_subsets"] == {"horizontal": {"available": 30, "per_epoch": [6, 6], "used_over_run": 30},
                                "vertical": {"available": 10, "per_epoch": [2, 2], "used_over_run": 10}}
    assert (s["reg_samples"], s["reg_images_used"], s["warnings"]) == (8, 40, [])
    # sd-scripts' own rule on the manifest order: the first 8 horizontal images, every epoch
    use = reg_balance.sd_scripts_use(8, [1] * 40)
    assert sum(use[:30]) == 8 and sum(use[30:]) == 0


def test_reg_draw_resumes_exactly(tmp_path):
    plan = train_data.plan(reg_run(tmp_path, epochs=4))
    per = plan.batches_per_epoch
    whole = train_data.RunData(plan, None, 0, 0)
    resumed = train_data.RunData(train_data.plan(reg_run(tmp_path, epochs=4)), None, 2, 1)
    assert len(resumed) == len(whole) - 2 * per - 1
    for k in range(len(resumed)):
        assert resumed[k]["keys"] == whole[2 * per + 1 + k]["keys"]


def test_a_short_run_warns_of_a_reg_subset_it_never_draws(tmp_path):
    write_images_manifest(tmp_path, "t", [(64, 64)])
    write_images_manifest(tmp_path, "r", [(96, 64)] * 9 + [(64, 96)], reg=True, seed=1)
    table, meta = manifest.read(tmp_path / "r.parquet")
    manifest.write(manifest.with_column(table, "subset", ["horizontal"] * 9 + ["vertical"]), tmp_path / "r.parquet", meta)
    cfg = train_config.load(write_config(tmp_path / "c.toml", [{"manifest": "t.parquet"}, {"manifest": "r.parquet"}],
                                         max_train_steps=1))
    s = train_data.plan(cfg).summary()
    assert s["reg_subsets"]["vertical"]["used_over_run"] + s["reg_subsets"]["horizontal"]["used_over_run"] == 1
    unused = [n for n, u in s["reg_subsets"].items() if not u["used_over_run"]]
    assert len(s["warnings"]) == 1 and f"reg subset {unused[0]!r}: none of its" in s["warnings"][0]


def test_caption_processing_statistics():
    ds = train_config.DatasetConfig(manifest=Path("m"), shuffle_caption=True, keep_tokens=2,
                                    caption_tag_dropout_rate=0.2, caption_dropout_rate=0.1)
    tags = ["a", "b", "c", "d", "e", "f", "g", "h"]
    caption = ", ".join(tags)
    rng = random.Random(0)
    n, empty, kept, first_after_keep = 20000, 0, Counter(), Counter()
    for _ in range(n):
        out = train_data.process_caption(caption, ds, None, rng)
        if not out:
            empty += 1
            continue
        parts = out.split(", ")
        assert parts[:2] == ["a", "b"]  # the keep group: never dropped, never moved
        assert len(set(parts)) == len(parts) and set(parts) <= set(tags)
        kept.update(parts[2:])
        if len(parts) > 2:
            first_after_keep[parts[2]] += 1
    assert abs(empty / n - 0.1) < 0.01
    for tag in tags[2:]:
        assert abs(kept[tag] / (n - empty) - 0.8) < 0.02
    assert len(first_after_keep) == 6 and min(first_after_keep.values()) > 0.1 * (n - empty)  # shuffled


def test_keep_separator_group_and_suffix_stay_put():
    ds = train_config.DatasetConfig(manifest=Path("m"), shuffle_caption=True, caption_tag_dropout_rate=0.5)
    rng = random.Random(1)
    for _ in range(500):
        out = train_data.process_caption("x, y ||| p, q, r, s ||| z", ds, "|||", rng)
        assert out.startswith("x, y") and out.endswith("z") and "|||" not in out
    plain = train_config.DatasetConfig(manifest=Path("m"))
    assert train_data.process_caption("a, b, c", plain, None, rng) == "a, b, c"


def test_time_ids_follow_the_crop(tmp_path):
    write_images_manifest(tmp_path, "t", [(160, 64)])
    cfg = train_config.load(write_config(tmp_path / "c.toml", [{"manifest": "t.parquet"}]))
    s = train_data.plan(cfg).samples[0]
    # buckets of 64x64 area, step 32: aspects 1/3, 1/4, 1, 3, 4; 160/64 = 2.5 -> 96x32,
    # resized to cover: width 96, height 64 * 0.6 = 38; centre crop 3 px from the top
    assert s.placement.bucket == (96, 32)
    assert s.placement.resized == (96, 38) and s.placement.crop == (0, 3)
    assert train_data.time_ids(s, flip=False) == [64, 160, 3, 0, 32, 96]  # orig hw, crop top/left, target hw
    bh, bw = 32, 96
    assert train_data.pixels(s, flip=False).shape == (3, bh, bw)


def test_latent_cache_key_is_content_bucket_crop(tmp_path):
    write_images_manifest(tmp_path, "t", [(64, 64), (96, 64)])
    cfg = train_config.load(write_config(tmp_path / "c.toml", [{"manifest": "t.parquet"}]))
    plan = train_data.plan(cfg)
    cache = train_data.LatentCache(tmp_path / "cache", "vae-a")
    todo = train_data.uncached(plan, cache)
    assert len(todo) == 2
    a, b = plan.samples
    assert a.content_hash == hashlib.sha256(a.path.read_bytes()).hexdigest()  # hashed in chunks, same digest
    assert cache.path(a, False) != cache.path(a, True) != cache.path(b, False)
    assert cache.path(a, False) != train_data.LatentCache(tmp_path / "cache", "vae-b").path(a, False)
    b.content_hash = a.content_hash
    assert cache.path(a, False) != cache.path(b, False)  # same bytes, other bucket/crop


# --- dry run ------------------------------------------------------------------------------


def test_dry_run_cli_text_and_json(tmp_path):
    write_images_manifest(tmp_path, "t", SIZES)
    write_images_manifest(tmp_path, "r", SIZES * 3, reg=True, seed=1)
    config = write_config(tmp_path / "c.toml", [{"manifest": "t.parquet", "num_repeats": 2}, {"manifest": "r.parquet"}],
                          gradient_accumulation_steps=4, max_train_epochs=3, pretrained="models/none.safetensors")
    # the command's output, in-process (the installed command's process: the --resume and error tests)
    r = CliRunner().invoke(app, ["train", str(config), "--dry-run", "--json"], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    s = json.loads(r.stdout)
    assert (s["train_samples"], s["reg_samples"], s["reg_images_used"], s["reg_images_available"]) == (12, 12, 18, 18)
    assert s["predefined_buckets"] == len(train_data.Buckets((64, 64), 32, 128, 32).predefined)
    assert sum(b["images"] for b in s["buckets"]) == 24
    batches = sum(math.ceil(b["images"] / 2) for b in s["buckets"])
    assert s["batches_per_epoch"] == batches and s["steps_per_epoch"] == math.ceil(batches / 4)
    assert s["total_optimizer_steps"] == 3 * s["steps_per_epoch"] and s["epochs"] == 3
    assert s["warnings"] == [f"pretrained model not found: {(Path.cwd() / 'models/none.safetensors').resolve()}"]
    assert s["reg_subsets"] == {"main": {"available": 18, "per_epoch": [12, 12], "used_over_run": 18}}
    text = CliRunner().invoke(app, ["train", str(config), "--dry-run"], catch_exceptions=False)
    assert text.exit_code == 0 and "buckets:" in text.stdout
    assert "reg subset main: 12 per epoch, 18 of 18 over 3 epochs" in text.stdout
    assert f"total: {s['total_optimizer_steps']} optimizer steps over 3 epochs" in text.stdout
    for b in s["buckets"]:
        assert f"{b['width']:>5} x {b['height']:<5} {b['images']:>6}" in text.stdout


# --- training -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    """4 steps straight vs 2 steps + --resume (through the CLI) to 4, same data and seed."""
    root = tmp_path_factory.mktemp("resume")
    write_images_manifest(root, "t", SIZES)
    write_images_manifest(root, "r", SIZES, reg=True, seed=1)
    datasets = [{"manifest": str(root / "t.parquet"), "shuffle_caption": True, "caption_tag_dropout_rate": 0.3,
                 "flip_aug": True}, {"manifest": str(root / "r.parquet")}]
    common = dict(gradient_accumulation_steps=2, min_snr_gamma=5.0, noise_offset=0.05, save_every_n_steps=2,
                  lr_scheduler="constant_with_warmup", lr_warmup_steps=2, latent_cache_dir=str(root / "cache"))
    (root / "a").mkdir()
    (root / "b").mkdir()
    straight = train(train_config.load(write_config(root / "a" / "c.toml", datasets, max_train_steps=4, **common)),
                     progress=False)
    first = train(train_config.load(write_config(root / "b" / "c.toml", datasets, max_train_steps=2, **common)),
                  progress=False)
    write_config(root / "b" / "c.toml", datasets, max_train_steps=4, **common)
    cli = subprocess.run([CURATE, "train", str(root / "b" / "c.toml"), "--resume", "--quiet"],
                         capture_output=True, text=True, cwd=root, env=ONE_THREAD)
    return root, straight, first, cli


def test_a_few_steps_run_with_finite_loss(resumed):
    root, straight, first, cli = resumed
    assert straight["steps"] == 4 and math.isfinite(straight["loss"])
    assert all(math.isfinite(v) for v in losses(root / "a" / "run").values())
    assert 0 <= straight["data_wait_share"] < 1


def test_resume_continues_exactly(resumed):
    root, straight, first, cli = resumed
    assert cli.returncode == 0, cli.stderr
    assert "resumed from" in cli.stdout and "step-0000002" in cli.stdout
    a, b = losses(root / "a" / "run"), losses(root / "b" / "run")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:  # same loss each step: same images, captions, flips, noise and weights
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6)
    from safetensors.torch import load_file

    wa = load_file(root / "a" / "run" / "model.safetensors")
    wb = load_file(root / "b" / "run" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    init = sdxl.tiny_random().unet.state_dict()
    trained = load_file(root / "a" / "run" / "checkpoints" / "step-0000004" / "model.safetensors")
    assert any(not torch.equal(init[k], trained[k]) for k in init)  # it did train


def test_checkpoints_and_resume_errors(resumed, tmp_path):
    root, *_ = resumed
    run = root / "a" / "run" / "checkpoints"
    assert sorted(p.name for p in run.iterdir()) == ["step-0000002", "step-0000004"]
    assert json.loads((run / "step-0000002" / "curate.json").read_text())["step"] == 2
    cfg = train_config.load(write_config(tmp_path / "c.toml", [{"manifest": str(root / "t.parquet")}]))
    with pytest.raises(CurateError, match="nothing to resume"):
        train(cfg, resume=True, progress=False)
    with pytest.raises(CurateError, match="not a complete curate checkpoint"):
        train(cfg, resume=str(tmp_path), progress=False)
    with pytest.raises(CurateError, match="the data or batch settings changed since this checkpoint"):
        train(cfg, resume=str(run / "step-0000002"), progress=False)  # other data, same model


def test_export_loads_back_with_identical_weights(resumed):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    root, *_ = resumed
    out = root / "a" / "run"
    trained = load_file(out / "checkpoints" / "step-0000004" / "model.safetensors")  # accelerate's UNet state
    from_folder = UNet2DConditionModel.from_pretrained(out / "diffusers", subfolder="unet").state_dict()
    from_single = UNet2DConditionModel.from_single_file(str(out / "model.safetensors"),
                                                        config=str(out / "diffusers"), subfolder="unet").state_dict()
    assert trained.keys() == from_folder.keys() == from_single.keys()
    for k in trained:
        assert torch.equal(trained[k], from_folder[k]) and torch.equal(trained[k], from_single[k]), k
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:  # ModelSpec, as sd-scripts writes it
        spec = f.metadata()
    assert (spec["modelspec.architecture"], spec["modelspec.title"], spec["modelspec.resolution"]) == (
        "stable-diffusion-xl-v1-base", "model", "64x64")
    single = load_file(out / "model.safetensors")  # the original (SGM) key layout
    assert "model.diffusion_model.input_blocks.0.0.weight" in single
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc1.weight" in single
    assert "conditioner.embedders.1.model.transformer.resblocks.9.attn.in_proj_weight" in single
    assert "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight" in single or \
        "first_stage_model.encoder.mid.attn_1.q.weight" in single
    # and the whole model loads as `pretrained` (single file + local config folder)
    model = sdxl.load(str(out / "model.safetensors"), out / "diffusers")
    for k, v in model.unet.state_dict().items():
        assert torch.equal(v, trained[k])


def test_overfit_on_four_images_lowers_loss(tmp_path):
    write_images_manifest(tmp_path, "t", [(64, 64)] * 4, captions=[f"img{i}" for i in range(4)])
    cfg = train_config.load(write_config(tmp_path / "c.toml", [{"manifest": "t.parquet"}], train_batch_size=4,
                                         learning_rate=2e-3, max_train_steps=24, max_grad_norm=0.0))
    plan = train_data.plan(cfg)
    model = sdxl.tiny_random()
    pixels = torch.stack([train_data.pixels(s, False) for s in plan.samples])
    with torch.no_grad():
        latents = model.vae.encode(pixels).latent_dist.mode() * model.vae.config.scaling_factor
    ids = torch.tensor([train_data.time_ids(s, False) for s in plan.samples], dtype=torch.float32)
    captions = [s.caption for s in plan.samples]
    scheduler = sdxl.noise_scheduler()
    gen = torch.Generator().manual_seed(123)
    probes = [(torch.randn(latents.shape, generator=gen), torch.tensor([t] * 4)) for t in (50, 250, 500, 750, 950)]

    def eval_loss(unet) -> float:
        with torch.no_grad():
            context, pooled = sdxl.encode_text(model, captions, "cpu")
            total = 0.0
            for noise, t in probes:
                pred = unet(scheduler.add_noise(latents, noise, t), t, context,
                            added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
                total += torch.nn.functional.mse_loss(pred, noise).item()
        return total / len(probes)

    before = eval_loss(sdxl.tiny_random().unet.eval())
    result = train(cfg, progress=False)
    after = eval_loss(sdxl.load(result["exported"]["diffusers"]).unet.eval())
    print(f"overfit eval loss {before:.4f} -> {after:.4f}")
    assert after < 0.5 * before, (before, after)


def test_cli_short_run_with_recipe_options(tmp_path, monkeypatch):
    """Lion8bit (bitsandbytes), v-prediction, min-SNR, EMA, uncached pixels through a loader worker.
    The command in-process (CliRunner): its output and files are the point, not the process."""
    write_images_manifest(tmp_path, "t", SIZES[:4])
    config = write_config(tmp_path / "c.toml", [{"manifest": "t.parquet", "flip_aug": True}],
                          optimizer_type="Lion8bit", optimizer_args={"weight_decay": 0.1, "betas": [0.9, 0.95]},
                          learning_rate=1e-4, v_parameterization=True, min_snr_gamma=5.0, ema_decay=0.9,
                          cache_latents=False, max_data_loader_n_workers=1, gradient_checkpointing=True,
                          output_name="demo", sample_every_n_steps=2, sample_prompts=["1girl, solo"],
                          sample_steps=2)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["train", str(config)], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    assert "train: 2 optimizer steps" in r.stdout and "demo.safetensors" in r.stdout
    assert all(math.isfinite(v) for v in losses(tmp_path / "run").values())
    assert (tmp_path / "run" / "diffusers" / "unet" / "config.json").is_file()
    assert not (tmp_path / "run" / "latent_cache").exists()
    with Image.open(tmp_path / "run" / "samples" / "step-0000002-0.png") as sample:
        assert sample.size == (64, 64)


def test_unloadable_pretrained_is_a_one_line_error(tmp_path):
    from safetensors.torch import save_file

    save_file({"foo": torch.zeros(3)}, str(tmp_path / "junk.safetensors"))
    (tmp_path / "empty").mkdir()
    for pretrained, config_dir in (("junk.safetensors", "empty"), ("empty", None), ("absent.safetensors", None)):
        with pytest.raises(CurateError) as err:
            sdxl.load(str(tmp_path / pretrained), tmp_path / config_dir if config_dir else None)
        assert str(tmp_path / pretrained) in str(err.value) and "\n" not in str(err.value)


def test_an_unwritable_output_dir_is_a_one_line_error_before_the_model_loads(tmp_path):
    write_images_manifest(tmp_path, "t", SIZES[:2])
    (tmp_path / "afile").write_text("a file where output_dir should go")
    config = write_config(tmp_path / "c.toml", [{"manifest": "t.parquet"}], mixed_precision="no",
                          output_dir=str(tmp_path / "afile" / "run"))
    r = subprocess.run([CURATE, "train", str(config)], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith(f"error: cannot write output_dir {tmp_path / 'afile' / 'run'}")


def test_two_processes_share_the_epoch(tmp_path):
    """What `accelerate launch` does on several GPUs, here as 2 CPU processes (gloo)."""
    write_images_manifest(tmp_path, "t", SIZES)
    config = write_config(tmp_path / "c.toml", [{"manifest": "t.parquet"}], max_train_epochs=1)
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    env = {**ONE_THREAD, "ACCELERATE_USE_CPU": "1"}
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "curate", "train", str(config),
                        "--quiet"], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("train: ") == 1  # one summary, from the main process
    plan = train_data.plan(train_config.load(config), num_processes=2)
    batches = [plan.epoch_batches(0, p) for p in (0, 1)]
    assert len(batches[0]) == len(batches[1]) == plan.batches_per_epoch
    assert sorted(sum(batches[0] + batches[1], [])) == sorted(i for v in plan.buckets.values() for i in v)
    assert len(losses(tmp_path / "run")) == plan.total_steps == plan.batches_per_epoch  # accumulation 1
