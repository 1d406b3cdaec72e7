"""Attention axis: which positions a query may see, and the self-attention layer that reads them.

An attention kind is three parts: a context builder (the (B, 1, T, T) visibility mask, plus what
the layer needs per batch, such as time intervals), the layer, and whether absolute positions are
added to the input (SASRec) or used inside the layer (TiSASRec).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rayrec.models.dropout import dropout


@dataclass
class AttnContext:
    mask: torch.Tensor  # (B, 1, T, T) bool: query row may attend to key column
    keep: torch.Tensor  # (B, T, 1) float: 1 at real items, 0 at padding
    intervals: torch.Tensor | None = None  # (B, T, T) long, time_interval only
    bias: torch.Tensor | None = None  # (B, 1, T, T) additive 0 / -inf form of mask, built once per batch
    queries: int = 0  # > 0: only the last `queries` positions query (keys and values stay all T)
    timestamps: torch.Tensor | None = None  # (B, T) int, for layers that read time themselves (hstu)
    time_buckets: torch.Tensor | None = None  # (B, T, T) long, hstu: built by its first layer, shared
    visibility: torch.Tensor | None = None  # (B, T, T) float 0 / -1e4 form of mask for hstu, built once per batch

    def last_rows(self, k: int) -> "AttnContext":
        """The context for a stream cut to its last k positions (after the final attention)."""
        return AttnContext(mask=self.mask[:, :, -k:], keep=self.keep[:, -k:],
                           intervals=None if self.intervals is None else self.intervals[:, -k:])


def causal_mask(items: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool: causal AND key-not-padding, every row sees at least itself.

    Left-padded query rows would otherwise see no key at all and softmax to NaN.
    """
    T = items.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=items.device).tril()  # (T, T)
    keys = (items != 0)[:, None, None, :]  # (B, 1, 1, T)
    eye = torch.eye(T, dtype=torch.bool, device=items.device)
    return (causal & keys) | eye  # (B, 1, T, T)


def bidirectional_mask(items: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool: every real key, in both directions (masked-item models)."""
    T = items.shape[1]
    keys = (items != 0)[:, None, None, :]  # (B, 1, 1, T)
    return keys | torch.eye(T, dtype=torch.bool, device=items.device)


def _keep(items: torch.Tensor) -> torch.Tensor:
    return (items != 0).unsqueeze(-1).float()  # (B, T, 1)


class SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        B, T, D = t.shape
        return t.view(B, T, self.heads, D // self.heads).transpose(1, 2)  # (B, H, T, Dh)

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x)  # (B, T, 3D)
        if self.training and self.dropout > 0 and x.device.type == "cpu" and not ctx.queries:
            H = self.heads
            parts = qkv.view(B, T, 3 * H, D // H).unbind(2)  # 3H x (B, T, Dh) views
            return self.out(self._attend_with_dropout(parts[:H], parts[H:2 * H], parts[2 * H:], ctx))
        q, k, v = (self.split_heads(t) for t in qkv.split(D, dim=-1))  # 3 x (B, H, T, Dh)
        mask = ctx.mask
        if ctx.queries:  # scoring reads the last positions only: their queries see every key
            q, mask = q[:, :, -ctx.queries:], mask[:, :, -ctx.queries:]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, q.shape[2], D))  # (B, Tq, D)

    def _attend_with_dropout(self, qs, ks, vs, ctx: AttnContext) -> torch.Tensor:
        """Per-head (B, T, Dh) q, k, v -> (B, T, H * Dh).

        SDPA's CPU dropout path draws the (B, H, T, T) mask with bernoulli_, the slowest op of a step.
        Heads go one at a time: each head's slice of the projection is a strided matrix that bmm
        reads in place, so q, k and v are never copied into (B * H, T, Dh), the (B, T, T) bias is
        not expanded per head, and unbind's backward assembles the projection's gradient once (with
        2 heads those copies were a fifth of the large config's step). baddbmm computes bias +
        scale * q k^T in one pass over the scores; the bias is built by the first layer and shared.
        """
        q0 = qs[0]
        if ctx.bias is None:
            ctx.bias = torch.zeros(ctx.mask.shape, dtype=q0.dtype, device=q0.device).masked_fill_(~ctx.mask, float("-inf"))
        bias = ctx.bias[:, 0]  # (B, T, T)
        heads = []
        for q, k, v in zip(qs, ks, vs):
            scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=q.shape[-1] ** -0.5)
            probs = dropout(torch.softmax(scores, dim=-1), self.dropout, True)
            heads.append(torch.bmm(probs, v))  # (B, T, Dh)
        return heads[0] if len(heads) == 1 else torch.cat(heads, dim=-1)


@dataclass(frozen=True)
class AttentionKind:
    context: Callable[..., AttnContext]  # (items, timestamps, model cfg) -> AttnContext
    layer: Callable[..., nn.Module]  # (model cfg, d) -> attention module: (x, ctx) -> (B, T, D)
    input_positions: bool = True  # add absolute position embeddings to the input


def _masked_context(mask_fn):
    def build(items, timestamps, cfg) -> AttnContext:
        return AttnContext(mask=mask_fn(items), keep=_keep(items), timestamps=timestamps)

    return build


def _self_attention(cfg, d: int) -> nn.Module:
    return SelfAttention(d, cfg.num_heads, cfg.dropout)


ATTENTIONS: dict[str, AttentionKind] = {
    "causal": AttentionKind(_masked_context(causal_mask), _self_attention),
    "bidirectional": AttentionKind(_masked_context(bidirectional_mask), _self_attention),
}
CAUSAL_KINDS = {"causal", "time_interval"}  # kinds where a future item never changes an earlier output


def _register_time_interval() -> None:
    from rayrec.models.time_interval import TIME_INTERVAL  # it builds on this module's parts

    ATTENTIONS["time_interval"] = TIME_INTERVAL


_register_time_interval()
