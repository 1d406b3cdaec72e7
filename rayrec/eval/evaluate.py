"""One evaluation pass over a rank's users, reduced across ranks with sums and counts.

Full ranking scores every item with the user's history masked (``-inf``); the sampled protocol
scores the target against the 100 negatives fixed at build time. Keys are
``<stage>_<metric>_<k>`` for full ranking and ``<stage>_sampled_<metric>_<k>`` for sampled, so a
sampled number can never be read as a full-ranking one.

The catalogue is met in pieces of ``eval.chunk_items`` (a running rank and a running top-k), so
memory does not grow with it. With ``eval.max_users`` the metrics are over a seeded sample of
users, and ``<stage>_users_sampled_from`` says how many users it was drawn from.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from rayrec.config import EvalConfig
from rayrec.data.batches import SequenceStore, eval_batch
from rayrec.eval.chunked import ItemScores, RunningTopK, SeenMask, chunk_size, count_against
from rayrec.eval.metrics import metric_sums, rank_of_target, ranks_from_counts

COVERAGE_K = 10


def all_reduce(t: torch.Tensor, op=None) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def score_batch(model, b: dict, device: torch.device) -> torch.Tensor:
    """Scores of every item after each history of an ``eval_batch``: (B, N+1), padding = -inf.

    The dense matrix, for models without ``score_query``; evaluation, top-k recommendation and
    candidate scoring read the same floats a piece at a time (``rayrec.eval.chunked``), so what the
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
    """Metrics for ``stage`` in {'val', 'test'} over every evaluable user of every rank (or over
    the ``eval.max_users`` sample of them)."""
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
    users, repeats, of = stage_users(store, stage, cfg, device)
    # batches of similar history lengths, each trimmed to its longest: metrics are order-free sums
    users = users[np.argsort(store.target_pos(stage)[users], kind="stable")]
    for lo in range(0, len(users), cfg.batch_size):
        b = eval_batch(store, users[lo: lo + cfg.batch_size], max_len, stage, trim=True)
        target = torch.from_numpy(b["target"]).to(device)
        src = ItemScores.of(model, b, device)  # (B, N+1) met a piece at a time
        cols = target[:, None]
        if "sampled" in protocols:
            cols = torch.cat([cols, torch.from_numpy(b["negatives"]).to(device)], dim=1)
        picked, nan_rows = src.scan(cols)  # (B, 1 + negatives)
        refuse_nan(nan_rows, stage)
        if "full" in protocols:
            seen, masked_target = seen_items(b, target, cfg, device)
            t = torch.where(masked_target, float("-inf"), picked[:, 0])
            top = RunningTopK(min(COVERAGE_K, n_items))
            above, equal = count_against(src, t, seen, chunk_size(cfg.chunk_items, len(target)), top)
            ranks, ties = ranks_from_counts(above, equal, t)
            for k, v in metric_sums(ranks, cfg.ks, ties).items():
                sums[k] += v
            topk_hits.index_fill_(0, top.items[torch.isfinite(top.values)], 1.0)  # a masked item is never recommended
        if "sampled" in protocols:
            ranks, ties = rank_of_target(picked[:, 1:], picked[:, 0], target_in_scores=False)
            for k, v in metric_sums(ranks, cfg.ks, ties).items():
                sums["sampled_" + k] += v
    out = reduce_means(sums, len(users), repeats, stage, device, of)
    if "full" in protocols:
        covered = all_reduce(topk_hits, dist.ReduceOp.MAX if dist.is_initialized() else None)
        out[f"{stage}_coverage_{COVERAGE_K}"] = covered[1:].sum().item() / n_items
    model.train(was_training)
    return out


def seen_items(b: dict, target: torch.Tensor, cfg: EvalConfig, device) -> tuple[SeenMask | None, torch.Tensor]:
    """The history items full ranking masks, and which rows' target is one of them (a miss), under
    ``eval.exclude_seen`` and ``eval.repeat_targets``."""
    masked = torch.zeros(len(target), dtype=torch.bool, device=device)
    if not cfg.exclude_seen:
        return None, masked
    rows, items = torch.from_numpy(b["seen_rows"]).to(device), torch.from_numpy(b["seen_items"]).to(device)
    is_target = items == target[rows]
    if cfg.repeat_targets == "rank":  # the target alone stays rankable
        rows, items = rows[~is_target], items[~is_target]
    else:
        masked[rows[is_target]] = True
    return SeenMask(rows, items), masked


def eval_users(store: SequenceStore, stage: str, repeat_policy: str) -> tuple[np.ndarray, int]:
    """This rank's users evaluated at ``stage`` under ``eval.repeat_targets``, and how many of its
    users have a repeat target (dropped under 'drop', evaluated under 'miss' and 'rank')."""
    users = store.eval_users(stage)
    repeat = store.repeat_targets(stage)[users]
    return (users[~repeat] if repeat_policy == "drop" else users), int(repeat.sum())


def stage_users(store: SequenceStore, stage: str, cfg: EvalConfig, device) -> tuple[np.ndarray, int, int | None]:
    """``eval_users``, cut to the ``eval.max_users`` sample when one is asked for: (rows, repeat
    targets, evaluable users of every rank, None without a sample). Collective with a sample."""
    users, repeats = eval_users(store, stage, cfg.repeat_targets)
    if cfg.max_users <= 0:
        return users, repeats, None
    keys = user_keys(store.user_idx[users], cfg.sample_seed)

    def count_upto(bound: int) -> int:
        n = np.count_nonzero(keys <= np.uint64(bound))
        return int(all_reduce(torch.tensor(n, dtype=torch.int64, device=device)).item())

    total = count_upto(2 ** 64 - 1)
    if total <= cfg.max_users:
        return users, repeats, total
    return users[keys <= np.uint64(sample_bound(cfg.max_users, count_upto))], repeats, total


def user_keys(user_idx: np.ndarray, seed: int) -> np.ndarray:
    """A seeded shuffle of user ids: splitmix64's finaliser, a bijection of uint64, so no two users
    share a key and a sample of the smallest keys has exactly the size asked for."""
    with np.errstate(over="ignore"):
        z = user_idx.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + 0x9E3779B97F4A7C15) % 2 ** 64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def sample_bound(k: int, count_upto) -> int:
    """The smallest key bound with ``count_upto(bound) >= k`` users at or below it, by bisection:
    ``count_upto`` counts over every rank, so each rank keeps its share of one global sample."""
    lo, hi = 0, 2 ** 64 - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if count_upto(mid) >= k:
            hi = mid
        else:
            lo = mid + 1
    return lo


def reduce_means(sums: dict[str, float], users: int, repeats: int, stage: str, device,
                 sampled_from: int | None = None) -> dict[str, float]:
    """Per-user means over every rank, with the users they average over and the repeat-target count
    (and, for a user sample, the evaluable users it was drawn from).

    Over no users there is no mean: the metrics are NaN (never a 0.0 that reads as a measured
    miss); fit() refuses such a run before training, so only a hand-built store reaches this."""
    keys = sorted(sums)
    vec = all_reduce(torch.tensor([sums[k] for k in keys] + [float(users), float(repeats)],
                                   dtype=torch.float64, device=device))
    count = vec[-2].item()
    out = {f"{stage}_{k}": (vec[i].item() / count if count else float("nan")) for i, k in enumerate(keys)}
    out[f"{stage}_users"] = count
    out[f"{stage}_repeat_targets"] = vec[-1].item()
    if sampled_from is not None:
        out[f"{stage}_users_sampled_from"] = float(sampled_from)
    return out


def refuse_nan(nan_rows: torch.Tensor, stage: str) -> None:
    """NaN scores would rank the target first (no comparison with NaN is true): refuse them."""
    if nan_rows.any():
        n = int(nan_rows.sum())
        raise FloatingPointError(
            f"the model scored NaN for {n} {stage} user(s): training diverged. Lower train.lr, set "
            "train.grad_clip (e.g. 1.0), or resume from an earlier checkpoint; no metric was computed from them")
