"""STE baseline: uniform fake quantization with the straight-through estimator (Bengio et al.,
2013; the common "min/max observer" scheme of PyTorch and TensorRT).

Weights: symmetric, ``s = max|w| / Q_P`` per tensor or per output row, recomputed every step.
Activations: affine, ``s = (max - min) / (2^b - 1)``, ``z = round(-min / s)``, from an EMA of the
batch min/max; the gradient passes inside [min, max] and is zero outside (clipped STE).
``ste_observer=learned``: the scale is a parameter trained through the plain STE (no gradient
scaling, no data-driven init beyond the first min/max; compare LSQ).
"""
from __future__ import annotations

import torch
from torch import nn

from rayrec.quant.base import ActQParams, Quantizer, exact_grid, round_ste


class STEWeight(Quantizer):
    is_weight = True

    def __init__(self, bits: int, per_channel: bool, channels: int = 1, learned: bool = False):
        super().__init__(bits, True, per_channel)
        self.learned = learned
        self.s = nn.Parameter(torch.ones(channels, 1) if per_channel else torch.ones(())) if learned else None

    def minmax_scale(self, w: torch.Tensor) -> torch.Tensor:
        amax = w.detach().abs().amax(dim=1, keepdim=True) if self.per_channel else w.detach().abs().max()
        return (amax / self.qp).clamp(min=1e-8)

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        return self.s if self.s is not None else self.minmax_scale(w)

    def init_from(self, w: torch.Tensor) -> None:
        if self.s is not None:
            self.s.data.copy_(self.minmax_scale(w))

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        s = self.scale(w)
        return round_ste(torch.clamp(w / s, self.qn, self.qp)) * s

    def int_weight(self, w):
        return exact_grid(self.quantize(w).detach(), self.scale(w).detach())


class STEAct(Quantizer):
    def __init__(self, bits: int, signed: bool, ema: float = 0.9, learned: bool = False):
        super().__init__(bits, signed)
        self.ema, self.learned = ema, learned
        self.levels = (1 << bits) - 1
        self.register_buffer("lo", torch.zeros(()))
        self.register_buffer("hi", torch.ones(()))
        self.s = nn.Parameter(torch.ones(())) if learned else None

    def init_from(self, x: torch.Tensor) -> None:
        self.lo.fill_(min(float(x.min()), 0.0))
        self.hi.fill_(max(float(x.max()), 1e-3))
        if self.s is not None:
            amax = max(-float(self.lo), float(self.hi)) if self.signed else float(self.hi)
            self.s.data.fill_(amax / self.qp)

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        s = ((self.hi - self.lo) / self.levels).clamp(min=1e-8)
        return s, torch.round(-self.lo / s).clamp(0, self.levels)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.s is not None:  # learned: symmetric (signed) or unsigned grid, plain STE on s
            return round_ste(torch.clamp(x / self.s, self.qn, self.qp)) * self.s
        if self.training:
            with torch.no_grad():
                self.lo.mul_(self.ema).add_((1 - self.ema) * x.min().clamp(max=0))
                self.hi.mul_(self.ema).add_((1 - self.ema) * x.max().clamp(min=0))
        s, z = self.affine()
        return (torch.clamp(round_ste(x / s) + z, 0, self.levels) - z) * s

    def act_qparams(self) -> ActQParams:
        if self.s is not None:
            s = float(self.s)
            return ActQParams(s, -self.qn, self.qn * s, self.qp * s)
        s, z = self.affine()
        s, z = float(s), int(z)
        return ActQParams(s, z, -z * s, (self.levels - z) * s)
