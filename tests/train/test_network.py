"""LoRA / LyCORIS training on the tiny SDXL: the file it writes loads in diffusers with the
same outputs, resume is exact, and the config keys are checked."""

import json

import pytest
import torch
from safetensors import safe_open

from curate.common import train_config
from curate.errors import CurateError
from curate.train import lora_file, network, sdxl
from curate.train.dryrun import dry_run
from curate.train.loop import train
from tests.train.test_loop import SIZES, losses, write_config, write_images_manifest

LORA = dict(network="lora", network_dim=4, network_alpha=2.0, conv_dim=2, conv_alpha=1.0, learning_rate=1e-2,
            text_encoder_lr=5e-3)


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    """A LoRA (UNet + both text encoders, 3x3 convs too) trained 4 steps straight, and 2 steps
    + resume to 4, on a training set and a reg set with caption processing and min-SNR."""
    root = tmp_path_factory.mktemp("lora")
    write_images_manifest(root, "t", SIZES)
    write_images_manifest(root, "r", SIZES, reg=True, seed=1)
    datasets = [{"manifest": str(root / "t.parquet"), "shuffle_caption": True, "caption_tag_dropout_rate": 0.3},
                {"manifest": str(root / "r.parquet")}]
    common = dict(**LORA, network_dropout=0.1, min_snr_gamma=5.0, save_every_n_steps=2,
                  latent_cache_dir=str(root / "cache"), output_name="style")
    for name in ("a", "b"):
        (root / name).mkdir()
    straight = train(train_config.load(write_config(root / "a" / "c.toml", datasets, max_train_steps=4, **common)),
                     progress=False)
    train(train_config.load(write_config(root / "b" / "c.toml", datasets, max_train_steps=2, **common)), progress=False)
    cfg = train_config.load(write_config(root / "b" / "c.toml", datasets, max_train_steps=4, **common))
    resumed = train(cfg, resume=True, progress=False)
    return root, straight, resumed, cfg


def test_lora_file_has_kohya_keys_and_sd_scripts_metadata(lora_runs):
    root, straight, _, _ = lora_runs
    path = root / "a" / "run" / "style.safetensors"
    assert straight["exported"] == {"lora": str(path)}
    assert not (root / "a" / "run" / "diffusers").exists()  # a network run exports the network only
    with safe_open(str(path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    names = {k.split(".")[0] for k in keys}
    assert {n.split("_")[1] for n in names} == {"unet", "te1", "te2"}
    for n in names:
        assert {f"{n}.lora_down.weight", f"{n}.lora_up.weight", f"{n}.alpha"} <= keys
    # the SGM module names sd-scripts' SDXL LoRAs carry
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k" in names
    assert "lora_unet_output_blocks_0_0_in_layers_2" in names  # a 3x3 conv (conv_dim)
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_te2_text_model_encoder_layers_9_mlp_fc2" in names
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "2" and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["ss_resolution"] == "(64, 64)" and meta["ss_num_train_images"] == str(len(SIZES))
    assert meta["ss_steps"] == "4"
    freq = json.loads(meta["ss_tag_frequency"])
    assert freq["1_t"]["smile"] == len(SIZES) and freq["1_t"]["tag0"] == 1  # the captions' tags, not the reg set's
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.title"] == "style" and meta["modelspec.sai_model_spec"] == "1.0.1"
    step2 = root / "a" / "run" / "checkpoints" / "step-0000002" / "style-step2.safetensors"
    with safe_open(str(step2), "pt") as f:
        assert f.metadata()["ss_steps"] == "2" and set(f.keys()) == keys


def test_lora_resume_is_exact(lora_runs):
    root, straight, resumed, _ = lora_runs
    assert resumed["resumed_from"].endswith("step-0000002")
    a, b = losses(root / "a" / "run"), losses(root / "b" / "run")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6)
    wa, _ = lora_file.read(root / "a" / "run" / "style.safetensors")
    wb, _ = lora_file.read(root / "b" / "run" / "style.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    assert any(k.endswith("lora_up.weight") and wa[k].abs().max() > 0 for k in wa)  # it trained (up starts at 0)


def _inputs(model):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    time_ids = torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)
    return x, t, time_ids


def test_diffusers_load_lora_weights_gives_curates_outputs(lora_runs):
    """The trained file in diffusers' SDXL pipeline (load_lora_weights: kohya keys -> PEFT)
    against curate's forward with its own network: same text embeddings, same UNet output."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    root, _, _, cfg = lora_runs
    path = root / "a" / "run" / "style.safetensors"
    ours = sdxl.tiny_random()
    net = network.from_config(ours, cfg)
    net.load_file(path)
    for part in (ours.unet, ours.te1, ours.te2):
        part.eval()  # the network follows the model's mode: no network_dropout at inference
    theirs = sdxl.tiny_random()
    pipe = StableDiffusionXLPipeline(
        vae=theirs.vae, text_encoder=theirs.te1, text_encoder_2=theirs.te2, tokenizer=theirs.tok1,
        tokenizer_2=theirs.tok2, unet=theirs.unet,
        scheduler=EulerDiscreteScheduler.from_config(sdxl.noise_scheduler().config))
    pipe.load_lora_weights(str(path))
    plain = sdxl.tiny_random()
    x, t, time_ids = _inputs(ours)
    captions = ["1girl, solo, blue_hair, smile", "tag3, smile"]
    with torch.no_grad():
        ctx, pooled = sdxl.encode_text(ours, captions, "cpu")
        ctx2, pooled2 = sdxl.encode_text(theirs, captions, "cpu")
        ctx0, _ = sdxl.encode_text(plain, captions, "cpu")
        torch.testing.assert_close(ctx2, ctx, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(pooled2, pooled, rtol=1e-5, atol=1e-5)
        assert (ctx - ctx0).abs().max() > 1e-3  # the text encoder LoRA changes the embeddings
        added = {"text_embeds": pooled, "time_ids": time_ids}
        out = ours.unet(x, t, ctx, added_cond_kwargs=added).sample
        out_diffusers = pipe.unet(x, t, ctx, added_cond_kwargs=added).sample
        out_plain = plain.unet(x, t, ctx, added_cond_kwargs=added).sample
    torch.testing.assert_close(out_diffusers, out, rtol=1e-5, atol=1e-5)
    assert (out - out_plain).abs().max() > 1e-3  # the UNet LoRA changes the output


@pytest.mark.parametrize("algo", ["locon", "loha", "lokr"])
def test_lycoris_algorithms_wrap_and_round_trip(algo, tmp_path):
    model = sdxl.tiny_random()
    net = network.Network(model, algo, dim=4, alpha=1, seed=0).attach()
    assert any("in_layers_2" in n for n in net)  # LyCORIS' algos wrap the 3x3 convs
    x, t, time_ids = _inputs(model)
    ctx, pooled = torch.zeros(2, 77, 80), torch.zeros(2, 48)
    added = {"text_embeds": pooled, "time_ids": time_ids}
    with torch.no_grad():
        before = model.unet(x, t, ctx, added_cond_kwargs=added).sample
        for p in net.parameters():  # (LoRA/LoHa/LoKr start as a zero change)
            p.add_(torch.randn_like(p) * 0.05)
        after = model.unet(x, t, ctx, added_cond_kwargs=added).sample
    assert (after - before).abs().max() > 1e-4
    path = lora_file.save(net.state_dict(), tmp_path / "n.safetensors", lora_file.network_metadata(algo, 4, 1))
    again = network.Network(sdxl.tiny_random(), algo, dim=4, alpha=1, seed=5)
    again.load_file(path)
    loaded = again.state_dict()  # once: a state_dict() per key walks every module again
    for k, v in net.state_dict().items():
        torch.testing.assert_close(loaded[k], v)
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["ss_network_module"] == "lycoris.kohya"
        assert json.loads(f.metadata()["ss_network_args"])["algo"] == algo


def test_network_weights_must_fit(tmp_path):
    model = sdxl.tiny_random()
    path = lora_file.save(network.Network(model, "lora", dim=4).state_dict(), tmp_path / "a.safetensors", {})
    with pytest.raises(CurateError, match="network_dim / conv_dim differ"):
        network.Network(model, "lora", dim=8).load_file(path)
    with pytest.raises(CurateError, match="does not fit"):
        network.Network(model, "lora", dim=4, text_encoders=False).load_file(path)


def test_network_config_keys_are_checked(tmp_path):
    ds = [{"manifest": "t.parquet"}]
    for values, message in [({"network": "dora"}, "network must be one of"),
                            ({"network": "lora", "network_dim": 0}, "network_dim must be >= 1"),
                            ({"network": "lora", "network_dropout": 1.0}, "network_dropout"),
                            ({"network": "lora", "ema_decay": 0.99}, "ema_decay"),
                            ({"network": "lora", "network_weights": "nope.safetensors"}, "network_weights not found"),
                            ({"network": "lora", "network_dim": "8"}, "network_dim")]:
        with pytest.raises(CurateError, match=message):
            train_config.load(write_config(tmp_path / "c.toml", ds, **values))


# --- the dry run's memory estimate ------------------------------------------------------------


def test_rank_sums_are_the_sdxl_architecture_and_count_the_network():
    from curate.train import memory

    assert network.rank_sums(sdxl.full_size_random("meta")) == memory.SDXL_RANK_SUMS
    tiny = network.rank_sums(sdxl.tiny_random())
    model = sdxl.tiny_random()
    for algo, values in [("lora", {}), ("lora", {"conv_dim": 2}), ("locon", {"conv_dim": 3}), ("loha", {}),
                         ("lora", {"network_train_unet_only": True})]:
        cfg = train_config.TrainConfig(pretrained="tiny-random", output_dir="x", network=algo, network_dim=4,
                                       **values)
        net = network.Network(model, algo, 4, 1, cfg.conv_dim, 1, text_encoders=not cfg.network_train_unet_only)
        assert memory.network_params(cfg, tiny) == sum(p.numel() for p in net.parameters()), (algo, values)


def test_dry_run_shows_how_much_less_a_lora_needs(tmp_path):
    from curate.train import memory

    write_images_manifest(tmp_path, "t", [(64, 64)] * 2)
    full = train_config.load(write_config(tmp_path / "f.toml", [{"manifest": "t.parquet"}], mixed_precision="bf16"))
    lora = train_config.load(write_config(tmp_path / "l.toml", [{"manifest": "t.parquet"}], mixed_precision="bf16",
                                          network="lora", network_dim=32))
    a, b = memory.estimate(full), memory.estimate(lora)
    n = 32 * sum(memory.SDXL_RANK_SUMS[k] for k in ("unet_attn", "te1", "te2"))
    assert b["trainable_params"] == n and a["trainable_params"] == memory.SDXL_PARAMS["unet"]
    assert b["optimizer"] * memory.GIB == n * 2 * 4 and b["gradients"] * memory.GIB == n * 4
    assert b["total"] < a["total"] - 20  # ~30 GiB of fp32 UNet weights, gradients and moments saved
    text = "\n".join(dry_run_lines(lora))
    assert f"trainable parameters: {n / 1e6:,.1f} M" in text


def dry_run_lines(cfg):
    from curate.train.dryrun import render

    return render(dry_run(cfg))


# --- reports from the trackers ----------------------------------------------------------------


def test_resuming_with_another_network_dim_is_one_line(lora_runs):
    """kohya-ss/sd-scripts#789: resuming a LoRA state with another network_dim gave a screen
    of `size mismatch for lora_unet_..._lora_down.weight` errors; here one line says why."""
    root, *_ = lora_runs
    cfg = train_config.load(root / "b" / "c.toml")
    cfg.network_dim, cfg.max_train_steps = 8, 6
    with pytest.raises(CurateError, match=r"another network or a full fine-tune \(lora_unet_.*: \(32, 4\) there, \(32, 8\) now\)"):
        train(cfg, resume=str(root / "b" / "run" / "checkpoints" / "step-0000004"), progress=False)


def test_unet_only_writes_no_text_encoder_modules():
    """kohya-ss/sd-scripts#2236: with network_train_unet_only, modules were still created for
    the text encoders; here none are made, trained or written."""
    cfg = train_config.TrainConfig(pretrained="tiny-random", output_dir="x", network="lora", network_dim=4,
                                   network_train_unet_only=True)
    model = sdxl.tiny_random()
    net = network.from_config(model, cfg)
    assert net and all(name.startswith("lora_unet_") for name in net) and not net.trains_text
    assert len(network.param_groups(net, cfg)) == 1
    cfg.network_train_unet_only, cfg.text_encoder_lr = False, 0.0  # a zero text-encoder rate: the same
    assert not network.from_config(sdxl.tiny_random(), cfg).trains_text


def test_the_demo_writes_a_lora_config_beside_the_fine_tune(tmp_path):
    from curate.demo.run import write_lora_config

    cfg = train_config.load(write_lora_config(tmp_path / "train_lora.toml", tmp_path))
    assert cfg.network == "lora" and cfg.output_dir == tmp_path / "runs" / "demo_lora"
    assert cfg.latent_cache_dir == (tmp_path / "runs" / "demo" / "latent_cache").resolve()  # shares the fine-tune's latents


def test_sample_images_are_drawn_with_the_network(tmp_path):
    write_images_manifest(tmp_path, "t", SIZES[:2])
    cfg = train_config.load(write_config(tmp_path / "c.toml", [{"manifest": "t.parquet"}], max_train_steps=1,
                                         network="lora", network_dim=2, network_dropout=0.5, sample_every_n_steps=1,
                                         sample_prompts=["1girl, smile"], sample_steps=2))
    r = train(cfg, progress=False)
    assert (cfg.output_dir / "samples" / "step-0000001-0.png").is_file()
    assert r["exported"]["lora"].endswith("model.safetensors")


def test_network_dropout_only_while_the_unet_trains():
    cfg = train_config.TrainConfig(pretrained="tiny-random", output_dir="x", network="lora", network_dim=4,
                                   network_dropout=0.5)
    model = sdxl.tiny_random()
    net = network.from_config(model, cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.te1.train(), model.unet.train()
        a, _ = sdxl.encode_text(model, ["1girl"], "cpu")
        b, _ = sdxl.encode_text(model, ["1girl"], "cpu")
        assert not torch.equal(a, b)  # training: dropout in the text encoder's network
        model.unet.eval()  # as sampling and validation do; the text encoders stay in train mode
        a, _ = sdxl.encode_text(model, ["1girl"], "cpu")
        b, _ = sdxl.encode_text(model, ["1girl"], "cpu")
        assert torch.equal(a, b)


def test_gradients_reach_the_network_through_a_checkpointed_frozen_unet():
    cfg = train_config.TrainConfig(pretrained="tiny-random", output_dir="x", network="lora", network_dim=2,
                                   network_train_unet_only=True)
    model = sdxl.tiny_random()
    model.unet.requires_grad_(False).train()
    model.unet.enable_gradient_checkpointing()  # as the loop does with gradient_checkpointing = true
    net = network.from_config(model, cfg)
    x, t, time_ids = _inputs(model)
    out = model.unet(x, t, torch.randn(2, 77, 80), added_cond_kwargs={"text_embeds": torch.randn(2, 48),
                                                                       "time_ids": time_ids}).sample
    out.square().mean().backward()
    ups = [m.lora_up.weight.grad for m in net.values()]
    assert all(g is not None for g in ups) and sum(float(g.abs().sum()) for g in ups) > 0
    assert all(p.grad is None for p in model.unet.parameters())
