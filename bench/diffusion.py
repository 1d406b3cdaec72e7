"""DiffSASRec next to SASRec-CE on the same data, split, protocol and model size, each trained to
convergence under early stopping on validation (issue 25).

    RAYREC_SHARED_DATA=/path/to/shared/data python bench/diffusion.py                # every stage
    python bench/diffusion.py --only ce            # one stage: ce | pretrain | sft | ce_ts | pretrain_ts
    python bench/diffusion.py train.epochs=10 --only pretrain                         # overrides for every stage

Rows: SASRec-CE (causal, full softmax); DiffSASRec pre-trained with RECIPE (what the probes of
bench/diffusion_probes.py found), evaluated single-step (one mask token; scores through the shared
evaluation path) and multi-step (10 mask tokens, threshold 0.9, decay 0.9); DiffSASRec after SFT
(from pre-training's best weights), single- and multi-step; and SASRec-CE and DiffSASRec on
MovieLens-1M with real timestamps under ``data.split=time`` (``*_ts`` rows). Model selection uses
single-step validation NDCG@10 (test is never looked at); the multi-step rows evaluate those same
best-on-validation weights. Results accumulate in bench/results/diffusion.json (one entry per
row, replaced when re-run) and print as a table.
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

# what every row shares: max_len 50, hidden 64, 2 blocks, 1 head, dropout 0.1, batch 128, lr 1e-3;
# trained until validation NDCG@10 (every 5 epochs) has not improved for 6 passes (30 epochs)
BUDGET = ["model.max_len=50", "model.hidden=64", "model.num_blocks=2", "model.num_heads=1", "model.dropout=0.1",
          "train.batch_size=128", "train.lr=0.001", "train.epochs=400", "train.eval_every=5", "train.patience=6",
          "eval.protocol=full", "eval.ks=[5,10,20]"]
# DiffSASRec's training recipe (bench/results/diffusion_probes.json): small embedding init, random
# training windows over the whole history, BERT4Rec's fixed mask ratio, half the rows next-item queries,
# twice the budget's learning rate (validation NDCG@10 at epoch 20: 0.0708 at 2e-3, 0.0582 at 1e-3, 0.0682 at 4e-3)
RECIPE = ["model.emb_init_std=0.02", "train.window_crop=1", "model.diffusion_schedule=fixed",
          "model.diffusion_mask_prob=0.2", "model.diffusion_last_prob=0.5", "train.lr=0.002"]
# SFT: the next-item query only (final position masked), on random windows, from pre-training's best weights;
# lr 5e-4 with cosine decay over 50 epochs (best validation NDCG@10 0.1572, against 0.1545 at a constant
# 2.5e-4 and 0.1520 at a constant 5e-4, from the same pre-trained weights: bench/results/diffusion_probes.json)
SFT = ["train.stage=sft", "train.lr=0.0005", "train.lr_schedule=cosine", "train.epochs=50", "train.patience=4"]
# MovieLens-1M with real timestamps (users 1-2999, ../shared/data/ml-1m), split at the 0.95 time quantile
TS = ["data.log=data/ml-1m-ts/interactions.parquet", "data.source.kind=movielens",
      "data.source.path=../shared/data/ml-1m/ratings.first487650.dat.gz", "data.split=time"]
MULTI = ["eval.diffusion_inference=multi", "eval.ks=[5,10]", "eval.diffusion_k=10",
         "eval.diffusion_threshold=0.9", "eval.diffusion_decay=0.9"]
COLS = ["test_ndcg_10", "test_hr_10", "test_mrr_10", "test_coverage_10", "val_ndcg_10"]
STAGES = ("ce", "pretrain", "sft", "ce_ts", "pretrain_ts")
ORDER = ["sasrec_ce", "diffsasrec_single", "diffsasrec_multi", "diffsasrec_sft_single", "diffsasrec_sft_multi",
         "sasrec_ce_ts", "diffsasrec_ts_single", "diffsasrec_ts_multi"]


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
    split = {"split": "time", "dataset": "ml-1m-ts"} if name.endswith("_ts") else {"split": "leave_last_two"}
    data = TS if name.endswith("_ts") else []
    suffix = "_ts" if name.endswith("_ts") else ""
    if name in ("ce", "ce_ts"):
        r = run_quality("configs/sasrec_ce_ml1m.yaml", f"bench_diff_sasrec_ce{suffix}", BUDGET + data + overrides,
                        split.get("dataset", "ml-1m"))
        return [dict(r, row=f"sasrec_ce{suffix}", inference="single", **split)]
    if name in ("pretrain", "pretrain_ts"):
        run = f"bench_diffsasrec{suffix}"
        r = run_quality("configs/diffsasrec_ml1m.yaml", run, BUDGET + RECIPE + data + overrides, split.get("dataset", "ml-1m"))
        single = dict(r, row=f"diffsasrec{suffix}_single", inference="single", **split)
        return [single, dict(multi_step(single, ROOT / "bench/runs" / run), row=f"diffsasrec{suffix}_multi")]
    if name == "sft":
        pre = ROOT / "bench/runs/bench_diffsasrec"
        if not pre.exists():
            sys.exit(f"{pre} does not exist: run --only pretrain first")
        r = run_quality("configs/diffsasrec_ml1m.yaml", "bench_diffsasrec_sft",
                        BUDGET + RECIPE + SFT + [f"train.init_from={pre}"] + overrides, "ml-1m")
        single = dict(r, row="diffsasrec_sft_single", inference="single", **split)
        return [single, dict(multi_step(single, ROOT / "bench/runs/bench_diffsasrec_sft"), row="diffsasrec_sft_multi")]
    raise SystemExit(f"unknown stage {name!r}: ce | pretrain | sft | ce_ts | pretrain_ts")


def table(rows: list[dict]) -> str:
    out = ["| row | split | head / attention | inference | epochs (best) | NDCG@10 | HR@10 | MRR@10 | coverage@10 | val NDCG@10 | s/epoch |",
           "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        m, mc = r["metrics"], r["config"]["model"]
        cells = " | ".join(f"{m[k]:.4f}" if k in m else "–" for k in COLS)
        out.append(f"| `{r['row']}` | {r.get('split', 'leave_last_two')} | {mc['head']} / {mc['attention']} | {r['inference']} | {r['epochs']} ({r['best_epoch']}) | "
                   f"{cells} | {r['timings']['s_per_epoch']} |")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="key=value applied to every stage")
    # choices: an override written after --only would otherwise be taken for a stage name
    p.add_argument("--only", nargs="*", choices=STAGES, default=list(STAGES), help="stages to run (overrides go before --only)")
    p.add_argument("--readme", action="store_true", help="write the table into the docs (docs/results.md) between its diffusion markers")
    a = p.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    path = RESULTS / "diffusion.json"
    mine: dict[str, dict] = {}
    for name in a.only:
        for r in stage(name, a.overrides):
            mine[r["row"]] = dict(r, command="python " + " ".join(["bench/diffusion.py", *a.overrides, "--only", name]))
        # read again before writing: another call running other stages may have written rows meanwhile
        rows = {r["row"]: r for r in (json.loads(path.read_text())["rows"] if path.exists() else [])} | mine
        ordered = sorted(rows.values(), key=lambda r: ORDER.index(r["row"]) if r["row"] in ORDER else 99)
        # after every stage: a stopped sweep keeps what it measured
        write_result("diffusion", {"script": "bench/diffusion.py", "dataset": "ml-1m (sasrec/ml-1m.txt.gz)",
                                   "split": "leave_last_two (rows *_ts: time)", "protocol": "full", "budget": BUDGET,
                                   "recipe": RECIPE, "sft": SFT, "time_split_data": TS,
                                   "multi": MULTI, "command": "python " + " ".join(["bench/diffusion.py", *sys.argv[1:]]),
                                   "rows": ordered})
    rows = {r["row"]: r for r in (json.loads(path.read_text())["rows"] if path.exists() else [])}
    text = table(sorted(rows.values(), key=lambda r: ORDER.index(r["row"]) if r["row"] in ORDER else 99))
    print(text)
    if a.readme and rows:
        top = json.loads(path.read_text())
        text += (f"\n\nEvery row: {' '.join(BUDGET)} (early stopping on validation); DiffSASRec: {' '.join(RECIPE)}; "
                 f"SFT: {' '.join(SFT)} (from the pre-training run's best weights); `*_ts` rows: MovieLens-1M with real "
                 f"timestamps, data.split=time; a run's epoch cap and patience, where given on the command line, are in "
                 f"its row of bench/results/diffusion.json. {top['hardware']}, commit {top['commit'][:8]}.")
        from bench.blocks import replace_block

        replace_block("diffusion", text)


if __name__ == "__main__":
    main()
