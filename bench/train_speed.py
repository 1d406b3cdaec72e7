"""Training speed on real data: plain torch loop vs Ray Train (1 and 2 workers), against the machine.

    python bench/train_speed.py                 # paper + large configs on sasrec/ml-1m.txt.gz
    python bench/train_speed.py --skip-ray      # only the single-process measurements

An epoch is every training user's sequence once with all positions as targets (the reference
port's epoch). For each config it measures, side by side in one run:
  * plain: one process, the library's own batches and ``train_step`` (no Ray), every batch
    max_len wide (the reference port's batches): s/epoch, sequences/s, time to first step, peak
    RSS, FLOPs per step (``torch.utils.flop_counter``) and achieved GFLOP/s as a fraction of the
    best large square fp32 matmul rate measured first;
  * plain+buckets (paper config): the same with ``train.bucket_by_length=true`` (batches of
    similar history length, trimmed);
  * optionally the same with ``torch.compile``;
  * Ray Train with 1 and 2 workers on a warm local cluster (``fit``, with buckets), s/epoch
    of the second epoch and time from ``fit()`` to the first optimizer step;
  * full-ranking evaluation of every user (validation + test), through ``evaluate`` (batches of
    similar length, trimmed) and, side by side, with every window max_len wide.
Results: bench/results/train_speed.json and a printed table.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SHARED_DATA, sha256, write_result  # noqa: E402

CONFIGS = {
    "paper": ["model.hidden=50", "model.num_blocks=2", "model.num_heads=1", "model.max_len=200", "model.dropout=0.2",
              "model.head=bce", "model.num_negatives=1", "train.batch_size=128"],
    "large": ["model.hidden=256", "model.num_blocks=3", "model.num_heads=2", "model.max_len=200", "model.dropout=0.2",
              "model.head=bce", "model.num_negatives=1", "train.batch_size=128"],
}
DATA = ["data.log=data/ml-1m-sasrec/interactions.parquet", "data.source.kind=sasrec_txt"]


def matmul_peak(threads: int, seconds: float = 3.0) -> float:
    """Best fp32 GFLOP/s of large square matmuls with ``threads`` threads."""
    import torch

    torch.set_num_threads(threads)
    best = 0.0
    for n in (1024, 2048, 3072, 4096):
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 4:
            a @ b
            reps += 1
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9)
    return best


def _plain(conn, seq_path: str, overrides: list[str], threads: int, compile_model: bool, eval_too: bool) -> None:
    """One measurement in a fresh process (so peak RSS is this config's own)."""
    t_start = time.perf_counter()
    import pyarrow.parquet as pq
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from rayrec.config import EvalConfig, load_config
    from rayrec.data.batches import SequenceStore
    from rayrec.eval.evaluate import evaluate
    from rayrec.models import build_model
    from rayrec.train.loop import EpochBatches, make_optimizer, to_device, train_step

    torch.set_num_threads(threads)
    cfg = load_config(None, overrides)
    meta = json.loads(Path(seq_path, "..", "meta.json").resolve().read_text())
    store = SequenceStore.from_tables([pq.read_table(seq_path)], meta["items_out"])
    torch.manual_seed(0)
    model = build_model(cfg.model, store.num_items, meta["users_out"])
    opt = make_optimizer(model, cfg)
    users = store.train_users()
    per = cfg.train.batch_size
    steps = math.ceil(len(users) / per)
    batches = EpochBatches(store, store.forbidden_keys(), users, cfg, 0, per, steps, model.head)
    step_model = torch.compile(model) if compile_model else model
    device = torch.device("cpu")
    it = batches.epoch(0)
    train_step(step_model, opt, to_device(next(it), device), cfg, 1)
    first_step_s = time.perf_counter() - t_start
    for _ in range(2 if compile_model else 1):  # compile: a couple more warm-up steps
        train_step(step_model, opt, to_device(next(it), device), cfg, 1)
    # FLOPs of one representative step (forward + backward), counted on the eager model
    b = to_device(next(iter(batches.epoch(1))), device)
    with FlopCounterMode(display=False) as fc:
        loss, count = model(b)
        (loss / count).backward()
    flops = fc.get_total_flops()
    opt.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    n = 0
    for b in batches.epoch(2):
        train_step(step_model, opt, to_device(b, device), cfg, 1)
        n += 1
    epoch_s = time.perf_counter() - t0
    out = {"s_per_epoch": epoch_s, "steps": n, "seq_per_s": n * per / epoch_s, "first_step_s": first_step_s,
           "params": sum(p.numel() for p in model.parameters())}
    if not cfg.train.bucket_by_length:  # bucketed steps differ in width: one step's FLOPs say nothing of the epoch
        out.update(flops_per_step=flops, gflops=flops * n / epoch_s / 1e9)
    if eval_too:
        import rayrec.eval.evaluate as ev

        for key, trim in (("eval_full_s", True), ("eval_full_untrimmed_s", False)):
            # untrimmed: the same evaluation with every window max_len wide (as before trimming)
            ev.eval_batch = _eval_batch_forced(trim)
            t0 = time.perf_counter()
            res = [evaluate(model, store, EvalConfig(protocol="full"), cfg.model.max_len, stage, device)
                   for stage in ("val", "test")]
            out[key] = time.perf_counter() - t0
            out[key.replace("_s", "_ndcg_10")] = res[1]["test_ndcg_10"]
        out["eval_users"] = int(len(store.eval_users()))
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    conn.send(out)


def _eval_batch_forced(trim: bool):
    """``eval_batch`` with trimming forced on or off, whatever ``evaluate`` asks for."""
    from rayrec.data.batches import eval_batch

    def call(store, rows, max_len, stage, **_):
        return eval_batch(store, rows, max_len, stage, trim=trim)
    return call


def plain(seq_path, overrides, threads, compile_model=False, eval_too=False) -> dict:
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    p = ctx.Process(target=_plain, args=(b, seq_path, overrides, threads, compile_model, eval_too))
    p.start()
    out = a.recv() if a.poll(3600) else {"error": "timed out"}
    p.join()
    return out


def ray_train(overrides: list[str], workers: int, tmp: str) -> dict:
    from rayrec.config import load_config
    from rayrec.train.fit import fit

    cpus = 2.0 / workers
    cfg = load_config(None, [*DATA, *overrides, f"output_dir={tmp}", f"name=speed{workers}_{time.time_ns()}",
                             "train.epochs=2", "train.eval_every=100", "eval.protocol=full", f"scale.num_workers={workers}",
                             f"scale.cpus_per_worker={cpus}"])
    t0 = time.time()
    res = fit(cfg)
    h = [r for r in res.history if r.get("final") != 1 and "epoch_s" in r and r["epoch_s"] == r["epoch_s"]]
    out = {"s_per_epoch": h[-1]["epoch_s"], "seq_per_s": h[-1]["seq_per_s"], "first_step_s": h[0]["first_step_unix"] - t0}
    # where the time to the first step went: the driver (data cache, Ray Dataset), then the worker's own marks
    out["startup_driver_s"] = out["first_step_s"] - h[0]["first_step_s"]
    out.update({k: h[0][k] for k in ("startup_worker_s", "startup_data_s", "startup_model_s")})
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--skip-ray", action="store_true")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile (paper config)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--ray-configs", default="paper,large", help="configs also run under Ray Train (comma-separated)")
    a = p.parse_args(argv)

    import tempfile

    import ray

    from rayrec.config import load_config
    from rayrec.data.prepare import ensure_log
    from rayrec.data.sequences import build_sequences
    from rayrec.ray_env import init_ray

    src = SHARED_DATA / "sasrec" / "ml-1m.txt.gz"
    cfg = load_config(None, [*DATA, f"data.source.path={src}"])
    ensure_log(cfg.data)
    init_ray(num_cpus=os.cpu_count())
    data = build_sequences(cfg.data)  # cached next to the log; the plain loop reads the same files

    rows, results = [], {}
    peak = matmul_peak(a.threads)
    print(f"fp32 matmul peak with {a.threads} threads: {peak:.1f} GFLOP/s", flush=True)

    def show(key, r):
        print(key, json.dumps({k: round(v, 3) for k, v in r.items()}), flush=True)

    for name, ov in CONFIGS.items():
        r = plain(data.sequences_path, [*ov, "train.bucket_by_length=false"], a.threads, eval_too=(name == "paper"))
        r["gflops_fraction"] = r["gflops"] / peak
        results[f"{name}/plain"] = r
        show(f"{name}/plain", r)
        if name == "paper":
            r = plain(data.sequences_path, [*ov, "train.bucket_by_length=true"], a.threads)
            results[f"{name}/plain+buckets"] = r
            show(f"{name}/plain+buckets", r)
        if a.compile and name == "paper":
            rc = plain(data.sequences_path, ov, a.threads, compile_model=True)
            rc["gflops_fraction"] = rc["gflops"] / peak
            results[f"{name}/plain+compile"] = rc
            show(f"{name}/plain+compile", rc)
        if not a.skip_ray and name in a.ray_configs.split(","):
            with tempfile.TemporaryDirectory() as tmp:
                for w in (1, 2):
                    r = ray_train([*ov, "train.bucket_by_length=true"], w, tmp)
                    results[f"{name}/ray{w}"] = r
                    show(f"{name}/ray{w}", r)
    ray.shutdown()

    for key, r in results.items():
        rows.append({"run": key, **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}})
    paper = results["paper/plain"]
    metrics = {
        "s_per_epoch_paper_config": round(paper["s_per_epoch"], 3),
        "s_per_epoch_large_config": round(results["large/plain"]["s_per_epoch"], 3),
        "gflops_fraction_large": round(results["large/plain"]["gflops_fraction"], 4),
        "gflops_fraction_paper": round(paper["gflops_fraction"], 4),
        "matmul_peak_gflops": round(peak, 1),
        "eval_full_s": round(paper["eval_full_s"], 3),
        "eval_full_untrimmed_s": round(paper["eval_full_untrimmed_s"], 3),
        "s_per_epoch_paper_config_buckets": round(results["paper/plain+buckets"]["s_per_epoch"], 3),
        "buckets_vs_plain": round(paper["s_per_epoch"] / results["paper/plain+buckets"]["s_per_epoch"], 3),
    }
    if "paper/ray2" in results:  # the Ray runs use buckets: compared with the same loop in one process
        ref = results["paper/plain+buckets"]
        metrics["ray2_vs_plain"] = round(results["paper/ray2"]["seq_per_s"] / ref["seq_per_s"], 3)
        metrics["ray1_vs_plain"] = round(results["paper/ray1"]["seq_per_s"] / ref["seq_per_s"], 3)
        metrics["first_step_s_ray2"] = round(results["paper/ray2"]["first_step_s"], 2)
    out = write_result("train_speed", {
        "script": "bench/train_speed.py", "command": "python " + " ".join(["bench/train_speed.py", *(argv or sys.argv[1:])]),
        "dataset": "ml-1m", "data_sha256": sha256(src), "config": {k: v for k, v in CONFIGS.items()},
        "protocol": "full", "metrics": metrics, "timings": {"threads": a.threads}, "rows": rows,
    })
    print(table(rows))
    print(json.dumps(metrics, indent=1))
    print(f"wrote {out}")


def table(rows: list[dict]) -> str:
    cols = ["s_per_epoch", "seq_per_s", "first_step_s", "gflops", "gflops_fraction", "peak_rss_mb"]
    lines = ["| run | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for r in rows:
        lines.append(f"| {r['run']} | " + " | ".join(f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "–")) for c in cols) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
