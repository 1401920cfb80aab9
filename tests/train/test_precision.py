"""Every precision path the config allows runs on the CPU through the code the GPU uses;
stochastic rounding keeps small updates of 16-bit weights; the grad scaler's skipped steps
do not advance the LR schedule; masked loss ignores masked pixels."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from curate.common import train_config
from curate.train import data as train_data
from curate.train import precision as train_precision
from curate.train import validation
from curate.train.loop import train
from tests.train.test_loop import SIZES, losses, write_config, write_images_manifest  # noqa: F401

LION = {"optimizer_type": "Lion8bit", "learning_rate": 1e-4}  # the recipe's optimizer for 16-bit weights
PATHS = {  # every combination _check allows
    "fp32": {},
    "bf16": {"mixed_precision": "bf16"},
    "fp16": {"mixed_precision": "fp16"},
    "full_bf16": {"mixed_precision": "bf16", "full_bf16": True, **LION},
    "full_fp16": {"mixed_precision": "fp16", "full_fp16": True, **LION},
    "full_bf16+sr": {"mixed_precision": "bf16", "full_bf16": True, "stochastic_rounding": True, **LION},
    "full_fp16+sr": {"mixed_precision": "fp16", "full_fp16": True, "stochastic_rounding": True},  # AdamW
}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    write_images_manifest(root, "t", SIZES[:2])
    return root


@pytest.mark.parametrize("name", list(PATHS))
def test_every_precision_path_trains(images, tmp_path, name):
    values = {"learning_rate": 1e-3, **PATHS[name]}
    cfg = train_config.load(write_config(tmp_path / "c.toml", [{"manifest": str(images / "t.parquet")}],
                                         save_every_n_steps=1, max_train_steps=2,
                                         latent_cache_dir=str(images / "cache"), log_with="none", **values))
    result = train(cfg, progress=False)
    assert result["steps"] == 2 and all(math.isfinite(v) for v in losses(tmp_path / "run").values())
    from safetensors.torch import load_file

    first = load_file(tmp_path / "run" / "checkpoints" / "step-0000001" / "model.safetensors")
    last = load_file(tmp_path / "run" / "checkpoints" / "step-0000002" / "model.safetensors")
    want = {"full_bf16": torch.bfloat16, "full_fp16": torch.float16}.get(name.split("+")[0], torch.float32)
    assert {v.dtype for v in last.values()} == {want}  # the weights trained in the path's dtype
    assert any(not torch.equal(first[k], last[k]) for k in first)  # and they moved
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    if values.get("mixed_precision") == "fp16":  # the grad scaler ran and is logged
        assert all(r["grad_scale"] > 0 for r in rows) and "skipped_steps" in rows[-1]
        assert (tmp_path / "run" / "checkpoints" / "step-0000002" / "custom_checkpoint_1.pkl").is_file()
    else:
        assert "grad_scale" not in rows[-1]


# pytorch/pytorch#120376 and pytorch/ao#1124: with 16-bit weights and round-to-nearest, an
# update under half a grid step is lost; stochastic rounding keeps it on average.
@pytest.mark.parametrize("dtype,optimizer", [(torch.float16, "Lion"), (torch.bfloat16, "AdamW")])
def test_stochastic_rounding_moves_weights_that_plain_rounding_keeps(dtype, optimizer):
    import bitsandbytes as bnb

    def run(stochastic: bool):
        torch.manual_seed(0)
        # |w| >= 0.016: the fp16 grid step there is 1.5e-5, twice the recipe's Lion step of 7.5e-6
        w = torch.nn.Parameter(torch.linspace(0.016, 0.5, 2000).to(dtype))
        start = w.detach().float().clone()
        if optimizer == "Lion":
            opt = bnb.optim.Lion([w], lr=7.5e-6, betas=(0.9, 0.95), weight_decay=0.0)
        else:
            opt = torch.optim.AdamW([w], lr=7.5e-6, weight_decay=0.0)
        if stochastic:
            cfg = train_config.TrainConfig(pretrained="tiny-random", output_dir="x", mixed_precision="fp16",
                                           full_fp16=True, stochastic_rounding=True)
            train_precision.Precision(cfg, torch.device("cpu")).install(opt)
        for _ in range(200):
            w.grad = torch.full_like(w, -1.0)  # always the same direction: up by lr per step
            opt.step()
        assert w.dtype == dtype
        return w.detach().float() - start

    plain, stochastic = run(False), run(True)
    assert torch.count_nonzero(plain) == 0  # every update rounded away
    assert (stochastic > 0).float().mean() > 0.5  # (bf16: a grid step is up to 4e-3 here, more than 200 updates)
    assert stochastic.mean().item() == pytest.approx(200 * 7.5e-6, rel=0.1)  # unbiased


def test_stochastic_round_is_unbiased_and_stays_on_the_grid():
    torch.manual_seed(0)
    x = torch.full((200_000,), 0.0200001) + torch.linspace(0, 1e-5, 200_000)
    for dtype in (torch.float16, torch.bfloat16):
        r = train_precision.stochastic_round(x, dtype)
        assert r.dtype == dtype
        assert r.float().mean().item() == pytest.approx(x.mean().item(), rel=1e-4)
        assert len(r.unique()) <= 4  # neighbours on the 16-bit grid, nothing in between
    exact = torch.tensor([0.5, -2.0, 0.0])
    assert torch.equal(train_precision.stochastic_round(exact, torch.float16).float(), exact)


def test_a_skipped_step_does_not_advance_the_schedule():
    cfg = train_config.TrainConfig(pretrained="tiny-random", output_dir="x", mixed_precision="fp16")
    precision = train_precision.Precision(cfg, torch.device("cpu"))
    w = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.AdamW([w], lr=1.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: step + 1)
    for grad, expected in ((float("inf"), False), (1.0, True)):
        with precision.autocast():
            loss = (w * grad).sum()
        precision.scaler.scale(loss).backward()  # what precision.backward does through accelerate
        precision.unscale(opt)
        stepped = precision.step(opt)
        if stepped:  # what the loop does
            schedule.step()
        opt.zero_grad()
        assert stepped is expected
    assert precision.skipped == 1 and schedule.last_epoch == 1  # one real step counted


# --- masked loss ------------------------------------------------------------------------------

def rgba(path, alpha):
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, alpha]).astype(np.uint8), "RGBA").save(path)


def test_masks_come_from_alpha_or_a_mask_file(tmp_path):
    write_images_manifest(tmp_path, "t", [(64, 64)] * 3)
    half = np.zeros((64, 64), np.uint8)
    half[:, 32:] = 255
    rgba(tmp_path / "t" / "000.png", half)                       # alpha: right half visible
    Image.fromarray(255 - half).save(tmp_path / "t" / "001_mask.png")  # mask file: left half
    cfg = train_config.load(write_config(tmp_path / "c.toml", [{"manifest": "t.parquet"}], masked_loss=True,
                                         train_batch_size=1))
    plan = train_data.plan(cfg)
    by_key = {s.key: s for s in plan.samples}
    alpha = train_data.mask(by_key["local/t-0"], False)
    assert alpha.shape == (64, 64) and alpha[:, :32].max() == 0 and alpha[:, 32:].min() == 1
    flipped = train_data.mask(by_key["local/t-0"], True)
    assert flipped[:, :32].min() == 1 and flipped[:, 32:].max() == 0  # follows the flip
    from_file = train_data.mask(by_key["local/t-1"], False)
    assert from_file[:, :32].min() == 1 and from_file[:, 32:].max() == 0
    assert train_data.mask(by_key["local/t-2"], False) is None  # no mask: trains as before
    batch = train_data.RunData(plan, None, 0, 0)[0]
    assert batch["masks"].shape == (1, 1, 64, 64)


def test_masked_pixels_contribute_nothing():
    """sd-scripts' apply_masked_loss: area-scaled to the latent grid; kohya-ss/sd-scripts#1223
    (alpha as the loss mask, so a transparent background is not learned)."""
    pred = torch.randn(1, 4, 8, 8, requires_grad=True)
    target = torch.randn(1, 4, 8, 8)
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 32:] = 1  # right half of the pixels -> right half of the latent grid
    loss = validation.apply_mask(torch.nn.functional.mse_loss(pred, target, reduction="none"), mask).mean()
    loss.backward()
    assert pred.grad[..., :4].abs().max() == 0 and pred.grad[..., 4:].abs().min() > 0
    changed = target.clone()
    changed[..., :4] += 10  # whatever is under the mask
    again = validation.apply_mask(torch.nn.functional.mse_loss(pred, changed, reduction="none"), mask).mean()
    assert again.item() == pytest.approx(loss.item())


def test_a_fully_transparent_image_teaches_nothing(tmp_path):
    write_images_manifest(tmp_path, "t", [(64, 64)])
    rgba(tmp_path / "t" / "000.png", np.zeros((64, 64), np.uint8))
    cfg = train_config.load(write_config(tmp_path / "c.toml", [{"manifest": "t.parquet"}], masked_loss=True,
                                         train_batch_size=1, log_with="none", max_grad_norm=0.0,
                                         optimizer_args={"weight_decay": 0.0}))
    train(cfg, progress=False)
    assert set(losses(tmp_path / "run").values()) == {0.0}
