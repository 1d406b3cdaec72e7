"""One evaluation pass over a rank's users, reduced across ranks with sums and counts.

Full ranking scores every item with the user's history masked (``-inf``); the sampled protocol
scores the target against the 100 negatives fixed at build time. Keys are
``<stage>_<metric>_<k>`` for full ranking and ``<stage>_sampled_<metric>_<k>`` for sampled, so a
sampled number can never be read as a full-ranking one.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from rayrec.config import EvalConfig
from rayrec.data.batches import SequenceStore, eval_batch
from rayrec.eval.metrics import metric_sums, rank_of_target

COVERAGE_K = 10


def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def score_batch(model, b: dict, device: torch.device) -> torch.Tensor:
    """Scores of every item after each history of an ``eval_batch``: (B, N+1), padding = -inf.

    Evaluation and ``rayrec.infer`` (API, batch job) both score through here, so what the
    metrics rank first is what a user is recommended.
    """
    items = torch.from_numpy(b["items"]).long().to(device)
    stamps = torch.from_numpy(b["timestamps"]).to(device)
    user_idx = torch.from_numpy(b["user_idx"]).long().to(device)
    return model.score_last(items, stamps, user_idx).float()


def mask_seen(scores: torch.Tensor, b: dict) -> torch.Tensor:
    """Set every item of each user's whole history (not only the window) to -inf, in place."""
    seen_r = torch.from_numpy(b["seen_rows"]).to(scores.device)
    seen_i = torch.from_numpy(b["seen_items"]).to(scores.device)
    scores[seen_r, seen_i] = float("-inf")
    return scores


@torch.no_grad()
def evaluate(model, store: SequenceStore, cfg: EvalConfig, max_len: int, stage: str, device: torch.device) -> dict[str, float]:
    """Metrics for ``stage`` in {'val', 'test'} over every evaluable user of every rank."""
    if cfg.diffusion_inference == "multi" and hasattr(getattr(model, "head", None), "corrupt"):
        from rayrec.eval.multistep import evaluate_multistep  # lists, not scores: its own ranking

        return evaluate_multistep(model, store, cfg, max_len, stage, device)
    was_training = model.training
    model.eval()
    protocols = ["full", "sampled"] if cfg.protocol == "both" else [cfg.protocol]
    # every rank reduces the same keys in the same order, even one with no evaluable users
    sums = {f"{pre}{m}_{k}": 0.0 for pre in ("" if p == "full" else "sampled_" for p in protocols)
            for m in ("ndcg", "hr", "mrr") for k in cfg.ks}
    n_items = store.num_items
    topk_hits = torch.zeros(n_items + 1, dtype=torch.float64, device=device)
    users, repeats = eval_users(store, stage, cfg.repeat_targets)
    # batches of similar history lengths, each trimmed to its longest: metrics are order-free sums
    users = users[np.argsort(store.target_pos(stage)[users], kind="stable")]
    for lo in range(0, len(users), cfg.batch_size):
        b = eval_batch(store, users[lo: lo + cfg.batch_size], max_len, stage, trim=True)
        target = torch.from_numpy(b["target"]).to(device)
        scores = score_batch(model, b, device)  # (B, N+1)
        check_finite(scores, stage)
        rows = torch.arange(len(target), device=device)
        if "full" in protocols:
            full = mask_seen(scores.clone(), b) if cfg.exclude_seen else scores.clone()
            if cfg.exclude_seen and cfg.repeat_targets == "rank":  # the target alone stays rankable
                full[rows, target] = scores[rows, target]
            ranks, ties = rank_of_target(full, full[rows, target])
            for k, v in metric_sums(ranks, cfg.ks, ties).items():
                sums[k] += v
            top = full.topk(min(COVERAGE_K, n_items), dim=1).indices.flatten()
            topk_hits.index_fill_(0, top, 1.0)
        if "sampled" in protocols:
            negs = torch.from_numpy(b["negatives"]).to(device)
            ranks, ties = rank_of_target(scores.gather(1, negs), scores[rows, target], target_in_scores=False)
            for k, v in metric_sums(ranks, cfg.ks, ties).items():
                sums["sampled_" + k] += v
    out = reduce_means(sums, len(users), repeats, stage, device)
    if "full" in protocols:
        covered = all_reduce(topk_hits, dist.ReduceOp.MAX if dist.is_initialized() else None)
        out[f"{stage}_coverage_{COVERAGE_K}"] = covered[1:].sum().item() / n_items
    model.train(was_training)
    return out


def eval_users(store: SequenceStore, stage: str, repeat_policy: str) -> tuple[np.ndarray, int]:
    """This rank's users evaluated at ``stage`` under ``eval.repeat_targets``, and how many of its
    users have a repeat target (dropped under 'drop', evaluated under 'miss' and 'rank')."""
    users = store.eval_users(stage)
    repeat = store.repeat_targets(stage)[users]
    return (users[~repeat] if repeat_policy == "drop" else users), int(repeat.sum())


def reduce_means(sums: dict[str, float], users: int, repeats: int, stage: str, device) -> dict[str, float]:
    """Per-user means over every rank, with the users they average over and the repeat-target count.

    Over no users there is no mean: the metrics are NaN (never a 0.0 that reads as a measured
    miss); fit() refuses such a run before training, so only a hand-built store reaches this."""
    keys = sorted(sums)
    vec = all_reduce(torch.tensor([sums[k] for k in keys] + [float(users), float(repeats)],
                                   dtype=torch.float64, device=device))
    count = vec[-2].item()
    out = {f"{stage}_{k}": (vec[i].item() / count if count else float("nan")) for i, k in enumerate(keys)}
    out[f"{stage}_users"] = count
    out[f"{stage}_repeat_targets"] = vec[-1].item()
    return out


def check_finite(scores: torch.Tensor, stage: str) -> None:
    """NaN scores would rank the target first (no comparison with NaN is true): refuse them."""
    if torch.isnan(scores).any():
        n = int(torch.isnan(scores).any(dim=1).sum())
        raise FloatingPointError(
            f"the model scored NaN for {n} {stage} user(s): training diverged. Lower train.lr, set "
            "train.grad_clip (e.g. 1.0), or resume from an earlier checkpoint; no metric was computed from them")
