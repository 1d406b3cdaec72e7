"""Block axis: the layer itself, written as residual branches ("sub-layers").

A sub-layer maps the residual stream's read-out ``x`` (B, T, D) to the update ``f(x)`` it adds;
how the update is added (plain ``x + f(x)``, Post-LN ``norm(x + f(x))``, or mHC's mixed streams)
belongs to the residual axis, so every block works with every residual.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rayrec.models.attention import AttnContext
from rayrec.models.dropout import Dropout


class PointWiseFFN(nn.Module):
    """SASRec's two 1x1 convolutions, written as Linear layers (the same map)."""

    def __init__(self, d: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, d), nn.ReLU(), Dropout(dropout), nn.Linear(d, d))

    def forward(self, x: torch.Tensor, ctx: AttnContext | None = None) -> torch.Tensor:
        return self.net(x)


class SwiGLU(nn.Module):
    def __init__(self, d: int, dropout: float):
        super().__init__()
        hidden = 4 * d  # eSASRec's width (its reference LiGR layer: 4d), not LLaMA's parameter-matched 8d/3
        self.up = nn.Linear(d, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor, ctx: AttnContext | None = None) -> torch.Tensor:
        a, b = self.up(x).chunk(2, dim=-1)
        return self.down(self.drop(F.silu(a) * b))


class SubLayer(nn.Module):
    """One residual branch: ``drop(gate(x) * body(pre_norm(x)))``.

    LiGR's gate reads the stream itself, not its normalised copy (as eSASRec's reference layer):
    the gate can then respond to the stream's scale, which the norm removes.

    ``post_norm`` is not applied here: the residual applies it after the addition (Post-LN).
    """

    def __init__(self, body: nn.Module, d: int, dropout: float, norm_first: bool, gated: bool = False):
        super().__init__()
        self.pre_norm = nn.LayerNorm(d, eps=1e-8) if norm_first else nn.Identity()
        self.post_norm = nn.Identity() if norm_first else nn.LayerNorm(d, eps=1e-8)
        self.body = body
        self.drop = Dropout(dropout)
        self.gate = nn.Linear(d, d) if gated else None
        if self.gate is not None:  # gates start half open everywhere: sigmoid(0) = 0.5
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        z = self.pre_norm(x)
        y = self.body(z, ctx)
        if self.gate is not None:
            y = torch.sigmoid(self.gate(x[:, -y.shape[1]:])) * y  # y has fewer rows when only the last query
        return self.drop(y)


class Block(nn.Module):
    """A layer: its sub-layers in order (attention, then feed-forward)."""

    def __init__(self, sublayers: list[SubLayer]):
        super().__init__()
        self.sublayers = nn.ModuleList(sublayers)


def sasrec_block(cfg, d: int, attention: nn.Module) -> Block:
    """The SASRec paper's layer: self-attention and a point-wise FFN, Pre-LN or Post-LN."""
    return Block([
        SubLayer(attention, d, cfg.dropout, cfg.norm_first),
        SubLayer(PointWiseFFN(d, cfg.dropout), d, cfg.dropout, cfg.norm_first),
    ])


def ligr_block(cfg, d: int, attention: nn.Module) -> Block:
    """eSASRec's LiGR layer: Pre-LN, sigmoid-gated residual branches, SwiGLU feed-forward."""
    return Block([
        SubLayer(attention, d, cfg.dropout, norm_first=True, gated=True),
        SubLayer(SwiGLU(d, cfg.dropout), d, cfg.dropout, norm_first=True, gated=True),
    ])


BLOCKS = {"sasrec": sasrec_block, "ligr": ligr_block}
