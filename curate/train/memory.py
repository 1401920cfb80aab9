"""Peak GPU memory of a `curate train` run, estimated from parameter counts, no model loaded
(what `--dry-run` prints beside the cards people train on).

Bytes per parameter, as curate.train.loop places them:
- weights: trained parts in fp32 (master weights) or, with full_fp16/full_bf16, in 16 bits;
  frozen parts in the compute dtype; the VAE leaves the GPU once latents are cached.
- gradients: the trained weights' dtype.
- optimizer state: AdamW two moments, Lion one, in the weights' dtype; the 8-bit
  bitsandbytes variants one byte per moment.
- autocast copies: mixed precision over fp32 weights keeps a 16-bit copy of each trained
  weight for the backward pass.
- activations: per sample at 1024x1024 (scaled by pixels and batch), with and without
  gradient checkpointing. These two are rough figures for the SDXL UNet with PyTorch SDPA,
  not derived from first principles; benchmarks/bench_train_gpu.py measures the real peak.
"""

from __future__ import annotations

from curate.common.train_config import TrainConfig

GIB = 2**30
CARDS_GB = (12, 16, 24, 48, 80)  # what people train on; a "24 GB" card holds 24 GiB
# sdxl.full_size_random() (the SDXL base architecture), counted in tests/test_train_memory.py
SDXL_PARAMS = {"unet": 2_567_463_684, "te1": 123_060_480, "te2": 694_659_840, "vae": 83_653_863}
ACTIVATION_GIB_PER_MEGAPIXEL = {True: 1.5, False: 14.0}  # gradient checkpointing -> GiB per 1024^2 sample
OVERHEAD_GIB = 1.0  # CUDA context, cuDNN/cuBLAS workspaces, allocator slack
OPTIMIZER_MOMENTS = {"AdamW": 2, "AdamW8bit": 2, "Lion": 1, "Lion8bit": 1}
# LoRA/LyCORIS (network = ...): sum of fan_in + fan_out over the layers a network wraps in the
# SDXL architecture (curate.train.network.rank_sums; counted in tests/train/test_network.py)
SDXL_RANK_SUMS = {"unet_attn": 2_659_840, "unet_resnet": 58_560, "unet_conv3x3": 355_840, "te1": 165_888, "te2": 737_280}


def estimate(config: TrainConfig, params: dict | None = None) -> dict:
    """{part: GiB} for the run's peak, plus `total` and `total_other_checkpointing` (the other
    gradient_checkpointing setting), for the SDXL architecture unless `params` says otherwise."""
    params = params or SDXL_PARAMS
    lrs = {"unet": config.learning_rate, "te1": config.learning_rate_te1, "te2": config.learning_rate_te2}
    trained = sum(params[p] for p, lr in lrs.items() if lr > 0)
    frozen = sum(params[p] for p, lr in lrs.items() if lr <= 0)
    if getattr(config, "network", None):  # only the network trains; the whole model is frozen
        trained, frozen = network_params(config, params.get("rank_sums", SDXL_RANK_SUMS)), trained + frozen
    mixed = config.mixed_precision != "no"
    half_weights = config.full_fp16 or config.full_bf16
    w_bytes = 2 if half_weights else 4
    moment_bytes = 1 if config.optimizer_type.endswith("8bit") else w_bytes
    if config.stochastic_rounding and not config.optimizer_type.endswith("8bit"):
        moment_bytes = 4  # the optimizer sees each weight in fp32, so it keeps fp32 state
    parts = {
        "weights": trained * w_bytes + frozen * (2 if mixed else 4)
        + (0 if config.cache_latents else params["vae"] * 4),
        "gradients": trained * w_bytes,
        "optimizer": trained * OPTIMIZER_MOMENTS[config.optimizer_type] * moment_bytes,
        "autocast_copies": trained * 2 if mixed and not half_weights else 0,
        "ema": params["unet"] * 4 if config.ema_decay else 0,
    }
    out = {k: v / GIB for k, v in parts.items()}
    megapixels = config.max_reso[0] * config.max_reso[1] / 1024**2 * config.train_batch_size
    scale = params["unet"] / SDXL_PARAMS["unet"]  # a smaller UNet: proportionally fewer activations
    act = {gc: ACTIVATION_GIB_PER_MEGAPIXEL[gc] * megapixels * scale for gc in (True, False)}
    out["activations"] = act[config.gradient_checkpointing]
    out["overhead"] = OVERHEAD_GIB
    out["total"] = sum(out.values())
    out["total_other_checkpointing"] = out["total"] - act[config.gradient_checkpointing] + act[not config.gradient_checkpointing]
    out["gradient_checkpointing"] = config.gradient_checkpointing
    out["trainable_params"] = trained
    return out


def network_params(config: TrainConfig, sums: dict) -> int:
    """Parameters of the network a config asks for (LoKr: at most this; it factors further)."""
    conv = config.network != "lora" or config.conv_dim > 0
    conv_dim = config.conv_dim or config.network_dim
    te_lr = config.text_encoder_lr if config.text_encoder_lr is not None else (config.network_lr or config.learning_rate)
    text = not config.network_train_unet_only and te_lr > 0
    n = config.network_dim * (sums["unet_attn"] + (sums["unet_resnet"] if conv else 0)
                              + (sums["te1"] + sums["te2"] if text else 0))
    n += conv_dim * sums["unet_conv3x3"] if conv else 0
    return 2 * n if config.network == "loha" else n  # LoHa: two factor pairs per layer


def render(est: dict) -> list[str]:
    gc = est["gradient_checkpointing"]
    parts = " + ".join(f"{name.replace('_', ' ')} {est[name]:.1f}" for name in
                       ("weights", "gradients", "optimizer", "autocast_copies", "ema", "activations", "overhead")
                       if est[name])
    other = "without" if gc else "with"
    lines = [f"  peak GPU memory (estimate, SDXL): {parts} = {est['total']:.1f} GiB "
             f"({'with' if gc else 'without'} gradient checkpointing; {other}: {est['total_other_checkpointing']:.1f})"]
    fits = lambda total: "  ".join(f"{gb} GB {'yes' if total <= gb else 'no'}" for gb in CARDS_GB)  # noqa: E731
    if "trainable_params" in est:
        lines.append(f"    trainable parameters: {est['trainable_params'] / 1e6:,.1f} M")
    lines.append(f"    fits: {fits(est['total'])}")
    lines.append(f"    {other} checkpointing: {fits(est['total_other_checkpointing'])}")
    return lines
