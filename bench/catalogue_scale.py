"""Catalogue size as a measured cost: 10^4 .. 10^6 items (10^7 with --sizes 10m where memory allows).

For each catalogue a synthetic log with sequential structure (``data_prep.synthetic.generate_large``:
Zipf popularity, successor chains; users scaled so most items are seen) and SASRec (hidden 64, 2
blocks, max_len 50, batch 128) with ``head=sampled_softmax`` (1024 shared negatives) and
``head=bce``, each with a dense and a row-sparse item table (``train.item_grad``):

  * phases: 2 gloo ranks (torch.multiprocessing, no Ray) run the library's batches, model and
    optimizer, with DDP's gradient all-reduce done explicitly after backward so it can be timed:
    forward+backward, gradient synchronisation and optimizer ms per step, and bytes all-reduced
    per step (dense: every gradient; sparse: each rank's rows, indices and values, as gloo gathers
    them, summed over the ranks);
  * ray: the same config trained by ``fit`` on 2 Ray Train workers (sequences/s of the second
    epoch, peak RSS per worker);
  * eval: full-ranking evaluation of 1,000 users (chunked over the catalogue) in a fresh process:
    seconds and peak RSS above the loaded model and data;
  * recommend: ``Recommender.recommend`` latency at batch 1 and 256 from the trained checkpoint.

    python bench/catalogue_scale.py                       # 10k, 100k, 1m
    python bench/catalogue_scale.py --sizes 10k --quick   # a smoke run

Writes bench/results/catalogue_scale.json and prints a table. Data and runs go under --work
(default bench/runs/catalogue_scale, git-ignored).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, write_result  # noqa: E402

SIZES = {"10k": 10_000, "100k": 100_000, "1m": 1_000_000, "10m": 10_000_000}
MODEL = ["model.hidden=64", "model.num_blocks=2", "model.num_heads=1", "model.max_len=50", "model.dropout=0.2",
         "train.batch_size=128", "train.warmup_steps=0", "data.eval_negatives=0", "eval.protocol=full"]
HEADS = {"sampled_softmax": ["model.head=sampled_softmax", "model.num_negatives=1024", "model.shared_negatives=true"],
         "bce": ["model.head=bce", "model.num_negatives=1"]}
MODES = ("dense", "sparse")


def users_for(items: int) -> int:
    """Mean history 40: about 4 events per item, so most items are seen (Zipf leaves a tail)."""
    return max(4000, items // 10)


def make_log(items: int, work: Path) -> Path:
    from data_prep.common import write_log
    from data_prep.synthetic import SyntheticSpec, generate_large

    out = work / f"log_{items}"
    if not (out / "interactions.parquet").exists():
        spec = SyntheticSpec(users=users_for(items), items=items, mean_len=40, seed=7)
        write_log(generate_large(spec), out, source="synthetic", extra={"synthetic_spec": vars(spec)})
    return out / "interactions.parquet"


def overrides(log: Path, head: str, mode: str) -> list[str]:
    return [f"data.log={log}", *MODEL, *HEADS[head], f"train.item_grad={mode}"]


# ---- phases: 2 gloo ranks, DDP's all-reduce made explicit ---------------------------------------

def _phase_rank(rank: int, world: int, store_path: str, seq_path: str, num_items: int, ov: list[str],
                steps: int, out: str) -> None:
    import pyarrow.parquet as pq
    import torch
    import torch.distributed as dist

    from rayrec.config import load_config
    from rayrec.data.batches import SequenceStore
    from rayrec.models import build_model
    from rayrec.train.loop import EpochBatches, all_reduce, to_device
    from rayrec.train.optim import make_optimizer, use_sparse_items

    torch.set_num_threads(1)
    store_ = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store_, rank=rank, world_size=world, timeout=timedelta(seconds=600))
    try:
        cfg = load_config(None, ov)
        store = SequenceStore.from_tables([pq.read_table(seq_path)], num_items, rank, world)
        torch.manual_seed(0)
        model = build_model(cfg.model, num_items)
        model.item_emb.sparse = use_sparse_items(cfg, num_items)
        opt = make_optimizer(model, cfg)
        per_rank = cfg.train.batch_size // world
        users = store.train_users()
        batches = EpochBatches(store, store.forbidden_keys(), users, cfg, rank, per_rank, steps + 2, model.head)
        rows = []
        for i, b in enumerate(batches.epoch(0)):
            b = to_device(b, torch.device("cpu"))
            dist.barrier()
            t0 = time.perf_counter()
            loss_sum, count = model(b)
            total = all_reduce(torch.stack([count.float()]))
            (loss_sum * (world / total[0].clamp(min=1.0))).backward()
            t1 = time.perf_counter()
            nbytes = 0
            g_item = model.item_emb.weight.grad
            touched = g_item.coalesce().values().shape[0] if g_item.is_sparse else int((g_item.abs().sum(1) > 0).sum())
            for p in model.parameters():
                if p.grad is None:
                    continue
                if p.grad.is_sparse:  # what DDP sends for a sparse gradient: gloo gathers indices + values
                    g = p.grad.coalesce()
                    nbytes += (g.indices().numel() * 8 + g.values().numel() * 4) * world
                    dist.all_reduce(g)
                    p.grad = g / world
                else:
                    nbytes += p.grad.numel() * 4
                    dist.all_reduce(p.grad)
                    p.grad.div_(world)
            t2 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            t3 = time.perf_counter()
            if i >= 2:  # the first steps warm caches and allocate optimizer state
                rows.append((t1 - t0, t2 - t1, t3 - t2, nbytes, touched))
        if rank == 0:
            med = [statistics.median(r[j] for r in rows) for j in range(5)]
            Path(out).write_text(json.dumps({
                "fwd_bwd_ms": med[0] * 1e3, "sync_ms": med[1] * 1e3, "opt_ms": med[2] * 1e3,
                "step_ms": sum(med[:3]) * 1e3, "allreduce_mb_per_step": med[3] / 2 ** 20,
                "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20,
                "touched_rows_per_step": med[4],  # item rows with a gradient on rank 0
            }))
    finally:
        store_.set(f"done{rank}", "1")
        store_.wait([f"done{r}" for r in range(world)], timedelta(seconds=600))
        dist.destroy_process_group()


def phases(seq_path: str, num_items: int, ov: list[str], steps: int) -> dict:
    import torch.multiprocessing as tmp

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "phases.json"
        tmp.start_processes(_phase_rank, args=(2, str(Path(d) / "store"), seq_path, num_items, ov, steps, str(out)),
                            nprocs=2, start_method="spawn", join=True)
        return json.loads(out.read_text())


# ---- Ray Train ----------------------------------------------------------------------------------

def ray_fit(ov: list[str], run_root: Path, name: str, steps: int) -> tuple[dict, Path]:
    from rayrec.config import load_config
    from rayrec.train.fit import fit

    cfg = load_config(None, [*ov, f"output_dir={run_root}", f"name={name}", "train.epochs=2",
                             f"train.max_steps_per_epoch={steps}", "train.eval_every=2", "eval.max_users=500",
                             "scale.num_workers=2", "scale.cpus_per_worker=0.9", "resume=false"])
    res = fit(cfg)
    epochs = [h for h in res.history if "train_loss" in h]
    last = epochs[-1]
    return {"seq_per_s": last["seq_per_s"], "epoch_s": last["epoch_s"],
            "peak_rss_gib_per_worker": max(h.get("peak_rss_gib", 0.0) for h in epochs),
            "val_ndcg_10": res.metrics.get("val_ndcg_10")}, res.run_dir


# ---- evaluation and recommendation ----------------------------------------------------------------

def _eval_proc(conn, seq_path: str, num_items: int, ov: list[str], users: int) -> None:
    import pyarrow.parquet as pq
    import torch

    from rayrec.config import load_config
    from rayrec.data.batches import SequenceStore
    from rayrec.eval.evaluate import evaluate
    from rayrec.models import build_model

    torch.set_num_threads(1)
    cfg = load_config(None, [*ov, f"eval.max_users={users}"])
    store = SequenceStore.from_tables([pq.read_table(seq_path)], num_items)
    model = build_model(cfg.model, num_items).eval()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    m = evaluate(model, store, cfg.eval, cfg.model.max_len, "test", torch.device("cpu"))
    dt = time.perf_counter() - t0
    conn.send({"eval_s": dt, "eval_users": m["test_users"],
               "eval_peak_gib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 2 ** 20})


def eval_cost(seq_path: str, num_items: int, ov: list[str], users: int = 1000) -> dict:
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    p = ctx.Process(target=_eval_proc, args=(b, seq_path, num_items, ov, users))
    p.start()
    out = a.recv()
    p.join()
    return out


def recommend_latency(run_dir: Path, seq_path: str) -> dict:
    import pyarrow.parquet as pq
    import torch

    from rayrec.infer.recommender import Recommender

    torch.set_num_threads(1)
    rec = Recommender.from_checkpoint(run_dir)
    vocab = pq.read_table(Path(seq_path).parent / "vocab" / "items.parquet")["item_id"].to_pylist()
    seqs = pq.read_table(seq_path, columns=["items"])["items"].to_pylist()[:256]
    histories = [[vocab[i - 1] for i in s[-50:]] for s in seqs]
    out = {}
    for b in (1, 256):
        rec.recommend(histories[:b], k=10)  # warm
        times = []
        for _ in range(5 if b == 1 else 3):
            t0 = time.perf_counter()
            rec.recommend(histories[:b], k=10)
            times.append(time.perf_counter() - t0)
        out[f"recommend_ms_b{b}"] = statistics.median(times) * 1e3
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="*", default=["10k", "100k", "1m"], choices=list(SIZES))
    p.add_argument("--steps", type=int, default=20, help="steps per Ray epoch and per phase measurement")
    p.add_argument("--work", default=str(ROOT / "bench" / "runs" / "catalogue_scale"))
    p.add_argument("--quick", action="store_true", help="phases only, a few steps (smoke run)")
    a = p.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)

    import ray

    from rayrec.config import load_config
    from rayrec.data.sequences import build_sequences
    from rayrec.ray_env import init_ray

    init_ray(num_cpus=2)
    rows = []
    for size in a.sizes:
        n = SIZES[size]
        t0 = time.perf_counter()
        log = make_log(n, work)
        data = build_sequences(load_config(None, [f"data.log={log}", *MODEL]).data)
        seq = str(Path(data.sequences_path))
        prep_s = time.perf_counter() - t0
        print(f"{size}: {data.num_items:,} items seen, {data.num_users:,} users, prepared in {prep_s:.0f} s", flush=True)
        for head in HEADS:
            for mode in MODES:
                ov = overrides(log, head, mode)
                row = {"size": size, "items": data.num_items, "users": data.num_users, "head": head, "item_grad": mode}
                row.update(phases(seq, data.num_items, ov, 4 if a.quick else a.steps))
                if not a.quick:
                    r, run_dir = ray_fit(ov, work / "runs", f"{size}_{head}_{mode}", a.steps)
                    row.update(r)
                    if head == "sampled_softmax" and mode == "sparse":
                        row.update(eval_cost(seq, data.num_items, ov))
                        row.update(recommend_latency(run_dir, seq))
                rows.append(row)
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    ray.shutdown()

    def pick(size, head="sampled_softmax", mode="sparse"):
        return next((r for r in rows if r["size"] == size and r["head"] == head and r["item_grad"] == mode), None)

    metrics = {}
    for size in a.sizes:
        best = pick(size)
        if best is None:
            continue
        for k in ("seq_per_s", "peak_rss_gib_per_worker", "allreduce_mb_per_step", "eval_s", "eval_peak_gib",
                  "recommend_ms_b1", "recommend_ms_b256", "step_ms"):
            if k in best:
                metrics[f"{k}_{size}"] = round(best[k], 4)
        dense = pick(size, mode="dense")
        if dense and "seq_per_s" in dense and "seq_per_s" in best:
            metrics[f"sparse_vs_dense_seq_per_s_{size}"] = round(best["seq_per_s"] / dense["seq_per_s"], 3)
    if "seq_per_s_1m" in metrics and "seq_per_s_10k" in metrics:
        metrics["throughput_ratio_1m_vs_10k"] = round(metrics["seq_per_s_1m"] / metrics["seq_per_s_10k"], 3)
    out = write_result("catalogue_scale" if not a.quick else "catalogue_scale_quick", {
        "script": "bench/catalogue_scale.py", "command": "python bench/catalogue_scale.py " + " ".join(argv or sys.argv[1:]),
        "dataset": "synthetic generate_large (Zipf 1.1, 3 successors, follow 0.8, mean length 40)",
        "config": {"model": MODEL, "heads": HEADS, "workers": 2, "cpus_per_worker": 0.9},
        "protocol": "full", "metrics": metrics, "rows": rows,
    })
    print(table(rows))
    print(json.dumps(metrics, indent=1))
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


def table(rows: list[dict]) -> str:
    cols = ["seq_per_s", "fwd_bwd_ms", "sync_ms", "opt_ms", "allreduce_mb_per_step", "peak_rss_gib_per_worker",
            "eval_s", "eval_peak_gib", "recommend_ms_b1", "recommend_ms_b256"]
    lines = ["| items | head | item_grad | " + " | ".join(cols) + " |", "|---|---|---|" + "---:|" * len(cols)]
    for r in rows:
        lines.append(f"| {r['items']:,} | {r['head']} | {r['item_grad']} | "
                     + " | ".join(f"{r[c]:.3g}" if isinstance(r.get(c), float) else "–" for c in cols) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
