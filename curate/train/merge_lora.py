"""`curate merge-lora BASE LORA --out FILE`: bake a network file into a checkpoint.

Each kohya name in the file is matched to its layer (network.targets, 3x3 convs
included) and LyCORIS rebuilds the module from the tensors it finds there (LoRA/LoCon,
LoHa, LoKr: lycoris.modules.get_module) and adds its weight change x scale in place.
"""

from __future__ import annotations

from pathlib import Path

import torch

from curate.errors import CurateError
from curate.train import lora_file, network, sdxl


def merge(model: sdxl.SDXL, state: dict, scale: float = 1.0) -> int:
    """Add the network's weight changes (x scale) to `model`; returns the layers merged."""
    from lycoris.modules import get_module, make_module

    layers = network.targets(model, text_encoders=True, conv=True)
    names = sorted({key.split(".")[0] for key in state})
    unknown = [n for n in names if n not in layers]
    if unknown:
        raise CurateError(f"{len(unknown)} of the LoRA's {len(names)} modules are not layers of this SDXL model "
                          f"(e.g. {unknown[0]}): a LoRA for another architecture?")
    for name in names:
        layer = layers[name][1]
        cls, params = get_module(state, name)
        module = make_module(cls, params, name, layer) if cls is not None else None
        if module is None:
            raise CurateError(f"{name}: not a LoRA/LyCORIS module curate can merge (keys: "
                              f"{', '.join(sorted(k.split('.', 1)[1] for k in state if k.startswith(name + '.')))})")
        with torch.no_grad():
            module.merge_to(scale)
    return len(names)


def run(base: str, lora: Path, out: Path, scale: float = 1.0, config_dir: Path | None = None,
        precision: str = "fp16") -> tuple[Path, int]:
    state, meta = lora_file.read(lora)
    model = sdxl.load(base, config_dir)
    n = merge(model, {k: v.float() for k, v in state.items()}, scale)
    spec = sdxl.modelspec(Path(out).stem)
    spec["modelspec.merged_from"] = f"{Path(base).name}, {Path(lora).name} x {scale:g}"
    dtype = {"float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return sdxl.save_single_file(model, Path(out), dtype, spec), n
