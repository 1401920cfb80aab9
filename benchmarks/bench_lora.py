"""LoRA vs full fine-tune, and extract-lora's speed on CPU.

1. Side by side, on the tiny SDXL-shaped model and on the full-size SDXL architecture
   (random weights on the meta device: the real shapes, no memory): trainable parameters,
   AdamW optimizer-state bytes (measured: one optimizer step, then the state's tensors) and
   the dry run's peak GPU estimate (bf16 mixed precision, gradient checkpointing), for a
   full UNet fine-tune vs a LoRA of dim 32 (UNet + both text encoders).
2. extract-lora on the full-size UNet at dim 64 (3x3 convs at 64 too) on the CPU, against
   a full SVD per layer (what sd-scripts' extract_lora_from_models.py does). Two full-size
   UNets in fp32 are 20 GiB, more than a small machine holds, so each distinct layer
   shape is timed once with random weights and the total is the sum over all layers of
   their shape's time (the SDXL UNet has ~20 distinct shapes for ~800 layers): an
   extrapolation, said so in the output. Target: under 10 minutes on 2 cores.

    python benchmarks/bench_lora.py [--threads 2] [--dim 64] [--baseline-shapes 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from curate.common.train_config import TrainConfig  # noqa: E402
from curate.train import extract_lora, memory, network, sdxl  # noqa: E402

TARGET_S = 600


def optimizer_state_bytes(params: list) -> int:
    """Bytes of AdamW's state after one step over `params` (meta tensors: shapes only)."""
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    opt.step()
    total = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                if torch.is_tensor(t) and t.dim() > 0)
    for p in params:
        p.grad = None
    return total


def side_by_side(name: str, model: sdxl.SDXL) -> None:
    counts = {part: sum(p.numel() for p in getattr(model, part).parameters()) for part in ("unet", "te1", "te2", "vae")}
    counts["rank_sums"] = network.rank_sums(model)
    full_cfg = TrainConfig(pretrained="x", output_dir="x", mixed_precision="bf16", gradient_checkpointing=True)
    lora_cfg = TrainConfig(pretrained="x", output_dir="x", mixed_precision="bf16", gradient_checkpointing=True,
                           network="lora", network_dim=32)
    with torch.random.fork_rng(devices=[]):
        net = network.Network(model, "lora", dim=32, alpha=16)
    rows = []
    for label, params, cfg in (("full fine-tune (UNet)", list(model.unet.parameters()), full_cfg),
                               ("LoRA dim 32 (UNet+TEs)", list(net.parameters()), lora_cfg)):
        trainable = sum(p.numel() for p in params)
        state = optimizer_state_bytes([torch.nn.Parameter(p.detach().clone()) for p in params])
        est = memory.estimate(cfg, counts)
        rows.append((label, trainable, state, est["total"]))
    print(f"\n{name}")
    print(f"  {'':<26}{'trainable params':>18}{'AdamW state':>16}{'peak estimate':>16}")
    for label, n, state, peak in rows:
        print(f"  {label:<26}{n:>18,}{state / 2**20:>13,.1f} MiB{peak:>12.2f} GiB")
    (_, n0, s0, p0), (_, n1, s1, p1) = rows
    print(f"  {'LoRA / full':<26}{n1 / n0:>18.4f}{s1 / s0:>16.4f}{p1 / p0:>16.3f}")


def extraction_time(dim: int, baseline_shapes: int) -> None:
    unet_only = sdxl.full_size_random("meta")
    layers = network.targets(unet_only, text_encoders=False, conv=True)
    shapes = Counter()
    for name, (_, layer, is_3x3) in layers.items():
        w = layer.weight
        shapes[(w.shape[0], w[0].numel())] += 1
    print(f"\nextract-lora, full-size SDXL UNet, dim {dim} (3x3 convs too): {len(layers)} layers, "
          f"{len(shapes)} distinct shapes, {torch.get_num_threads()} CPU threads")
    print("  time per distinct shape measured once on random weights, total = sum over all layers "
          "(extrapolated, not a run over two real 10 GiB UNets); wall clock and CPU time (all threads)")
    wall = cpu = 0.0
    base_ours = base_full = 0.0
    g = torch.Generator().manual_seed(0)
    common = {shape for shape, _ in shapes.most_common(baseline_shapes)}
    for (rows, cols), count in sorted(shapes.items(), key=lambda kv: -kv[1]):
        base = torch.randn(rows, cols, generator=g)
        tuned = base + torch.randn(rows, cols, generator=g) * 1e-3
        w0, c0 = time.perf_counter(), time.process_time()
        extract_lora.low_rank(tuned - base, dim)
        t_wall, t_cpu = time.perf_counter() - w0, time.process_time() - c0
        wall, cpu = wall + t_wall * count, cpu + t_cpu * count
        line = f"    {rows:>5} x {cols:<6} x{count:<4} randomized SVD {t_wall:6.2f} s wall {t_cpu:6.2f} s CPU"
        if (rows, cols) in common:
            w0 = time.perf_counter()
            torch.linalg.svd(tuned - base, full_matrices=False)
            t_full = time.perf_counter() - w0
            base_ours, base_full = base_ours + t_wall * count, base_full + t_full * count
            line += f"   full SVD {t_full:6.2f} s wall"
        print(line)
    print(f"  total (extrapolated): {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU time; target < "
          f"{TARGET_S / 60:.0f} min wall on 2 cores: {'met' if wall < TARGET_S else 'NOT met'} on this machine")
    if base_full:
        n = sum(shapes[s] for s in common)
        print(f"  baseline, the {len(common)} most frequent shapes ({n} of {len(layers)} layers): full SVD "
              f"(sd-scripts' method) {base_full / 60:.1f} min vs randomized {base_ours / 60:.1f} min wall: "
              f"{base_full / base_ours:.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--baseline-shapes", type=int, default=5,
                    help="Time the full-SVD baseline on this many of the most frequent shapes (0: none; it is slow).")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    side_by_side("tiny SDXL-shaped model (CPU)", sdxl.tiny_random())
    side_by_side("full-size SDXL architecture (meta device)", sdxl.full_size_random("meta"))
    with torch.no_grad():
        extraction_time(args.dim, args.baseline_shapes)


if __name__ == "__main__":
    main()
