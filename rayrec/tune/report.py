"""What a sweep leaves behind: HParams per trial, the results table, the best config, a plot, a leaderboard."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import yaml

from rayrec.config import Config
from rayrec.train.tb import hp_value as _hp_value
from rayrec.tune.space import tune_metric

log = logging.getLogger("rayrec.tune")


def session_names(cfg: Config, metric: str) -> list[str]:
    """Final-report metric names a trial's HParams session shows (``rayrec.train.tb.session_metric_tags``)."""
    return [metric] + [f"{s}_{m}_{k}" for s in ("val", "test") for m in ("ndcg", "hr") for k in cfg.eval.ks]


def write_trial_hparams(cfg: Config, sampled: dict[str, Any], metric: str) -> None:
    """The trial's one HParams session, in its run's own TensorBoard folder, written when the trial
    first starts: the sweep's searched keys (``train.lr``: the same names as the results table) and
    the trial name. TensorBoard reads the metric values from the scalars of the same folder
    (``epoch/val_*`` every validation pass, ``final/*`` when the trial completes), so a trial that
    ASHA stopped or that was interrupted still shows up with its last values. The run's own
    end-of-run call (``TBLogger.hparams``) finds this session and adds no second one.
    """
    from torch.utils.tensorboard import SummaryWriter

    from rayrec.train.tb import session_metric_tags, write_session

    logdir = cfg.run_dir / "tensorboard"
    writer = SummaryWriter(str(logdir))
    try:
        write_session(writer, logdir, {**sampled, "trial": cfg.name}, session_metric_tags(session_names(cfg, metric)))
    finally:
        writer.close()


# A trial's status in the results table: completed, stopped (by ASHA), interrupted, pending, error.
# Tune's own TERMINATED covers both a trial that finished and one ASHA stopped; RUNNING/PENDING/PAUSED
# in the state Tune saved last means the driver was interrupted (docs/tune.md#resume).
FINISHED = ("completed", "stopped")  # what best_config.yaml chooses among


def tune_statuses(exp_dir: Path) -> dict[str, str]:
    """Tune's status of every trial (``RUNNING``, ``TERMINATED``, ``ERROR``...) by trial folder name,
    from the sweep's newest experiment state. That file is Tune's last word before it stops the
    trials of an interrupted sweep; the ResultGrid's Trial objects are read after that stop and say
    TERMINATED for interrupted trials too."""
    from rayrec.tune.storage import STATE_FILES

    files = sorted(Path(exp_dir).glob(STATE_FILES))
    if not files:
        return {}
    try:
        state = json.loads(files[-1].read_text())
        out = {}
        for trial_json, _ in state["trial_data"]:
            t = json.loads(trial_json)
            out[f"trial_{t['trial_id'].rsplit('_', 1)[-1]}"] = str(t["status"])  # sweep.trial_name
        return out
    except (ValueError, KeyError, TypeError, OSError) as e:
        log.warning("could not read trial statuses from %s (%s): unfinished trials read as stopped", files[-1], e)
        return {}


def _status(res, metrics: dict, tune_status: str | None = None) -> str:
    if res.error is not None:
        return "error"
    if metrics.get("final") == 1:
        return "completed"
    if tune_status is None or tune_status == "TERMINATED":
        return "stopped"
    return "interrupted" if metrics else "pending"


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
    statuses = tune_statuses(Path(grid.experiment_path))
    rows = []
    for res in grid:
        metrics = dict(res.metrics or {})
        df = res.metrics_dataframe
        name = Path(res.path).name
        row: dict[str, Any] = {"trial": name, "status": _status(res, metrics, statuses.get(name))}
        best = math.nan
        if df is not None and metric in df:
            vals = df[metric].dropna()
            if len(vals):
                best = float(vals.max() if sign > 0 else vals.min())
        row[f"best_{metric}"] = best
        trained = metrics.get("epochs", metrics.get("epoch"))  # the final row says "epochs"; a pass row "epoch"
        row["epochs"] = int(trained) if trained is not None else 0
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


def best_rule(cfg: Config) -> str:
    metric = tune_metric(cfg)
    return (f"the {'highest' if cfg.tune.mode == 'max' else 'lowest'} best_{metric} among completed or ASHA-stopped "
            "trials with a finite value; "
            "interrupted, pending and failed trials are never chosen")


def best_trial(cfg: Config, table):
    """The row best_config.yaml is written from: best on validation among finished trials (completed,
    or stopped by ASHA) with a finite validation metric; never an interrupted or failed trial, whose
    test metrics are missing. None when no trial qualifies (yet)."""
    metric = tune_metric(cfg)
    if not len(table):
        return None
    ok = table[table["status"].isin(FINISHED)].dropna(subset=[f"best_{metric}"])
    ok = ok[ok[f"best_{metric}"].map(lambda v: math.isfinite(float(v)))]
    return ok.iloc[0] if len(ok) else None


def best_config(cfg: Config, exp_dir: Path, table, grid) -> Path | None:
    """The best trial's full config as a YAML that ``jobs/train.py`` runs (a fresh run, not a resume)."""
    from rayrec.tune.sweep import trial_config

    metric = tune_metric(cfg)
    top = best_trial(cfg, table)
    path = exp_dir / "best_config.yaml"
    if top is None:
        path.unlink(missing_ok=True)  # never leave one that the summary does not vouch for
        return None
    sampled = next(res.config for res in grid if Path(res.path).name == top["trial"])
    run = trial_config(cfg.to_dict(), sampled, str(exp_dir), f"{exp_dir.name}_best")
    run.output_dir = cfg.output_dir
    raw = run.to_dict()
    raw["train"]["betas"] = list(raw["train"]["betas"])
    raw.pop("tune")
    unfinished = int(table["status"].isin(("interrupted", "pending")).sum())
    interim = (f"# Interim: {unfinished} trial(s) unfinished; resume the sweep to finish them:\n"
               f"#   python jobs/tune.py --resume {exp_dir}\n") if unfinished else ""
    header = (f"# Best trial {top['trial']} ({top['status']}) of the sweep {exp_dir} ({metric} = {top[f'best_{metric}']:.4f}),\n"
              f"# chosen as {best_rule(cfg)}.\n{interim}"
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
    statuses = tune_statuses(exp_dir)
    fig, ax = plt.subplots(figsize=(8, 5))
    for res in sorted(grid, key=lambda r: Path(r.path).name):
        df = res.metrics_dataframe
        if df is None or metric not in df or "epoch" not in df:
            continue
        if "final" in df:
            df = df[df["final"] != 1]
        df = df.dropna(subset=[metric])
        unfinished = statuses.get(Path(res.path).name, "TERMINATED") not in ("TERMINATED", "ERROR")
        style = ":" if res.error is not None else ("--" if unfinished else "-")  # failed, interrupted, finished
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


def strict_json(obj):
    """``obj`` with every NaN/inf as None and numpy scalars as Python ones: strict JSON (no bare NaN)."""
    if isinstance(obj, dict):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):  # numpy scalar
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def resume_command(exp_dir: Path) -> str:
    return f"python jobs/tune.py --resume {exp_dir}"


def write_outputs(cfg: Config, exp_dir: Path, grid):
    table = results_table(cfg, grid)
    table.to_parquet(exp_dir / "results.parquet", index=False)
    table.to_csv(exp_dir / "results.csv", index=False)
    best = best_config(cfg, exp_dir, table, grid) if len(table) else None
    top = best_trial(cfg, table)
    plot_metric(cfg, exp_dir, grid)
    board = leaderboard(cfg, table) if len(table) else "no trials"
    unfinished = list(table.loc[table["status"].isin(("interrupted", "pending")), "trial"]) if len(table) else []
    summary = {"experiment": str(exp_dir), "metric": tune_metric(cfg), "mode": cfg.tune.mode, "trials": len(table),
               "by_status": table["status"].value_counts().to_dict() if len(table) else {},
               "complete": not unfinished,
               "unfinished": unfinished,
               "resume": resume_command(exp_dir) if unfinished else None,
               "best_rule": best_rule(cfg),
               "best_config": str(best) if best else None,
               "best": top.to_dict() if top is not None else None}
    text = json.dumps(strict_json(summary), indent=2, allow_nan=False)
    (exp_dir / "summary.json").write_text(text + "\n")
    return table, best, board
