"""Probes of what limits DiffSASRec on the SASRec paper's MovieLens-1M (issue 25): one recipe per call,
trained under the shared budget of bench/diffusion.py (max_len 50, hidden 64, 2 blocks, 1 head,
batch 128, lr 1e-3) with the given overrides; its validation curve, best validation NDCG@10 and the
test NDCG@10 of the best-on-validation weights accumulate in bench/results/diffusion_probes.json.

    RAYREC_SHARED_DATA=/path/to/shared/data python bench/diffusion_probes.py crop_fixed_last \\
        train.window_crop=1 model.diffusion_schedule=fixed model.diffusion_last_prob=0.5 train.epochs=25

Test numbers are recorded for the report only; recipes are compared on validation.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, sha256, write_result  # noqa: E402
from bench.diffusion import BUDGET  # noqa: E402
from bench.quality import resolve_source  # noqa: E402


def probe(name: str, overrides: list[str], config: str = "configs/diffsasrec_ml1m.yaml") -> dict:
    from rayrec.config import load_config
    from rayrec.data.prepare import ensure_log
    from rayrec.train.fit import fit

    cfg = load_config(config, [f"name=probe_{name}", "output_dir=bench/runs", *BUDGET, "train.patience=0", *overrides])
    cfg.data.source.path = resolve_source(cfg.data.source.path)
    ensure_log(cfg.data)
    t0 = time.perf_counter()
    res = fit(cfg)
    wall = time.perf_counter() - t0
    m = res.metrics
    times = sorted(h["epoch_s"] for h in res.history if math.isfinite(h.get("epoch_s", math.nan)))
    # the first report of an epoch: the final one repeats the last epoch with the restored best weights' metrics
    curve = sorted({h["epoch"]: round(h["val_ndcg_10"], 5) for h in reversed(res.history) if "val_ndcg_10" in h}.items())
    return {"probe": name, "overrides": overrides, "config": cfg.to_dict(), "data_sha256": sha256(Path(cfg.data.source.path)),
            "epochs": m.get("epoch"), "best_epoch": m.get("best_epoch"),
            "best_val_ndcg_10": round(m["best_val_ndcg_10"], 5), "test_ndcg_10": round(m["test_ndcg_10"], 5),
            "test_hr_10": round(m["test_hr_10"], 5), "val_curve": curve,
            "s_per_epoch_median": round(times[len(times) // 2], 2) if times else None, "wall_s": round(wall, 1)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--config", default="configs/diffsasrec_ml1m.yaml")
    p.add_argument("--note", default="")
    a = p.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    r = probe(a.name, a.overrides, a.config)
    if a.note:
        r["note"] = a.note
    path = RESULTS / "diffusion_probes.json"
    rows = {x["probe"]: x for x in (json.loads(path.read_text())["probes"] if path.exists() else [])}
    rows[a.name] = r
    write_result("diffusion_probes", {"script": "bench/diffusion_probes.py", "dataset": "ml-1m (sasrec/ml-1m.txt.gz)",
                                      "split": "leave_last_two", "protocol": "full", "budget": BUDGET,
                                      "probes": list(rows.values())})
    print(json.dumps({k: r[k] for k in ("probe", "epochs", "best_epoch", "best_val_ndcg_10", "test_ndcg_10", "val_curve",
                                        "s_per_epoch_median")}))


if __name__ == "__main__":
    main()
