"""DiffSASRec next to SASRec-CE on the same data, split, model size and epoch budget.

    RAYREC_SHARED_DATA=/path/to/shared/data python bench/diffusion.py                # every stage
    python bench/diffusion.py --only ce            # one stage: ce | pretrain | sft (sft needs pretrain's run)
    python bench/diffusion.py --only pretrain train.epochs=10                         # overrides for every stage

Rows: SASRec-CE (causal, full softmax); DiffSASRec pre-trained, evaluated single-step (one mask
token; scores through the shared evaluation path) and multi-step (10 mask tokens, threshold 0.9,
decay 0.9); DiffSASRec after SFT (from pre-training's best weights), single- and multi-step.
Model selection uses single-step validation NDCG@10 (test is never looked at); the multi-step
rows evaluate those same best-on-validation weights. Results accumulate in
bench/results/diffusion.json (one entry per row, replaced when re-run) and print as a table.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, ROOT, write_result  # noqa: E402
from bench.quality import run_quality  # noqa: E402

# the budget every row shares: the SASRec paper's ML-1M file, leave-last-two-out, max_len 50,
# hidden 64, 2 blocks, batch 128, lr 1e-3, dropout 0.1, 40 epochs (validation every 5): about 10 minutes
# for the three trainings on a 2-core CPU; SFT adds 10 epochs at lr 5e-4
BUDGET = ["model.max_len=50", "model.hidden=64", "model.num_blocks=2", "model.num_heads=1", "model.dropout=0.1",
          "train.batch_size=128", "train.lr=0.001", "train.epochs=40", "train.eval_every=5", "train.patience=0",
          "eval.protocol=full", "eval.ks=[5,10,20]"]
SFT = ["train.stage=sft", "train.epochs=10", "train.lr=0.0005"]
MULTI = ["eval.diffusion_inference=multi", "eval.ks=[5,10]", "eval.diffusion_k=10",
         "eval.diffusion_threshold=0.9", "eval.diffusion_decay=0.9"]
COLS = ["test_ndcg_10", "test_hr_10", "test_mrr_10", "test_coverage_10", "val_ndcg_10"]
ORDER = ["sasrec_ce", "diffsasrec_single", "diffsasrec_multi", "diffsasrec_sft_single", "diffsasrec_sft_multi"]


def multi_step(row: dict, run_dir: Path) -> dict:
    """The multi-step row of a trained run: the same best-on-validation weights, listed by K mask tokens."""
    import time

    from rayrec.eval.offline import evaluate_checkpoint

    t0 = time.perf_counter()
    metrics, _ = evaluate_checkpoint(run_dir, MULTI)
    out = dict(row, inference="multi", metrics={k: round(v, 5) for k, v in metrics.items() if isinstance(v, float)})
    out["timings"] = dict(row["timings"], eval_multi_s=round(time.perf_counter() - t0, 1))
    return out


def stage(name: str, overrides: list[str]) -> list[dict]:
    if name == "ce":
        r = run_quality("configs/sasrec_ce_ml1m.yaml", "bench_diff_sasrec_ce", BUDGET + overrides, "ml-1m")
        return [dict(r, row="sasrec_ce", inference="single")]
    if name == "pretrain":
        r = run_quality("configs/diffsasrec_ml1m.yaml", "bench_diffsasrec", BUDGET + overrides, "ml-1m")
        single = dict(r, row="diffsasrec_single", inference="single")
        return [single, dict(multi_step(single, ROOT / "bench/runs/bench_diffsasrec"), row="diffsasrec_multi")]
    if name == "sft":
        pre = ROOT / "bench/runs/bench_diffsasrec"
        if not pre.exists():
            sys.exit(f"{pre} does not exist: run --only pretrain first")
        r = run_quality("configs/diffsasrec_ml1m.yaml", "bench_diffsasrec_sft",
                        BUDGET + SFT + [f"train.init_from={pre}"] + overrides, "ml-1m")
        single = dict(r, row="diffsasrec_sft_single", inference="single")
        return [single, dict(multi_step(single, ROOT / "bench/runs/bench_diffsasrec_sft"), row="diffsasrec_sft_multi")]
    raise SystemExit(f"unknown stage {name!r}: ce | pretrain | sft")


def table(rows: list[dict]) -> str:
    out = ["| row | head / attention | inference | epochs (best) | NDCG@10 | HR@10 | MRR@10 | coverage@10 | val NDCG@10 | s/epoch |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        m, mc = r["metrics"], r["config"]["model"]
        cells = " | ".join(f"{m[k]:.4f}" if k in m else "–" for k in COLS)
        out.append(f"| `{r['row']}` | {mc['head']} / {mc['attention']} | {r['inference']} | {r['epochs']} ({r['best_epoch']}) | "
                   f"{cells} | {r['timings']['s_per_epoch']} |")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="key=value applied to every stage")
    p.add_argument("--only", nargs="*", default=["ce", "pretrain", "sft"], help="stages to run")
    p.add_argument("--readme", action="store_true", help="write the table into the docs (docs/results.md) between its diffusion markers")
    a = p.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    path = RESULTS / "diffusion.json"
    rows = {r["row"]: r for r in (json.loads(path.read_text())["rows"] if path.exists() else [])}
    for name in a.only:
        for r in stage(name, a.overrides):
            rows[r["row"]] = r
        ordered = sorted(rows.values(), key=lambda r: ORDER.index(r["row"]) if r["row"] in ORDER else 99)
        # after every stage: a stopped sweep keeps what it measured
        write_result("diffusion", {"script": "bench/diffusion.py", "dataset": "ml-1m (sasrec/ml-1m.txt.gz)",
                                   "split": "leave_last_two", "protocol": "full", "budget": BUDGET, "sft": SFT,
                                   "multi": MULTI, "command": "python " + " ".join(["bench/diffusion.py", *sys.argv[1:]]),
                                   "rows": ordered})
    text = table(sorted(rows.values(), key=lambda r: ORDER.index(r["row"]) if r["row"] in ORDER else 99))
    print(text)
    if a.readme and rows:
        top = json.loads(path.read_text())
        text += (f"\n\nBudget for every row: {' '.join(BUDGET)}; SFT: {' '.join(SFT)} (from the pre-training run's best "
                 f"weights). {top['hardware']}, commit {top['commit'][:8]}.")
        from bench.blocks import replace_block

        replace_block("diffusion", text)


if __name__ == "__main__":
    main()
