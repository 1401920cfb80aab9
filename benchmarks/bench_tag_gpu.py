"""GPU tagging throughput: wd-vit-tagger-v3's architecture, model-only and end-to-end from JPEGs.

Model: vit_base_patch16_224 with wd-vit-tagger-v3's config (448 px, no class token,
avg pool, gelu_tanh, 10,861 classes), random weights, saved in the hub layout and
loaded by curate's loader -- the same code path as the real checkpoint.

1. model only: uint8 batches already on the GPU, normalised there, bf16 autocast,
   channels_last (what `curate tag` does per batch); images/s and MFU at
   157 GFLOP/image (also counted here with torch's FlopCounterMode);
2. decoding only: curate's DataLoader workers on JPEGs on disk (draft decode, pad,
   resize), no model;
3. end to end: `curate.dataset.tag.run` on a manifest of those JPEGs (decode, transfer,
   model, tag selection, manifest write);
then which of 1 and 2 bounds 3.

    python benchmarks/bench_tag_gpu.py [--batch-size 256] [--images 4096] [--workers N] [--compile]
                                       [--peak-tflops T]
    python benchmarks/bench_tag_gpu.py --smoke   # no GPU: run every step tiny, on the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

ARCH = "vit_base_patch16_224"
ARGS = dict(img_size=448, class_token=False, global_pool="avg", fc_norm=False, act_layer="gelu_tanh")
N_CLASSES = 10861
GFLOP_PER_IMAGE = 157.0  # ViT-B/16 at 448 px, multiply-add = 2 FLOP
PEAK_BF16_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0,
                    "L40S": 362.0, "A10G": 70.0, "L4": 121.0}  # dense, no sparsity
SIZES = [(1920, 1080), (2048, 2880), (1200, 1600), (1024, 1448)]
SHARED_TAGS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "wd-tagger" / "selected_tags_wd-vit-tagger-v3.csv"


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS.items():  # the most specific key first
        if key in name:
            return value
    return None


def write_model(folder: Path, arch: str = ARCH, args: dict = ARGS) -> None:
    import timm
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if SHARED_TAGS.is_file():
        (folder / "selected_tags.csv").write_bytes(SHARED_TAGS.read_bytes())
    else:  # the real list's shape: 4 ratings, 8106 general, 2751 character
        rows = ([(9, r) for r in ("general", "sensitive", "questionable", "explicit")]
                + [(0, f"general_{i}") for i in range(8106)] + [(4, f"character_{i}") for i in range(2751)])
        (folder / "selected_tags.csv").write_text(
            "tag_id,name,category,count\n" + "".join(f"{i},{n},{c},1\n" for i, (c, n) in enumerate(rows)))
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=N_CLASSES, **args)
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    size = args.get("img_size", 448)
    cfg = {"input_size": [3, size, size], "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
           "mean": [0.5] * 3, "std": [0.5] * 3, "num_classes": N_CLASSES, "fixed_input_size": False}
    (folder / "config.json").write_text(json.dumps({"architecture": arch, "num_classes": N_CLASSES,
                                                    "model_args": args, "pretrained_cfg": cfg}))


def _scene_jpeg(job) -> bytes:
    import io

    from bench_dedupe_synth import scene

    i, (w, h) = job
    buf = io.BytesIO()
    scene(i, i, w, h).save(buf, "JPEG", quality=92)
    return buf.getvalue()


def write_images(folder: Path, n: int, distinct: int = 32) -> list[Path]:
    """n JPEG files; `distinct` scenes rendered (in parallel), the rest copies (decoding is what counts)."""
    folder.mkdir(parents=True, exist_ok=True)
    distinct = min(distinct, n)
    with ProcessPoolExecutor() as pool:
        blobs = list(pool.map(_scene_jpeg, [(i, SIZES[i % len(SIZES)]) for i in range(distinct)]))
    paths = []
    for i in range(n):
        p = folder / f"{i:05d}.jpg"
        p.write_bytes(blobs[i % distinct])
        paths.append(p)
    return paths


def model_only(tagger, device: str, batch_size: int, iters: int, compile: bool) -> float:
    import torch

    from curate.dataset.tag import Runner
    from curate.dataset.tagger_model import normalize

    runner = Runner(tagger, device, batch_size, compile)  # channels_last + autocast as in `curate tag`
    u8 = torch.randint(0, 256, (batch_size, tagger.size, tagger.size, 3), dtype=torch.uint8, device=device)

    def step():
        x = normalize(u8.permute(0, 3, 1, 2), tagger.mean, tagger.std)
        x = x.contiguous(memory_format=torch.channels_last) if runner.cuda else x.contiguous()
        with runner.autocast:
            return runner.model(x)

    with torch.inference_mode():
        for _ in range(3 if not compile else 5):  # warm-up (and compilation)
            step()
        if runner.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            out = step()
        out.float().sum().item()
        if runner.cuda:
            torch.cuda.synchronize()
    return iters * batch_size / (time.perf_counter() - t0)


def counted_gflop(tagger, device: str) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, tagger.size, tagger.size, device=device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        tagger.model(x)
    return counter.get_total_flops() / 1e9


def decode_only(tagger, paths: list[Path], batch_size: int, workers: int, device: str) -> float:
    from curate.dataset.tag import Images

    ds = Images([(i, str(p)) for i, p in enumerate(paths)], tagger.size, tagger.interpolation, tagger.crop_pct)
    loader = ds.loader(batch_size, workers, device)  # the DataLoader `curate tag` uses, pinning included
    t0 = time.perf_counter()
    n = sum(len(keys) for keys, _, _ in loader)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--iters", type=int, default=30, help="model-only batches timed")
    ap.add_argument("--images", type=int, default=4096, help="JPEG files for decode-only and end to end")
    ap.add_argument("--workers", type=int, default=None, help="decoding processes (default: curate's)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (as `curate tag --compile`)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: by GPU name)")
    ap.add_argument("--smoke", action="store_true", help="no GPU needed: every step, tiny, on the CPU")
    args = ap.parse_args()

    import pyarrow as pa
    import torch

    from curate import manifest as mf
    from curate.dataset import tag
    from curate.dataset import tagger_model as tm

    if args.smoke:
        device, arch, margs = "cpu", "vit_tiny_patch16_224", dict(ARGS, img_size=224)
        args.batch_size, args.iters, args.images = 4, 1, min(args.images, 8)
    elif not torch.cuda.is_available():
        sys.exit("bench_tag_gpu: no CUDA GPU visible to torch (torch.cuda.is_available() is False); "
                 "run it on a machine with an NVIDIA GPU, or pass --smoke to check the script on the CPU")
    else:
        device, arch, margs = "cuda", ARCH, ARGS
    workers = tag.default_workers(device) if args.workers is None else args.workers

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_model(tmp / "model", arch, margs)
        tagger = tm.load(str(tmp / "model"), device)
        name = torch.cuda.get_device_name() if device == "cuda" else "CPU smoke run (figures mean nothing)"
        peak = args.peak_tflops or peak_tflops(name)
        print(f"{name}: {arch} @{tagger.size}, {len(tagger.labels)} classes, batch {args.batch_size}, "
              f"{os.cpu_count()} CPU cores, {workers} decode workers{', compiled' if args.compile else ''}")

        counted = counted_gflop(tagger, device)
        model_ips = model_only(tagger, device, args.batch_size, args.iters, args.compile)
        mfu = f"{model_ips * GFLOP_PER_IMAGE / (peak * 1e3):.1%} of {peak:g} TFLOP/s bf16" if peak else "n/a (give --peak-tflops)"
        print(f"1. model only: {model_ips:8.1f} images/s   MFU {mfu} "
              f"(at {GFLOP_PER_IMAGE:g} GFLOP/image; counted: {counted:.1f} GFLOP/image)")

        paths = write_images(tmp / "images", args.images)
        dec_ips = decode_only(tagger, paths, args.batch_size, workers, device)
        print(f"2. decoding only: {dec_ips:8.1f} images/s ({workers} workers, {dec_ips / max(workers, 1):.0f} "
              f"per worker; JPEGs {', '.join(f'{w}x{h}' for w, h in SIZES)}, in the page cache)")

        rows = [{"key": f"local/{p.stem}", "path": f"images/{p.name}"} for p in paths]
        m = tmp / "m.parquet"
        mf.write(pa.Table.from_pylist(rows), m, mf.new_provenance())
        s = tag.run(m, str(tmp / "model"), device=device, batch_size=args.batch_size, workers=workers,
                    compile=args.compile, progress=False)
        e2e = s.tagged / s.seconds
        print(f"3. end to end (curate.dataset.tag.run): {e2e:8.1f} images/s ({s.tagged} images in {s.seconds:.1f}s)")

        bound, limit = ("decoding on the CPU", dec_ips) if dec_ips < model_ips else ("the model on the GPU", model_ips)
        print(f"bottleneck: {bound} ({limit:.0f} images/s); end to end reaches {e2e / limit:.0%} of it")
        if bound.startswith("decoding"):
            print("  -> more CPU cores / --workers, or smaller source files (crop --max-pixels), raise it; "
                  "the GPU idles the rest of the time")


if __name__ == "__main__":
    main()
