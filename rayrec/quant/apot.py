"""APoT (Li et al., ICLR 2020): additive powers-of-two weight levels, weight normalisation and a
learned clipping level, following the authors' code (yhhhli/APoT_Quantization).

Weights are normalised, ``w' = (w - mean) / std`` (statistics without gradient), divided by the
learned alpha, clipped to [-1, 1] and rounded to the nearest APoT level; each level is a sum of
one power of two from each of n terms (``levels``). The gradient is the paper's (RCF):

    d/dx = g * [|x/alpha| <= 1],   d/dalpha = sum g * (sign(x) [|x/alpha| > 1] + (q - x/alpha) [|x/alpha| <= 1])

Activations use the same clip-and-round with uniform levels (the authors' activation quantizer).
The authors' convolutions are followed by BatchNorm, which absorbs the normalisation; rayrec's
Linears are not, so the quantized weight is multiplied back by the (detached) std.
"""
from __future__ import annotations

import torch
from torch import nn

from rayrec.quant.base import ActQParams, Quantizer, exact_grid


def apot_levels(b: int) -> torch.Tensor:
    """Magnitude levels in [0, 1] for b magnitude bits (the sign is one more bit).

    b = 2..6 are the authors' tables (build_power_value); b = 1 is {0, 1}; b = 7 (8-bit weights)
    extends the even-b rule with one 1-bit term. Term i of n takes 0 or 2^-(i + j n + 1)."""
    if b == 1:
        return torch.tensor([0.0, 1.0], dtype=torch.float64)
    bases: list[list[float]]
    if b == 3:
        bases = [[0.0, 2 ** -1, 2 ** -2, 2 ** -4], [0.0, 2 ** -3]]
    elif b == 5:
        bases = [[0.0, 2 ** -1, 2 ** -3, 2 ** -6], [0.0, 2 ** -2, 2 ** -4, 2 ** -7], [0.0, 2 ** -5]]
    else:
        n = b // 2
        bases = [[0.0] + [2.0 ** -(i + j * n + 1) for j in range(3)] for i in range(n)]
        if b % 2:
            bases.append([0.0, 2.0 ** -(3 * n + 1)])
    values = torch.zeros(1, dtype=torch.float64)
    for base in bases:
        values = (values[:, None] + torch.tensor(base, dtype=torch.float64)[None, :]).flatten()
    return torch.unique(values)  # float64 dyadic sums; callers normalise by the max


def _nearest(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Nearest level of each |x| in [0, 1] (levels sorted ascending)."""
    mids = (levels[1:] + levels[:-1]) / 2
    return levels[torch.bucketize(x, mids)]


class _ClipRound(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, alpha, levels, signed: bool):
        xa = x / alpha
        mag = xa.abs().clamp(max=1.0) if signed else xa.clamp(0.0, 1.0)
        q = _nearest(mag, levels)
        q = q * torch.sign(xa) if signed else q
        ctx.save_for_backward(xa, q)
        ctx.signed = signed
        return q * alpha

    @staticmethod
    def backward(ctx, g):
        xa, q = ctx.saved_tensors
        out = (xa.abs() > 1.0) if ctx.signed else (xa > 1.0)
        outf = out.to(g.dtype)
        clip_grad = torch.sign(xa) * outf if ctx.signed else outf
        grad_alpha = (g * (clip_grad + (q - xa) * (1 - outf))).sum()
        return g * (1 - outf), grad_alpha, None, None


class APoTWeight(Quantizer):
    is_weight = True

    def __init__(self, bits: int):
        super().__init__(bits, signed=True)
        self.alpha = nn.Parameter(torch.tensor(3.0))  # the authors' initial weight clip (in std units)
        raw = apot_levels(bits - 1)
        self.register_buffer("levels", (raw / raw.max()).float(), persistent=False)
        # the smallest power of two that makes every level an integer: an int8 grid if <= 127
        self.unit = next((2.0 ** -e for e in range(16) if bool(((raw * 2 ** e) % 1 == 0).all())), None)
        self.int_max = float(raw.max() / self.unit) if self.unit else float("inf")

    def quantize(self, w: torch.Tensor) -> torch.Tensor:
        mean, std = w.detach().mean(), w.detach().std().clamp(min=1e-8)
        return _ClipRound.apply((w - mean) / std, self.alpha, self.levels, True) * std

    def int_weight(self, w):
        if self.int_max > 127:
            return None
        return exact_grid(self.quantize(w).detach(), (self.alpha * w.detach().std() / self.int_max).detach())


def uniform_levels(bits: int) -> torch.Tensor:
    return torch.arange(1 << bits, dtype=torch.float32) / ((1 << bits) - 1)


class APoTAct(Quantizer):
    def __init__(self, bits: int, signed: bool):
        super().__init__(bits, signed)
        self.alpha = nn.Parameter(torch.tensor(8.0))
        self.register_buffer("levels", uniform_levels(bits - 1 if signed else bits), persistent=False)

    def init_from(self, x: torch.Tensor) -> None:
        # the authors start at 8.0 for post-ReLU CNN features; LayerNorm outputs are ~N(0, 1),
        # so start at the observed range instead (then learned)
        self.alpha.data.fill_(max(float(x.abs().max()), 1e-3))

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        return _ClipRound.apply(x, self.alpha, self.levels, self.signed)

    def act_qparams(self) -> ActQParams:
        a = float(self.alpha)
        n = len(self.levels) - 1
        return ActQParams(a / n, 128 if self.signed else 0, -a if self.signed else 0.0, a)
