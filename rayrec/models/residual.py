"""Residual axis: how each sub-layer's update is added to the residual stream.

A residual owns the stream across the whole network: ``expand`` once after the embedding,
``connect`` once per sub-layer (in order, ``i`` = 0..num_sublayers-1), ``reduce`` once before the
final norm. ``plain`` keeps one stream; ``mhc`` keeps n mixed streams (see ``mhc.py``).
"""
from __future__ import annotations

import torch
from torch import nn

from rayrec.models.attention import AttnContext
from rayrec.models.mhc import MHCResidual


class PlainResidual(nn.Module):
    """``x + f(x)``; with Post-LN sub-layers, ``norm(x + f(x))``."""

    def __init__(self, cfg, d: int, num_sublayers: int):
        super().__init__()

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def connect(self, i: int, x: torch.Tensor, sublayer: nn.Module, ctx: AttnContext) -> torch.Tensor:
        # Padding rows are not zeroed here: no real position reads them (attention masks padded
        # keys, everything else is per position) and the model zeroes them once at its output.
        # Zeroing after every sub-layer was a full pass forward and backward each time.
        y = sublayer(x, ctx)  # (B, Tq, D): Tq < T when only the last positions query
        return sublayer.post_norm(x[:, -y.shape[1]:] + y)

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x


RESIDUALS = {"plain": PlainResidual, "mhc": MHCResidual}
