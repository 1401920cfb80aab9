"""CPU tagging throughput: `curate tag`'s batched pipeline vs sd-scripts' default per-image loop.

Model: a small member of the WD v3 ViT family (vit_tiny_patch16 at 448 px with the
wd-vit-tagger-v3 options: no class token, avg pool, gelu_tanh; 10,861 classes;
random weights), saved in the hub layout and loaded by curate's own loader.
Images: synthetic CG-like JPEGs of the sizes a training set holds (1920x1080
screenshots, 2048x2880 and 1200x1600 CGs).

Baseline (what sd-scripts' tag_images_by_wd14_tagger.py does by default: batch 1,
no DataLoader, preprocessing in the main process): open, full decode, pad to a white
square, resize, normalise, BGR, forward one image, sigmoid, threshold.
curate: `curate.dataset.tag.run` on a manifest of the same files (DataLoader workers with
JPEG draft decoding, batches, manifest written), same model. Threads: the baseline
keeps torch's default (all cores); curate gives the model the cores its decode
workers leave (tag.run does that on CPU). --threads N pins both to N threads, which
separates that effect from the decoding one; --breakdown times each part alone.

    python benchmarks/bench_tag_cpu.py [--images 48] [--batch-size N] [--workers N] [--threads N] [--breakdown]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_dedupe_synth import scene  # noqa: E402

SIZES = [(1920, 1080), (2048, 2880), (1200, 1600)]
ARCH = "vit_tiny_patch16_224"
ARGS = dict(img_size=448, class_token=False, global_pool="avg", fc_norm=False, act_layer="gelu_tanh")


def write_model(folder: Path, n_classes: int = 10861) -> None:
    import timm
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    rows = ([(9, r) for r in ("general", "sensitive", "questionable", "explicit")]
            + [(0, f"general_{i}") for i in range(8106)] + [(4, f"character_{i}") for i in range(n_classes - 8110)])
    (folder / "selected_tags.csv").write_text(
        "tag_id,name,category,count\n" + "".join(f"{i},{n},{c},1\n" for i, (c, n) in enumerate(rows)))
    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False, num_classes=n_classes, **ARGS)
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    cfg = {"input_size": [3, 448, 448], "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
           "mean": [0.5] * 3, "std": [0.5] * 3, "num_classes": n_classes, "fixed_input_size": False}
    (folder / "config.json").write_text(json.dumps({"architecture": ARCH, "num_classes": n_classes,
                                                    "model_args": ARGS, "pretrained_cfg": cfg}))


def write_images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        p = folder / f"{i:04d}.jpg"
        if i < 6:  # a few distinct scenes, copied: generating them is not what is measured
            scene(i, i, w, h).save(p, quality=92)
        else:
            p.write_bytes(out[i % 6].read_bytes())
        out.append(p)
    return out


def baseline(tagger, paths: list[Path]) -> float:
    """sd-scripts' default loop: one image at a time, everything in the main process."""
    import torch
    from PIL import Image

    mean = torch.tensor(tagger.mean).view(1, 3, 1, 1)
    std = torch.tensor(tagger.std).view(1, 3, 1, 1)
    labels = tagger.labels
    t0 = time.perf_counter()
    for p in paths:
        img = Image.open(p)
        if img.mode != "RGB":
            img = img.convert("RGB")
        px = max(img.size)
        square = Image.new("RGB", (px, px), (255, 255, 255))
        square.paste(img, ((px - img.width) // 2, (px - img.height) // 2))
        square = square.resize((tagger.size, tagger.size), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(square, dtype=np.float32) / 255).permute(2, 0, 1)[None]
        x = ((x - mean) / std)[:, [2, 1, 0]]
        with torch.inference_mode():
            probs = torch.sigmoid(tagger.model(x))[0].numpy()
        _ = [labels.names[i] for i in labels.general if probs[i] > 0.35]
    return time.perf_counter() - t0


def breakdown(tagger, paths: list[Path], batch_size: int, workers: int) -> None:
    """Where the ratio comes from: preprocessing alone, then the model alone."""
    import torch
    from torch.utils.data import DataLoader

    from curate.dataset import tag

    t0 = time.perf_counter()
    for p in paths:  # the baseline's preprocessing: full decode + resize in the main process
        from PIL import Image

        img = Image.open(p).convert("RGB")
        px = max(img.size)
        square = Image.new("RGB", (px, px), (255, 255, 255))
        square.paste(img, ((px - img.width) // 2, (px - img.height) // 2))
        square.resize((tagger.size, tagger.size), Image.BICUBIC)
    pre_base = len(paths) / (time.perf_counter() - t0)
    ds = tag.Images([(i, str(p)) for i, p in enumerate(paths)], tagger.size, tagger.interpolation, tagger.crop_pct)
    t0 = time.perf_counter()
    for _ in DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=tag.collate):
        pass
    pre_ours = len(paths) / (time.perf_counter() - t0)
    def model_ips(batch: int, threads: int, n: int = 8) -> float:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        x = torch.randn(batch, 3, tagger.size, tagger.size)
        with torch.inference_mode():
            tagger.model(x)
            t0 = time.perf_counter()
            for _ in range(max(1, n // batch)):
                tagger.model(x)
            ips = max(1, n // batch) * batch / (time.perf_counter() - t0)
        torch.set_num_threads(before)
        return ips

    base_threads = torch.get_num_threads()
    our_threads = max(1, min(base_threads, (os.cpu_count() or 1) - workers))  # what tag.run sets
    print(f"  preprocessing only: main process, full decode {pre_base:6.1f} images/s | "
          f"{workers} worker(s), draft {pre_ours:6.1f} images/s")
    print(f"  model only: batch 1, {base_threads} thread(s) (baseline) {model_ips(1, base_threads):6.2f} images/s | "
          f"batch {batch_size}, {our_threads} thread(s) (curate) {model_ips(batch_size, our_threads):6.2f} images/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=None, help="curate's batch (default: its own, 4 on CPU)")
    ap.add_argument("--workers", type=int, default=None, help="curate's decoding processes (default: its own)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for both (default: torch's)")
    ap.add_argument("--breakdown", action="store_true", help="also time preprocessing and the model alone")
    args = ap.parse_args()

    import pyarrow as pa
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from curate import manifest as mf
    from curate.dataset import tag
    from curate.dataset import tagger_model as tm

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_model(tmp / "model")
        paths = write_images(tmp / "images", args.images)
        rows = [{"key": f"local/{p.stem}", "path": f"images/{p.name}"} for p in paths]
        m = tmp / "m.parquet"
        mf.write(pa.Table.from_pylist(rows), m, mf.new_provenance())
        tagger = tm.load(str(tmp / "model"), "cpu")
        with torch.inference_mode():  # warm-up, both sides use this model and thread pool
            tagger.model(torch.zeros(2, 3, 448, 448))
        print(f"{len(paths)} JPEGs ({', '.join(f'{w}x{h}' for w, h in SIZES)}), {ARCH} @448, "
              f"10,861 classes, torch threads {torch.get_num_threads()}, {os.cpu_count()} cores")

        t_base = baseline(tagger, paths)
        s = tag.run(m, str(tmp / "model"), device="cpu", batch_size=args.batch_size, workers=args.workers,
                    progress=False)
        batch = args.batch_size or 4
        assert s.tagged == len(paths), s.lines()
        t_ours = s.seconds
        base, ours = len(paths) / t_base, len(paths) / t_ours
        workers = tag.default_workers("cpu") if args.workers is None else args.workers
        print(f"baseline (sd-scripts default: batch 1, main-process preprocessing): {base:6.2f} images/s")
        print(f"curate tag (batch {batch}, {workers} decode worker(s), JPEG draft):        {ours:6.2f} images/s")
        print(f"ratio: {ours / base:.2f}x (target >= 3x); load average {os.getloadavg()[0]:.1f}")
        if args.breakdown:
            breakdown(tagger, paths, batch, max(1, workers))


if __name__ == "__main__":
    main()
