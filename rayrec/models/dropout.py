"""Dropout whose CPU mask costs a fifth of ``torch.bernoulli_``.

On CPU, ``F.dropout`` draws one 32-bit random number per element through ``bernoulli_``; for
SASRec at max_len 200 that was ~25-38% of a whole training step (the attention probabilities alone
are B x T x T). Here one 64-bit draw yields 8 random bytes and the mask is ``byte >= round(256 p)``:
the drop probability is quantised to 1/256 (0.2 -> 0.1992) and survivors are scaled by the exact
inverse keep rate, so the expectation is unchanged. On other devices the fused kernel is used.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def random_bytes(n: int, device: torch.device) -> torch.Tensor:
    """n independent uniform bytes (uint8).

    ``random_`` over the whole int64 range has a fast path that fills each word with 64 random
    bits; a bounded range such as [0, 2^56) is 4.5x slower per word, and taking 7 of 8 bytes
    needed a strided copy.
    """
    words = torch.empty((n + 7) // 8, dtype=torch.int64, device=device).random_(-(1 << 63), None)
    return words.view(torch.uint8)[:n]


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """(bool mask of kept elements, scale for survivors)."""
    rand = random_bytes(math.prod(shape), device).view(shape)
    threshold = round(p * 256)
    return rand >= threshold, 256.0 / (256 - threshold)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 255 / 256 or torch.compiler.is_compiling():
        return F.dropout(x, p, True)  # (compiled graphs generate their own fast random numbers)
    keep, scale = keep_mask(x.shape, p, x.device)
    return x * torch.where(keep, scale, 0.0).to(x.dtype)


class Dropout(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
