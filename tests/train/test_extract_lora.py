"""extract-lora and merge-lora on tiny SDXL checkpoints (diffusers folders and single files).

The commands run in-process: their output and files are the point, not the process (the
installed `curate` runs as a process in test_loop.py); the one-line error goes through
curate.cli.main, the installed command's entry point."""

import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from curate import cli
from curate.errors import CurateError
from curate.train import extract_lora, lora_file, merge_lora, network, sdxl

RANK = 3


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """BASE (a diffusers folder) and TUNED (a single file) whose difference is exactly rank 3
    in every layer a LoRA covers, 3x3 convs included; the difference per kohya name."""
    root = tmp_path_factory.mktemp("extract")
    base, tuned = sdxl.tiny_random(), sdxl.tiny_random()
    g = torch.Generator().manual_seed(0)
    diffs = {}
    with torch.no_grad():
        for name, (part, layer, is_3x3) in network.targets(tuned, True, conv=True).items():
            w = layer.weight
            u = torch.randn(w.shape[0], RANK, generator=g) * 0.05
            v = torch.randn(RANK, w[0].numel(), generator=g)
            diffs[name] = (u @ v).reshape(w.shape)
            w.add_(diffs[name])
    sdxl.save_diffusers(base, root / "base")
    sdxl.save_single_file(tuned, root / "tuned.safetensors")
    return root, diffs


def test_an_exactly_low_rank_difference_is_recovered_and_merges_back(checkpoints):
    root, diffs = checkpoints
    out, result = extract_lora.run(str(root / "base"), str(root / "tuned.safetensors"), dim=4, conv_dim=4,
                                   out=root / "x.safetensors", config_dir=root / "base", precision="float")
    state, meta = lora_file.read(out)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert {k.split(".")[0] for k in state} == set(diffs)
    for name, diff in diffs.items():
        up, down = state[f"{name}.lora_up.weight"], state[f"{name}.lora_down.weight"]
        scale = state[f"{name}.alpha"] / down.shape[0]
        rebuilt = (up.flatten(1) @ down.flatten(1)) * scale
        torch.testing.assert_close(rebuilt.reshape(diff.shape), diff, rtol=1e-4, atol=2e-6)
    for kind, (kept, total) in result.norms.items():
        assert kept == pytest.approx(total, rel=1e-5), kind  # rank 4 >= 3 keeps all of it
    text = "\n".join(result.lines(out))
    assert "100.0%" in text and "warning" not in text

    merged = root / "merged.safetensors"
    r = CliRunner().invoke(cli.app, ["merge-lora", str(root / "base"), str(out), "--out", str(merged),
                                     "--precision", "float"], catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    got = sdxl.load(str(merged), root / "base")
    want = sdxl.load(str(root / "tuned.safetensors"), root / "base")
    for part in ("unet", "te1", "te2"):
        a, b = getattr(got, part).state_dict(), getattr(want, part).state_dict()
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=2e-6)


def test_a_small_rank_warns_and_convs_left_out_are_reported(checkpoints, tmp_path):
    root, _ = checkpoints
    r = CliRunner().invoke(cli.app, ["extract-lora", str(root / "base"), str(root / "tuned.safetensors"), "--dim", "1",
                                     "--config", str(root / "base"), "--out", str(tmp_path / "small.safetensors")],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.stderr
    assert "unet attention/mlp" in r.stdout and "te1 (text encoder)" in r.stdout
    assert "layers no LoRA layer covers" in r.stdout  # the 3x3 convs, without --conv-dim
    assert "warning: unet:" in r.stdout and "add --conv-dim" in r.stdout
    state, meta = lora_file.read(tmp_path / "small.safetensors")
    assert all(v.dtype == torch.float16 for v in state.values())  # --precision fp16 by default
    assert not any("in_layers_2" in k for k in state)


def test_a_rank_that_keeps_little_warns():
    """Differences with 8 equal singular values: rank 1 keeps sqrt(1/8) = 35% of the norm."""
    base, tuned = sdxl.tiny_random(), sdxl.tiny_random()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, (part, layer, _) in network.targets(tuned, True).items():
            w = layer.weight
            q1 = torch.linalg.qr(torch.randn(w.shape[0], 8, generator=g)).Q
            q2 = torch.linalg.qr(torch.randn(w[0].numel(), 8, generator=g)).Q
            w.add_((q1 @ q2.T).reshape(w.shape) * 0.01)
        result = extract_lora.extract(base, tuned, dim=1)
    for kind, (kept, total) in result.norms.items():
        assert (kept / total) ** 0.5 == pytest.approx(8 ** -0.5, rel=1e-3), kind
    text = "\n".join(result.lines(Path("x.safetensors")))
    assert "warning: unet attention/mlp: the rank keeps only 35%" in text
    assert "warning: te2 (text encoder): the rank keeps only 35%" in text


def test_two_architectures_are_refused_in_one_line(checkpoints, tmp_path, monkeypatch, capsys):
    from diffusers import UNet2DConditionModel

    root, _ = checkpoints
    other = sdxl.tiny_random()
    other.unet = UNet2DConditionModel.from_config({**other.unet.config, "transformer_layers_per_block": (1, 1)})
    sdxl.save_diffusers(other, tmp_path / "other")
    capsys.readouterr()
    # the console script's entry point (an exception other than the one-line error would escape it
    # and fail the test, as a traceback would in the installed command's stderr)
    monkeypatch.setattr(sys, "argv", ["curate", "extract-lora", str(root / "base"), str(tmp_path / "other"),
                                      "--dim", "4"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    stderr = capsys.readouterr().err
    assert exit_.value.code not in (0, None) and "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]  # (above it: the loaders' progress bars)
    assert "different architectures" in last and "extract from a fine-tune of BASE" in last


def test_merging_a_trained_lora_equals_the_network_forward(tmp_path):
    """A LoRA with LoCon convs at scale 0.5, merged, gives the UNet output of the applied network."""
    model = sdxl.tiny_random()
    net = network.Network(model, "locon", dim=4, alpha=2, seed=1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = lora_file.save(net.state_dict(), tmp_path / "n.safetensors", {})
    net.attach()
    net.set_multiplier(0.5)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([300])
    ctx = torch.randn(1, 77, 80, generator=g)
    added = {"text_embeds": torch.randn(1, 48, generator=g), "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]])}
    merged = sdxl.tiny_random()
    state, _ = lora_file.read(path)
    assert merge_lora.merge(merged, state, scale=0.5) == len(net)
    with torch.no_grad():
        want = model.unet(x, t, ctx, added_cond_kwargs=added).sample
        got = merged.unet(x, t, ctx, added_cond_kwargs=added).sample
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_merge_refuses_a_lora_for_another_model(tmp_path):
    """Comfy-Org/ComfyUI#6381 and #5655: a LoRA for another architecture (an SD 1.5 LoRA, which
    kohya names with diffusers' block names, on SDXL) is applied with a screen of `lora key not
    loaded` lines and silently does less; merge-lora refuses it in one line instead."""
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"  # from ComfyUI#6381
    bad = {f"{name}.lora_down.weight": torch.zeros(4, 320), f"{name}.lora_up.weight": torch.zeros(320, 4)}
    path = lora_file.save(bad, tmp_path / "flux.safetensors", {})
    state, _ = lora_file.read(path)
    with pytest.raises(CurateError, match="not layers of this SDXL model"):
        merge_lora.merge(sdxl.tiny_random(), state)
    (tmp_path / "not.safetensors").write_bytes(b"garbage")
    with pytest.raises(CurateError, match="cannot read"):
        lora_file.read(tmp_path / "not.safetensors")


def test_a_slightly_tuned_text_encoder_is_extracted_and_an_untouched_one_reported():
    """kohya-ss/sd-scripts#890: a text encoder trained at a low rate moved less than
    extract_lora_from_models' min_diff (0.01), so the extracted LoRA left it out and training
    the text encoder looked like it "does literally nothing". Here only a text encoder whose
    largest change is below save rounding (1e-4) counts as unchanged, and the summary says so."""
    base, tuned = sdxl.tiny_random(), sdxl.tiny_random()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, (part, layer, _) in network.targets(tuned, True).items():
            if part == "te1":  # moved by ~1e-3 at most: under sd-scripts' min_diff
                u, v = torch.randn(layer.weight.shape[0], 1, generator=g), torch.randn(1, layer.weight.shape[1], generator=g)
                layer.weight.add_(u @ v / (u @ v).abs().max() * 1e-3)
        result = extract_lora.extract(base, tuned, dim=2)
    assert result.skipped_parts == ["te2"]
    assert any(k.startswith("lora_te1_") for k in result.state) and not any(k.startswith("lora_te2_") for k in result.state)
    assert result.norms["te1 (text encoder)"][0] == pytest.approx(result.norms["te1 (text encoder)"][1], rel=1e-4)
    assert "te2: unchanged by the fine-tune, not extracted" in "\n".join(result.lines(Path("x")))
