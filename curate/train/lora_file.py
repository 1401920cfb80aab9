"""The network file other tools load: one .safetensors with kohya's key names
(`lora_unet_...`, `lora_te1_...`, `lora_te2_...`; `.lora_down.weight`, `.lora_up.weight`,
`.alpha` for LoRA/LoCon, `.hada_*` / `.lokr_*` for LoHa/LoKr as LyCORIS writes them), the
`ss_*` metadata sd-scripts' train_network.py writes (which UIs and model sites show) and
the ModelSpec keys with architecture `stable-diffusion-xl-v1-base/lora`, as sd-scripts.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from pathlib import Path

from curate.errors import CurateError
from curate.train import sdxl

BASE_MODEL_VERSION = "sdxl_base_v1-0"
LORA_ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"  # sd-scripts' sai_model_spec: arch + "/lora"


def network_metadata(algo: str, dim: int, alpha: float, conv_dim: int = 0, conv_alpha: float = 0.0,
                     dropout: float = 0.0) -> dict[str, str]:
    """What a network is: sd-scripts' networks.lora for plain LoRA, lycoris.kohya (with its
    `algo` in ss_network_args) for LoCon/LoHa/LoKr, as each trainer writes it."""
    args = {}
    if algo != "lora":
        args["algo"] = algo
    if conv_dim:
        args.update(conv_dim=str(conv_dim), conv_alpha=str(conv_alpha))
    return {"ss_network_module": "networks.lora" if algo == "lora" else "lycoris.kohya",
            "ss_network_dim": str(dim), "ss_network_alpha": _num(alpha),
            "ss_network_dropout": _num(dropout), "ss_network_args": json.dumps(args),
            "ss_base_model_version": BASE_MODEL_VERSION, "ss_v2": "False"}


def train_metadata(config, plan, step: int, epoch: int) -> dict[str, str]:
    """The ss_* keys of a curate train run (sd-scripts' names and formats)."""
    from curate.train import network

    train = [s for s in plan.samples if not s.is_reg]
    reg = [s for s in plan.samples if s.is_reg]
    meta = network_metadata(config.network, config.network_dim, config.network_alpha, config.conv_dim,
                            config.conv_alpha, config.network_dropout)
    te_lr = config.text_encoder_lr if config.text_encoder_lr is not None else network.unet_lr(config)
    meta.update({
        "ss_session_id": str(uuid.uuid4().int % 2**31), "ss_training_started_at": str(time.time()),
        "ss_output_name": config.output_name, "ss_sd_model_name": Path(config.pretrained).name,
        "ss_resolution": str(tuple(config.max_reso)), "ss_learning_rate": str(config.learning_rate),
        "ss_unet_lr": str(network.unet_lr(config)),
        "ss_text_encoder_lr": "0" if config.network_train_unet_only else str(te_lr),
        "ss_network_train_unet_only": str(config.network_train_unet_only),
        "ss_num_train_images": str(sum(s.repeats for s in train)), "ss_num_reg_images": str(len(reg)),
        "ss_num_batches_per_epoch": str(plan.batches_per_epoch), "ss_num_epochs": str(plan.epochs),
        "ss_max_train_steps": str(plan.total_steps), "ss_steps": str(step), "ss_epoch": str(epoch),
        "ss_lr_scheduler": config.lr_scheduler, "ss_lr_warmup_steps": str(config.lr_warmup_steps),
        "ss_optimizer": config.optimizer_type, "ss_seed": str(config.seed),
        "ss_gradient_accumulation_steps": str(config.gradient_accumulation_steps),
        "ss_gradient_checkpointing": str(config.gradient_checkpointing),
        "ss_mixed_precision": config.mixed_precision, "ss_full_fp16": str(config.full_fp16),
        "ss_cache_latents": str(config.cache_latents), "ss_min_snr_gamma": str(config.min_snr_gamma),
        "ss_noise_offset": str(config.noise_offset), "ss_max_grad_norm": str(config.max_grad_norm),
        "ss_tag_frequency": json.dumps(tag_frequency(config, train)),
        "ss_dataset_dirs": json.dumps(dataset_dirs(config, train)),
    })
    return meta


def save_trained(net, path: Path, config, position, dtype=None) -> Path:
    """A training run's network file (checkpoint or final), as sd-scripts writes it."""
    title = config.output_name + (f" step {position.step}" if path.stem.endswith(f"-step{position.step}") else "")
    meta = {**getattr(net, "metadata", {}), "ss_steps": str(position.step), "ss_epoch": str(position.epoch),
            **modelspec(title, config.max_reso, config.v_parameterization)}
    return save(net.state_dict(), path, meta, dtype)


def tag_frequency(config, samples) -> dict:
    """{"<repeats>_<manifest>": {tag: images}}: sd-scripts keys it by its image folder name;
    a manifest is curate's folder. Tags are the captions' comma-separated parts."""
    out: dict[str, Counter] = {}
    for s in samples:
        ds = config.datasets[s.dataset]
        counts = out.setdefault(f"{ds.num_repeats}_{Path(ds.manifest).stem}", Counter())
        counts.update({t.strip() for t in s.caption.split(ds.caption_separator) if t.strip()})
    return {k: dict(v.most_common()) for k, v in out.items()}


def dataset_dirs(config, samples) -> dict:
    out: dict[str, dict] = {}
    for s in samples:
        ds = config.datasets[s.dataset]
        entry = out.setdefault(f"{ds.num_repeats}_{Path(ds.manifest).stem}", {"n_repeats": ds.num_repeats, "img_count": 0})
        entry["img_count"] += 1
    return out


def modelspec(title: str, resolution=(1024, 1024), v_prediction: bool = False) -> dict[str, str]:
    spec = sdxl.modelspec(title, tuple(resolution), v_prediction)
    spec["modelspec.architecture"] = LORA_ARCHITECTURE
    return spec


def save(state: dict, path: Path, metadata: dict[str, str], dtype=None) -> Path:
    """Write the tensors (cast to `dtype` if given; `.alpha` too, as sd-scripts) atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in state.items()}
    tmp = path.with_name(path.name + ".part")
    save_file(tensors, str(tmp), metadata={"format": "pt", **metadata})
    tmp.replace(path)
    return path


def read(path: Path) -> tuple[dict, dict]:
    """(tensors, metadata) of a network file; anything else is a one-line error."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CurateError(f"LoRA file not found: {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise CurateError(f"cannot read {path} as a .safetensors LoRA: {sdxl._first_line(exc)}") from None
    if not any(k.startswith(("lora_unet_", "lora_te")) for k in state):
        raise CurateError(f"{path}: no kohya-format LoRA keys (lora_unet_*, lora_te1_*, lora_te2_*)")
    return state, meta


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)
