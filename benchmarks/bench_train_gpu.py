"""Training step on one CUDA GPU with the real SDXL architecture (random weights): the
recipe's precision and optimizer (fp16, Lion8bit wd 0.1 betas 0.9/0.95), batch 2 at
1024x1024, cached latents, through curate.train.loop.train.

Reports step time, peak GPU memory and the data-wait share for
    gc            gradient checkpointing, fp32 master weights (fp16 mixed precision)
    no gc         the same without checkpointing (speed reference)
    gc+full_fp16  checkpointing with fp16 weights: the recipe (configs/baxl_v3.toml;
                  target: <= 24 GB)
each in its own process, so one variant's memory never counts against another, and
beside each the `--dry-run` estimate (curate/train/memory.py, from this model's
parameter counts, without its fixed CUDA-context allowance) with measured/estimate.

    python benchmarks/bench_train_gpu.py [--steps 12] [--images 8] [--workdir bench-data/train_gpu]
    python benchmarks/bench_train_gpu.py --smoke     # the same plumbing, tiny model on CPU

Nothing is downloaded: the model is built from the SDXL base config in process.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import tomli_w
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from curate import manifest  # noqa: E402

VARIANTS = {"gc": {"gradient_checkpointing": True},
            "no gc": {"gradient_checkpointing": False},
            "gc+full_fp16": {"gradient_checkpointing": True, "full_fp16": True}}
WARMUP_STEPS = 3  # excluded from the averages (cuDNN autotuning, allocator growth)


def make_dataset(folder: Path, n: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        field = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(field).resize((size, size), Image.Resampling.BICUBIC).save(folder / f"images/{i}.png")
        rows.append({"key": f"local/{i}", "subset": "bench", "path": f"images/{i}.png", "width": size,
                     "height": size, "caption": ", ".join(f"tag{j}" for j in rng.choice(500, 30, replace=False))})
    return manifest.write(pa.Table.from_pylist(rows), folder / "bench.parquet", manifest.new_provenance())


def child(args) -> None:
    """One variant: build the model, train --steps, print one JSON line."""
    import torch

    from curate.common import train_config
    from curate.train import memory as train_memory
    from curate.train import sdxl
    from curate.train.loop import train

    smoke = args.smoke
    values = {"pretrained": "tiny-random", "output_dir": str(args.workdir / "run"), "train_batch_size": 2,
              "resolution": 64 if smoke else 1024, "min_bucket_reso": 32 if smoke else 256,
              "max_bucket_reso": 128 if smoke else 4096, "bucket_reso_steps": 32,
              "learning_rate": 7.5e-6, "optimizer_type": "AdamW" if smoke else "Lion8bit",
              "optimizer_args": {"weight_decay": 0.1, "betas": [0.9, 0.95]}, "min_snr_gamma": 5.0,
              "mixed_precision": "no" if smoke else "fp16", "max_train_steps": args.steps,
              "max_data_loader_n_workers": 2, "latent_cache_dir": str(args.workdir / "cache"),
              **{k: v for k, v in VARIANTS[args.child].items() if not (smoke and k == "full_fp16")},
              "datasets": [{"manifest": str(args.workdir / "bench.parquet"), "shuffle_caption": True,
                            "caption_tag_dropout_rate": 0.1}]}
    path = args.workdir / "bench.toml"
    path.write_text(tomli_w.dumps(values))
    shutil.rmtree(args.workdir / "run", ignore_errors=True)
    torch.manual_seed(0)  # same random VAE in every variant: its latents are cached once
    model = sdxl.tiny_random() if smoke else sdxl.full_size_random("cuda")
    if not smoke:
        torch.cuda.reset_peak_memory_stats()
    config = train_config.load(path)
    params = {n: sum(p.numel() for p in getattr(model, n).parameters()) for n in ("unet", "te1", "te2", "vae")}
    est = train_memory.estimate(config, params)
    t0 = time.perf_counter()
    train(config, model=model, progress=False, log=lambda *_: None, save_final=False)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (args.workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    timed = rows[WARMUP_STEPS:] or rows
    step_s = sum(r["step_s"] for r in timed) / len(timed)
    wait_s = sum(r["data_wait_s"] for r in timed) / len(timed)
    print(json.dumps({"variant": args.child, "step_s": step_s, "wait_share": wait_s / step_s, "wall_s": wall,
                      "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if not smoke else 0.0,
                      "reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if not smoke else 0.0,
                      "estimate_gib": est["total"] - est["overhead"]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--workdir", type=Path, default=ROOT / "bench-data" / "train_gpu")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU: checks the script, measures nothing")
    p.add_argument("--child", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args()
    args.workdir = args.workdir.resolve()
    if args.child:
        return child(args)

    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("bench_train_gpu: no CUDA GPU here (torch.cuda.is_available() is False); "
              "run it on a machine with one, or --smoke to check the script on CPU", file=sys.stderr)
        sys.exit(2)
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    make_dataset(args.workdir, args.images, 64 if args.smoke else 1024)
    gpu = "CPU (smoke)" if args.smoke else torch.cuda.get_device_name(0)
    what = ("tiny model at 64x64, fp32, AdamW" if args.smoke else
            "SDXL UNet 2.6B (random weights), batch 2 at 1024x1024, fp16 mixed precision, Lion8bit")
    print(f"{gpu}: {what}, {args.steps} steps ({WARMUP_STEPS} warm-up not averaged)")
    results = []
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--child", variant, "--steps", str(args.steps),
               "--workdir", str(args.workdir)] + (["--smoke"] if args.smoke else [])
        r = subprocess.run(cmd, capture_output=True, text=True)
        line = next((x for x in r.stdout.splitlines() if x.startswith("{")), None)
        if r.returncode or line is None:
            tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"{variant:<14} failed: {tail}")
            continue
        results.append(json.loads(line))
    print(f"{'variant':<14} {'s/step':>7} {'img/s':>7} {'peak GiB':>9} {'reserved':>9} {'estimate':>9} "
          f"{'peak/est':>9} {'data wait':>10}")
    for r in results:
        measured = f"{r['peak_gib'] / r['estimate_gib']:>9.2f}" if r["peak_gib"] else f"{'n/a':>9}"
        print(f"{r['variant']:<14} {r['step_s']:>7.3f} {2 / r['step_s']:>7.2f} {r['peak_gib']:>9.1f} "
              f"{r['reserved_gib']:>9.1f} {r['estimate_gib']:>9.1f} {measured} {100 * r['wait_share']:>9.1f}%")
    if args.smoke:
        print("(smoke: no GPU memory to measure; the estimate column is the formula on the tiny model)")
    recipe = next((r for r in results if r["variant"] == "gc+full_fp16"), None)
    if recipe and not args.smoke:
        verdict = "meets" if recipe["reserved_gib"] <= 24 else "MISSES"
        print(f"recipe (gc + full_fp16 + Lion8bit) {verdict} a 24 GB card "
              f"({recipe['reserved_gib']:.1f} GiB peak reserved, {recipe['peak_gib']:.1f} allocated)")


if __name__ == "__main__":
    main()
