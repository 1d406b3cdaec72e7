"""``rayrec report FOLDER``: PNG plots and a short markdown summary of a run or of many runs.

A *run* is a folder with ``final_metrics.json`` and/or ``tensorboard/`` (what ``fit`` writes), or a
Tune trial folder with ``result.json``. Given an experiment folder (runs or trials below it),
the report also compares them. Every PNG is ``SIZE`` pixels, so a reader (or a test) knows what
to expect:

    curves.png          training loss and the validation metric per epoch (one line per run)
    metrics_at_k.png    test NDCG/HR/MRR at every K (best run, or the only one) against popularity
    comparison.png      the selection metric of every run/trial, best first (two or more runs)
    report.md           the table of final metrics and the images
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

FIGSIZE, DPI = (8.0, 4.5), 100
SIZE = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))  # (width, height) of every PNG
METRIC_RE = re.compile(r"^test_(ndcg|hr|mrr)_(\d+)$")


@dataclass
class Run:
    name: str
    folder: Path
    history: list[dict] = field(default_factory=list)  # one dict per epoch: epoch, train_loss, val_*
    final: dict = field(default_factory=dict)  # test_*, best_*, baseline_pop_*
    metric: str = "val_ndcg_10"  # the run's selection metric (eval.metric)


def _is_run(p: Path) -> bool:
    return (p / "final_metrics.json").exists() or (p / "tensorboard").is_dir() or (p / "result.json").exists()


def find_runs(folder: Path, depth: int = 3) -> list[Path]:
    if _is_run(folder):
        return [folder]
    if depth == 0:
        return []
    return [r for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            for r in find_runs(sub, depth - 1)]


def _tensorboard_history(logdir: Path) -> list[dict]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    tags = [t for t in acc.Tags().get("scalars", []) if t.startswith("epoch/")]
    by_step: dict[int, dict] = {}
    for tag in tags:
        for e in acc.Scalars(tag):
            by_step.setdefault(e.step, {})[tag[len("epoch/"):]] = e.value
    # one epoch/* row per epoch: the n-th logged step is epoch n
    return [dict(v, epoch=i + 1) for i, (_, v) in enumerate(sorted(by_step.items()))]


def _result_json_history(path: Path) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    history = [r for r in rows if r.get("final") != 1 and "epoch" in r]
    finals = [r for r in rows if r.get("final") == 1 or any(k.startswith("test_") for k in r)]
    return history, (finals[-1] if finals else {})


def load_run(folder: Path, root: Path) -> Run:
    import yaml

    name = str(folder.relative_to(root)) if folder != root else folder.name
    run = Run(name=name, folder=folder)
    if (folder / "result.json").exists():
        run.history, run.final = _result_json_history(folder / "result.json")
    if (folder / "tensorboard").is_dir():
        run.history = _tensorboard_history(folder / "tensorboard") or run.history
    if (folder / "final_metrics.json").exists():
        run.final = json.loads((folder / "final_metrics.json").read_text())
    cfg = folder / "config.yaml"
    if cfg.exists():
        run.metric = ((yaml.safe_load(cfg.read_text()) or {}).get("eval") or {}).get("metric", run.metric)
    return run


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    return plt, plt.figure(figsize=FIGSIZE, dpi=DPI)


def _save(plt, fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": keep the documented pixel size
    plt.close(fig)
    return path


def plot_curves(runs: list[Run], path: Path) -> Path | None:
    if not any(r.history for r in runs):
        return None
    plt, fig = _figure()
    ax_loss, ax_val = fig.subplots(1, 2)
    for r in runs:
        ep = [h["epoch"] for h in r.history if "train_loss" in h]
        ax_loss.plot(ep, [h["train_loss"] for h in r.history if "train_loss" in h], label=r.name)
        vals = [(h["epoch"], h[r.metric]) for h in r.history if r.metric in h and math.isfinite(h[r.metric])]
        if vals:
            ax_val.plot(*zip(*vals), marker="o", markersize=3, label=r.name)
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_val):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.set(title="training loss", xlabel="epoch")
    ax_val.set(title=f"validation {runs[0].metric}", xlabel="epoch")
    if len(runs) <= 8:
        ax_val.legend(fontsize=7)
    fig.tight_layout()
    return _save(plt, fig, path)


def plot_metrics_at_k(run: Run, path: Path) -> Path | None:
    found = sorted({(m.group(1), int(m.group(2))) for k in run.final if (m := METRIC_RE.match(k))}, key=lambda x: (x[0], x[1]))
    if not found:
        return None
    plt, fig = _figure()
    ax = fig.subplots()
    labels = [f"{m.upper()}@{k}" for m, k in found]
    xs = range(len(found))
    ax.bar([x - 0.2 for x in xs], [run.final[f"test_{m}_{k}"] for m, k in found], width=0.4, label=run.name)
    pop = [run.final.get(f"baseline_pop_test_{m}_{k}", 0.0) for m, k in found]
    if any(pop):
        ax.bar([x + 0.2 for x in xs], pop, width=0.4, label="most popular")
    ax.set_xticks(list(xs), labels, rotation=30, fontsize=8)
    ax.set(title=f"test metrics (full ranking): {run.name}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(plt, fig, path)


def _best_value(r: Run) -> float:
    v = r.final.get(r.metric, r.final.get(f"best_{r.metric}"))
    if v is None:
        vals = [h[r.metric] for h in r.history if r.metric in h]
        v = max(vals) if vals else math.nan
    return float(v)


def plot_comparison(runs: list[Run], path: Path) -> Path | None:
    scored = sorted(((r.name, _best_value(r)) for r in runs), key=lambda x: -x[1] if math.isfinite(x[1]) else math.inf)
    scored = [s for s in scored if math.isfinite(s[1])]
    if len(scored) < 2:
        return None
    plt, fig = _figure()
    ax = fig.subplots()
    names, vals = zip(*scored[:30])
    ax.barh(range(len(vals)), vals)
    ax.set_yticks(range(len(vals)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set(title=f"{runs[0].metric} by run (best first)", xlabel=runs[0].metric)
    fig.tight_layout()
    return _save(plt, fig, path)


def _markdown(runs: list[Run], plots: list[Path], folder: Path, out: Path) -> str:
    keys = [k for k in ("test_ndcg_10", "test_hr_10", "test_mrr_10", "test_coverage_10", "baseline_pop_test_ndcg_10")
            if any(k in r.final for r in runs)]
    metric = runs[0].metric
    lines = [f"# rayrec report: {folder}", "", f"{len(runs)} run(s); selection metric `{metric}`; "
             "test metrics are full ranking from the best-on-validation weights.", "",
             "| run | epochs | " + " | ".join([metric] + keys) + " |", "|---|---:|" + "---:|" * (len(keys) + 1)]
    for r in sorted(runs, key=lambda r: -_best_value(r) if math.isfinite(_best_value(r)) else math.inf):
        epochs = r.final.get("epoch", r.history[-1]["epoch"] if r.history else "")
        cells = [f"{_best_value(r):.4f}"] + [f"{r.final[k]:.4f}" if isinstance(r.final.get(k), (int, float)) else "–" for k in keys]
        lines.append(f"| `{r.name}` | {epochs} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"![{p.stem}]({p.relative_to(out)})" for p in plots]
    return "\n".join(lines) + "\n"


def write_report(folder: str | Path, out: str | Path | None = None) -> dict:
    """Plots and report.md for a run or an experiment folder; returns their paths."""
    from rayrec.config import ConfigError

    folder = Path(folder).expanduser().absolute()
    if not folder.is_dir():
        raise ConfigError(f"report: {folder} is not a folder; pass a run folder or a folder of runs / Tune trials")
    paths = find_runs(folder)
    if not paths:
        raise ConfigError(f"report: no run under {folder} (a run has final_metrics.json, tensorboard/ or result.json)")
    runs = [load_run(p, folder) for p in paths]
    out = Path(out).expanduser().absolute() if out else folder / "report"
    out.mkdir(parents=True, exist_ok=True)
    best = max(runs, key=lambda r: _best_value(r) if math.isfinite(_best_value(r)) else -math.inf)
    plots = [p for p in (plot_curves(runs, out / "curves.png"), plot_metrics_at_k(best, out / "metrics_at_k.png"),
                         plot_comparison(runs, out / "comparison.png")) if p is not None]
    md = out / "report.md"
    md.write_text(_markdown(runs, plots, folder, out))
    return {"markdown": str(md), "plots": [str(p) for p in plots], "runs": [r.name for r in runs], "size": SIZE}
