"""Sample prompts in sd-scripts' syntax, parsed and honoured: size, steps, seed, CFG, sampler,
negative prompt; PNG text metadata, a contact sheet, images in TensorBoard."""

import json

import pytest
import torch
from PIL import Image

from curate.common import train_config
from curate.errors import CurateError
from curate.train import sampling
from curate.train.loop import train
from tests.train.test_loop import SIZES, one_thread, write_config, write_images_manifest  # noqa: F401


def cfg_with(tmp_path, prompts, **values):
    (tmp_path / "m").mkdir(exist_ok=True)
    write_images_manifest(tmp_path / "m", "t", SIZES[:2])
    return train_config.load(write_config(tmp_path / "c.toml", [{"manifest": str(tmp_path / "m" / "t.parquet")}],
                                          sample_prompts=prompts, **values))


def test_prompt_line_options_as_sd_scripts_reads_them(tmp_path):
    """The line of sd-scripts' docs/train_README (`--n` negative, `--w`/`--h` size, `--l` CFG,
    `--s` steps, `--d` seed) and `--ss` for the sampler."""
    cfg = cfg_with(tmp_path, ["masterpiece, 1girl, halo --n low quality, worst quality --w 832 --h 1216 --l 5.5 "
                              "--s 20 --d 42 --ss k_euler", "plain prompt", "odd size --w 100 --h 70"])
    first, plain, odd = sampling.prompts(cfg)
    assert first == sampling.Prompt("masterpiece, 1girl, halo", "low quality, worst quality", 832, 1216, 5.5, 20,
                                    42, "euler")
    # defaults: the recipe card's sampler, steps, CFG and negative prompt; the training size; seed + index
    assert plain == sampling.Prompt("plain prompt", train_config.SAMPLE_NEGATIVE, 64, 64, 5.0, 25, 7 + 1, "euler_a")
    assert (odd.width, odd.height) == (96, 64)  # rounded down to a multiple of 8
    assert "Steps: 20, Sampler: Euler, CFG scale: 5.5, Seed: 42, Size: 832x1216" in first.parameters()


def test_prompt_files_txt_toml_json(tmp_path):
    (tmp_path / "p.txt").write_text("# a comment\n\n1girl --s 3\n  # indented comment\nsolo --d 9\n", encoding="utf-8")
    (tmp_path / "p.toml").write_text('[prompt]\nwidth = 128\nsample_steps = 4\n\n[[prompt.subset]]\nprompt = "a"\n\n'
                                     '[[prompt.subset]]\nprompt = "b"\nnegative_prompt = "c"\nseed = 3\n', encoding="utf-8")
    (tmp_path / "p.json").write_text(json.dumps(["x --l 7", {"prompt": "y", "scale": 2, "sample_sampler": "dpm++_2m"}]))
    txt, toml, js = ([(p.prompt, p.steps, p.seed) for p in sampling.prompts(cfg_with(tmp_path, f"p.{ext}"))]
                     for ext in ("txt", "toml", "json"))
    assert txt == [("1girl", 3, 7), ("solo", 25, 9)]
    assert toml == [("a", 4, 7), ("b", 4, 3)]
    assert [(p.prompt, p.scale, p.sampler) for p in sampling.prompts(cfg_with(tmp_path, "p.json"))] == [
        ("x", 7.0, "euler_a"), ("y", 2.0, "dpm++_2m")]
    assert sampling.prompts(cfg_with(tmp_path, "p.toml"))[0].width == 128


@pytest.mark.parametrize("line,message", [
    ("a --x 3", "unknown option --x 3"), ("a --w wide", "invalid literal"), ("a --ss ddim", "sampler 'ddim'"),
    ("a --w 32", "width/height must be >= 64"), ("a --s 0", "steps 1-1000"),
])
def test_bad_prompt_lines_are_one_line_errors(tmp_path, line, message):
    cfg = cfg_with(tmp_path, [line])
    with pytest.raises(CurateError) as err:
        sampling.prompts(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_sampling_points():
    cfg = train_config.TrainConfig(pretrained="tiny-random", output_dir="x", sample_prompts=["a"],
                                   sample_every_n_steps=3, sample_at_first=True)
    assert [s for s in range(10) if sampling.due(cfg, s)] == [0, 3, 6, 9]
    cfg.sample_every_n_epochs = 2  # wins over sample_every_n_steps, as in sd-scripts
    assert not sampling.due(cfg, 3) and sampling.due(cfg, 7, epoch_end=2) and not sampling.due(cfg, 7, epoch_end=1)


@pytest.fixture(scope="module")
def sampled(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampled")
    cfg = cfg_with(root, ["1girl, solo --n lowres --w 64 --h 96 --l 4 --s 2 --d 5 --ss dpm++_2m",
                          "1girl, solo --n lowres --w 64 --h 96 --l 4 --s 2 --d 5 --ss euler",
                          "1girl, solo --n lowres --w 64 --h 96 --l 4 --s 2 --d 6 --ss euler"],
                   sample_at_first=True, sample_every_n_steps=2, max_train_steps=2)
    train(cfg, progress=False)
    return root / "run"


def test_sample_images_follow_their_prompt_line(sampled):
    folder = sampled / "samples"
    names = {p.name for p in folder.iterdir()}
    assert names == {f"step-{s:07d}-{i}.png" for s in (0, 2) for i in range(3)} | {
        "step-0000000-sheet.png", "step-0000002-sheet.png"}
    with Image.open(folder / "step-0000002-0.png") as im:
        assert im.size == (64, 96)
        meta = json.loads(im.text["curate"])
        assert im.text["parameters"].startswith("1girl, solo\nNegative prompt: lowres\nSteps: 2, Sampler: DPM++ 2M")
    assert (meta["seed"], meta["steps"], meta["scale"], meta["sampler"], meta["step"]) == (5, 2, 4.0, "dpm++_2m", 2)
    with Image.open(folder / "step-0000002-sheet.png") as sheet:
        assert sheet.size == (3 * round(256 * 64 / 96), 256)  # three images side by side at 256 px high
    # the seed (--d) decides the noise: other seed, other image; the weights moved between 0 and 2
    pixels = {name: torch.tensor(list(Image.open(folder / name).getdata())).float()
              for name in ("step-0000002-1.png", "step-0000002-2.png", "step-0000000-1.png")}
    assert not torch.equal(pixels["step-0000002-1.png"], pixels["step-0000002-2.png"])
    assert not torch.equal(pixels["step-0000002-1.png"], pixels["step-0000000-1.png"])


def test_samples_show_in_tensorboard(sampled):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(sampled / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {"samples/0", "samples/1", "samples/2"} <= set(events.Tags()["images"])
    assert [e.step for e in events.Images("samples/0")] == [0, 2]
    assert events.Images("samples/0")[0].width == 64 and events.Images("samples/0")[0].height == 96
