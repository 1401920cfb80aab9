"""metrics.jsonl never holds a step twice; log_with; text encoders frozen after the stop with
their optimizer state freed; cosine_with_restarts restarts (the LR curve shows it)."""

import json

import pytest
import torch

from curate.common import train_config
from curate.errors import CurateError
from curate.train import logs
from curate.train.loop import train
from tests.train.test_loop import SIZES, one_thread, write_config, write_images_manifest  # noqa: F401


def test_a_resumed_log_drops_the_steps_after_the_checkpoint(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)))
    cfg = train_config.TrainConfig(pretrained="tiny-random", output_dir=tmp_path, log_with="none")
    lines = []
    run_log = logs.RunLog(cfg, tmp_path, resume_step=3, log=lines.append)
    run_log.step(4, {"loss": float("nan"), "lr": 1e-5})
    run_log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] is None  # NaN written as null
    assert lines == [f"logging to metrics: {tmp_path / 'metrics.jsonl'}"]


def test_wandb_is_imported_only_when_asked(tmp_path):
    import importlib.util

    cfg = train_config.TrainConfig(pretrained="tiny-random", output_dir=tmp_path, log_with="wandb")
    if importlib.util.find_spec("wandb") is None:
        with pytest.raises(CurateError, match="needs the wandb package"):
            logs.RunLog(cfg, tmp_path, log=lambda _: None)
    else:  # offline: nothing leaves the machine
        import os

        os.environ["WANDB_MODE"] = "offline"
        logs.RunLog(cfg, tmp_path, log=lambda _: None).close()
        assert (tmp_path / "wandb").is_dir()


@pytest.fixture(scope="module")
def te_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("te")
    write_images_manifest(root, "t", SIZES[:2])
    cfg = train_config.load(write_config(
        root / "c.toml", [{"manifest": "t.parquet"}], max_train_steps=8, learning_rate=1e-3,
        learning_rate_te1=1e-3, stop_text_encoder_training=0.25, save_every_n_steps=2, save_last_n_checkpoints=0,
        lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles=2, log_with="none"))
    logged = []
    train(cfg, progress=False, log=logged.append)
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    return root / "run", rows, logged, cfg


def test_text_encoders_freeze_after_the_stop_and_free_their_state(te_run):
    from safetensors.torch import load_file

    from curate.train import sdxl

    run, rows, logged, _ = te_run
    assert "step 2: text encoders frozen (stop_text_encoder_training)" in logged  # 0.25 of 8 steps
    te1 = "conditioner.embedders.0.transformer."
    step = {s: load_file(run / "checkpoints" / f"step-{s:07d}" / f"model-step{s}.safetensors") for s in (2, 4, 6)}
    start = sdxl.save_single_file(sdxl.tiny_random(), run / "start.safetensors")
    start = load_file(start)
    keys = [k for k in start if k.startswith(te1)]
    assert any(not torch.equal(start[k], step[2][k]) for k in keys)  # trained until the stop
    assert all(torch.equal(step[2][k], step[6][k]) for k in keys)    # frozen after it
    unet = [k for k in start if k.startswith("model.diffusion_model.")]
    assert any(not torch.equal(step[4][k], step[6][k]) for k in unet)  # the UNet goes on
    optimizer = torch.load(run / "checkpoints" / "step-0000006" / "optimizer.bin", weights_only=False)
    unet_group, te_group = optimizer["param_groups"]
    assert te_group["params"] == [] and len(optimizer["state"]) == len(unet_group["params"])  # TE state freed


def test_cosine_with_restarts_restarts(te_run):
    """huggingface/diffusers#1232 and bmaltais/kohya_ss#881: cosine_with_restarts ran as one
    plain cosine (num_cycles never reached the scheduler). Two cycles over 8 steps: the LR falls
    to its low at step 4 and is back up at step 5."""
    run, rows, *_ = te_run
    lr = [r["lr/unet"] for r in rows]
    assert lr[0] > lr[1] > lr[2] > lr[3] and lr[4] == pytest.approx(1e-3) and lr[4] > lr[5] > lr[6] > lr[7]
    assert [r["lr/te1"] for r in rows] == lr  # the text encoder's own LR (here equal) on the same schedule


def test_a_resume_after_the_stop_continues_exactly(te_run):
    """The checkpoint after the stop holds no text-encoder optimizer state; the resumed run
    freezes them before loading it, and trains on as the uninterrupted run did."""
    run, rows, _, cfg = te_run
    train(cfg, resume=str(run / "checkpoints" / "step-0000004"), progress=False, log=lambda _: None)
    again = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again] == list(range(1, 9))
    for a, b in zip(rows[4:], again[4:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6) and b["lr/unet"] == a["lr/unet"]
