#!/usr/bin/env bash
# The GPU check of `curate train` and `curate tag`, on one GPU in under 8 minutes.
#
#   benchmarks/gpu_check.sh            # one CUDA GPU: the full-size SDXL architecture (random weights)
#   benchmarks/gpu_check.sh --cpu      # no GPU: the same steps with the tiny model (checks the script only)
#
# Training: configs/baxl_v3.toml as it is (full_fp16, Lion8bit wd 0.1, min-SNR 5, gradient
# checkpointing, batch 2, 1024 px buckets) except gradient_accumulation_steps = 1 (one optimizer
# step per batch, so steps/s is measured in minutes, not hours) and 10 generated 1024x1024 images,
# 2 of them held out (validation_split = 0.2). It reports steps/s, images/s, peak GPU memory
# against `curate train --dry-run`'s estimate, the time of one validation pass and of one sample
# image (Euler a, 25 steps, CFG 5, at 1024x1024), and the tagger's images/s at batch 64
# (wd-vit-tagger-v3's architecture, model only; benchmarks/bench_tag_gpu.py has the full picture).
# Nothing is downloaded; it prints one table.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
MODE=gpu
if [ "${1:-}" = "--cpu" ]; then MODE=cpu; fi
if [ "$MODE" = gpu ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: no CUDA GPU visible to torch; run it on a GPU machine, or with --cpu to check the script" >&2
    exit 2
fi
WORK="${WORKDIR:-$(mktemp -d)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout "${LIMIT_S:-480}" "$PY" - "$MODE" "$WORK" <<'PYTHON'
import json, sys, time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

sys.path.insert(0, "benchmarks")
from curate import manifest
from curate.common import train_config
from curate.train import data as train_data, memory, precision as train_precision, sampling, sdxl, validation
from curate.train.loop import train

mode, work = sys.argv[1], Path(sys.argv[2])
gpu = mode == "gpu"
device = torch.device("cuda" if gpu else "cpu")
size, steps, n_images = (1024, 10, 10) if gpu else (64, 4, 5)
rows = []
(work / "images").mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
for i in range(n_images):
    field = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(field).resize((size, size), Image.Resampling.BICUBIC).save(work / f"images/{i}.png")
    rows.append({"key": f"local/{i}", "subset": "check", "path": f"images/{i}.png", "caption":
                 ", ".join(f"tag{j}" for j in rng.choice(500, 30, replace=False))})
manifest.write(pa.Table.from_pylist(rows), work / "check.parquet", manifest.new_provenance())

config = train_config.load("configs/baxl_v3.toml")  # the recipe, then only what a check must change
config.pretrained, config.output_dir, config.gradient_accumulation_steps = "tiny-random", work / "run", 1
config.datasets = [train_config.DatasetConfig(manifest=work / "check.parquet", shuffle_caption=True,
                                              caption_tag_dropout_rate=0.1)]
config.max_train_epochs, config.max_train_steps, config.save_every_n_steps = None, steps, 0
config.validation_split, config.validate_every_n_steps = 0.2, 5
config.sample_prompts = [f"1girl, solo, halo --w {size} --h {size}"]
config.log_with, config.max_data_loader_n_workers = "none", 2
if not gpu:
    config.resolution, config.min_bucket_reso, config.max_bucket_reso = 64, 32, 128
    config.sample_prompts = ["1girl, solo, halo --s 2"]
estimate = memory.estimate(config)  # what --dry-run prints for the SDXL architecture

torch.manual_seed(0)
model = sdxl.full_size_random("cuda") if gpu else sdxl.tiny_random()
if gpu:
    torch.cuda.reset_peak_memory_stats()
t0 = time.perf_counter()
result = train(config, model=model, progress=False, log=lambda *_: None, save_final=False)
wall = time.perf_counter() - t0
peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else float("nan")
reserved = torch.cuda.max_memory_reserved() / 2**30 if gpu else float("nan")
metrics = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
timed = metrics[3:] or metrics  # the first steps autotune and grow the allocator
step_s = sum(r["step_s"] for r in timed) / len(timed)

plan = train_data.plan(config)
cache = train_data.LatentCache(work / "run" / "latent_cache", model.vae_id)
assert not train_data.uncached(plan, cache)  # (fills the content hashes the cache is keyed by)
precision = train_precision.Precision(config, device)
t0 = time.perf_counter()
val = validation.loss(model, model.unet, train_data.val_batches(plan, cache), sdxl.noise_scheduler(), config,
                      device, precision)
val_s = time.perf_counter() - t0
t0 = time.perf_counter()
sampling.sample(config, model, steps, device, precision)
sample_s = time.perf_counter() - t0

from bench_tag_gpu import ARCH, ARGS, model_only, write_model  # the tagger, model only
from curate.dataset import tagger_model

arch, margs, batch = (ARCH, ARGS, 64) if gpu else ("vit_tiny_patch16_224", dict(ARGS, img_size=224), 4)
write_model(work / "tagger", arch, margs)
tagger = tagger_model.load(str(work / "tagger"), str(device))
tag_ips = model_only(tagger, str(device), batch, 20 if gpu else 1, False)

name = torch.cuda.get_device_name() if gpu else "CPU, tiny model (checks the script; figures mean nothing)"
table = [
    ("train steps/s (batch 2, accumulation 1)", f"{1 / step_s:.2f}", f"{2 / step_s:.2f} images/s"),
    ("train loss, finite steps", f"{sum(r['loss'] is not None for r in metrics)}/{len(metrics)}",
     f"last {result['loss']:.4f}, skipped by the scaler {result['skipped_steps']}"),
    ("peak GPU memory allocated / reserved GiB", f"{peak:.1f} / {reserved:.1f}",
     f"dry-run estimate {estimate['total']:.1f} (ratio {reserved / estimate['total']:.2f})"),
    ("validation pass (s)", f"{val_s:.1f}", f"{validation.passes(plan)} forward passes, loss {val:.4f}"),
    ("one sample image (s)", f"{sample_s:.1f}", f"{config.sample_sampler}, {sampling.prompts(config)[0].steps} steps"),
    ("tagger images/s, batch " + str(batch), f"{tag_ips:.1f}", f"{arch}, bf16 autocast, model only"),
    ("wall time of the training run (s)", f"{wall:.0f}", f"{steps} steps incl. latent caching"),
]
print(f"gpu_check on {name}")
print(f"{'check':<42} {'figure':>14}  reference")
for row in table:
    print(f"{row[0]:<42} {row[1]:>14}  {row[2]}")
PYTHON
