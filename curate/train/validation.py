"""Validation loss on the held-out set (validation_split / is_val, see data.py).

Every held-out image is noised at the same timesteps with the same noise (seeded by the
config's seed and the image's key) at every validation, so the numbers compare across steps
and across runs with the same seed; the loss is the plain MSE of the model's target (no
min-SNR weight, no noise offset, no caption dropout), masked as in training with masked_loss.
"""

from __future__ import annotations

import random

TIMESTEPS = (100, 300, 500, 700, 900)  # spread over the schedule: detail to composition


def loss(model, unet, batches, scheduler, config, device, precision) -> float:
    """Mean loss over every held-out image and TIMESTEPS (`batches`: data.val_batches)."""
    import torch
    import torch.nn.functional as F

    from curate.train import sdxl

    total, count = 0.0, 0
    was_training = unet.training
    unet.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                latents = batch["latents"].to(device) if "latents" in batch else encode(model.vae, batch["pixels"], device)
                with precision.autocast():
                    context, pooled = sdxl.encode_text(model, batch["captions"], device)
                added = {"text_embeds": pooled, "time_ids": batch["time_ids"].to(device)}
                for t_value in TIMESTEPS:
                    noise = torch.stack([_noise(config.seed, key, t_value, latents.shape[1:]) for key in batch["keys"]])
                    noise = noise.to(device)
                    t = torch.full(latents.shape[:1], t_value, device=device, dtype=torch.long)
                    with precision.autocast():
                        pred = unet(scheduler.add_noise(latents, noise, t), t, context, added_cond_kwargs=added).sample
                    target = scheduler.get_velocity(latents, noise, t) if config.v_parameterization else noise
                    err = F.mse_loss(pred.float(), target.float(), reduction="none")
                    if "masks" in batch:
                        err = apply_mask(err, batch["masks"].to(device))
                    total += err.mean(dim=(1, 2, 3)).sum().item()
                    count += latents.shape[0]
    finally:
        unet.train(was_training)
    return total / max(count, 1)


def _noise(seed: int, key: str, t: int, shape):
    import torch

    gen = torch.Generator().manual_seed(random.Random(f"{seed}:val:{key}:{t}").getrandbits(62))
    return torch.randn(tuple(shape), generator=gen)


def encode(vae, pixels, device):
    """Pixels [-1, 1] -> scaled latents (the distribution's mode), in fp32 like the cache."""
    import torch

    with torch.no_grad():
        vae_device = next(vae.parameters()).device
        latents = vae.encode(pixels.to(vae_device, torch.float32)).latent_dist.mode()
    return (latents * vae.config.scaling_factor).to(device)


def apply_mask(err, masks):
    """sd-scripts' apply_masked_loss: the per-element loss times the mask, area-scaled to the
    latent grid (masked pixels count 0, the mean is still over the whole image)."""
    import torch.nn.functional as F

    return err * F.interpolate(masks.to(err.dtype), size=err.shape[2:], mode="area")


def passes(plan) -> int:
    """Forward passes per validation (for the dry run's cost estimate)."""
    return len(plan.val) * len(TIMESTEPS)
