"""The sd-scripts training arguments that reproduce a curate train config.

Written as `sdxl_train_args.toml` beside the export, for `sdxl_train.py --config_file`
(sd-scripts' read_config_from_file flattens the tables and uses every key as an argument
of that name). Names and forms are sd-scripts' (library/train_util.py): `optimizer_args`
as ["name=value", ...] strings it reads with ast.literal_eval. Settings sd-scripts has no
argument for are named in the notes instead of being dropped silently.
"""

from __future__ import annotations

from curate.common.train_config import TrainConfig

# curate train-config key -> sd-scripts argument (the same name unless given)
SAME = ("output_dir", "output_name", "gradient_accumulation_steps", "max_train_steps", "max_train_epochs",
        "seed", "max_data_loader_n_workers", "learning_rate", "lr_scheduler", "lr_warmup_steps",
        "optimizer_type", "max_grad_norm", "mixed_precision", "full_fp16", "full_bf16",
        "gradient_checkpointing", "save_precision", "v_parameterization")
IF_SET = ("min_snr_gamma", "noise_offset", "save_every_n_steps", "sample_every_n_steps")  # 0: off, left out


def optimizer_arg(name: str, value) -> str:
    """One `name=value` entry as sd-scripts parses it (ast.literal_eval of the value)."""
    if isinstance(value, (list, tuple)):
        return f"{name}=" + ",".join(repr(v) for v in value)  # literal_eval("0.9,0.95") is a tuple
    return f"{name}={value!r}"


def sdxl_train_args(cfg: TrainConfig, dataset_config: str, prompts_file: str | None = None
                    ) -> tuple[dict, list[str]]:
    """(arguments for sdxl_train.py, notes on settings it cannot take)."""
    args: dict = {"dataset_config": dataset_config, "save_model_as": "safetensors"}
    notes = []
    if cfg.pretrained == "tiny-random":
        notes.append("pretrained = \"tiny-random\" is curate's test model: set pretrained_model_name_or_path")
    else:
        args["pretrained_model_name_or_path"] = cfg.pretrained
    for key in SAME:
        value = getattr(cfg, key)
        if value is not None and not (isinstance(value, bool) and not value):
            args[key] = str(value) if key == "output_dir" else value
    for key in IF_SET:
        if getattr(cfg, key):
            args[key] = getattr(cfg, key)
    if cfg.learning_rate_te1 or cfg.learning_rate_te2:
        args.update(train_text_encoder=True, learning_rate_te1=cfg.learning_rate_te1,
                    learning_rate_te2=cfg.learning_rate_te2)
    if cfg.optimizer_args:
        args["optimizer_args"] = [optimizer_arg(k, v) for k, v in cfg.optimizer_args.items()]
    if cfg.cache_latents:
        args.update(cache_latents=True, cache_latents_to_disk=True)
    if cfg.save_every_n_steps and cfg.save_last_n_checkpoints:
        args["save_last_n_steps"] = cfg.save_every_n_steps * cfg.save_last_n_checkpoints
    if cfg.weighted_captions:
        args["weighted_captions"] = True
    if prompts_file and cfg.sample_every_n_steps:
        args["sample_prompts"] = prompts_file
        args["sample_sampler"] = "euler"
        notes.append(f"sample images: sample_steps = {cfg.sample_steps} goes into the prompts file (--s)")
    if cfg.ema_decay:
        notes.append(f"ema_decay = {cfg.ema_decay}: sd-scripts has no EMA; its weights are the raw ones")
    return args, notes


def prompt_lines(cfg: TrainConfig) -> str:
    """sd-scripts' prompt file: one prompt a line, options after `--` (steps: --s)."""
    prompts = cfg.sample_prompts if isinstance(cfg.sample_prompts, list) else []
    return "".join(f"{p} --s {cfg.sample_steps}\n" for p in prompts)
