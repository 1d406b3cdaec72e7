"""What a sweep leaves behind: HParams per trial, the results table, the best config, a plot, a leaderboard."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import yaml

from rayrec.config import Config
from rayrec.tune.space import tune_metric

log = logging.getLogger("rayrec.tune")


def _hp_value(v: Any):
    return v if isinstance(v, (int, float, str, bool)) else str(v)


def write_trial_hparams(cfg: Config, sampled: dict[str, Any], metric: str) -> None:
    """HParams session for one trial in its own TensorBoard folder, written when the trial first starts.

    TensorBoard reads a session's metric values from the scalars of the same folder (``epoch/val_*``,
    written by rank 0 every validation pass), so a trial that ASHA stops early still shows up in the
    HParams dashboard with its last values.
    """
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    hp = {k: _hp_value(v) for k, v in sorted(sampled.items())}
    hp["trial"] = cfg.name
    tags = {f"epoch/{metric}"} | {f"epoch/val_{m}_{k}" for m in ("ndcg", "hr") for k in cfg.eval.ks}
    exp, ssi, _ = hparams(hp, {t: 0.0 for t in sorted(tags | {"epoch/train_loss"})})
    writer = SummaryWriter(str(cfg.run_dir / "tensorboard"))
    try:
        writer.file_writer.add_summary(exp)
        writer.file_writer.add_summary(ssi)
    finally:
        writer.close()


def _status(res, metrics: dict) -> str:
    if res.error is not None:
        return "error"
    return "completed" if metrics.get("final") == 1 else "stopped"


def _error_text(err) -> str:
    text = str(err).strip().splitlines()
    # Ray wraps the trial's exception; its last lines name the real problem
    useful = [ln for ln in text if ln.strip() and not ln.startswith(("Traceback", "  File", "    "))]
    return (useful[-1] if useful else (text[-1] if text else repr(err)))[:500]


def results_table(cfg: Config, grid):
    """One row per trial: status, best metric over its validation passes, test metrics of completed
    trials (from their best-on-validation weights), every searched key, and the error of failed ones."""
    import pandas as pd

    metric, sign = tune_metric(cfg), (1 if cfg.tune.mode == "max" else -1)
    rows = []
    for res in grid:
        metrics = dict(res.metrics or {})
        df = res.metrics_dataframe
        row: dict[str, Any] = {"trial": Path(res.path).name, "status": _status(res, metrics)}
        best = math.nan
        if df is not None and metric in df:
            vals = df[metric].dropna()
            if len(vals):
                best = float(vals.max() if sign > 0 else vals.min())
        row[f"best_{metric}"] = best
        row["epochs"] = int(metrics["epoch"]) if "epoch" in metrics else 0
        row["best_epoch"] = int(metrics["best_epoch"]) if "best_epoch" in metrics else None
        for k, v in metrics.items():
            if k.startswith("test_") and not k.endswith(("_users", "_repeat_targets", "_users_sampled_from")):
                row[k] = float(v)
        for k, v in sorted((res.config or {}).items()):
            row[f"config/{k}"] = _hp_value(v)
        row["error"] = _error_text(res.error) if res.error is not None else ""
        row["run_dir"] = str(Path(res.path).parent / "runs" / Path(res.path).name)
        rows.append(row)
    table = pd.DataFrame(rows)
    if len(table):
        table = table.sort_values(f"best_{metric}", ascending=sign < 0, na_position="last").reset_index(drop=True)
    return table


def best_config(cfg: Config, exp_dir: Path, table, grid) -> Path | None:
    """The best trial's full config as a YAML that ``jobs/train.py`` runs (a fresh run, not a resume)."""
    from rayrec.tune.sweep import trial_config

    metric = tune_metric(cfg)
    ok = table[table["status"] != "error"].dropna(subset=[f"best_{metric}"])
    if not len(ok):
        return None
    top = ok.iloc[0]
    sampled = next(res.config for res in grid if Path(res.path).name == top["trial"])
    run = trial_config(cfg.to_dict(), sampled, str(exp_dir), f"{exp_dir.name}_best")
    run.output_dir = cfg.output_dir
    raw = run.to_dict()
    raw["train"]["betas"] = list(raw["train"]["betas"])
    raw.pop("tune")
    path = exp_dir / "best_config.yaml"
    header = (f"# Best trial {top['trial']} of the sweep {exp_dir} ({metric} = {top[f'best_{metric}']:.4f}).\n"
              f"#   python jobs/train.py {path}\n")
    path.write_text(header + yaml.safe_dump(raw, sort_keys=False))
    return path


def plot_metric(cfg: Config, exp_dir: Path, grid) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no metric_by_epoch.png (pip install matplotlib)")
        return None
    metric = tune_metric(cfg)
    fig, ax = plt.subplots(figsize=(8, 5))
    for res in sorted(grid, key=lambda r: Path(r.path).name):
        df = res.metrics_dataframe
        if df is None or metric not in df or "epoch" not in df:
            continue
        if "final" in df:
            df = df[df["final"] != 1]
        df = df.dropna(subset=[metric])
        style = ":" if res.error is not None else "-"
        ax.plot(df["epoch"], df[metric], style, marker="o", ms=3, label=Path(res.path).name)
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{exp_dir.name}: {metric} per trial")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    out = exp_dir / "metric_by_epoch.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def leaderboard(cfg: Config, table, top: int = 20) -> str:
    metric = tune_metric(cfg)
    keys = [c for c in table.columns if c.startswith("config/")]
    cols = ["trial", "status", f"best_{metric}", "epochs", *keys] + (["test_ndcg_10"] if "test_ndcg_10" in table else [])

    def cell(v):
        if isinstance(v, float):
            return "–" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    rows = [[c.removeprefix("config/") for c in cols]] + [[cell(r[c]) for c in cols] for _, r in table.head(top).iterrows()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for _, r in table[table["status"] == "error"].iterrows():
        lines.append(f"{r['trial']} failed: {r['error']}")
    return "\n".join(lines)


def write_outputs(cfg: Config, exp_dir: Path, grid):
    table = results_table(cfg, grid)
    table.to_parquet(exp_dir / "results.parquet", index=False)
    table.to_csv(exp_dir / "results.csv", index=False)
    best = best_config(cfg, exp_dir, table, grid) if len(table) else None
    plot_metric(cfg, exp_dir, grid)
    board = leaderboard(cfg, table) if len(table) else "no trials"
    summary = {"experiment": str(exp_dir), "metric": tune_metric(cfg), "mode": cfg.tune.mode, "trials": len(table),
               "by_status": table["status"].value_counts().to_dict() if len(table) else {},
               "best_config": str(best) if best else None,
               "best": table.iloc[0].to_dict() if len(table) else None}
    (exp_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return table, best, board
