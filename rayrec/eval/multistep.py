"""Evaluation of multi-step masked-diffusion inference (``eval.diffusion_inference: multi``).

The model returns a list of K distinct unseen items instead of scores, so ranks come from the
list: the target's position in it, or a miss. Same users, batches, reduction (sums and counts
across ranks) and metric keys as ``rayrec.eval.evaluate``; coverage counts the first
``COVERAGE_K`` items of every list.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from rayrec.config import EvalConfig
from rayrec.data.batches import SequenceStore, eval_batch
from rayrec.eval.evaluate import all_reduce, reduce_means, seen_items, stage_users
from rayrec.eval.metrics import MISS_RANK as MISS, metric_sums
from rayrec.models.diffusion import generate

COVERAGE_K = 10


def list_ranks(recs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """0-based position of each target in its list, ``MISS`` when absent: (B, K), (B,) → (B,)."""
    hit = recs == target[:, None]  # (B, K)
    return torch.where(hit.any(1), hit.int().argmax(1), torch.full_like(target, MISS))


@torch.no_grad()
def evaluate_multistep(model, store: SequenceStore, cfg: EvalConfig, max_len: int, stage: str,
                       device: torch.device) -> dict[str, float]:
    was_training = model.training
    model.eval()
    # one generator per call: the same seed gives the same lists (Gumbel sampling when temperature > 0)
    gen = torch.Generator(device=device).manual_seed(cfg.diffusion_seed)
    sums = {f"{m}_{k}": 0.0 for m in ("ndcg", "hr", "mrr") for k in cfg.ks}
    n_items = store.num_items
    listed = torch.zeros(n_items + 1, dtype=torch.float64, device=device)
    # the time split holds out different users for val and test
    users, repeats, of = stage_users(store, stage, cfg, device)
    for lo in range(0, len(users), cfg.batch_size):
        b = eval_batch(store, users[lo: lo + cfg.batch_size], max_len, stage)
        items = torch.from_numpy(b["items"]).long().to(device)
        target = torch.from_numpy(b["target"]).to(device)
        mask, masked = seen_items(b, target, cfg, device)
        seen = {} if mask is None else {"seen_rows": mask.rows, "seen_items": mask.items}
        recs = generate(model, items, cfg.diffusion_k, users=torch.from_numpy(b["user_idx"]).long().to(device),
                        threshold=cfg.diffusion_threshold, decay=cfg.diffusion_decay,
                        temperature=cfg.diffusion_temperature, generator=gen, **seen)  # (B, K)
        # a masked target is a miss even if a list longer than the unmasked catalogue reached it
        ranks = torch.where(masked, torch.full_like(target, MISS), list_ranks(recs, target))
        for k, v in metric_sums(ranks, cfg.ks).items():
            sums[k] += v
        listed.index_fill_(0, recs[:, :COVERAGE_K].flatten(), 1.0)
    out = reduce_means(sums, len(users), repeats, stage, device, of)
    covered = all_reduce(listed, dist.ReduceOp.MAX if dist.is_available() and dist.is_initialized() else None)
    out[f"{stage}_coverage_{COVERAGE_K}"] = covered[1:].sum().item() / n_items  # index 0: an empty slot
    model.train(was_training)
    return out
