"""`curate extract-lora BASE TUNED`: a LoRA that carries (most of) what a fine-tune changed.

For each layer a LoRA wraps (network.targets: the same layers, the same kohya names),
the weight difference TUNED - BASE is reshaped to a matrix (out, in x kh x kw) and cut
to its best rank-`dim` approximation by SVD: up = U S, down = V^T, alpha = rank (scale 1),
as sd-scripts' networks/extract_lora_from_models.py does. On a GPU the SVD is exact;
on the CPU it is randomized (torch.svd_lowrank, 2 power iterations) one layer at a
time, which finds an exactly low-rank difference to float precision and is ~10x faster
than a full SVD of SDXL's wide layers.

The summary says, per block type, how much of the difference's norm (Frobenius) the
kept ranks hold, and how much lies in layers no LoRA layer covers (3x3 convs without
--conv-dim, norms, embeddings), and warns where little is kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from curate.errors import CurateError
from curate.train import lora_file, network, sdxl

WARN_KEPT = 0.5         # warn when the kept ranks hold less than half the difference's norm
SAME_TEXT_ENCODER = 1e-4  # max |difference| below which a text encoder counts as untouched (save rounding)
OVERSAMPLE, POWER_ITERATIONS = 8, 2  # torch.svd_lowrank's defaults: niter 2


@dataclass
class Extraction:
    state: dict = field(default_factory=dict)        # kohya key -> tensor
    norms: dict = field(default_factory=dict)        # block type -> [kept^2, total^2]
    uncovered: dict = field(default_factory=dict)    # part -> [uncovered^2, total^2]
    skipped_parts: list = field(default_factory=list)
    layers: int = 0

    def lines(self, out: Path) -> list[str]:
        lines = [f"extract-lora: {self.layers} layers -> {out}"]
        lines.append("  share of the difference's norm kept, per block type:")
        warnings = []
        for kind, (kept, total) in self.norms.items():
            share = (kept / total) ** 0.5 if total else 1.0
            lines.append(f"    {kind:<24} {100 * share:5.1f}%" if total else f"    {kind:<24} unchanged")
            if share < WARN_KEPT:
                warnings.append(f"{kind}: the rank keeps only {100 * share:.0f}% of the difference; "
                                "raise --dim (or --conv-dim) for a closer copy of the fine-tune")
        for part, (missed, total) in self.uncovered.items():
            share = (missed / total) ** 0.5 if total else 0.0
            if share > 0.01:
                lines.append(f"    {part}: {100 * share:.1f}% of its difference is in layers no LoRA layer covers")
            if share > 1 - WARN_KEPT:
                hint = " (add --conv-dim N for the 3x3 convs)" if part == "unet" else ""
                warnings.append(f"{part}: {100 * share:.0f}% of the difference is outside the LoRA's layers{hint}")
        for part in self.skipped_parts:
            lines.append(f"    {part}: unchanged by the fine-tune, not extracted")
        return lines + [f"  warning: {w}" for w in warnings]


def check_same_architecture(base: sdxl.SDXL, tuned: sdxl.SDXL) -> None:
    for part in ("unet", "te1", "te2"):
        a = {k: tuple(v.shape) for k, v in getattr(base, part).state_dict().items()}
        b = {k: tuple(v.shape) for k, v in getattr(tuned, part).state_dict().items()}
        if a != b:
            key = next((k for k in a if a[k] != b.get(k)), None) or next(k for k in b if k not in a)
            raise CurateError(f"BASE and TUNED are different architectures ({part} {key}: "
                              f"{a.get(key, 'absent')} vs {b.get(key, 'absent')}); extract from a fine-tune of BASE")


def block_type(name: str) -> str:
    if name.startswith("lora_te"):
        return name.split("_")[1] + " (text encoder)"
    if "transformer_blocks" in name or name.endswith(("proj_in", "proj_out")):
        return "unet attention/mlp"
    return "unet resnet/sampler"


def extract(base: sdxl.SDXL, tuned: sdxl.SDXL, dim: int, conv_dim: int = 0, device=None,
            progress=None) -> Extraction:
    """The LoRA (kohya keys) of TUNED - BASE at rank `dim` (3x3 convs at `conv_dim`, 0: left out)."""
    check_same_architecture(base, tuned)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Extraction()
    ours, theirs = network.targets(base, True, conv_dim > 0), network.targets(tuned, True, conv_dim > 0)
    for part in ("te1", "te2"):
        names = [n for n, (p, _, _) in ours.items() if p == part]
        if all(_max_diff(ours[n][1].weight, theirs[n][1].weight) < SAME_TEXT_ENCODER for n in names):
            out.skipped_parts.append(part)
    covered = {}
    for name, (part, layer, is_3x3) in ours.items():
        if progress:
            progress()
        covered.setdefault(part, set()).add(id(layer.weight))
        if part in out.skipped_parts:
            continue
        diff = theirs[name][1].weight.detach().to(device, torch.float32) - layer.weight.detach().to(device, torch.float32)
        matrix = diff.reshape(diff.shape[0], -1)
        total = float(matrix.square().sum())
        norms = out.norms.setdefault(block_type(name), [0.0, 0.0])
        norms[1] += total
        if total == 0.0:
            continue
        up, down, kept = low_rank(matrix, conv_dim if is_3x3 else dim)
        norms[0] += kept
        rank = down.shape[0]
        if diff.dim() == 4:
            down = down.reshape(rank, *diff.shape[1:])
            up = up.reshape(*up.shape, 1, 1)
        out.state[f"{name}.lora_up.weight"] = up.cpu().contiguous()
        out.state[f"{name}.lora_down.weight"] = down.cpu().contiguous()
        out.state[f"{name}.alpha"] = torch.tensor(float(rank))
        out.layers += 1
    for part in ("unet", "te1", "te2"):
        if part in out.skipped_parts:
            continue
        missed = total = 0.0
        tuned_params = dict(getattr(tuned, part).named_parameters())
        for key, w in getattr(base, part).named_parameters():
            d = float((tuned_params[key].detach().float() - w.detach().float()).square().sum())
            total += d
            if id(w) not in covered.get(part, ()):
                missed += d
        out.uncovered[part] = [missed, total]
    return out


def low_rank(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(up [out, r], down [r, in], kept squared norm) of the best rank-r approximation."""
    rank = min(rank, *matrix.shape)
    if matrix.device.type == "cuda" or min(matrix.shape) <= rank + OVERSAMPLE:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    else:
        u, s, v = torch.svd_lowrank(matrix, q=rank + OVERSAMPLE, niter=POWER_ITERATIONS)
        vh = v.T
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    return u * s, vh, float(s.square().sum())


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


def run(base: str, tuned: str, dim: int, conv_dim: int = 0, out: Path | None = None,
        config_dir: Path | None = None, precision: str = "fp16") -> tuple[Path, Extraction]:
    """Load both (diffusers folders or single files, as `pretrained`), extract, write the file."""
    if dim < 1 or conv_dim < 0:
        raise CurateError("--dim must be >= 1 and --conv-dim >= 0")
    out = Path(out) if out else Path(tuned).with_name(f"{Path(tuned).stem}-lora{dim}.safetensors")
    models = [sdxl.load(str(path), config_dir) for path in (base, tuned)]
    with torch.no_grad():
        result = extract(*models, dim, conv_dim)
    meta = {**lora_file.network_metadata("lora", dim, dim, conv_dim, conv_dim),
            **lora_file.modelspec(out.stem),
            "ss_training_comment": f"extracted by curate extract-lora from {Path(tuned).name} - {Path(base).name}"}
    dtype = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    lora_file.save(result.state, out, meta, dtype)
    return out, result
