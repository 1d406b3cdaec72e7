"""Why multi-step DiffSASRec inference ranks below single-step (issue 25): on a trained run's
best-on-validation weights, over the validation users (test is not needed to explain it):

- ``single``: NDCG@10 of the one-mask query (history + 1 mask token at the newest position);
- ``first_of_k``: NDCG@10 of the scores at the first of K appended mask tokens (history + K
  masks, read before any unmasking): the query multi-step starts from, ranked like single-step;
- ``multi``: NDCG@10 of the K-item list multi-step returns;
- calibration of the first pass: for each of the K masked positions, the mean top probability
  (the confidence multi-step accepts by) against how often that top item is the target, and
  which positions are accepted first.

    python bench/diffusion_multistep.py bench/runs/bench_diffsasrec     # writes bench/results/diffusion_multistep.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write_result  # noqa: E402


@torch.no_grad()
def diagnose(run: str, k: int = 10, max_users: int = 0) -> dict:
    import ray.data

    from rayrec.config import load_config
    from rayrec.data.batches import eval_batch
    from rayrec.data.sequences import build_sequences
    from rayrec.eval.evaluate import seen_items, stage_users
    from rayrec.eval.metrics import metric_sums
    from rayrec.eval.multistep import list_ranks
    from rayrec.eval.offline import find_checkpoint
    from rayrec.models import build_model
    from rayrec.models.diffusion import generate
    from rayrec.ray_env import init_ray
    from rayrec.train import checkpoint as ckpt
    from rayrec.train.loop import load_store

    folder = find_checkpoint(run)
    cfg = load_config(folder / ckpt.CONFIG, [f"eval.max_users={max_users}"])
    init_ray()
    data = build_sequences(cfg.data)
    tables = ray.data.read_parquet(data.sequences_path).iter_batches(batch_format="pyarrow", batch_size=None)
    store = load_store(data.num_items, 0, 1, tables=tables)
    model = build_model(cfg.model, data.num_items, data.num_users)
    model.load_state_dict(ckpt.load_weights(folder, best=True))
    model.eval()
    dev, T, n = torch.device("cpu"), cfg.model.max_len, data.num_items
    users, _, _ = stage_users(store, "val", cfg.eval, dev)
    sums = {"single": 0.0, "first_of_k": 0.0, "multi": 0.0}
    conf_sum, hit_sum, first_pos = torch.zeros(k, dtype=torch.float64), torch.zeros(k, dtype=torch.float64), torch.zeros(k)
    emb = model.output_embeddings()
    for lo in range(0, len(users), cfg.eval.batch_size):
        b = eval_batch(store, users[lo: lo + cfg.eval.batch_size], T, "val")
        items = torch.from_numpy(b["items"]).long()
        target = torch.from_numpy(b["target"]).long()
        mask, masked = seen_items(b, target, cfg.eval, dev)
        miss = torch.full_like(target, 10 ** 9)

        def ndcg(scores):
            if mask is not None:
                scores[mask.rows, mask.items] = float("-inf")
            rank = (scores > scores.gather(1, target[:, None])).sum(1)
            return metric_sums(torch.where(masked, miss, rank), [10])["ndcg_10"]

        sums["single"] += ndcg(model.score_last(items).float())
        x = torch.cat([items[:, k:], torch.full_like(items[:, :k], n + 1)], dim=1)  # history + K masks, as generate builds it
        h = model.encode(x, None, None, last=k)  # (B, K, D)
        logits = (h @ emb.T).float()
        logits[:, :, 0] = float("-inf")
        sums["first_of_k"] += ndcg(logits[:, 0].clone())
        if mask is not None:
            logits[mask.rows, :, mask.items] = float("-inf")
        conf, top = torch.softmax(logits, -1).max(-1)  # (B, K)
        conf_sum += conf.double().sum(0)
        hit_sum += (top == target[:, None]).double().sum(0)  # is a position's top item the next item?
        first_pos += torch.bincount(conf.argmax(1), minlength=k)[:k].float()
        seen = {} if mask is None else {"seen_rows": mask.rows, "seen_items": mask.items}
        recs = generate(model, items, k, threshold=cfg.eval.diffusion_threshold, decay=cfg.eval.diffusion_decay, **seen)
        sums["multi"] += metric_sums(torch.where(masked, miss, list_ranks(recs, target)), [10])["ndcg_10"]
    U = len(users)
    return {"run": str(folder), "users": U, "k": k,
            "val_ndcg_10": {key: round(v / U, 5) for key, v in sums.items()},
            "first_pass_mean_confidence_by_position": [round(v, 4) for v in (conf_sum / U).tolist()],
            "first_pass_top_item_is_next_item_by_position": [round(v, 4) for v in (hit_sum / U).tolist()],
            "first_pass_most_confident_position_share": [round(v, 4) for v in (first_pos / U).tolist()]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--max-users", type=int, default=0, help="a seeded sample of validation users (0 = all)")
    a = p.parse_args(argv)
    r = diagnose(a.run, a.k, a.max_users)
    write_result("diffusion_multistep", {"script": "bench/diffusion_multistep.py", "command": "python bench/diffusion_multistep.py " + a.run, **r})
    print(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
