"""`curate train`: fine-tune SDXL on curate manifests. Read it top to bottom:

    plan the data (train_data) -> load the model (sdxl) -> cache latents -> optimizer and
    schedule -> [resume] -> loop: micro-batches, loss, backward, step -> checkpoints -> export

Precision (precision.py): fp32 master weights with bf16/fp16 autocast (fp16 with a grad
scaler), or `full_fp16`/`full_bf16` weights, the same code on CPU and GPU. The VAE always runs
in fp32 (SDXL's VAE overflows in fp16). Around the loop: validation loss on a held-out set
(validation.py), sample images (sampling.py), metrics/TensorBoard/W&B (logs.py).
Multi-GPU: `accelerate launch` with the same command; each process takes every n-th batch.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from curate.common.train_config import TrainConfig
from curate.errors import CurateError
from curate.train import data as train_data
from curate.train import logs as train_logs
from curate.train import lora_file, network, sampling, sdxl, validation
from curate.train import precision as train_precision
from curate.train.dryrun import contradictions, text_encoder_stop

BNB_OPTIMIZERS = {"AdamW8bit": "AdamW8bit", "Lion": "Lion", "Lion8bit": "Lion8bit"}
CHECKPOINTS = "checkpoints"
MAX_BAD_LOSSES = 10  # consecutive non-finite losses before the run stops
RUN_FILES = ("metrics.jsonl", CHECKPOINTS, "tensorboard", "wandb", "samples", "diffusers")  # what --overwrite clears


@dataclass
class Position:
    """Where the run is; saved in every checkpoint so --resume continues exactly there."""
    step: int = 0       # optimizer steps done
    epoch: int = 0
    batch: int = 0      # batches of `epoch` consumed by this process
    batches_per_epoch: int = 0  # to notice data or batch settings that changed before a resume

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


def train(config: TrainConfig, resume: str | bool | None = None, progress: bool = True,
          model: sdxl.SDXL | None = None, log=print, save_final: bool = True, overwrite: bool = False) -> dict:
    """Run (or continue) training; returns a summary. Benchmarks pass `model` in and
    skip the final checkpoint and export (`save_final=False`)."""
    out_dir = Path(config.output_dir)
    try:  # before minutes of model loading (and seconds of imports): a typo in output_dir is a one-line error now
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CurateError(f"cannot write output_dir {out_dir}: {exc.strerror or exc}") from None
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from tqdm import tqdm

    accelerator = Accelerator()  # mixed precision is precision.py's: the same path on CPU and GPU
    main = accelerator.is_main_process
    device = accelerator.device
    precision = train_precision.Precision(config, device)
    plan = train_data.plan(config, accelerator.num_processes)
    resume_from = _find_checkpoint(out_dir, resume) if resume else None
    saved = json.loads((resume_from / "curate.json").read_text()) if resume_from else {"step": 0}
    start_step = saved["step"]
    if saved.get("batches_per_epoch", plan.batches_per_epoch) != plan.batches_per_epoch:
        raise CurateError(f"{resume_from}: the data or batch settings changed since this checkpoint "
                          f"({saved['batches_per_epoch']} batches per epoch then, {plan.batches_per_epoch} now); "
                          "an exact resume needs the same manifests, buckets and batch size")
    if resume_from and start_step >= plan.total_steps:
        raise CurateError(f"{out_dir}: the run is finished ({start_step} of {plan.total_steps} steps in "
                          f"{resume_from.name}); nothing changed. Raise max_train_steps/epochs to continue it")
    if not resume_from:
        _claim(out_dir, overwrite, main)
    accelerator.wait_for_everyone()
    for warning in plan.summary()["warnings"] + contradictions(config, plan) if main else []:
        log(f"warning: {warning}")
    sampling.prompts(config)  # a bad prompt line fails here, not at the first sample

    # --- model: only what has a learning rate trains; frozen parts in the compute dtype
    model = model or sdxl.load(config.pretrained, config.pretrained_config)
    lrs = {"unet": config.learning_rate, "te1": config.learning_rate_te1, "te2": config.learning_rate_te2}
    trained = {name: getattr(model, name) for name, lr in lrs.items() if lr > 0 and not config.network}
    _place(model.vae.requires_grad_(False).eval(), device, torch.float32)
    for name in ("unet", "te1", "te2"):
        part = getattr(model, name)
        is_trained = name in trained
        part.requires_grad_(is_trained).train(is_trained or bool(config.network))  # network dropout: train mode
        _place(part, device, precision.weights if is_trained else precision.frozen)
        if (is_trained or config.network and name == "unet") and config.gradient_checkpointing:
            (part.enable_gradient_checkpointing if name == "unet" else part.gradient_checkpointing_enable)()
    net = network.from_config(model, config, plan) if config.network else None  # LoRA/LyCORIS: only it trains
    if net is not None:
        trained = {"network": net}
    scheduler = sdxl.noise_scheduler(config.v_parameterization)
    alphas_cumprod = scheduler.alphas_cumprod.to(device)

    # --- latents: encoded once, on disk, when nothing needs the pixels at each step
    cache = None
    if config.cache_latents:
        cache = train_data.LatentCache(config.latent_cache_dir or out_dir / "latent_cache", model.vae_id)
        with accelerator.main_process_first():
            todo = train_data.uncached(plan, cache)
            show = main and progress and bool(todo)
            with tqdm(total=len(todo), desc="caching latents", unit="img", disable=not show) as bar:
                train_data.fill_cache(todo, cache, lambda px: _encode(model.vae, px, device), bar.update)
        model.vae.to("cpu")

    # --- optimizer, schedule (warmup counted in optimizer steps), accelerate
    groups = network.param_groups(net, config) if net is not None else [
        {"params": [p for p in part.parameters()], "lr": lrs[name]} for name, part in trained.items()]
    optimizer = _optimizer(config, groups)
    precision.install(optimizer)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=plan.total_steps, num_cycles=config.lr_scheduler_num_cycles,
                                 power=config.lr_scheduler_power)
    prepared = accelerator.prepare(*trained.values(), optimizer)
    for name, wrapped in zip(trained, prepared):
        trained[name] = wrapped
    optimizer = prepared[-1]
    unet = trained.get("unet", model.unet)
    te_stop = text_encoder_stop(config, plan.total_steps)
    if start_step >= te_stop:  # the checkpoint's optimizer holds no text-encoder state any more
        _stop_text_encoders(model, trained, optimizer, list(trained))
    ema = None
    if config.ema_decay:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(accelerator.unwrap_model(unet).parameters(), decay=config.ema_decay)
    position = Position(batches_per_epoch=plan.batches_per_epoch)
    accelerator.register_for_checkpointing(lr_scheduler, position, *([ema] if ema else []),
                                           *([precision.scaler] if precision.scaler else []))
    if resume_from:
        if net is not None:
            network.check_resume(accelerator.unwrap_model(trained["network"]), resume_from)
        accelerator.load_state(str(resume_from))
        if position.batches_per_epoch != plan.batches_per_epoch:
            raise CurateError(f"{resume_from}: the data or batch settings changed since this checkpoint "
                              f"({position.batches_per_epoch} batches per epoch then, {plan.batches_per_epoch} now); "
                              "an exact resume needs the same manifests, buckets and batch size")
        if main:
            log(f"resumed from {resume_from} (step {position.step}, epoch {position.epoch + 1}, "
                f"batch {position.batch})")
        if ema:
            ema.to(device)

    # --- the loop
    out_dir.mkdir(parents=True, exist_ok=True)
    run_log = train_logs.RunLog(config, out_dir, position.step, log) if main else None
    total = plan.total_steps
    bar = tqdm(total=total, initial=position.step, desc="train", unit="step", disable=not (main and progress))
    accum = config.gradient_accumulation_steps
    params = [p for g in groups for p in g["params"]]
    timings = {"step_s": 0.0, "wait_s": 0.0, "steps": 0, "images": 0}
    last_loss = val_loss = float("nan")
    bad_losses = 0
    group_names = list(trained)

    def loss_of(batch) -> "torch.Tensor":
        if "latents" in batch:
            latents = batch["latents"].to(device, non_blocking=True)
        else:
            latents = _encode(model.vae, batch["pixels"], device)
        where = f"{config.seed}:noise:{batch['epoch']}:{batch['batch']}:{accelerator.process_index}"
        gen = torch.Generator(device).manual_seed(random.Random(where).getrandbits(62))  # resumable noise
        noise = torch.randn(latents.shape, generator=gen, device=device)
        if config.noise_offset:  # shifts the mean per channel: lets the model learn very dark/bright images
            noise += config.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=gen, device=device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, latents.shape[:1], generator=gen, device=device)
        noisy = scheduler.add_noise(latents, noise, t)
        te_training = position.step < te_stop and bool({"te1", "te2"} & set(trained))
        te_grads = te_training or (net is not None and net.trains_text)  # a network's TE modules
        with precision.autocast(), torch.set_grad_enabled(te_grads):
            context, pooled = sdxl.encode_text(model, batch["captions"], device)
        added = {"text_embeds": pooled, "time_ids": batch["time_ids"].to(device)}
        with precision.autocast():
            pred = unet(noisy, t, context, added_cond_kwargs=added).sample
        target = scheduler.get_velocity(latents, noise, t) if config.v_parameterization else noise
        loss = F.mse_loss(pred.float(), target.float(), reduction="none")
        if "masks" in batch:  # masked_loss: pixels outside the mask teach nothing
            loss = validation.apply_mask(loss, batch["masks"].to(device))
        loss = loss.mean(dim=(1, 2, 3))
        if config.min_snr_gamma:  # min-SNR-gamma: down-weight the easy, low-noise timesteps
            snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
            clipped = snr.clamp(max=config.min_snr_gamma)
            loss = loss * (clipped / (snr + 1) if config.v_parameterization else clipped / snr)
        return loss.mean()

    def validate() -> float:
        if not plan.val:
            return float("nan")
        batches = train_data.val_batches(plan, cache)
        return validation.loss(model, unet, batches, scheduler, config, device, precision)

    def feedback(epoch_end: int | None = None) -> None:
        """Sample images at the sampling points (main process; the others wait)."""
        if sampling.due(config, position.step, epoch_end) and main:
            sampling.sample(config, _unwrapped(accelerator, model, trained), position.step, device, precision,
                            run_log)
        accelerator.wait_for_everyone()

    if position.step == 0:
        feedback()
    per_epoch = plan.batches_per_epoch
    it = iter(_loader(plan, position, cache, accelerator.process_index, config.max_data_loader_n_workers, device))
    while position.step < total:
        t0 = time.perf_counter()
        wait = 0.0
        n_micro = min(accum, per_epoch - position.batch)  # the last step of an epoch may be short
        loss_sum = torch.zeros((), device=device)
        images = 0
        for k in range(n_micro):
            t_wait = time.perf_counter()
            batch = next(it)
            wait += time.perf_counter() - t_wait
            images += len(batch["captions"])
            sync = k == n_micro - 1  # all-reduce gradients only on the last micro-batch
            with contextlib.ExitStack() as stack:
                if not sync:
                    for part in trained.values():
                        stack.enter_context(accelerator.no_sync(part))
                loss = loss_of(batch)
                precision.backward(accelerator, loss / n_micro)
            loss_sum += loss.detach() / n_micro
        precision.unscale(optimizer)
        grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm or math.inf)
        lrs_now = [g["lr"] for g in optimizer.param_groups]  # what this step used, before the schedule moves
        stepped = _step(optimizer, config, position.step, precision)
        if stepped:  # the LR schedule counts optimizer steps that happened (fp16 may skip one)
            lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema:
            ema.step(accelerator.unwrap_model(unet).parameters())
        position.step += 1
        position.batch += n_micro
        epoch_end = None
        if position.batch == per_epoch:
            position.epoch, position.batch = position.epoch + 1, 0
            epoch_end = position.epoch
        if position.step == te_stop:  # the cards' schedule: text encoders train only at first
            _stop_text_encoders(model, trained, optimizer, group_names)
            if main:
                log(f"step {position.step}: text encoders frozen (stop_text_encoder_training)")
        last_loss = accelerator.reduce(loss_sum, "mean").item()
        # fp16's grad scaler skips an overflowing step by itself; only a run of them is fatal
        bad_losses = 0 if math.isfinite(last_loss) else bad_losses + 1
        if bad_losses >= MAX_BAD_LOSSES:
            raise CurateError(f"loss is {last_loss} for {bad_losses} steps in a row (step {position.step}): "
                              "lower learning_rate, or use mixed_precision = \"bf16\" / no full_fp16")
        dt = time.perf_counter() - t0
        timings["step_s"] += dt
        timings["wait_s"] += wait
        timings["steps"] += 1
        timings["images"] += images
        bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lrs_now[0]:.2e}", refresh=False)
        bar.update(1)
        validating = bool(plan.val) and (position.step == total or bool(config.validate_every_n_steps)
                                         and position.step % config.validate_every_n_steps == 0)
        if validating:
            val_loss = validate()
        if run_log:
            row = {"epoch": batch["epoch"] + 1, "loss": last_loss, "lr": lrs_now[0],
                   **{f"lr/{name}": lr for name, lr in zip(group_names, lrs_now)},
                   "grad_norm": float(grad_norm), "images_per_s": images * accelerator.num_processes / dt,
                   "step_s": round(dt, 4), "data_wait_s": round(wait, 4), "data_wait_share": wait / dt}
            if precision.scaler:
                row.update(grad_scale=precision.scale(), skipped_steps=precision.skipped)
            if device.type == "cuda":
                row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            if validating:
                row["val_loss"] = val_loss
            run_log.step(position.step, row)
        if config.save_every_n_steps and position.step % config.save_every_n_steps == 0 and position.step < total:
            _save_checkpoint(accelerator, config, model, trained, ema, position)
        feedback(epoch_end)
    bar.close()
    if run_log:
        run_log.close()

    # --- final: a full checkpoint (so a longer run can --resume) and the exported model
    final = _save_checkpoint(accelerator, config, model, trained, ema, position) if save_final else None
    exported = {}
    if main and save_final and net is not None:
        exported["lora"] = str(lora_file.save_trained(accelerator.unwrap_model(trained["network"]), out_dir / f"{config.output_name}.safetensors",
                                                      config, position, _save_dtype(config)))
    if main and save_final and net is None:
        final_model, dtype = _unwrapped(accelerator, model, trained), _save_dtype(config)
        with _ema_weights(ema, final_model.unet):
            exported["diffusers"] = str(sdxl.save_diffusers(final_model, out_dir / "diffusers", dtype))
            exported["single_file"] = str(sdxl.save_single_file(
                final_model, out_dir / f"{config.output_name}.safetensors", dtype, _modelspec(config)))
    accelerator.wait_for_everyone()
    step_s = max(timings["step_s"], 1e-9)
    return {"main_process": main, "steps": position.step, "epochs": position.epoch, "loss": last_loss,
            "val_loss": val_loss, "skipped_steps": precision.skipped,
            "checkpoint": str(final) if final else None, "exported": exported,
            "steps_per_s": timings["steps"] / step_s, "data_wait_share": timings["wait_s"] / step_s,
            "images_per_s": timings["images"] / step_s,
            "metrics": str(out_dir / "metrics.jsonl"), "resumed_from": str(resume_from) if resume_from else None}


# --- helpers, in the order the loop uses them ------------------------------------------


def _place(part, device, dtype) -> None:
    part.to(device)
    if next(part.parameters()).dtype != dtype:  # (diffusers warns on every dtype .to())
        part.to(dtype)


def _encode(vae, pixels, device):
    """Pixels [-1, 1] -> scaled latents. The distribution's mode: deterministic, cacheable."""
    import torch

    with torch.no_grad():
        vae_device = next(vae.parameters()).device
        latents = vae.encode(pixels.to(vae_device, torch.float32)).latent_dist.mode()
    return (latents * vae.config.scaling_factor).to(device)


def _optimizer(config: TrainConfig, groups: list):
    import torch

    args = dict(config.optimizer_args)
    if "betas" in args:
        args["betas"] = tuple(args["betas"])
    name = config.optimizer_type
    if name == "AdamW":
        cls = torch.optim.AdamW
    else:
        try:
            import bitsandbytes as bnb
        except Exception as exc:  # ImportError, or a CUDA setup error raised at import
            raise CurateError(f"optimizer_type {name} needs bitsandbytes, which cannot load here "
                              f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                              "use optimizer_type = \"AdamW\"") from None
        cls = getattr(bnb.optim, BNB_OPTIMIZERS[name])
    try:
        return cls(groups, **args)
    except (TypeError, ValueError) as exc:
        raise CurateError(f"optimizer_args for {name}: {exc}") from None


def _step(optimizer, config: TrainConfig, step: int, precision) -> bool:
    """The optimizer step (through the grad scaler); False if the scaler skipped it.
    bitsandbytes failing on this device becomes a one-line error."""
    try:
        return precision.step(optimizer)
    except (RuntimeError, NotImplementedError, AttributeError) as exc:
        if config.optimizer_type in BNB_OPTIMIZERS and step == 0:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CurateError(f"{config.optimizer_type} (bitsandbytes) cannot run on this device: {first}; "
                              "use optimizer_type = \"AdamW\"") from None
        raise


def _stop_text_encoders(model, trained: dict, optimizer, group_names: list) -> None:
    """Freeze the text encoders and free their optimizer state; their (empty) parameter groups
    stay, so the LR schedule and the checkpoint's group layout keep their shape."""
    for name in ("te1", "te2"):
        if name not in trained:
            continue
        getattr(model, name).requires_grad_(False).eval()
        group = optimizer.param_groups[group_names.index(name)]
        for p in group["params"]:
            optimizer.state.pop(p, None)
            p.grad = None
        group["params"] = []


def _loader(plan, position: Position, cache, process: int, workers: int, device):
    import torch
    from torch.utils.data import DataLoader

    data = train_data.RunData(plan, cache, position.epoch, position.batch, process)
    # its own generator: starting an iterator draws a seed, which must not move the global RNG
    # that a resume restores (network_dropout draws from it)
    return DataLoader(data, batch_size=None, shuffle=False, num_workers=workers, generator=torch.Generator(),
                      pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)


def _save_dtype(config: TrainConfig):
    import torch

    return {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.save_precision]


def _modelspec(config: TrainConfig, step: int | None = None) -> dict:
    title = config.output_name + (f" step {step}" if step is not None else "")
    return sdxl.modelspec(title, config.max_reso, config.v_parameterization)


def _unwrapped(accelerator, model: sdxl.SDXL, trained: dict) -> sdxl.SDXL:
    parts = {name: accelerator.unwrap_model(trained[name]) if name in trained else getattr(model, name)
             for name in ("unet", "te1", "te2")}
    return sdxl.SDXL(parts["unet"], model.vae, parts["te1"], parts["te2"], model.tok1, model.tok2)


@contextlib.contextmanager
def _ema_weights(ema, unet):
    """Export the EMA weights, then put the training weights back."""
    if ema is None:
        yield
        return
    ema.store(unet.parameters())
    ema.copy_to(unet.parameters())
    try:
        yield
    finally:
        ema.restore(unet.parameters())


def _save_checkpoint(accelerator, config: TrainConfig, model, trained, ema, position: Position) -> Path:
    """Full state (weights, optimizer, scheduler, grad scaler, RNG, data position) plus the
    model as one .safetensors to try out; `curate.json` marks it complete."""
    folder = Path(config.output_dir) / CHECKPOINTS / f"step-{position.step:07d}"
    if (folder / "curate.json").is_file():  # the final save right after a periodic one
        return folder
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        unet = accelerator.unwrap_model(trained.get("unet", model.unet))
        if "network" in trained:  # LoRA/LyCORIS: the network file, not a full model
            lora_file.save_trained(accelerator.unwrap_model(trained["network"]), folder / f"{config.output_name}-step{position.step}.safetensors",
                                   config, position, _save_dtype(config))
        else:
            with _ema_weights(ema, unet):
                sdxl.save_single_file(_unwrapped(accelerator, model, trained),
                                      folder / f"{config.output_name}-step{position.step}.safetensors", _save_dtype(config),
                                      _modelspec(config, position.step))
        (folder / "curate.json").write_text(json.dumps({**position.state_dict(), "config": str(config.source)}))
        done = sorted(p for p in folder.parent.glob("step-*") if (p / "curate.json").is_file())
        for old in done[:-config.save_last_n_checkpoints] if config.save_last_n_checkpoints else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return folder


def _find_checkpoint(out_dir: Path, resume: str | bool) -> Path:
    """--resume: the newest complete checkpoint in output_dir; --resume PATH: that one."""
    if isinstance(resume, str):
        path = Path(resume)
        if not (path / "curate.json").is_file():
            raise CurateError(f"not a complete curate checkpoint: {path}")
        return path
    done = sorted(p for p in (out_dir / CHECKPOINTS).glob("step-*") if (p / "curate.json").is_file())
    if not done:
        raise CurateError(f"nothing to resume: no checkpoint in {out_dir / CHECKPOINTS}")
    return done[-1]


def _claim(out_dir: Path, overwrite: bool, main: bool) -> None:
    """A new run never writes over an old one by accident."""
    held = [name for name in RUN_FILES if (out_dir / name).exists()]
    if not held:
        return
    if not overwrite:
        raise CurateError(f"{out_dir} holds a run ({', '.join(held)}): continue it with --resume, "
                          "or start over with --overwrite")
    if main:  # the latent cache stays: it is keyed by content and still valid
        for name in held:
            path = out_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
