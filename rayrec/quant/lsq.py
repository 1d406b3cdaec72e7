"""LSQ (Esser et al., ICLR 2020): learned step size for weights and activations.

    v_hat = round(clip(v / s, -Q_N, Q_P)) * s

with the straight-through gradient for ``v`` inside the range and, for ``s``,
``-v/s + round(v/s)`` inside, ``-Q_N`` / ``Q_P`` outside, scaled by ``g = 1 / sqrt(N * Q_P)``
(N: weights per step size, or the features of one token for activations). Initialised from
data: ``s = 2 <|v|> / sqrt(Q_P)``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from rayrec.quant.base import ActQParams, Quantizer, exact_grid, grad_scale, round_ste


class LSQ(Quantizer):
    def __init__(self, bits: int, signed: bool = True, per_channel: bool = False, is_weight: bool = False,
                 channels: int = 1):
        super().__init__(bits, signed, per_channel)
        self.is_weight = is_weight
        self.s = nn.Parameter(torch.ones(channels, 1) if per_channel else torch.ones(()))

    def init_from(self, x: torch.Tensor) -> None:
        mean_abs = x.abs().mean(dim=1, keepdim=True) if self.per_channel else x.abs().mean()
        self.s.data.copy_((2 * mean_abs / math.sqrt(self.qp)).clamp(min=1e-8))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        n = (x[0].numel() if self.per_channel else x.numel()) if self.is_weight else x.shape[-1]
        s = grad_scale(self.s, 1.0 / math.sqrt(n * self.qp))
        return round_ste(torch.clamp(x / s, self.qn, self.qp)) * s

    def act_qparams(self) -> ActQParams:
        s = float(self.s)
        return ActQParams(s, -self.qn, self.qn * s, self.qp * s)

    def int_weight(self, w):
        return exact_grid(self.quantize(w).detach(), self.s.detach())
