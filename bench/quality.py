"""Train a config on a real dataset and record its quality with full provenance.

    python bench/quality.py configs/sasrec_ml1m.yaml --name sasrec_bce_ml1m [key=value ...]

Writes bench/results/<name>.json (DESIGN.md format) and prints a table. Test metrics come from the
best-on-validation checkpoint; full-ranking and sampled-100 numbers are labelled apart.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SHARED_DATA, sha256, write_result  # noqa: E402


def resolve_source(path: str) -> str:
    """Configs name shared data as ../shared/data/...; find it under RAYREC_SHARED_DATA too."""
    p = Path(path)
    if p.exists() or "shared/data/" not in path:
        return path
    return str(SHARED_DATA / path.split("shared/data/", 1)[1])


def run_quality(config: str, name: str, overrides: list[str], dataset: str) -> dict:
    """Train ``config`` and return its result payload (DESIGN.md format, without writing it)."""
    from rayrec.config import load_config
    from rayrec.data.prepare import ensure_log
    from rayrec.train.fit import fit

    cfg = load_config(config, [f"name={name}", "output_dir=bench/runs", *overrides])
    cfg.data.source.path = resolve_source(cfg.data.source.path)
    src = Path(cfg.data.source.path)
    if not src.exists():
        sys.exit(f"dataset file {src} not found: set RAYREC_SHARED_DATA or data.source.path")
    ensure_log(cfg.data)
    t0 = time.perf_counter()
    res = fit(cfg)
    wall = time.perf_counter() - t0
    m = res.metrics
    metrics = {k: round(v, 5) for k, v in m.items() if k.startswith(("test_", "val_", "best_", "baseline_")) and isinstance(v, float)}
    # median over this call's epochs: honest after a resume too (train_s covers only this call)
    epoch_times = sorted(h["epoch_s"] for h in res.history if math.isfinite(h.get("epoch_s", math.nan)))
    epoch_s = epoch_times[len(epoch_times) // 2] if epoch_times else float("nan")
    return {
        "name": name, "dataset": dataset, "data_sha256": sha256(src), "config": cfg.to_dict(),
        "protocol": cfg.eval.protocol, "epochs": m.get("epoch"), "best_epoch": m.get("best_epoch"),
        "metrics": metrics, "resumed": cfg.resume,
        # per validated epoch; the final report repeats the last epoch with the restored best weights' metrics
        "val_curve": sorted({h["epoch"]: round(h[cfg.eval.metric], 5) for h in reversed(res.history) if cfg.eval.metric in h}.items()),
        "timings": {"wall_s_this_call": round(wall, 1), "s_per_epoch_median": round(epoch_s, 2), "s_per_epoch": round(epoch_s, 2)},
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--name", required=True, help="result name: bench/results/<name>.json")
    p.add_argument("--dataset", default="ml-1m", help="label of the dataset in the result")
    a = p.parse_intermixed_args(argv)

    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    r = run_quality(a.config, a.name, a.overrides, a.dataset)
    r.update({"script": "bench/quality.py",
              "command": "python " + " ".join(["bench/quality.py", a.config, "--name", a.name, "--dataset", a.dataset, *a.overrides])})
    out = write_result(a.name, r)
    m = r["metrics"]
    print(f"\n{a.name}: {r['epochs']} epochs, best epoch {r['best_epoch']}, wall {r['timings']['wall_s_this_call']:.0f} s")
    for k in ("test_ndcg_10", "test_hr_10", "test_mrr_10", "test_sampled_ndcg_10", "test_sampled_hr_10", "test_coverage_10"):
        if k in m:
            print(f"  {k:<22} {m[k]:.4f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
