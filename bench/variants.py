"""Every model variant under the same budget and protocol, on the same real data.

    python bench/variants.py                       # all of VARIANTS, 120 epochs each at most (the configs' budget)
    python bench/variants.py --only sasrec_ml1m_ts tisasrec_ml1m_ts train.epochs=10

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

# (config stem, dataset label); the same hidden size, depth, max_len, batch, lr and epoch budget
VARIANTS = [
    ("sasrec_ml1m_ts", "ml-1m-ts"),
    ("sasrec_ce_ml1m_ts", "ml-1m-ts"),
    ("gsasrec_ml1m_ts", "ml-1m-ts"),
    ("esasrec_ml1m_ts", "ml-1m-ts"),
    ("tisasrec_ml1m_ts", "ml-1m-ts"),
    ("sasrec_mhc_ml1m_ts", "ml-1m-ts"),
    ("sasrec_wide_ml1m_ts", "ml-1m-ts"),  # plain SASRec at mHC's parameter count
    ("tisasrec_mhc_ml1m_ts", "ml-1m-ts"),
    ("ssept_ml1m_ts", "ml-1m-ts"),
]
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
    for stem, dataset in VARIANTS:
        if a.only and stem not in a.only:
            continue
        r = run_quality(f"configs/{stem}.yaml", stem, a.overrides, dataset)
        r["params"] = _params(r["config"])
        # rows accumulate over sessions and machines: each keeps its own provenance
        r.update(commit=commit(), date=dt.date.today().isoformat(), hardware=hardware())
        runs[stem] = r
        _write(runs)  # after every variant: a long sweep loses nothing when stopped
    print(table(_ordered(runs)))


def _ordered(runs: dict) -> list[dict]:
    order = {s: i for i, (s, _) in enumerate(VARIANTS)}
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
