"""Ranking metrics from the 0-based rank of the held-out item among the scored candidates.

Sums (not means) are returned so shards reduce exactly: mean = all-reduced sum / all-reduced count.
"""
from __future__ import annotations

import torch

# The rank given to a target that cannot be recommended (masked, -inf): past any cut-off k, so it is
# a miss whatever k is and however few candidates are left unmasked.
MISS_RANK = 1 << 40


def rank_of_target(scores: torch.Tensor, target_scores: torch.Tensor,
                   target_in_scores: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(above, ties): candidates scored strictly above the target, and the other candidates scored
    exactly as the target; (B, C), (B,) → two (B,) int64.

    Ties are not rare: a quantized model's integer arithmetic, a popularity count or a collapsed
    model gives many items the same score. Counting them in the target's favour would let a model
    that scores everything alike rank every target first. ``target_in_scores``: the target is one
    of the columns (full ranking), so it is not its own tie. Masked candidates carry -inf and never
    outrank anything. A masked target (-inf) is a miss: it gets ``MISS_RANK`` and no ties, so it
    stays out of the top k even when fewer than k candidates are unmasked (ranking it only below
    the finite scores would put it inside the top k of a short candidate list).
    """
    t = target_scores[:, None]
    return ranks_from_counts((scores > t).sum(dim=1), (scores == t).sum(dim=1), target_scores, target_in_scores)


def ranks_from_counts(above: torch.Tensor, equal: torch.Tensor, target_scores: torch.Tensor,
                      target_in_scores: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``rank_of_target`` from the counts of candidates scored above and exactly at the target,
    which sum over any split of the candidates (``rayrec.eval.chunked``)."""
    ties = equal - int(target_in_scores)
    masked = ~torch.isfinite(target_scores)
    return (torch.where(masked, torch.full_like(above, MISS_RANK), above),
            torch.where(masked, torch.zeros_like(ties), ties.clamp(min=0)))


def _prefix(values: torch.Tensor) -> torch.Tensor:
    return torch.cat([values.new_zeros(1), values.cumsum(0)])


def metric_sums(ranks: torch.Tensor, ks: list[int], ties: torch.Tensor | None = None) -> dict[str, float]:
    """{'ndcg_10': sum, 'hr_10': sum, 'mrr_10': sum, ...} over the batch.

    With ``ties``, each user's metric is its exact expectation under a random order of the tied
    candidates: the target is equally likely at every position ``ranks .. ranks + ties``.
    """
    r = ranks.long()
    e = torch.zeros_like(r) if ties is None else ties.long().to(r.device)
    out = {}
    for k in ks:
        pos = torch.arange(k, dtype=torch.float64, device=r.device)
        lo, hi = r.clamp(max=k), (r + e + 1).clamp(max=k)  # positions lo..hi-1 are within the top k
        n = (e + 1).double()
        for name, per_pos in (("ndcg", 1.0 / torch.log2(pos + 2.0)), ("hr", torch.ones_like(pos)), ("mrr", 1.0 / (pos + 1.0))):
            table = _prefix(per_pos)
            out[f"{name}_{k}"] = float(((table[hi] - table[lo]) / n).sum())
    return out
