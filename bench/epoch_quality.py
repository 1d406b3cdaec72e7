"""Quality per epoch: the SASRec paper config trained with every batch max_len wide, with length
buckets (``train.bucket_by_length``) and with buckets on 2 Ray Train workers, side by side on
``sasrec/ml-1m.txt.gz``.

    python bench/epoch_quality.py [--epochs 20] [--eval-every 5] [--seeds 42 7] [--modes plain buckets ray2]
                                  [--reference LOG.json ...]

Each run is ``configs/sasrec_ml1m.yaml`` through ``fit`` (Ray Train: 1 worker with 2 CPUs, or 2 with
1 each) for the same number of epochs with no early stop; validation NDCG@10 (full ranking and
sampled-100) every few epochs, test NDCG@10 of the best-on-validation weights, and the median
seconds per epoch.
``bench/train_speed.py`` says how much faster an epoch is; this says what an epoch is worth.

``--reference FILE`` adds the per-epoch log of another trainer run on the same file (a JSON list of
``{"epoch", "epoch_s", "val_sampled_ndcg_10", "test_sampled_ndcg_10", ...}``), such as the
SASRec.pytorch port run on this machine in the same hour, so its numbers sit in the same table.
Its sampled-100 protocol draws new negatives at every evaluation; rayrec's are fixed and persisted,
so the two agree in expectation, not draw for draw. No code of another trainer is part of rayrec.

Results: bench/results/epoch_quality.json and a printed table.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, SHARED_DATA, sha256, write_result  # noqa: E402

CONFIG = ROOT / "configs" / "sasrec_ml1m.yaml"
CURVE = ("val_ndcg_10", "val_sampled_ndcg_10")
FINAL = ("best_epoch", "test_ndcg_10", "test_sampled_ndcg_10", "test_hr_10")


MODES = {  # how each mode builds its batches
    "plain": ["train.bucket_by_length=false"],
    "buckets": ["train.bucket_by_length=true"],
    # two Ray Train workers (DDP, 1 CPU each) with buckets: the same global batch of 128, split
    "ray2": ["train.bucket_by_length=true", "scale.num_workers=2", "scale.cpus_per_worker=1"],
}


def train(mode: str, seed: int, epochs: int, every: int, src: Path, tmp: str) -> dict:
    from rayrec.config import load_config
    from rayrec.train.fit import fit

    cfg = load_config(CONFIG, [f"data.source.path={src}", f"output_dir={tmp}", f"name=epoch_quality_{mode}_{seed}",
                               *MODES[mode], f"train.epochs={epochs}",
                               f"train.eval_every={every}", "train.patience=0", f"train.seed={seed}"])
    res = fit(cfg)
    rows = [h for h in res.history if h.get("final") != 1]
    times = sorted(h["epoch_s"] for h in rows if math.isfinite(h.get("epoch_s", math.nan)))
    curve = {int(h["epoch"]): {k: round(h[k], 5) for k in CURVE} for h in rows
             if math.isfinite(h.get("val_ndcg_10", math.nan))}  # epochs without a validation pass have none
    final = {k: (round(res.metrics[k], 5) if isinstance(res.metrics.get(k), float) else res.metrics.get(k)) for k in FINAL}
    return {"run": f"{mode}/seed{seed}", "mode": mode, "seed": seed, "s_per_epoch": round(times[len(times) // 2], 3),
            "curve": curve, **final}


def reference(path: Path) -> dict:
    """A foreign trainer's per-epoch log, in the same row shape."""
    log = json.loads(path.read_text())
    if not isinstance(log, list) or not all(isinstance(r, dict) and "epoch" in r and "epoch_s" in r for r in log):
        sys.exit(f"--reference {path}: expected a JSON list of objects with 'epoch' and 'epoch_s'")
    times = sorted(r["epoch_s"] for r in log)
    curve = {int(r["epoch"]): {k: round(r[k], 5) for k in ("val_sampled_ndcg_10", "test_sampled_ndcg_10") if k in r}
             for r in log if "val_sampled_ndcg_10" in r}
    return {"run": f"reference/{path.stem}", "mode": "reference", "s_per_epoch": round(times[len(times) // 2], 3),
            "curve": curve, "source": str(path)}


def summary(rows: list[dict], modes: list[str]) -> dict:
    """Means over seeds per mode; speed and quality ratios against plain and the first reference."""
    metrics = {}
    for mode in modes:
        mine = [r for r in rows if r["mode"] == mode]
        for key in ("test_ndcg_10", "test_sampled_ndcg_10"):
            metrics[f"{mode}_{key}_mean"] = round(sum(r[key] for r in mine) / len(mine), 5)
        metrics[f"{mode}_s_per_epoch"] = round(sum(r["s_per_epoch"] for r in mine) / len(mine), 3)
    for mode in set(modes) - {"plain"} if "plain" in modes else ():
        metrics[f"{mode}_vs_plain_test_ndcg_10"] = round(metrics[f"{mode}_test_ndcg_10_mean"] / metrics["plain_test_ndcg_10_mean"], 4)
        metrics[f"{mode}_speedup"] = round(metrics["plain_s_per_epoch"] / metrics[f"{mode}_s_per_epoch"], 3)
    ref = next((r for r in rows if r["mode"] == "reference"), None)
    if ref is not None:  # the reference has no selection: its last evaluation, against our best-on-validation test
        last = ref["curve"][max(ref["curve"])] if ref["curve"] else {}
        metrics["reference_s_per_epoch"] = ref["s_per_epoch"]
        if "test_sampled_ndcg_10" in last:
            metrics["reference_test_sampled_ndcg_10_last"] = last["test_sampled_ndcg_10"]
        for mode in modes:
            metrics[f"{mode}_speedup_vs_reference"] = round(ref["s_per_epoch"] / metrics[f"{mode}_s_per_epoch"], 3)
            if "test_sampled_ndcg_10" in last:
                metrics[f"{mode}_vs_reference_test_sampled_ndcg_10"] = round(
                    metrics[f"{mode}_test_sampled_ndcg_10_mean"] / last["test_sampled_ndcg_10"], 4)
    return metrics


def table(rows: list[dict], epochs: list[int]) -> str:
    head = ["run", "s_per_epoch", *[f"val_sampled@{e}" for e in epochs], *[f"val_full@{e}" for e in epochs],
            "test_full", "test_sampled"]
    out = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        c = r["curve"]
        cells = [r["run"], f"{r['s_per_epoch']:.2f}"]
        cells += [f"{c[e]['val_sampled_ndcg_10']:.4f}" if e in c and "val_sampled_ndcg_10" in c[e] else "–" for e in epochs]
        cells += [f"{c[e]['val_ndcg_10']:.4f}" if e in c and "val_ndcg_10" in c[e] else "–" for e in epochs]
        last = c.get(max(c), {}) if c else {}
        cells += [f"{r['test_ndcg_10']:.4f}" if r.get("test_ndcg_10") is not None else "–",
                  f"{r['test_sampled_ndcg_10']:.4f}" if r.get("test_sampled_ndcg_10") is not None
                  else (f"{last['test_sampled_ndcg_10']:.4f} (last)" if "test_sampled_ndcg_10" in last else "–")]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--seeds", type=int, nargs="+", default=[42])
    p.add_argument("--modes", nargs="+", default=["plain", "buckets"], choices=sorted(MODES))
    p.add_argument("--reference", type=Path, nargs="*", default=[], help="per-epoch JSON logs of another trainer")
    a = p.parse_args(argv)
    if a.epochs < 1 or a.eval_every < 1 or a.eval_every > a.epochs:
        sys.exit("--epochs and --eval-every must be >= 1, and --eval-every <= --epochs")
    refs = [reference(r) for r in a.reference]  # checked before hours of training, not after

    from rayrec.config import load_config
    from rayrec.data.prepare import ensure_log
    from rayrec.ray_env import init_ray

    src = SHARED_DATA / "sasrec" / "ml-1m.txt.gz"
    if not src.exists():
        sys.exit(f"dataset file {src} not found: set RAYREC_SHARED_DATA")
    ensure_log(load_config(CONFIG, [f"data.source.path={src}"]).data)
    init_ray(num_cpus=2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in a.seeds:
            for mode in a.modes:
                r = train(mode, seed, a.epochs, a.eval_every, src, tmp)
                print(json.dumps(r), flush=True)
                rows.append(r)
    rows += refs
    epochs = sorted({e for r in rows for e in r["curve"]})
    metrics = summary(rows, a.modes)
    out = write_result("epoch_quality", {
        "script": "bench/epoch_quality.py", "command": "python " + " ".join(["bench/epoch_quality.py", *(argv or sys.argv[1:])]),
        "dataset": "ml-1m", "data_sha256": sha256(src), "config": str(CONFIG.relative_to(ROOT)), "protocol": "both",
        "epochs": a.epochs, "metrics": metrics, "rows": rows,
    })
    print(table(rows, epochs))
    print(json.dumps(metrics, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
