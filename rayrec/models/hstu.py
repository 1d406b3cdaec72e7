"""HSTU (Zhai et al., "Actions Speak Louder than Words", ICML 2024; Meta's generative-recommenders).

One HSTU layer is one residual branch (a sub-layer, so every residual serves it):

    U, V, Q, K = split(SiLU(Norm(x) W_uvqk))                         4 x (B, T, D)
    A(x)       = SiLU(Q K^T + rab^{p,t}) / n   on visible keys only   (B, H, T, T)
    f(x)       = W_o Dropout(Norm(A(x) V) * U)                        (B, T, D)

Pointwise aggregated attention: no softmax, so a query's weights do not compete and need not sum
to 1 (the paper: it keeps the intensity of a user's engagement); ``n`` is ``model.max_len`` (the
authors divide by their padded length, a constant), which keeps outputs independent of left
padding. No feed-forward: U gates the attention output instead. The relative attention bias
``rab`` (one per layer, shared by the heads) is a learned weight per relative position ``i - j``
plus, with ``model.hstu_rel_bias=position_time``, a learned weight per log-bucket of the time
between the query's and the key's interactions.

Departure from the authors (docs/models.md): their time bucket of query i reads the timestamp of
item i+1 (the next item's, i.e. the query time); here it reads item i's own, so a later
interaction never changes an earlier output (rayrec's causality guarantee) and training sees at
every position what scoring sees at the last one (the authors also use the last item's own
timestamp there).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from rayrec.models.attention import AttnContext
from rayrec.models.blocks import Block, SubLayer
from rayrec.models.dropout import Dropout

TIME_BUCKETS = 128  # the authors' num_buckets


def time_buckets(timestamps: torch.Tensor) -> torch.Tensor:
    """(B, T) timestamps -> (B, T, T) long buckets of |t_i - t_j|: the authors' ln(max(dt, 1)) / 0.301,
    clipped to [0, TIME_BUCKETS]."""
    dt = (timestamps[:, :, None] - timestamps[:, None, :]).abs().clamp(min=1).float()  # (B, T, T)
    return (torch.log(dt) / 0.301).long().clamp(0, TIME_BUCKETS)


# Added to the scores of keys a query may not see: SiLU(x) for x below about -88 is exactly 0 in
# float32 (x * sigmoid(x), sigmoid underflows) and so is its gradient, so a finite bias does what a
# 0/1 mask multiply would without another (B, H, T, T) pass; -inf would give -inf * 0 = NaN.
INVISIBLE = -1e4


def visibility_bias(ctx: AttnContext) -> torch.Tensor:
    """(B, T, T) float: 0 where the query sees the key, INVISIBLE elsewhere; built once per batch."""
    if ctx.visibility is None:
        mask = ctx.mask[:, 0]  # (B, T, T) bool
        ctx.visibility = torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, INVISIBLE)
    return ctx.visibility


class RelativeBias(nn.Module):
    """rab_ij = w_pos[i - j] (+ w_time[bucket(|t_i - t_j|)]): (B, Tq, T), one per layer, shared by its heads."""

    def __init__(self, max_len: int, use_time: bool):
        super().__init__()
        self.max_len = max_len
        self.pos = nn.Parameter(torch.empty(2 * max_len - 1).normal_(std=0.02))  # offsets -(L-1)..(L-1)
        self.time = nn.Parameter(torch.empty(TIME_BUCKETS + 1).normal_(std=0.02)) if use_time else None

    def forward(self, ctx: AttnContext, T: int, Tq: int) -> torch.Tensor:
        i = torch.arange(T - Tq, T, device=self.pos.device)  # query positions (the last Tq)
        j = torch.arange(T, device=self.pos.device)
        bias = self.pos[i[:, None] - j[None, :] + self.max_len - 1][None]  # (1, Tq, T)
        if self.time is not None:
            if ctx.timestamps is None:
                raise ValueError("model.hstu_rel_bias=position_time needs the batch's timestamps")
            if ctx.time_buckets is None:  # built by the first layer, shared by the others
                ctx.time_buckets = time_buckets(ctx.timestamps)
            bias = bias + self.time[ctx.time_buckets[:, -Tq:]]  # (B, Tq, T)
        return bias


class HSTUUnit(nn.Module):
    """The body of one HSTU layer, ``Norm(x) -> f(x)`` (the pre-norm is SubLayer's)."""

    def __init__(self, d: int, heads: int, dropout: float, max_len: int, rel_bias: str):
        super().__init__()
        self.heads, self.max_len = heads, max_len
        self.uvqk = nn.Linear(d, 4 * d, bias=False)  # the authors' one fused projection, no bias
        nn.init.normal_(self.uvqk.weight, std=0.02)
        self.out = nn.Linear(d, d)
        nn.init.xavier_uniform_(self.out.weight)
        self.rab = RelativeBias(max_len, rel_bias == "position_time") if rel_bias != "none" else None
        self.drop = Dropout(dropout)

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        B, T, D = x.shape
        Dh = D // self.heads
        u, v, q, k = F.silu(self.uvqk(x)).split(D, dim=-1)  # 4 x (B, T, D)
        Tq = ctx.queries or T  # scoring: only the last positions query; keys and values stay all T
        u, q = u[:, -Tq:], q[:, -Tq:]
        bias = visibility_bias(ctx)[:, -Tq:]  # (B, Tq, T)
        if self.rab is not None:
            bias = bias + self.rab(ctx, T, Tq)
        heads = []
        for h in range(self.heads):  # per-head strided views: bmm reads them in place, the bias is not copied per head
            c = slice(h * Dh, (h + 1) * Dh)
            scores = torch.baddbmm(bias, q[..., c], k[..., c].transpose(1, 2))  # (B, Tq, T): no 1/sqrt(Dh), as the authors
            heads.append(torch.bmm(F.silu(scores), v[..., c]))  # (B, Tq, Dh): invisible keys weigh exactly 0
        y = heads[0] if len(heads) == 1 else torch.cat(heads, dim=-1)  # (B, Tq, D)
        y = F.layer_norm(y / self.max_len, (D,), eps=1e-6) * u  # Norm(A V / n) * U
        return self.out(self.drop(y))


def hstu_block(cfg, d: int, attention: nn.Module) -> Block:
    """One HSTU layer. ``attention`` (the attention axis' softmax layer) is not used: the axis gives
    HSTU its visibility mask (causal, or bidirectional for masked-item training) and input positions;
    the layer attends pointwise itself. Dropout sits before the output projection, as the authors'."""
    unit = HSTUUnit(d, cfg.num_heads, cfg.dropout, cfg.max_len, cfg.hstu_rel_bias)
    return Block([SubLayer(unit, d, 0.0, norm_first=True)])
