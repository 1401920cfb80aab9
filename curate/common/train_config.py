"""The training config: one TOML file, flat top-level keys with sd-scripts' names and
one `[[datasets]]` table per manifest (DESIGN.md, "Training config").

Every key is listed once below with its type and default; anything else is an error
that names the key. `curate export --config` reads the same file (export.py uses
`read_toml` and `resolve_manifest` from here, so both resolve paths the same way).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional, Union

from curate.common import toml_bounds
from curate.errors import CurateError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

OPTIMIZERS = ("AdamW", "AdamW8bit", "Lion", "Lion8bit")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
PRECISIONS = ("no", "fp16", "bf16")
SAVE_PRECISIONS = ("float", "fp16", "bf16")
SAMPLERS = ("euler_a", "euler", "dpm++_2m")  # sample_sampler (sd-scripts' names; k_ prefixes accepted)
LOGGERS = ("tensorboard", "wandb", "all", "none")
# the sample defaults of the recipe's model card (Kohaku-XL: Euler a, 25 steps, CFG 5, its quality tags)
SAMPLE_NEGATIVE = ("low quality, worst quality, normal quality, text, signature, jpeg artifacts, "
                   "bad anatomy, old, early, copyright name, watermark, artist name")
NETWORKS = ("lora", "locon", "loha", "lokr")  # LoRA/LyCORIS (docs/lora.md); absent: full fine-tune
# sd-scripts subset keys that `curate export` passes on but `curate train` does not implement.
EXPORT_ONLY_KEYS = {"color_aug", "random_crop", "face_crop_aug_range", "caption_prefix",
                    "caption_suffix", "secondary_separator",
                    "caption_dropout_every_n_epochs", "cache_info", "resize_interpolation"}


@dataclass
class DatasetConfig:
    """One `[[datasets]]` table: a manifest and how its captions are used."""
    manifest: Path
    num_repeats: int = 1
    is_reg: Optional[bool] = None          # None: the manifest's provenance decides (kind = "reg")
    class_tokens: Optional[str] = None     # caption for rows without one (reg sets); default: provenance
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: Optional[str] = None  # None: what the caption stage recorded
    caption_separator: str = ","
    caption_tag_dropout_rate: float = 0.0
    caption_dropout_rate: float = 0.0
    flip_aug: bool = False
    enable_wildcard: bool = False          # a caption's lines are alternatives: one per step (else the first)
    is_val: bool = False                   # the whole manifest is held out for validation loss
    validation_split: Optional[float] = None  # None: the top-level validation_split


@dataclass
class TrainConfig:
    pretrained: str                        # diffusers folder, single-file .safetensors, or "tiny-random"
    output_dir: Path
    datasets: list = field(default_factory=list)
    pretrained_config: Optional[Path] = None  # local diffusers folder (configs + tokenizers) for a single file
    # buckets
    resolution: Union[int, list] = 1024
    enable_bucket: bool = True             # for sd-scripts/export; curate train always buckets
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    # batches and length
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_train_steps: Optional[int] = None
    max_train_epochs: Optional[int] = None  # wins over max_train_steps, as in sd-scripts
    seed: int = 42
    max_data_loader_n_workers: int = 2
    # optimisation
    learning_rate: float = 1e-6            # UNet
    learning_rate_te1: float = 0.0         # 0: text encoder 1 frozen
    learning_rate_te2: float = 0.0
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0               # in optimizer steps
    lr_scheduler_num_cycles: int = 1       # cosine_with_restarts: hard restarts over the run
    lr_scheduler_power: float = 1.0        # polynomial: the decay's power
    stop_text_encoder_training: Union[int, float] = 0  # step (int) or fraction of the run (float); 0: never
    optimizer_type: str = "AdamW"
    optimizer_args: dict = field(default_factory=dict)
    max_grad_norm: float = 1.0             # 0: no clipping
    min_snr_gamma: float = 0.0             # 0: off
    noise_offset: float = 0.0
    v_parameterization: bool = False       # v-prediction loss instead of epsilon
    ema_decay: float = 0.0                 # 0: no EMA; else exported weights are the EMA
    # precision and memory
    mixed_precision: str = "no"
    full_fp16: bool = False                # weights themselves in fp16 (explicit opt-in)
    full_bf16: bool = False
    gradient_checkpointing: bool = False
    stochastic_rounding: bool = False      # full_fp16/full_bf16: round each update stochastically
    masked_loss: bool = False              # weight the loss by alpha (or <stem>_mask.png)
    cache_latents: bool = True             # VAE latents on disk, keyed by content + bucket + crop
    latent_cache_dir: Optional[Path] = None  # default <output_dir>/latent_cache
    # saving
    save_every_n_steps: int = 0            # optimizer steps; 0: only at the end
    save_last_n_checkpoints: int = 3       # older full-state checkpoints are removed
    save_precision: str = "float"
    output_name: str = "model"
    # feedback
    sample_every_n_steps: int = 0          # 0: no sample images
    sample_every_n_epochs: int = 0
    sample_at_first: bool = False          # samples before the first step too
    sample_prompts: Union[list, str] = field(default_factory=list)  # sd-scripts prompt lines, or a .txt/.toml/.json file
    sample_steps: int = 25                 # default steps per sample image (--s)
    sample_sampler: str = "euler_a"
    sample_cfg: float = 5.0                # default CFG scale (--l)
    sample_negative_prompt: str = SAMPLE_NEGATIVE  # default negative prompt (--n)
    validation_split: float = 0.0          # fraction of each training [[datasets]] held out (seeded)
    validation_split_reg: bool = False     # split reg sets too
    validate_every_n_steps: int = 0        # 0: only at the end (when there is a held-out set)
    log_with: str = "tensorboard"
    wandb_project: str = "curate"
    weighted_captions: Optional[bool] = None  # None: as the captions were written (escape_parentheses)
    # LoRA / LyCORIS (docs/lora.md): train a network on the frozen model instead of the model
    network: Optional[str] = None          # lora | locon | loha | lokr; None: full fine-tune
    network_dim: int = 16
    network_alpha: float = 1.0
    network_dropout: float = 0.0
    conv_dim: int = 0                      # 3x3 convs too (locon/loha/lokr: default network_dim)
    conv_alpha: float = 1.0
    network_train_unet_only: bool = False
    network_lr: Optional[float] = None     # UNet modules; default learning_rate
    text_encoder_lr: Optional[float] = None  # text encoder modules; default network_lr
    network_weights: Optional[Path] = None  # start from an existing network file
    source: Optional[Path] = None          # the file this came from (not a key)

    @property
    def max_reso(self) -> tuple[int, int]:
        r = self.resolution
        return (r, r) if isinstance(r, int) else (r[0], r[1])


# key -> accepted Python types (TOML gives int, float, str, bool, list, dict)
_NUMBER = (int, float)
_TYPES = {
    "pretrained": str, "output_dir": str, "pretrained_config": str, "resolution": (int, list),
    "enable_bucket": bool, "min_bucket_reso": int, "max_bucket_reso": int,
    "bucket_reso_steps": int, "bucket_no_upscale": bool, "train_batch_size": int,
    "gradient_accumulation_steps": int, "max_train_steps": int, "max_train_epochs": int,
    "seed": int, "max_data_loader_n_workers": int, "learning_rate": _NUMBER,
    "learning_rate_te1": _NUMBER, "learning_rate_te2": _NUMBER, "lr_scheduler": str,
    "lr_warmup_steps": int, "optimizer_type": str, "optimizer_args": dict,
    "max_grad_norm": _NUMBER, "min_snr_gamma": _NUMBER, "noise_offset": _NUMBER,
    "v_parameterization": bool, "ema_decay": _NUMBER, "mixed_precision": str, "full_fp16": bool,
    "full_bf16": bool, "gradient_checkpointing": bool, "cache_latents": bool,
    "latent_cache_dir": str, "save_every_n_steps": int, "save_last_n_checkpoints": int,
    "save_precision": str, "output_name": str, "sample_every_n_steps": int,
    "sample_prompts": (list, str), "sample_steps": int, "datasets": list, "weighted_captions": bool,
    "lr_scheduler_num_cycles": int, "lr_scheduler_power": _NUMBER, "stop_text_encoder_training": (int, float),
    "stochastic_rounding": bool, "masked_loss": bool, "sample_every_n_epochs": int, "sample_at_first": bool,
    "sample_sampler": str, "sample_cfg": _NUMBER, "sample_negative_prompt": str, "validation_split": _NUMBER,
    "validation_split_reg": bool, "validate_every_n_steps": int, "log_with": str, "wandb_project": str,
    "network": str, "network_dim": int, "network_alpha": _NUMBER, "network_dropout": _NUMBER, "conv_dim": int,
    "conv_alpha": _NUMBER, "network_train_unet_only": bool, "network_lr": _NUMBER, "text_encoder_lr": _NUMBER,
    "network_weights": str,
}
_DATASET_TYPES = {
    "manifest": str, "num_repeats": int, "is_reg": bool, "class_tokens": str,
    "shuffle_caption": bool, "keep_tokens": int, "keep_tokens_separator": str,
    "caption_separator": str, "caption_tag_dropout_rate": _NUMBER,
    "caption_dropout_rate": _NUMBER, "flip_aug": bool, "is_val": bool, "validation_split": _NUMBER,
    "enable_wildcard": bool,
}
assert set(_TYPES) | {"source"} == {f.name for f in fields(TrainConfig)}
assert set(_DATASET_TYPES) == {f.name for f in fields(DatasetConfig)}


# sd-scripts' spellings of the same settings, accepted so one file serves both
ALIASES = {"pretrained_model_name_or_path": "pretrained"}


def canonical(doc: dict, path: Path) -> dict:
    """`doc` with sd-scripts' spellings as curate's: ALIASES, and `optimizer_args` in its
    list form (["weight_decay=0.1", "betas=0.9,0.95"], each value a Python literal) as a table."""
    doc = dict(doc)
    for alias, key in ALIASES.items():
        if alias in doc:
            if key in doc:
                raise CurateError(f"{path}: {key} and {alias} name one setting: keep one")
            doc[key] = doc.pop(alias)
    args = doc.get("optimizer_args")
    if isinstance(args, list):
        doc["optimizer_args"] = dict(_optimizer_arg(a, path) for a in args)
    return doc


def _optimizer_arg(arg, path: Path) -> tuple[str, object]:
    import ast

    key, eq, text = arg.partition("=") if isinstance(arg, str) else ("", "", "")
    try:
        if not (eq and key.strip()):
            raise ValueError
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        raise CurateError(f"{path}: optimizer_args entry {arg!r} is not name=value "
                          "(a Python literal, as sd-scripts reads it)") from None
    return key.strip(), list(value) if isinstance(value, tuple) else value


BUCKET_KEYS = ("resolution", "train_batch_size", "enable_bucket", "bucket_no_upscale",
               "bucket_reso_steps", "min_bucket_reso", "max_bucket_reso")


def dataset_defaults() -> dict:
    """The dataset-level defaults (buckets, batch) of a config that leaves them out: the one
    source for `curate train` and `curate export --config`, so both make the same buckets."""
    return {f.name: f.default for f in fields(TrainConfig) if f.name in BUCKET_KEYS}


def read_toml(path: str | Path) -> dict:
    """The parsed TOML document; unreadable or invalid files are a CurateError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        toml_bounds.check(text, str(path))
        return tomllib.loads(text)
    except OSError as exc:
        raise CurateError(f"cannot read train config {path}: {exc.strerror}") from None
    except (ValueError, RecursionError) as exc:  # TOMLDecodeError, and int() past 4300 digits
        raise CurateError(f"{path}: not valid TOML ({str(exc)[:200]})") from None
    except UnicodeDecodeError:
        raise CurateError(f"{path}: not UTF-8 text") from None


def resolve_manifest(text: str, config_path: Path) -> Path:
    """A config's path: relative to the working folder (DESIGN's layout), else to the config."""
    for candidate in (Path(text), Path(config_path).parent / text):
        if candidate.exists():
            return candidate.resolve()
    return Path(text).resolve()


def load(path: str | Path) -> TrainConfig:
    """Parse and check a train config; every problem is a one-line CurateError."""
    path = Path(path)
    doc = canonical(read_toml(path), path)
    values = {}
    for key, value in doc.items():
        if key not in _TYPES:
            raise CurateError(f"{path}: unknown key {key!r}" + _hint(key))
        values[key] = _typed(value, _TYPES[key], f"{path}: {key}")
    for key in ("pretrained", "output_dir"):
        if key not in values:
            raise CurateError(f"{path}: missing {key} = \"...\"")
    entries = values.pop("datasets", [])
    if not entries or not all(isinstance(e, dict) for e in entries):
        raise CurateError(f"{path}: needs [[datasets]] tables, one per manifest (manifest = \"...\")")
    values["datasets"] = [_dataset(e, path, i) for i, e in enumerate(entries, 1)]
    values["output_dir"] = Path(values["output_dir"])
    for key in ("pretrained_config", "latent_cache_dir", "network_weights"):
        if key in values:
            values[key] = resolve_manifest(values[key], path)
    if values["pretrained"] != "tiny-random":
        values["pretrained"] = str(resolve_manifest(values["pretrained"], path))
    if isinstance(values.get("sample_prompts"), str):
        values["sample_prompts"] = _prompt_file(resolve_manifest(values["sample_prompts"], path), path)
    if not all(isinstance(p, (str, dict)) for p in values.get("sample_prompts", [])):
        raise CurateError(f"{path}: sample_prompts must be a list of prompt lines or a file name")
    cfg = TrainConfig(**values, source=path)
    _check(cfg, path)
    return cfg


def _prompt_file(prompts: Path, path: Path) -> list:
    """sd-scripts' prompt files: .txt (one prompt line each, `#` comments), .toml ([prompt] defaults
    and [[prompt.subset]] entries) or .json (a list of lines or of {prompt, negative_prompt, ...})."""
    try:
        text = prompts.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        raise CurateError(f"{path}: sample_prompts: cannot read {prompts}") from None
    try:
        if prompts.suffix == ".toml":
            doc = tomllib.loads(text)["prompt"]
            return [{**{k: v for k, v in doc.items() if k != "subset"}, **sub} for sub in doc["subset"]]
        if prompts.suffix == ".json":
            import json

            entries = json.loads(text)
            if not isinstance(entries, list):
                raise ValueError("not a list")
            return entries
    except (tomllib.TOMLDecodeError, ValueError, KeyError, TypeError) as exc:
        raise CurateError(f"{path}: sample_prompts: {prompts} is not an sd-scripts prompt file ({exc})") from None
    return [t.strip() for t in text.splitlines() if t.strip() and not t.lstrip().startswith("#")]


def _dataset(entry: dict, path: Path, i: int) -> DatasetConfig:
    where = f"{path}: [[datasets]] #{i}"
    values = {}
    for key, value in entry.items():
        if key in _TYPES and key not in _DATASET_TYPES:
            raise CurateError(f"{where}: {key} is a top-level key of the train config")
        if key in EXPORT_ONLY_KEYS:
            raise CurateError(f"{where}: {key} is not supported by curate train "
                              "(curate export passes it to sd-scripts)")
        if key not in _DATASET_TYPES:
            raise CurateError(f"{where}: unknown key {key!r}")
        values[key] = _typed(value, _DATASET_TYPES[key], f"{where}: {key}")
    if "manifest" not in values:
        raise CurateError(f"{where}: needs manifest = \"path/to/manifest.parquet\"")
    values["manifest"] = resolve_manifest(values["manifest"], path)
    for key in ("caption_tag_dropout_rate", "caption_dropout_rate"):
        if not 0 <= values.get(key, 0) <= 1:
            raise CurateError(f"{where}: {key} must be between 0 and 1")
    if not 0 <= values.get("validation_split", 0) < 1:
        raise CurateError(f"{where}: validation_split must be in [0, 1)")
    if values.get("num_repeats", 1) < 1 or values.get("keep_tokens", 0) < 0:
        raise CurateError(f"{where}: num_repeats must be >= 1 and keep_tokens >= 0")
    return DatasetConfig(**values)


def _typed(value, typ, where: str):
    if isinstance(value, bool) and typ is not bool and bool not in (typ if isinstance(typ, tuple) else (typ,)):
        raise CurateError(f"{where}: expected a number, not {value!r}")
    if not isinstance(value, typ):
        raise CurateError(f"{where}: unexpected value {value!r}")
    return float(value) if typ is _NUMBER else value


def _check(cfg: TrainConfig, path: Path) -> None:
    def bad(msg: str):
        raise CurateError(f"{path}: {msg}")

    if not cfg.enable_bucket:
        bad("enable_bucket = false is not supported by curate train (it always buckets)")
    step = cfg.bucket_reso_steps
    if step <= 0 or step % 8:
        bad("bucket_reso_steps must be a positive multiple of 8 (the VAE downscales by 8)")
    for key in ("min_bucket_reso", "max_bucket_reso"):
        if getattr(cfg, key) % step:
            bad(f"{key} must be divisible by bucket_reso_steps ({step})")
    r = cfg.resolution
    if isinstance(r, list) and (len(r) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in r)):
        bad("resolution must be a number or [width, height]")
    if min(cfg.max_reso) < step or cfg.min_bucket_reso > cfg.max_bucket_reso:
        bad("resolution / bucket sizes are inconsistent (min_bucket_reso <= max_bucket_reso)")
    if not cfg.bucket_no_upscale and max(cfg.max_reso) > cfg.max_bucket_reso:
        bad("max_bucket_reso must be at least the resolution")
    if cfg.train_batch_size < 1 or cfg.gradient_accumulation_steps < 1:
        bad("train_batch_size and gradient_accumulation_steps must be >= 1")
    if cfg.max_train_steps is None and cfg.max_train_epochs is None:
        bad("set max_train_steps or max_train_epochs")
    if (cfg.max_train_steps or 1) < 1 or (cfg.max_train_epochs or 1) < 1:
        bad("max_train_steps / max_train_epochs must be >= 1")
    if cfg.optimizer_type not in OPTIMIZERS:
        bad(f"optimizer_type must be one of {', '.join(OPTIMIZERS)}")
    if cfg.lr_scheduler not in SCHEDULERS:
        bad(f"lr_scheduler must be one of {', '.join(SCHEDULERS)}")
    if cfg.mixed_precision not in PRECISIONS:
        bad(f"mixed_precision must be one of {', '.join(PRECISIONS)}")
    if cfg.save_precision not in SAVE_PRECISIONS:
        bad(f"save_precision must be one of {', '.join(SAVE_PRECISIONS)}")
    if cfg.full_fp16 and cfg.mixed_precision != "fp16":
        bad("full_fp16 needs mixed_precision = \"fp16\"")
    if cfg.full_bf16 and cfg.mixed_precision != "bf16":
        bad("full_bf16 needs mixed_precision = \"bf16\"")
    if not 0 <= cfg.ema_decay < 1:
        bad("ema_decay must be in [0, 1)")
    if min(cfg.learning_rate, cfg.learning_rate_te1, cfg.learning_rate_te2) < 0:
        bad("learning rates must be >= 0")
    if cfg.network is not None:
        _check_network(cfg, bad)
    elif cfg.learning_rate == cfg.learning_rate_te1 == cfg.learning_rate_te2 == 0:
        bad("every learning rate is 0: nothing would train")
    if (cfg.sample_every_n_steps or cfg.sample_every_n_epochs or cfg.sample_at_first) and not cfg.sample_prompts:
        bad("sample_every_n_steps / sample_every_n_epochs / sample_at_first need sample_prompts")
    if cfg.sample_sampler.removeprefix("k_") not in SAMPLERS:
        bad(f"sample_sampler must be one of {', '.join(SAMPLERS)}")
    if cfg.log_with not in LOGGERS:
        bad(f"log_with must be one of {', '.join(LOGGERS)}")
    if not 0 <= cfg.validation_split < 1:
        bad("validation_split must be in [0, 1)")
    if cfg.lr_scheduler_num_cycles < 1 or cfg.lr_scheduler_power <= 0:
        bad("lr_scheduler_num_cycles must be >= 1 and lr_scheduler_power > 0")
    stop = cfg.stop_text_encoder_training
    if stop < 0 or (isinstance(stop, float) and stop > 1) or isinstance(stop, bool):
        bad("stop_text_encoder_training must be a step (>= 0) or a fraction of the run (0.0-1.0)")
    if stop and not (cfg.learning_rate_te1 or cfg.learning_rate_te2):
        bad("stop_text_encoder_training needs learning_rate_te1 or learning_rate_te2 > 0")
    if cfg.stochastic_rounding and not (cfg.full_fp16 or cfg.full_bf16):
        bad("stochastic_rounding is for half-precision weights: set full_fp16 or full_bf16")
    if min(cfg.sample_every_n_epochs, cfg.validate_every_n_steps, cfg.sample_steps - 1) < 0:
        bad("sample_every_n_epochs and validate_every_n_steps must be >= 0, sample_steps >= 1")
    if min(cfg.lr_warmup_steps, cfg.save_every_n_steps, cfg.max_data_loader_n_workers, cfg.sample_every_n_steps) < 0:
        bad("lr_warmup_steps, save_every_n_steps, sample_every_n_steps and max_data_loader_n_workers must be >= 0")
    if not _plain_name(cfg.output_name):  # checked before any work: it names files in output_dir
        bad(f"output_name must be a plain file name (no folders, not '.' or '..'), got {cfg.output_name!r}")
    if not any(not d.is_reg for d in cfg.datasets if d.is_reg is not None) and all(d.is_reg for d in cfg.datasets):
        bad("every [[datasets]] is a reg set: training images are needed too")


def _plain_name(name: str) -> bool:
    """A name that stays a file in output_dir: no separators, no `..`, no control characters,
    short enough for any filesystem with the suffixes curate adds."""
    return (bool(name) and name.strip() == name and name not in (".", "..") and len(name.encode()) <= 200
            and not any(c in name for c in "/\\:") and all(c.isprintable() for c in name))


def _check_network(cfg: TrainConfig, bad) -> None:
    if cfg.network not in NETWORKS:
        bad(f"network must be one of {', '.join(NETWORKS)}")
    if cfg.network_dim < 1 or cfg.conv_dim < 0:
        bad("network_dim must be >= 1 and conv_dim >= 0")
    if not 0 <= cfg.network_dropout < 1:
        bad("network_dropout must be in [0, 1)")
    if min(cfg.network_lr or 0, cfg.text_encoder_lr or 0) < 0:
        bad("network_lr and text_encoder_lr must be >= 0")
    if (cfg.network_lr if cfg.network_lr is not None else cfg.learning_rate) <= 0:
        bad("the network's UNet learning rate (network_lr, else learning_rate) must be > 0")
    if cfg.ema_decay:
        bad("ema_decay is for full fine-tunes; leave it out with network")
    if cfg.network_weights is not None and not cfg.network_weights.is_file():
        bad(f"network_weights not found: {cfg.network_weights}")


def _hint(key: str) -> str:
    if key in _DATASET_TYPES or key in EXPORT_ONLY_KEYS:
        return " (it belongs in a [[datasets]] table)"
    return ""
