"""A real Tune sweep next to the untuned default, on the same data, epochs and protocol.

    python bench/tune_sweep.py configs/tune/sasrec_ml1m.yaml --dataset ml-100k \\
        data.source.path=$PWD/../shared/data/ml-100k/u.data.gz data.log=$PWD/data/ml-100k/interactions.parquet \\
        name=sasrec_ml100k output_dir=$PWD/runs/bench

Runs the sweep (``jobs/tune.py``'s code path), then trains the base config as written (no search:
the default a user gets without tuning) and writes bench/results/tune_<dataset>.json with both
test results (each from its best-on-validation weights) and the sweep's leaderboard.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import sha256, write_result  # noqa: E402
from rayrec.config import TuneConfig, load_config  # noqa: E402
from rayrec.tune.space import tune_metric  # noqa: E402

KEYS = ["test_ndcg_10", "test_hr_10", "test_mrr_10", "best_val_ndcg_10", "val_ndcg_10"]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--dataset", required=True, help="label for the result file: bench/results/tune_<dataset>.json")
    a = p.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from rayrec.train.fit import fit
    from rayrec.tune.sweep import run_sweep

    cfg = load_config(a.config, a.overrides)
    t0 = time.perf_counter()
    sweep = run_sweep(cfg)
    sweep_s = time.perf_counter() - t0
    table = sweep.table
    metric = tune_metric(cfg)
    best = table.iloc[0].to_dict()

    default = load_config(a.config, a.overrides)
    default.tune = TuneConfig()
    default.name = f"{cfg.name}_default"
    default.output_dir = str(sweep.exp_dir)
    t1 = time.perf_counter()
    base = fit(default)
    default_s = time.perf_counter() - t1

    searched = sorted(cfg.tune.space)
    default_values = {k: getattr(getattr(default, k.split(".")[0]), k.split(".")[1]) for k in searched}
    best_values = {k: best[f"config/{k}"] for k in searched}
    rows = [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items() if k != "run_dir"}
            for r in table.to_dict("records")]
    log_path = Path(default.data.log)
    payload = {
        "script": "bench/tune_sweep.py", "command": "python bench/tune_sweep.py " + " ".join(sys.argv[1:]),
        "dataset": a.dataset, "data_sha256": sha256(log_path) if log_path.is_file() else None,
        "config": cfg.to_dict(), "protocol": cfg.eval.protocol, "tune_metric": metric,
        "metrics": {
            **{f"best_trial_{k}": float(best[k]) for k in ("test_ndcg_10", "test_hr_10") if k in best},
            f"best_trial_best_{metric}": float(best[f"best_{metric}"]),
            **{f"default_{k}": float(base.metrics[k]) for k in KEYS if k in base.metrics},
            "baseline_pop_test_ndcg_10": float(base.metrics["baseline_pop_test_ndcg_10"]),
        },
        "best": {"trial": best["trial"], "status": best["status"], "config": best_values},
        "default": {"config": default_values},
        "trials": {"total": len(table), **table["status"].value_counts().to_dict()},
        "timings": {"sweep_wall_s": round(sweep_s, 1), "default_wall_s": round(default_s, 1)},
        "rows": rows,
    }
    out = write_result(f"tune_{a.dataset}", payload)
    print(f"\n{sweep.leaderboard}\n")
    m = payload["metrics"]
    print("| run | " + " | ".join(searched) + f" | best {metric} | test NDCG@10 | test HR@10 |")
    print("|---|" + "---|" * len(searched) + "---:|---:|---:|")
    print(f"| best trial ({best['trial']}) | " + " | ".join(f"{best_values[k]:.4g}" if isinstance(best_values[k], float)
                                                        else str(best_values[k]) for k in searched)
          + f" | {m[f'best_trial_best_{metric}']:.4f} | {m.get('best_trial_test_ndcg_10', float('nan')):.4f} | "
          f"{m.get('best_trial_test_hr_10', float('nan')):.4f} |")
    print("| untuned default | " + " | ".join(str(default_values[k]) for k in searched)
          + f" | {base.metrics[f'best_{metric}']:.4f} | {m['default_test_ndcg_10']:.4f} | {m['default_test_hr_10']:.4f} |")
    print(f"\npopularity test NDCG@10 {m['baseline_pop_test_ndcg_10']:.4f}; sweep {sweep_s / 60:.1f} min, "
          f"default {default_s / 60:.1f} min\nwrote {out}")


if __name__ == "__main__":
    main()
