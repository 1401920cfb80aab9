"""Precision paths of `curate train`, the same code on the CPU and the GPU.

    mixed_precision "no"    fp32 weights, fp32 compute
    "bf16"                  fp32 master weights, bf16 autocast
    "fp16"                  fp32 master weights, fp16 autocast, a grad scaler
    + full_bf16 / full_fp16 the trained weights themselves in 16 bits (gradients, optimizer
                            state too); optional stochastic rounding of each update

torch's autocast and GradScaler run on the CPU as on CUDA (accelerate turns fp16 off on the
CPU), so curate drives them itself: every path above runs in the tests on the tiny model.
"""

from __future__ import annotations

import contextlib
import types

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class Precision:
    def __init__(self, config, device: torch.device):
        self.device = device
        self.compute = DTYPES.get(config.mixed_precision)           # None: fp32, no autocast
        half_weights = config.full_fp16 or config.full_bf16
        self.weights = self.compute if half_weights else torch.float32  # trained parts
        self.frozen = self.compute or torch.float32                   # parts that do not train
        self.scaler = torch.amp.GradScaler(device.type) if config.mixed_precision == "fp16" else None
        if self.scaler is not None and config.full_fp16:
            _allow_fp16_grads(self.scaler)
        self.stochastic_rounding = config.stochastic_rounding
        self.skipped = 0  # optimizer steps the grad scaler skipped (inf/nan gradients)

    def autocast(self):
        if self.compute is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute)

    def backward(self, accelerator, loss) -> None:
        accelerator.backward(self.scaler.scale(loss) if self.scaler else loss)

    def unscale(self, optimizer) -> None:
        """Before clipping or reading the gradient norm: the true gradients."""
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer) -> bool:
        """optimizer.step() through the scaler; False when the scaler skipped it (inf/nan
        gradients), so the LR schedule does not advance, as in sd-scripts (accelerate's
        scheduler wrapper skips its step the same way)."""
        if self.scaler is None:
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        stepped = self.scaler.get_scale() >= before
        self.skipped += not stepped
        return stepped

    def scale(self) -> float | None:
        return self.scaler.get_scale() if self.scaler else None

    def install(self, optimizer) -> None:
        """With stochastic_rounding, each parameter's update is computed in fp32 and rounded
        to its 16-bit dtype stochastically (unbiased), one parameter at a time."""
        if self.stochastic_rounding:
            own = optimizer.step

            def step(self, closure=None):  # a bound method, as torch's LR schedulers expect to wrap
                return stochastic_step(self, own, closure)

            optimizer.step = types.MethodType(step, optimizer)


def _allow_fp16_grads(scaler) -> None:
    """full_fp16: fp16 weights have fp16 gradients, which torch's GradScaler refuses to unscale
    by default; sd-scripts lets it (allow_fp16=True). The loss is still scaled."""
    unscale = scaler._unscale_grads_
    scaler._unscale_grads_ = lambda opt, inv_scale, found_inf, allow_fp16: unscale(opt, inv_scale, found_inf, True)


def stochastic_round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 -> dtype, rounding up or down with the probability of the distance (E[result] = x).
    With plain rounding, an update smaller than half a step of the 16-bit grid is lost."""
    near = x.to(dtype)
    near32 = near.float()
    toward = torch.where(x > near32, torch.inf, -torch.inf).to(dtype)
    other = torch.nextafter(near, toward)
    gap = other.float() - near32
    frac = torch.where(gap != 0, (x - near32) / gap, torch.zeros_like(x))
    return torch.where(torch.rand_like(x) < frac, other, near)


def stochastic_step(optimizer, step, closure=None):
    """Run `step` (the optimizer's own) for one parameter at a time on an fp32 copy of it, then
    round the result back stochastically. Works for any optimizer (torch, bitsandbytes): the
    optimizer sees a normal fp32 parameter; only one parameter is in fp32 at a time."""
    groups = [g["params"] for g in optimizer.param_groups]
    try:
        for gi, params in enumerate(groups):
            for p in params:
                if p.grad is None:
                    continue
                half, grad = p.data, p.grad
                if half.dtype == torch.float32:
                    single = [p]
                else:
                    p.data = half.float()
                    p.grad = grad.float()
                    single = [p]
                for gj, g in enumerate(optimizer.param_groups):
                    g["params"] = single if gj == gi else []
                step()
                if half.dtype != torch.float32:
                    half.copy_(stochastic_round(p.data, half.dtype))
                    p.data = half
                    p.grad = grad
    finally:
        for g, params in zip(optimizer.param_groups, groups):
            g["params"] = params
