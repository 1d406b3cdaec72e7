"""Every model variant under the same budget and protocol, on the same real data.

    python bench/variants.py                       # all of VARIANTS, 120 epochs each at most (the configs' budget)
    python bench/variants.py --only sasrec_ml1m_ts tisasrec_ml1m_ts train.epochs=10
    python bench/variants.py --only sasrec_beauty esasrec_beauty   # the same configs on Amazon Beauty

Each run trains from its YAML in configs/ (early stopping on validation NDCG@10, test metrics from
the best-on-validation epoch, full ranking and sampled-100 both). Results accumulate in
bench/results/variants.json (one entry per variant, replaced when re-run) and print as a table.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, commit, hardware, write_result  # noqa: E402
from bench.quality import run_quality  # noqa: E402

# A variant is a config in configs/; a dataset is a set of overrides that points that config at
# another log (model, budget and protocol unchanged but for the stated data-specific knobs).
DATASETS = {
    "ml-1m-ts": [],
    # Amazon Beauty 5-core (S3-Rec files: 22,363 users, 12,101 items, order only). Dropout 0.5 is
    # the SASRec paper's setting for the sparse Amazon data (0.2 for MovieLens). An epoch is 175
    # steps here against ML-1M-ts's 24, so 60 epochs are ~7x the steps of ML-1M-ts's 120; the
    # histories are short (8.9 items on average), so batches are length-bucketed and trimmed.
    "beauty": ["data.log=data/beauty/interactions.parquet", "data.source.kind=s3rec_txt",
               "data.source.path=../shared/data/s3rec/Beauty.txt.gz", "model.dropout=0.5",
               "train.epochs=60", "train.eval_every=2", "train.patience=5", "train.bucket_by_length=true"],
}
ML1M = ["sasrec", "sasrec_ce", "gsasrec", "esasrec", "tisasrec", "sasrec_mhc", "sasrec_wide", "tisasrec_mhc", "ssept", "hstu", "hstu_large"]
# Beauty's files carry item order only (timestamps are synthesized one apart), so every time
# interval is equal and the time_interval variants would measure nothing: they are not run there.
BEAUTY = ["sasrec", "sasrec_ce", "gsasrec", "esasrec", "sasrec_mhc", "sasrec_wide", "ssept", "hstu"]
# eSASRec's negatives are a share of the catalogue: 1024 of ML-1M-ts's 3,615 items, 4096 of Beauty's
# 12,101 (with 1024 on Beauty: 0.0528, below SASRec-CE's 0.0549), so its Beauty row is its own config;
# HSTU's ML-1M-ts config biases by time, which Beauty's synthesized timestamps do not carry
OWN_CONFIG = {("esasrec", "beauty"): "esasrec_beauty", ("hstu", "beauty"): "hstu_beauty"}
# (row name, config stem, dataset)
VARIANTS = ([(f"{v}_ml1m_ts", f"{v}_ml1m_ts", "ml-1m-ts") for v in ML1M]
            + [(f"{v}_beauty", OWN_CONFIG.get((v, "beauty"), f"{v}_ml1m_ts"), "beauty") for v in BEAUTY])
COLS = ["test_ndcg_10", "test_hr_10", "test_sampled_ndcg_10", "test_sampled_hr_10", "baseline_pop_test_ndcg_10"]


def table(runs: list[dict]) -> str:
    head = "| variant | data | block / attention / residual / user / head | epochs (best) | NDCG@10 full | HR@10 full | NDCG@10 sampled | HR@10 sampled | pop NDCG@10 | s/epoch | params |"
    rows = [head, "|---|---|---|---|" + "---:|" * 7]
    for r in runs:
        m, mc = r["metrics"], r["config"]["model"]
        axes = " / ".join(str(mc[a]) for a in ("block", "attention", "residual", "user", "head"))
        cells = " | ".join(f"{m[k]:.4f}" if k in m else "–" for k in COLS)
        rows.append(f"| `{r['name']}` | {r['dataset']} | {axes} | {r['epochs']} ({r['best_epoch']}) | {cells} | "
                    f"{r['timings']['s_per_epoch']} | {r.get('params', '–')} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="key=value applied to every variant")
    p.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    a = p.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    path = RESULTS / "variants.json"
    old = json.loads(path.read_text()) if path.exists() else {"runs": []}
    runs = {r["name"]: r for r in old["runs"]}
    # `--only a b key=value`: argparse hands the overrides after --only to it
    a.overrides += [o for o in a.only or () if "=" in o]
    a.only = [o for o in a.only or () if "=" not in o] or None
    unknown = set(a.only or ()) - {name for name, _, _ in VARIANTS}
    if unknown:
        sys.exit(f"--only: unknown variants {sorted(unknown)}; choose from {[n for n, _, _ in VARIANTS]}")
    for name, stem, dataset in VARIANTS:
        if a.only and name not in a.only:
            continue
        r = run_quality(f"configs/{stem}.yaml", name, [*DATASETS[dataset], *a.overrides], dataset)
        r["params"] = _params(r["config"])
        # rows accumulate over sessions and machines: each keeps its own provenance
        r.update(commit=commit(), date=dt.date.today().isoformat(), hardware=hardware())
        runs[name] = r
        _write(runs)  # after every variant: a long sweep loses nothing when stopped
    print(table(_ordered(runs)))


def _ordered(runs: dict) -> list[dict]:
    order = {name: i for i, (name, _, _) in enumerate(VARIANTS)}
    return sorted(runs.values(), key=lambda r: order.get(r["name"], 99))


def _write(runs: dict) -> None:
    write_result("variants", {"script": "bench/variants.py", "command": "python " + " ".join(["bench/variants.py", *sys.argv[1:]]),
                              "runs": _ordered(runs)})


def _params(cfg_dict: dict) -> int:
    from rayrec.config import config_from_dict
    from rayrec.models import build_model

    cfg = config_from_dict(cfg_dict)
    meta = json.loads(Path(cfg.data.log).with_name("meta.json").read_text())
    return sum(p.numel() for p in build_model(cfg.model, meta["items"], meta["users"]).parameters())


if __name__ == "__main__":
    main()
