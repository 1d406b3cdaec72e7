"""Head axis: the training objective over the encoder's hidden states.

A head gets the item part of the hidden states ``h`` (B, T, D), the item table ``emb`` (N+1, D)
with row 0 = padding, the batch (``targets`` (B, T), and ``negatives`` / ``ratings`` when the head
asks for them) and an optional per-position score ``offset`` (B, T) from the user axis. It returns
``(loss_sum, count)``; the train loop divides by the *global* count so a DDP step over shards
equals one step over the whole batch.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from rayrec.config import negatives_for
from rayrec.models.diffusion import MaskedDiffusionHead
from rayrec.models.softmax_ce import shared_sampled_softmax_sum, softmax_ce_sum


def _with_offset(scores: torch.Tensor, offset: torch.Tensor | None, valid: torch.Tensor) -> torch.Tensor:
    if offset is None:
        return scores
    o = offset[valid]  # (V,)
    return scores + o.view(-1, *([1] * (scores.dim() - 1)))


def _pos_neg_scores(h, emb, batch, offset):
    """Scores of each valid position's target (V,) and its negatives (V, k), and the valid mask."""
    targets, negs = batch["targets"], batch["negatives"]
    valid = targets != 0  # (B, T)
    hv = h[valid]  # (V, D)
    pos = (hv * emb[targets[valid]]).sum(-1)  # (V,)
    negs = negs[valid]  # (V, k)
    neg = torch.einsum("vd,vkd->vk", hv, emb[negs])  # (V, k)
    return _with_offset(pos, offset, valid), _with_offset(neg, offset, valid), negs != 0, valid


class BCEHead(nn.Module):
    """SASRec's loss: each target against ``k`` sampled negatives, binary cross-entropy; the
    negatives' term is averaged over k so the positive keeps its weight as k grows."""

    needs_negatives = True
    needs_ratings = False

    def __init__(self, cfg, num_items: int):
        super().__init__()
        self.k = negatives_for(cfg, num_items)

    def forward(self, h, emb, batch, offset=None):
        pos, neg, real, valid = _pos_neg_scores(h, emb, batch, offset)
        neg_loss = (F.softplus(neg) * real).sum(-1) / self.k  # a 0 negative means none could be drawn
        return (F.softplus(-pos) + neg_loss).sum(), valid.sum()


class GBCEHead(nn.Module):
    """gSASRec's generalised BCE (Petrov & Macdonald, RecSys 2023).

    With k negatives out of N-1 items the sampling rate is alpha = k / (N-1) and the positive's
    probability is raised to beta = alpha * (t * (1 - 1/alpha) + 1/alpha), which undoes the
    over-confidence that negative sampling induces (t = 1: fully calibrated; t = 0: beta = 1, the
    paper's BCE with summed negatives). ``-log sigmoid(s)^beta = beta * softplus(-s)``: stable.
    """

    needs_negatives = True
    needs_ratings = False

    def __init__(self, cfg, num_items: int):
        super().__init__()
        alpha = negatives_for(cfg, num_items) / max(1, num_items - 1)
        # alpha * (t * (1 - 1/alpha) + 1/alpha), written so that t = 0 gives exactly 1
        self.beta = 1.0 - cfg.gbce_t * (1.0 - alpha)

    def forward(self, h, emb, batch, offset=None):
        pos, neg, real, valid = _pos_neg_scores(h, emb, batch, offset)
        return (self.beta * F.softplus(-pos) + (F.softplus(neg) * real).sum(-1)).sum(), valid.sum()


class SampledSoftmaxHead(nn.Module):
    """Softmax over the target and k sampled negatives per position.

    Negatives arrive either per position (``negatives`` (B, T, k)) or shared by the whole batch
    (``shared_negatives`` (k,) with ``shared_allowed`` (B, k): False where that row must not use
    it). A negative equal to the target is masked. With popularity sampling every logit is
    corrected by ``- log q(item)`` (Yi et al., 2019), so the loss estimates the full softmax.
    """

    needs_negatives = True
    needs_ratings = False

    def __init__(self, cfg):
        super().__init__()
        self.shared = cfg.shared_negatives

    def forward(self, h, emb, batch, offset=None):
        targets = batch["targets"]
        valid = targets != 0
        hv, t = h[valid], targets[valid]  # (V, D), (V,)
        logq = batch.get("log_q")  # (N+1,) log sampling probability of each item, or None
        if self.shared:  # fused and chunked: the (V, k) logits never exist whole. The user offset is
            # a per-row constant, to which a softmax is invariant
            negs = batch["shared_negatives"]  # (k,)
            rows = torch.nonzero(valid)[:, 0]  # (V,) batch row of each position
            bias = (None, None) if logq is None else (-logq[t], -logq[negs])
            loss = shared_sampled_softmax_sum(hv, emb[t], emb[negs], batch["shared_allowed"].bool(), rows, t, negs, *bias)
            return loss, valid.sum()
        pos = (hv * emb[t]).sum(-1, keepdim=True)  # (V, 1)
        negs = batch["negatives"][valid]  # (V, k)
        neg = torch.einsum("vd,vkd->vk", hv, emb[negs])
        allowed = (negs != 0) & (negs != t[:, None])
        if logq is not None:
            pos, neg = pos - logq[t][:, None], neg - logq[negs]
        logits = torch.cat([pos, neg.masked_fill(~allowed, float("-inf"))], dim=-1)  # (V, 1+k)
        logits = _with_offset(logits, offset, valid)
        return -F.log_softmax(logits, dim=-1)[:, 0].sum(), valid.sum()


class SoftmaxCEHead(nn.Module):
    """Cross-entropy over the whole catalogue (SASRec+ / "CE" in the literature), computed in
    chunks of rows so the (targets x items) logit matrix never exists. The user offset is a
    per-position constant, to which a softmax is invariant."""

    needs_negatives = False
    needs_ratings = False

    def forward(self, h, emb, batch, offset=None):
        targets = batch["targets"]
        valid = targets != 0
        items = emb[1:]  # (N, D): padding is never a class
        # blocks of ~1M logits (4 MB) stay in cache; at least 32 rows keep the matmuls efficient, and
        # past 32K items the catalogue is cut into blocks too, so memory never grows with it
        chunk = max(32, (1 << 20) // items.shape[0])
        return softmax_ce_sum(h[valid], items, targets[valid] - 1, chunk, item_block=1 << 15), valid.sum()


class RatingMSEHead(nn.Module):
    """Regression of the explicit rating of each next item: ``(h . e_target + offset - r)^2``."""

    needs_negatives = False
    needs_ratings = True

    def forward(self, h, emb, batch, offset=None):
        targets, ratings = batch["targets"], batch["ratings"]
        valid = targets != 0
        pred = _with_offset((h[valid] * emb[targets[valid]]).sum(-1), offset, valid)
        return (pred - ratings[valid].to(pred.dtype)).pow(2).sum(), valid.sum()


class SoftLabelBCEHead(nn.Module):
    """BCE whose positive label is the rating scaled to [0, 1] (r / max_rating); negatives are 0."""

    needs_negatives = True
    needs_ratings = True

    def __init__(self, cfg, num_items: int):
        super().__init__()
        self.k, self.max_rating = negatives_for(cfg, num_items), cfg.max_rating

    def forward(self, h, emb, batch, offset=None):
        pos, neg, real, valid = _pos_neg_scores(h, emb, batch, offset)
        label = (batch["ratings"][valid].to(pos.dtype) / self.max_rating).clamp(0.0, 1.0)
        pos_loss = F.binary_cross_entropy_with_logits(pos, label, reduction="none")
        neg_loss = (F.softplus(neg) * real).sum(-1) / self.k
        return (pos_loss + neg_loss).sum(), valid.sum()


HEADS = {
    "bce": BCEHead,
    "gbce": GBCEHead,
    "sampled_softmax": lambda cfg, n: SampledSoftmaxHead(cfg),
    "ce": lambda cfg, n: SoftmaxCEHead(),
    "mse": lambda cfg, n: RatingMSEHead(),
    "soft_bce": SoftLabelBCEHead,
    "masked_diffusion": MaskedDiffusionHead,
}
