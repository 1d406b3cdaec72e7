"""Render bench/results/*.json as the docs' generated tables (numbers are never typed by hand).

    python bench/report.py            # print the README's headline table and the quality table
    python bench/report.py --readme   # rewrite every generated table: README.md's headline,
                                      # docs/results.md's quality, variants, speed and catalogue tables
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
COLS = [("test_ndcg_10", "NDCG@10 full"), ("test_hr_10", "HR@10 full"), ("test_sampled_ndcg_10", "NDCG@10 sampled-100"),
        ("test_sampled_hr_10", "HR@10 sampled-100"), ("test_coverage_10", "coverage@10")]


def table() -> str:
    rows = ["| run | data | head | epochs (best) | " + " | ".join(c[1] for c in COLS) + " | s/epoch | commit |",
            "|---|---|---|---|" + "---:|" * len(COLS) + "---:|---|"]
    for p in sorted((ROOT / "bench" / "results").glob("*.json")):
        r = json.loads(p.read_text())
        if r.get("script") != "bench/quality.py":
            continue
        m = r["metrics"]
        cells = [f"{m[k]:.4f}" if k in m else "–" for k, _ in COLS]
        rows.append(f"| `{r['name']}` | {r['dataset']} | {r['config']['model']['head']} | {r['epochs']} ({r['best_epoch']}) | "
                    + " | ".join(cells) + f" | {r['timings']['s_per_epoch']} | {r['commit'][:8]} |")
    return "\n".join(rows)


# the README's one results table: the best row of each model class, beside what is published on the
# same data and protocol (file or row, source json, metric key, published reference)
HEADLINE = [
    ("eSASRec (LiGR + CE), 4 layers", "ML-1M (SASRec file)", ("esasrec_deep_ml1m",), "test_ndcg_10", "HSTU-large 0.1893"),
    ("eSASRec (LiGR + CE), 2 layers", "ML-1M (SASRec file)", ("esasrec_ml1m",), "test_ndcg_10", "–"),
    ("SASRec-CE", "ML-1M (SASRec file)", ("sasrec_ce_ml1m_h128",), "test_ndcg_10", "SASRec+ 0.1821"),
    ("SASRec-BCE", "ML-1M (SASRec file)", ("sasrec_bce_ml1m_v3",), "test_sampled_ndcg_10", "SASRec paper 0.5905"),
    ("HSTU + CE", "ML-1M (SASRec file)", ("hstu_ml1m",), "test_ndcg_10", "HSTU 0.1720"),
    ("HSTU-large + CE", "ML-1M (SASRec file)", ("hstu_large_ml1m",), "test_ndcg_10", "HSTU-large 0.1893"),
    ("DiffSASRec", "ML-1M (SASRec file)", ("diffusion", "best_single"), "test_ndcg_10", "BERT4Rec 0.1516"),
    ("eSASRec", "ML-1M, real time", ("variants", "esasrec_ml1m_ts"), "test_ndcg_10", "–"),
    ("HSTU", "ML-1M, real time", ("variants", "hstu_ml1m_ts"), "test_ndcg_10", "–"),
    ("LiGR + CE", "Amazon Beauty", ("esasrec_beauty_ce",), "test_ndcg_10", "eSASRec paper ~0.052"),
]


def headline_row(source: tuple[str, ...]) -> dict | None:
    """The result a headline row shows, or None while it has not been measured."""
    path = ROOT / "bench" / "results" / f"{source[0]}.json"
    if not path.exists():
        return None
    r = json.loads(path.read_text())
    if source[0] == "variants":
        return next((x for x in r["runs"] if x["name"] == source[1]), None)
    if source[0] == "diffusion":  # best single-step row on validation (pre-training or SFT)
        rows = [x for x in r["rows"] if x.get("inference") == "single" and x["config"]["model"]["head"] == "masked_diffusion"]
        return max(rows, key=lambda x: x["metrics"].get("val_ndcg_10", -1.0), default=None)
    return r


def headline() -> str:
    out = ["| model | data | metric (test, best-on-validation weights) | rayrec | published | epochs (best) | s/epoch |",
           "|---|---|---|---:|---|---|---:|"]
    for model, data, source, key, published in HEADLINE:
        r = headline_row(source)
        if r is None or key not in r["metrics"]:
            continue
        what = key.replace("test_", "").replace("sampled_", "sampled-100 ").replace("ndcg_10", "NDCG@10")
        what = what if "sampled" in what else "full-ranking " + what
        out.append(f"| {model} | {data} | {what} | {r['metrics'][key]:.4f} | {published} | {r['epochs']} ({r['best_epoch']}) "
                   f"| {r['timings']['s_per_epoch']} |")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", action="store_true", help="write every generated table (README.md, docs/results.md)")
    a = p.parse_args(argv)
    t = table()
    if not a.readme:
        print(headline() + "\n\n" + t)
        return
    from bench.blocks import replace_block

    replace_block("headline", headline())
    replace_block("results", t)
    variants = ROOT / "bench" / "results" / "variants.json"
    if variants.exists():
        from bench.variants import _ordered, table as variants_table

        runs = json.loads(variants.read_text())["runs"]
        replace_block("variants", variants_table(_ordered({r["name"]: r for r in runs})))
    speed = ROOT / "bench" / "results" / "train_speed.json"
    if speed.exists():
        from bench.train_speed import table as speed_table

        r = json.loads(speed.read_text())
        body = speed_table(r["rows"]) + "\n\n" + " · ".join(f"`{k}` {v}" for k, v in r["metrics"].items()) + \
            f"\n\n({r['hardware']}, commit {r['commit'][:8]})"
        replace_block("speed", body)
    catalogue = ROOT / "bench" / "results" / "catalogue_scale.json"
    if catalogue.exists():
        r = json.loads(catalogue.read_text())
        keys = ("seq_per_s_10k", "seq_per_s_1m", "throughput_ratio_1m_vs_10k", "sparse_vs_dense_seq_per_s_1m",
                "allreduce_mb_per_step_1m", "peak_rss_gib_per_worker_1m", "eval_s_1m", "eval_peak_gib_1m",
                "recommend_ms_b1_1m")
        body = " · ".join(f"`{k}` {r['metrics'][k]}" for k in keys if k in r["metrics"]) + \
            f"\n\n({r['hardware']}, commit {r['commit'][:8]})"
        replace_block("catalogue", body)
    print("generated tables updated (README.md, docs/results.md)")


if __name__ == "__main__":
    main()
