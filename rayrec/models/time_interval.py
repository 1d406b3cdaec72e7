"""TiSASRec's attention (Li, Wang & McAuley, WSDM 2020): time intervals as relations.

Between query i and key j the relation is r_ij = min(floor(|t_i - t_j| / s), time_span), where s
is the user's smallest positive gap between consecutive interactions. Keys and values get learned
embeddings of r_ij and of absolute positions (instead of positions added to the input):

    score_ij = q_i . (k_j + P^K_j + R^K_{r_ij}) / sqrt(d)
    out_i    = sum_j a_ij (v_j + P^V_j + R^V_{r_ij})

Nothing T x T x D is materialised: q_i . R^K_r is computed for every r (B, H, T, S+1) and gathered
at r_ij; the value term bins each a_ij by r_ij (scatter-add) and multiplies the bins by R^V.
Intervals are computed per batch on the device from the (B, T) timestamps. The scale s is taken
over the query's own prefix (a running minimum), so a later interaction can never change an
earlier position's output; at the last position it is the paper's per-user scale.
"""
from __future__ import annotations

import torch
from torch import nn

from rayrec.models.attention import AttentionKind, AttnContext, _keep, causal_mask
from rayrec.models.dropout import dropout


def time_intervals(items: torch.Tensor, timestamps: torch.Tensor, time_span: int) -> torch.Tensor:
    """(B, T) ids and int timestamps -> (B, T, T) long relations r_ij in [0, time_span]."""
    real = items != 0
    t = timestamps.long()
    both = real[:, 1:] & real[:, :-1]
    gaps = torch.where(both, t[:, 1:] - t[:, :-1], torch.zeros_like(t[:, 1:]))  # (B, T-1)
    big = torch.iinfo(torch.long).max
    gaps = torch.where(gaps > 0, gaps, torch.full_like(gaps, big))
    scale = torch.cat([torch.full_like(t[:, :1], big), gaps], dim=1).cummin(dim=1).values  # (B, T): prefix minimum
    scale = torch.where(scale == big, torch.ones_like(scale), scale)
    diff = (t[:, :, None] - t[:, None, :]).abs()  # (B, T, T)
    r = torch.div(diff, scale[:, :, None], rounding_mode="floor").clamp(max=time_span)
    return torch.where(real[:, :, None] & real[:, None, :], r, torch.zeros_like(r))


def interval_context(items: torch.Tensor, timestamps: torch.Tensor | None, cfg) -> AttnContext:
    if timestamps is None:
        raise ValueError("model.attention=time_interval needs the batch's timestamps")
    return AttnContext(mask=causal_mask(items), keep=_keep(items),
                       intervals=time_intervals(items, timestamps, cfg.time_span))


class TimeIntervalAttention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float, time_span: int, max_len: int):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.pos_k, self.pos_v = nn.Embedding(max_len, d), nn.Embedding(max_len, d)
        self.rel_k, self.rel_v = nn.Embedding(time_span + 1, d), nn.Embedding(time_span + 1, d)
        for e in (self.pos_k, self.pos_v, self.rel_k, self.rel_v):
            nn.init.normal_(e.weight, std=d ** -0.5)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        *lead, D = t.shape  # (..., T, D) -> (..., H, T, Dh)
        return t.reshape(*lead, self.heads, D // self.heads).transpose(-3, -2)

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = (self._heads(t) for t in self.qkv(x).split(D, dim=-1))  # 3 x (B, H, T, Dh)
        pos = torch.arange(T - 1, -1, -1, device=x.device)  # counted from the newest item, like SeqRec
        k = k + self._heads(self.pos_k(pos))  # (H, T, Dh) broadcast over B
        v = v + self._heads(self.pos_v(pos))
        rel_k = self.rel_k.weight.view(-1, self.heads, D // self.heads).transpose(0, 1)  # (H, S+1, Dh)
        rel_v = self.rel_v.weight.view(-1, self.heads, D // self.heads).transpose(0, 1)
        intervals, mask = ctx.intervals, ctx.mask
        if ctx.queries:  # only the last positions query (scoring); keys and values stay all T
            q, intervals, mask = q[:, :, -ctx.queries:], intervals[:, -ctx.queries:], mask[:, :, -ctx.queries:]
        Tq = q.shape[2]
        idx = intervals[:, None].expand(B, self.heads, Tq, T)  # (B, H, Tq, T)
        scores = q @ k.transpose(-2, -1) + torch.einsum("bhtd,hsd->bhts", q, rel_k).gather(-1, idx)
        scores = scores * (D // self.heads) ** -0.5
        probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)  # (B, H, Tq, T)
        probs = dropout(probs, self.dropout, self.training)
        bins = torch.zeros(B, self.heads, Tq, rel_v.shape[1], dtype=probs.dtype, device=x.device).scatter_add_(-1, idx, probs)
        y = probs @ v + torch.einsum("bhts,hsd->bhtd", bins, rel_v)  # (B, H, Tq, Dh)
        return self.out(y.transpose(1, 2).reshape(B, Tq, D))


def _layer(cfg, d: int) -> nn.Module:
    return TimeIntervalAttention(d, cfg.num_heads, cfg.dropout, cfg.time_span, cfg.max_len)


TIME_INTERVAL = AttentionKind(interval_context, _layer, input_positions=False)
