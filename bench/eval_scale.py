"""Peak memory and time of one full-ranking evaluation batch as the catalogue grows: the dense
evaluator (a (B, N+1) score matrix, cloned for masking, as before ``eval.chunk_items``) against the
chunked one (``rayrec/eval/chunked.py``, eval.chunk_items=0: pieces from a 64 MiB budget).

Each point runs in a fresh process; its peak is the growth of the resident set (VmHWM, reset
through /proc/self/clear_refs) over the RSS after the model, store and one warm-up batch of 8
users exist, so it counts what the batch itself allocates. A random SASRec (hidden 64, 2 blocks,
max_len 50) scores 256 users with 20..49 history items; both modes give the same metrics.

    python bench/eval_scale.py                 # 10^4, 10^5, 10^6 items
    python bench/eval_scale.py --items 10000   # one size
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HIDDEN, BATCH, MAX_LEN = 64, 256, 50


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def one_point(n_items: int, mode: str) -> dict:
    import numpy as np
    import torch

    from rayrec.config import EvalConfig, config_from_dict
    from rayrec.data.batches import SequenceStore, eval_batch
    from rayrec.eval.evaluate import evaluate, mask_seen
    from rayrec.eval.metrics import metric_sums, rank_of_target
    from rayrec.models import build_model

    torch.manual_seed(0)
    cfg = config_from_dict({"model": {"hidden": HIDDEN, "num_heads": 2, "num_blocks": 2, "max_len": MAX_LEN, "dropout": 0.0}})
    model = build_model(cfg.model, n_items, 0).eval()
    g = np.random.default_rng(0)
    lens = g.integers(20, 50, BATCH)
    offsets = np.r_[0, np.cumsum(lens)].astype(np.int64)
    store = SequenceStore(user_idx=np.arange(1, BATCH + 1), offsets=offsets,
                          items=g.integers(1, n_items + 1, offsets[-1]).astype(np.int32),
                          timestamps=np.arange(offsets[-1], dtype=np.int64), eval_negatives=None, num_items=n_items)
    ks = [10, n_items]  # NDCG@N is non-zero for every user: a comparison of the two modes that means something
    ev = EvalConfig(ks=ks, batch_size=BATCH, repeat_targets="rank")

    @torch.no_grad()
    def dense(users):  # the evaluator before chunking, for one batch
        users = users[np.argsort(store.target_pos("test")[users], kind="stable")]  # evaluate's batch order
        b = eval_batch(store, users, MAX_LEN, "test", trim=True)
        target = torch.from_numpy(b["target"])
        q, _ = model.score_query(*(torch.from_numpy(b[k]).long() for k in ("items", "timestamps", "user_idx")))
        scores = q @ model.output_embeddings().T  # one (B, N+1) matmul, as SeqRec.score_last was
        scores[:, 0] = float("-inf")
        rows = torch.arange(len(target))
        full = mask_seen(scores.clone(), b)
        full[rows, target] = scores[rows, target]
        ranks, ties = rank_of_target(full, full[rows, target])
        out = metric_sums(ranks, ks, ties)
        full.topk(10, dim=1)
        return {f"test_{k}": v / len(users) for k, v in out.items()}

    def run(users):
        if mode == "dense":
            return dense(users)
        sub = SequenceStore(user_idx=store.user_idx[users], offsets=np.r_[0, np.cumsum(lens[users])].astype(np.int64),
                            items=np.concatenate([store.items[offsets[u]: offsets[u + 1]] for u in users]),
                            timestamps=np.concatenate([store.timestamps[offsets[u]: offsets[u + 1]] for u in users]),
                            eval_negatives=None, num_items=n_items)
        return evaluate(model, sub, ev, MAX_LEN, "test", torch.device("cpu"))

    run(np.arange(8))  # warm-up: lazy inits, thread pools
    rss0 = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    t0 = time.perf_counter()
    metrics = run(np.arange(BATCH))
    wall = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    return {"items": n_items, "mode": mode, "peak_mib": round((peak - rss0) / 1024, 1), "wall_s": round(wall, 3),
            "test_ndcg_10": metrics["test_ndcg_10"], "test_ndcg_all": metrics[f"test_ndcg_{n_items}"],
            "dense_scores_mib": round(BATCH * (n_items + 1) * 4 / 2 ** 20, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, nargs="*", default=[10 ** 4, 10 ** 5, 10 ** 6])
    ap.add_argument("--point", nargs=2, help=argparse.SUPPRESS)  # child process: items mode
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    if args.point:
        print(json.dumps(one_point(int(args.point[0]), args.point[1])))
        return
    rows = []
    for n in args.items:
        for mode in ("dense", "chunked"):
            out = subprocess.run([sys.executable, __file__, "--point", str(n), mode], check=True, capture_output=True, text=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{r['items']:>9} items  {mode:<8} peak {r['peak_mib']:>8.1f} MiB  {r['wall_s']:>7.3f} s  "
                  f"ndcg@N {r['test_ndcg_all']:.6f}  (dense scores alone: {r['dense_scores_mib']} MiB)")
    for n in args.items:
        d, c = (next(r for r in rows if r["items"] == n and r["mode"] == m) for m in ("dense", "chunked"))
        assert (d["test_ndcg_10"], d["test_ndcg_all"]) == (c["test_ndcg_10"], c["test_ndcg_all"]), (n, d, c)
    if not args.no_write:
        from bench.common import write_result

        path = write_result("eval_scale", {
            "script": "bench/eval_scale.py", "command": "python bench/eval_scale.py", "dataset": "random histories",
            "config": {"hidden": HIDDEN, "batch": BATCH, "max_len": MAX_LEN, "num_blocks": 2, "eval.chunk_items": 0},
            "protocol": "full", "metrics": {}, "timings": {f"{r['mode']}_{r['items']}_wall_s": r["wall_s"] for r in rows},
            "rows": rows})
        print(f"wrote {path.relative_to(Path(__file__).resolve().parent.parent)}")


if __name__ == "__main__":
    main()
