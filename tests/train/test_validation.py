"""Validation loss on a held-out set that never trains; the dry run shows it and warns where
settings contradict each other; a run is never overwritten by accident."""

import json
import math

import pytest
import torch

from curate.common import train_config
from curate.errors import CurateError
from curate.train import data as train_data
from curate.train import sdxl, validation
from curate.train.dryrun import dry_run, render
from curate.train.loop import train
from tests.train.test_loop import SIZES, write_config, write_images_manifest  # noqa: F401


def split_config(root, **values):
    write_images_manifest(root, "t", SIZES)
    write_images_manifest(root, "r", SIZES, reg=True, seed=1)
    datasets = [{"manifest": str(root / "t.parquet")}, {"manifest": str(root / "r.parquet")}]
    return train_config.load(write_config(root / "c.toml", datasets, **{"validation_split": 0.34, **values}))


def test_held_out_rows_never_train(tmp_path):
    cfg = split_config(tmp_path, max_train_epochs=3)
    plan = train_data.plan(cfg)
    held = {plan.samples[i].key for i in plan.val}
    assert len(held) == 2 and all(not plan.samples[i].is_reg for i in plan.val)  # 34% of 6; reg sets not split
    data = train_data.RunData(plan, None, 0, 0)
    seen = {key for i in range(len(data)) for key in data[i]["keys"]}  # every batch of the run
    assert seen and not seen & held
    assert plan.summary()["train_images"] == 4 and plan.summary()["validation_images"] == 2
    # the same split next time (seeded, by key), another with another seed
    assert {plan.samples[i].key for i in train_data.plan(cfg).val} == held


def test_reg_sets_split_only_when_asked_and_is_val_holds_out_a_manifest(tmp_path):
    cfg = split_config(tmp_path, validation_split_reg=True)
    plan = train_data.plan(cfg)
    assert sum(plan.samples[i].is_reg for i in plan.val) == 2 and len(plan.val) == 4
    assert plan.summary()["validation_reg_images"] == 2
    write_images_manifest(tmp_path, "v", SIZES[:3], seed=3)
    whole = train_config.load(write_config(tmp_path / "v.toml", [{"manifest": "t.parquet"},
                                                                  {"manifest": "v.parquet", "is_val": True}]))
    plan = train_data.plan(whole)
    assert sorted(plan.samples[i].key for i in plan.val) == ["local/v-0", "local/v-1", "local/v-2"]


def test_validation_loss_uses_fixed_noise_and_timesteps(tmp_path):
    """kohya-ss/sd-scripts#1856 (validation over fixed timesteps, to compare across steps):
    the same weights give the same number every time; other weights another."""
    cfg = split_config(tmp_path)
    plan = train_data.plan(cfg)
    model = sdxl.tiny_random()
    from curate.train.precision import Precision

    precision = Precision(cfg, torch.device("cpu"))
    scheduler = sdxl.noise_scheduler()

    def loss(m):
        return validation.loss(m, m.unet, train_data.val_batches(plan, None), scheduler, cfg, "cpu", precision)

    first = loss(model)
    torch.randn(100)  # the global RNG moved: no effect
    assert loss(model) == first and math.isfinite(first)
    assert loss(sdxl.tiny_random(seed=1)) != first
    assert validation.passes(plan) == 2 * len(validation.TIMESTEPS)


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    root = tmp_path_factory.mktemp("validated")
    cfg = split_config(root, validate_every_n_steps=2, max_train_steps=4, lr_scheduler="polynomial",
                       lr_scheduler_power=2.0)
    logged = []
    result = train(cfg, progress=False, log=logged.append)
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    return root, cfg, result, rows, logged


def test_validation_loss_is_logged_beside_the_training_loss(validated):
    root, cfg, result, rows, logged = validated
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # one line per step
    assert [("val_loss" in r) for r in rows] == [False, True, False, True]
    assert all(math.isfinite(r["val_loss"]) for r in rows if "val_loss" in r)
    assert result["val_loss"] == rows[-1]["val_loss"]
    assert logged[0] == f"logging to metrics: {root / 'run' / 'metrics.jsonl'}; TensorBoard: " \
        f"tensorboard --logdir {root / 'run' / 'tensorboard'}"


def test_polynomial_schedule_honours_the_power(validated):
    *_, rows, _ = validated
    lr, end = 1e-3, 1e-7  # diffusers' polynomial decay ends at lr_end = 1e-7
    for r in rows:
        assert r["lr"] == pytest.approx((lr - end) * (1 - (r["step"] - 1) / 4) ** 2 + end)  # the LR step k used


def test_tensorboard_event_files_hold_the_scalars(validated):
    """AkaneTendo25/musubi-tuner#35: tensorboard missing from the requirements, so a run with
    --log_with tensorboard wrote no logs and said nothing. Here it is in the ml extra and the
    events are really written."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, *_ = validated
    events = EventAccumulator(str(root / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "val_loss", "lr", "lr/unet", "grad_norm", "images_per_s", "data_wait_share"} <= tags
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("val_loss")] == [2, 4]


def test_a_run_is_not_overwritten_and_a_finished_run_is_not_resumed(validated):
    root, cfg, *_ = validated
    before = (root / "run" / "metrics.jsonl").read_bytes()
    with pytest.raises(CurateError, match=r"holds a run \(metrics.jsonl, checkpoints, tensorboard, diffusers\): continue it "
                                          r"with --resume, or start over with --overwrite"):
        train(cfg, progress=False)
    with pytest.raises(CurateError, match=r"the run is finished \(4 of 4 steps in step-0000004\); nothing changed"):
        train(cfg, resume=True, progress=False)
    assert (root / "run" / "metrics.jsonl").read_bytes() == before


def test_overwrite_starts_over_and_keeps_the_latent_cache(tmp_path):
    cfg = split_config(tmp_path, max_train_steps=1, log_with="none")
    run = tmp_path / "run"
    (run / "checkpoints" / "step-0000009").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 9}\n')
    (run / "latent_cache").mkdir()
    (run / "latent_cache" / "keep.safetensors").write_text("x")
    train(cfg, progress=False, overwrite=True)
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000001"]
    assert (run / "latent_cache" / "keep.safetensors").is_file()


def test_dry_run_shows_validation_and_warns_of_contradictions(tmp_path):
    write_images_manifest(tmp_path, "t", SIZES[:2])
    write_images_manifest(tmp_path, "v", SIZES[:3], seed=3)
    cfg = train_config.load(write_config(
        tmp_path / "c.toml", [{"manifest": "t.parquet"}, {"manifest": "v.parquet", "is_val": True}],
        lr_scheduler="constant_with_warmup", lr_warmup_steps=50, max_train_steps=4, validate_every_n_steps=2,
        sample_prompts=["big --w 512 --h 512"], mixed_precision="fp16", full_fp16=True))
    s = dry_run(cfg)
    assert s["validation"] == {"images": 3, "passes_per_validation": 15, "validations": 2,
                               "share_of_training": pytest.approx(2 * 15 / (3 * 4 * 2))}
    text = "\n".join(render(s))
    assert "validation: 3 held-out images (0 reg), 15 forward passes x 2 validations = 125.0% of the training" in text
    warnings = s["warnings"]
    assert any("lr_warmup_steps (50) is longer than the run (4 optimizer steps)" in w for w in warnings)
    assert any("validation set (3 images) is as large as the training set (2)" in w for w in warnings)
    assert any("sample prompt 1 is 512x512, larger than the largest bucket" in w for w in warnings)
    assert any("full_fp16 with AdamW" in w for w in warnings)
