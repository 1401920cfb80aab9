"""`curate train --dry-run`: the config and the data resolved, no model loaded.

What the run would do (buckets, images per bucket, reg use per subset, steps, the held-out
set's cost, the peak GPU memory estimate) and the settings that contradict each other. Kept
apart from loop.py so that a dry run imports no torch, diffusers or bitsandbytes: it answers
in a second on a laptop before a GPU is rented. curate.train.loop re-exports dry_run and render.
"""

from __future__ import annotations

import math
from pathlib import Path

from curate.common.train_config import TrainConfig
from curate.train import data as train_data
from curate.train import memory as train_memory
from curate.train import sampling, validation


def dry_run(config: TrainConfig) -> dict:
    """Resolve the config and the data, load no model."""
    plan = train_data.plan(config)
    summary = plan.summary()
    summary["memory"] = train_memory.estimate(config)
    if config.pretrained != "tiny-random" and not Path(config.pretrained).exists():
        summary["warnings"].append(f"pretrained model not found: {config.pretrained}")
    summary["validation"] = _validation_cost(config, plan)
    summary["sample_prompts"] = len(sampling.prompts(config))
    summary["warnings"] += contradictions(config, plan)
    return summary


def text_encoder_stop(config: TrainConfig, total: int) -> float:
    """The step after which the text encoders stop training (inf: never)."""
    stop = config.stop_text_encoder_training
    if not stop or not (config.learning_rate_te1 or config.learning_rate_te2):
        return math.inf
    return round(stop * total) if isinstance(stop, float) else stop


def _validation_cost(config: TrainConfig, plan) -> dict:
    """Held-out images, forward passes per validation, and their share of the run's compute
    (a training sample costs about 3 forward passes: forward + backward)."""
    total, every = plan.total_steps, config.validate_every_n_steps
    count = (total // every + (total % every != 0)) if every else 1  # and always at the end
    passes = validation.passes(plan)
    train_passes = 3 * total * config.train_batch_size * config.gradient_accumulation_steps
    return {"images": len(plan.val), "passes_per_validation": passes, "validations": count if plan.val else 0,
            "share_of_training": count * passes / train_passes if plan.val else 0.0}


def contradictions(config: TrainConfig, plan) -> list[str]:
    """Settings that contradict each other: the run would do something other than meant."""
    out = []
    total = plan.total_steps
    if config.lr_warmup_steps > total and config.lr_scheduler != "constant":
        out.append(f"lr_warmup_steps ({config.lr_warmup_steps}) is longer than the run ({total} optimizer "
                   "steps): the learning rate never reaches learning_rate")
    n_train = sum(1 for s in plan.samples if not s.is_reg and not s.is_val)
    if len(plan.val) >= n_train:
        out.append(f"the validation set ({len(plan.val)} images) is as large as the training set ({n_train})")
    if config.validate_every_n_steps and not plan.val:
        out.append("validate_every_n_steps is set but nothing is held out (validation_split or is_val)")
    if config.full_fp16 and config.optimizer_type == "AdamW" and not config.stochastic_rounding:
        out.append("full_fp16 with AdamW: its fp16 state underflows (eps 1e-8 is 0 in fp16) and the loss turns "
                   "NaN; use Lion8bit/AdamW8bit, or stochastic_rounding = true (fp32 update math)")
    stop = text_encoder_stop(config, total)
    if stop != math.inf and stop >= total:
        out.append(f"stop_text_encoder_training ({stop}) is not before the end of the run ({total} steps)")
    buckets = [b for b, n in plan.bucket_sizes().items() if n]
    largest = max(buckets, key=lambda b: b[0] * b[1]) if buckets else config.max_reso
    for i, p in enumerate(sampling.prompts(config), 1):
        if p.width * p.height > largest[0] * largest[1]:
            out.append(f"sample prompt {i} is {p.width}x{p.height}, larger than the largest bucket "
                       f"({largest[0]}x{largest[1]}): the model never trains at that size")
    return out


def render(summary: dict) -> list[str]:
    """Dry-run summary as text (one screen)."""
    s = summary
    lines = [f"train config {s['config']}: model {s['pretrained']} -> {s['output_dir']}",
             f"  training images {s['train_images']} ({s['train_samples']} with repeats); reg images: "
             f"{s['reg_samples']} drawn per epoch from {s['reg_images_available']}, "
             f"{s['reg_images_used']} used over the run"]
    for name, u in s["reg_subsets"].items():
        lo, hi = u["per_epoch"]
        lines.append(f"    reg subset {name or '(none)'}: {lo if lo == hi else f'{lo}-{hi}'} per epoch, "
                     f"{u['used_over_run']} of {u['available']} over {s['epochs']} epoch{'s' if s['epochs'] != 1 else ''}")
    if s["skipped"]:
        lines.append("  skipped rows: " + ", ".join(f"{k} {v}" for k, v in s["skipped"].items()))
    lines.append(f"  buckets: {s['buckets_used']} used of {s['predefined_buckets']} "
                 f"(width x height: images, train/reg)")
    for b in s["buckets"]:
        lines.append(f"    {b['width']:>5} x {b['height']:<5} {b['images']:>6}  ({b['train']}/{b['reg']})")
    lines.append(f"  batch {s['batch_size']} x accumulation {s['gradient_accumulation_steps']}: "
                 f"{s['batches_per_epoch']} batches = {s['steps_per_epoch']} optimizer steps per epoch")
    lines.append(f"  total: {s['total_optimizer_steps']} optimizer steps over {s['epochs']} epochs")
    v = s.get("validation")
    if v and v["images"]:
        lines.append(f"  validation: {v['images']} held-out images ({s['validation_reg_images']} reg), "
                     f"{v['passes_per_validation']} forward passes x {v['validations']} validations "
                     f"= {100 * v['share_of_training']:.1f}% of the training compute")
    if s.get("sample_prompts"):
        lines.append(f"  sample images: {s['sample_prompts']} prompts per sampling point")
    if "memory" in s:
        lines += train_memory.render(s["memory"])
    lines += [f"  warning: {w}" for w in s.get("warnings", [])]
    return lines
