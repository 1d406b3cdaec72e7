"""PACT (Choi et al., 2018): a learned clipping level alpha for activations.

    y = 0.5 (|x| - |x - alpha| + alpha) = clip(x, 0, alpha),  y_q = round(y * (2^k - 1) / alpha) * alpha / (2^k - 1)

Rounding is straight-through, so d y_q / d alpha = 1 where x >= alpha and 0 elsewhere (the
paper's eq. 3); the loss gets ``lambda * alpha^2``. The signed variant for pre-activation inputs
(LayerNorm outputs) clips to [-alpha, alpha]: y = 0.5 (|x + alpha| - |x - alpha|), with
2^(k-1) - 1 levels per side and d y_q / d alpha = -1 where x <= -alpha. Weights are quantized
with DoReFa, as in the paper.
"""
from __future__ import annotations

import torch
from torch import nn

from rayrec.quant.base import ActQParams, Quantizer


class PACT(Quantizer):
    def __init__(self, bits: int, signed: bool = False, init: float = 0.0, l2: float = 0.0):
        super().__init__(bits, signed)
        self.init, self.l2 = init, l2
        self.alpha = nn.Parameter(torch.tensor(init or 1.0))
        self.levels = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1

    def init_from(self, x: torch.Tensor) -> None:
        self.alpha.data.fill_(self.init or max(float(x.abs().max() if self.signed else x.clamp(min=0).max()), 1e-3))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha
        if self.signed:
            y = 0.5 * ((x + a).abs() - (x - a).abs())
        else:
            y = 0.5 * (x.abs() - (x - a).abs() + a)
        step = (a / self.levels).detach()  # STE on the rounding only: alpha's gradient is the clip's
        return y + (torch.round(y / step) * step - y).detach()

    def penalty(self):
        return self.l2 * self.alpha.pow(2) if self.l2 else 0.0

    def act_qparams(self) -> ActQParams:
        a = float(self.alpha)
        return ActQParams(a / self.levels, 128 if self.signed else 0, -a if self.signed else 0.0, a)
