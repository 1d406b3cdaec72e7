"""Render bench/results/*.json as the README's results table (numbers are never typed by hand).

    python bench/report.py            # print the table
    python bench/report.py --readme   # replace the table between the markers in README.md
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
START, END = "<!-- results:start -->", "<!-- results:end -->"
V_START, V_END = "<!-- variants:start -->", "<!-- variants:end -->"
S_START, S_END = "<!-- speed:start -->", "<!-- speed:end -->"
C_START, C_END = "<!-- catalogue:start -->", "<!-- catalogue:end -->"
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


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", action="store_true")
    a = p.parse_args(argv)
    t = table()
    if not a.readme:
        print(t)
        return
    readme = ROOT / "README.md"
    text = _replace(readme.read_text(), START, END, t)
    variants = ROOT / "bench" / "results" / "variants.json"
    if variants.exists():
        from bench.variants import _ordered, table as variants_table

        runs = json.loads(variants.read_text())["runs"]
        text = _replace(text, V_START, V_END, variants_table(_ordered({r["name"]: r for r in runs})))
    speed = ROOT / "bench" / "results" / "train_speed.json"
    if speed.exists():
        from bench.train_speed import table as speed_table

        r = json.loads(speed.read_text())
        body = speed_table(r["rows"]) + "\n\n" + " · ".join(f"`{k}` {v}" for k, v in r["metrics"].items()) + \
            f"\n\n({r['hardware']}, commit {r['commit'][:8]})"
        text = _replace(text, S_START, S_END, body)
    catalogue = ROOT / "bench" / "results" / "catalogue_scale.json"
    if catalogue.exists():
        r = json.loads(catalogue.read_text())
        keys = ("seq_per_s_10k", "seq_per_s_1m", "throughput_ratio_1m_vs_10k", "sparse_vs_dense_seq_per_s_1m",
                "allreduce_mb_per_step_1m", "peak_rss_gib_per_worker_1m", "eval_s_1m", "eval_peak_gib_1m",
                "recommend_ms_b1_1m")
        body = " · ".join(f"`{k}` {r['metrics'][k]}" for k in keys if k in r["metrics"]) + \
            f"\n\n({r['hardware']}, commit {r['commit'][:8]})"
        text = _replace(text, C_START, C_END, body)
    readme.write_text(text)
    print("README.md results tables updated")


def _replace(text: str, start: str, end: str, body: str) -> str:
    if start not in text or end not in text:
        sys.exit(f"README.md lacks the markers {start} ... {end}")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


if __name__ == "__main__":
    main()
