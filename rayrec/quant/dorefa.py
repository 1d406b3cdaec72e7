"""DoReFa-Net (Zhou et al., 2016): k-bit weights through tanh normalisation, k-bit activations.

    quantize_k(r) = round((2^k - 1) r) / (2^k - 1)             (straight-through)
    w_q = 2 quantize_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1    (weights in [-1, 1])
    x_q = quantize_k(clip(x, 0, 1))                             (activations after a ReLU)

For pre-activation inputs (LayerNorm outputs) the signed variant clips to [-1, 1] with
2^(k-1) - 1 levels per side, so 0 stays a level; the LayerNorm gain learns the range.

The paper's networks put BatchNorm after every layer, which absorbs the [-1, 1] weight range;
rayrec's Linears have none, so ``w_q`` is multiplied by the (detached) max |w| to keep each
layer's output scale. A per-tensor constant: the levels are the paper's.
"""
from __future__ import annotations

import torch

from rayrec.quant.base import ActQParams, Quantizer, exact_grid, round_ste


def quantize_k(r: torch.Tensor, k: int) -> torch.Tensor:
    n = (1 << k) - 1
    return round_ste(r * n) / n


class DoReFaWeight(Quantizer):
    is_weight = True

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        t = torch.tanh(w)
        return (2 * quantize_k(t / (2 * t.abs().max()) + 0.5, self.bits) - 1) * w.detach().abs().max()

    def int_weight(self, w):
        # levels are odd multiples of max|w| / (2^k - 1): an int8 grid up to k = 7 bits
        n = (1 << self.bits) - 1
        if n > 127:
            return None
        return exact_grid(self.quantize(w).detach(), w.detach().abs().max() / n)


class DoReFaAct(Quantizer):
    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.signed:
            n = (1 << (self.bits - 1)) - 1
            return round_ste(torch.clamp(x, -1.0, 1.0) * n) / n
        return quantize_k(torch.clamp(x, 0.0, 1.0), self.bits)

    def act_qparams(self) -> ActQParams:
        if self.signed:
            return ActQParams(1.0 / ((1 << (self.bits - 1)) - 1), 128, -1.0, 1.0)
        return ActQParams(1.0 / ((1 << self.bits) - 1), 0, 0.0, 1.0)
