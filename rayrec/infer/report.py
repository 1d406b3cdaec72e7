"""``rayrec report FOLDER``: PNG plots and a short markdown summary of a run or of many runs.

A *run* is a folder with ``final_metrics.json`` and/or ``tensorboard/`` (what ``fit`` writes), or a
Tune trial folder with ``result.json``. Given an experiment folder (runs or trials below it),
the report also compares them. A Tune sweep holds each trial twice, as Tune's trial folder
(``<sweep>/trial_X``, result.json) and as its Train run (``<sweep>/runs/trial_X``): the report
counts it once, as ``<sweep>/trial_X``, from the Train run (Tune's log fills in what the run lacks).
Every PNG is ``SIZE`` pixels, so a reader (or a test) knows what to expect:

    curves.png          training loss and the validation metric per epoch (one line per run, legend)
    metrics_at_k.png    test NDCG/HR/MRR at every K (best run, or the only one) against popularity
    comparison.png      the selection metric of every run/trial, best first (two or more runs)
    report.md           the table of final metrics and the images
    plots.json          what each PNG was drawn with: per axes its title, axis labels, legend
                        entries and line styles (read from the figure before it was saved)
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

FIGSIZE, DPI = (8.0, 4.5), 100
SIZE = (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))  # (width, height) of every PNG
METRIC_RE = re.compile(r"^test_(ndcg|hr|mrr)_(\d+)$")
PLOTS_JSON = "plots.json"


@dataclass
class Run:
    name: str
    folder: Path
    history: list[dict] = field(default_factory=list)  # one dict per epoch: epoch, train_loss, val_*
    final: dict = field(default_factory=dict)  # test_*, best_*, baseline_pop_*
    metric: str = "val_ndcg_10"  # the run's selection metric (eval.metric)


def _is_run(p: Path) -> bool:
    return (p / "final_metrics.json").exists() or (p / "tensorboard").is_dir() or (p / "result.json").exists()


def _train_twin(p: Path) -> Path | None:
    """The Train run of a Tune trial folder (``<sweep>/trial_X`` -> ``<sweep>/runs/trial_X``), if any."""
    twin = p.parent / "runs" / p.name
    return twin if (p / "result.json").exists() and twin != p and _is_run(twin) else None


def _tune_twin(p: Path) -> Path | None:
    """The Tune trial folder of a sweep trial's Train run (``<sweep>/runs/trial_X`` -> ``<sweep>/trial_X``)."""
    twin = p.parent.parent / p.name
    return twin if p.parent.name == "runs" and (twin / "result.json").exists() else None


def find_runs(folder: Path, depth: int = 3) -> list[Path]:
    """Run folders under ``folder``, each Tune trial once (its Train run when the sweep has one)."""
    found = _find(folder, depth)
    return list(dict.fromkeys(_train_twin(p) or p for p in found))


def _find(folder: Path, depth: int) -> list[Path]:
    if _is_run(folder):
        return [folder]
    if depth == 0:
        return []
    return [r for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            for r in _find(sub, depth - 1)]


@contextlib.contextmanager
def _quiet_tensorboard():
    """TensorBoard's event reader logs every file switch at INFO ("Directory watcher advancing...",
    "No path found after..."): not the report's business."""
    tb_log = logging.getLogger("tensorboard")
    level = tb_log.level
    tb_log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        tb_log.setLevel(level)


def _tensorboard_history(logdir: Path) -> list[dict]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with _quiet_tensorboard():
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
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # blank, or a line cut off by a kill
            continue
    by_epoch: dict[int, dict] = {}  # older sweeps logged a resumed epoch twice: the later row wins
    for r in rows:
        if r.get("final") != 1 and isinstance(r.get("epoch"), (int, float)):
            by_epoch[int(r["epoch"])] = r
    history = [by_epoch[e] for e in sorted(by_epoch)]
    finals = [r for r in rows if r.get("final") == 1 or any(k.startswith("test_") for k in r)]
    return history, (finals[-1] if finals else {})


def load_run(folder: Path, root: Path) -> Run:
    import yaml

    tune_trial = _tune_twin(folder)
    shown = tune_trial if tune_trial is not None else folder  # a sweep trial is named by its trial folder
    name = str(shown.relative_to(root)) if folder != root and shown.is_relative_to(root) else shown.name
    run = Run(name=name, folder=folder)
    for f in ((tune_trial / "result.json") if tune_trial else None, folder / "result.json"):
        if f is not None and f.exists():
            history, final = _result_json_history(f)
            run.history, run.final = history or run.history, final or run.final
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


def describe(fig) -> dict:
    """What a figure shows, read from its axes: title, axis labels, legend entries, line styles."""
    from matplotlib.colors import to_hex

    axes = []
    for ax in fig.axes:
        legend = ax.get_legend()
        axes.append({"title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(),
                     "legend": [t.get_text() for t in legend.get_texts()] if legend else [],
                     "texts": [t.get_text() for t in ax.texts],
                     "lines": [{"label": ln.get_label(), "color": to_hex(ln.get_color()), "linestyle": ln.get_linestyle()}
                               for ln in ax.get_lines() if not ln.get_label().startswith("_")]})
    figure_legends = [[t.get_text() for t in lg.get_texts()] for lg in fig.legends]
    return {"axes": axes, "figure_legend": figure_legends[0] if figure_legends else []}


def _save(plt, fig, path: Path, described: dict | None = None) -> Path:
    if described is not None:
        described[path.name] = describe(fig)
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": keep the documented pixel size
    plt.close(fig)
    return path


LINESTYLES = ("-", "--", "-.", ":")


def run_style(i: int) -> dict:
    """Colour and line style of the i-th run: 10 colours, then the next line style (40 distinct)."""
    import matplotlib

    colours = matplotlib.colormaps["tab10"].colors
    return {"color": colours[i % len(colours)], "linestyle": LINESTYLES[(i // len(colours)) % len(LINESTYLES)]}


def plot_curves(runs: list[Run], path: Path, described: dict | None = None) -> Path | None:
    if not any(r.history for r in runs):
        return None
    plt, fig = _figure()
    ax_loss, ax_val = fig.subplots(1, 2)
    handles = []
    for i, r in enumerate(runs):
        style = run_style(i)
        ep = [h["epoch"] for h in r.history if "train_loss" in h]
        (line,) = ax_loss.plot(ep, [h["train_loss"] for h in r.history if "train_loss" in h], label=r.name, **style)
        vals = [(h["epoch"], h[r.metric]) for h in r.history if r.metric in h and math.isfinite(h[r.metric])]
        if vals:
            (line,) = ax_val.plot(*zip(*vals), marker="o", markersize=3, label=r.name, **style)
        handles.append(line)
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_val):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    ax_loss.set(title="training loss", xlabel="epoch", ylabel="training loss (mean per step)")
    ax_val.set(title=f"validation {runs[0].metric}", xlabel="epoch", ylabel=runs[0].metric)
    if len(runs) <= 3:
        ax_val.legend(handles, [r.name for r in runs], fontsize=7)
        fig.tight_layout()
    else:  # one legend for both panels, below them: more columns and a smaller font as runs grow
        ncol = 3 if len(runs) <= 9 else 5
        rows = -(-len(runs) // ncol)
        size = 7 if rows <= 3 else 5
        fig.legend(handles, [r.name for r in runs], loc="lower center", ncol=ncol, fontsize=size, frameon=False)
        fig.tight_layout(rect=(0, min(0.5, 0.03 + rows * size * 1.5 / (FIGSIZE[1] * 72)), 1, 1))
    return _save(plt, fig, path, described)


def plot_metrics_at_k(run: Run, path: Path, described: dict | None = None) -> Path | None:
    found = sorted({(m.group(1), int(m.group(2))) for k in run.final if (m := METRIC_RE.match(k))}, key=lambda x: (x[0], x[1]))
    if not found:
        return None
    plt, fig = _figure()
    ax = fig.subplots()
    labels = [f"{m.upper()}@{k}" for m, k in found]
    xs = list(range(len(found)))
    ax.bar([x - 0.2 for x in xs], [run.final[f"test_{m}_{k}"] for m, k in found], width=0.4, label=run.name)
    # the popularity baseline where the run has it (runs before MRR was kept have NDCG/HR only):
    # a missing value is written "n/a" over an empty slot, never drawn as a zero-height bar
    pop = [run.final.get(f"baseline_pop_test_{m}_{k}") for m, k in found]
    ok = [isinstance(v, (int, float)) and math.isfinite(v) for v in pop]
    label = "most popular" if any(ok) else "most popular (n/a: not in this run's metrics)"
    ax.bar([x + 0.2 for x, good in zip(xs, ok) if good], [v for v, good in zip(pop, ok) if good], width=0.4,
           color="tab:orange", label=label)
    top = max([run.final[f"test_{m}_{k}"] for m, k in found] + [v for v, good in zip(pop, ok) if good])
    for x, good in zip(xs, ok):
        if not good:
            ax.text(x + 0.2, 0.02 * top, "n/a", ha="center", va="bottom", fontsize=8, color="tab:orange")
    ax.set_xticks(xs, labels, rotation=30, fontsize=8)
    ax.set(title=f"test metrics (full ranking): {run.name}", xlabel="metric@K", ylabel="score (higher is better)")
    from matplotlib.patches import Patch

    handles, names = ax.get_legend_handles_labels()
    if label not in names:  # no popularity bar at all: the series still has its legend entry
        handles, names = [*handles, Patch(color="tab:orange")], [*names, label]
    ax.legend(handles, names, fontsize=8)
    fig.tight_layout()
    return _save(plt, fig, path, described)


def _best_value(r: Run) -> float:
    v = r.final.get(r.metric, r.final.get(f"best_{r.metric}"))
    if v is None:
        vals = [h[r.metric] for h in r.history if r.metric in h]
        v = max(vals) if vals else math.nan
    return float(v)


def plot_comparison(runs: list[Run], path: Path, described: dict | None = None) -> Path | None:
    scored = sorted(((r.name, _best_value(r)) for r in runs), key=lambda x: -x[1] if math.isfinite(x[1]) else math.inf)
    scored = [s for s in scored if math.isfinite(s[1])]
    if len(scored) < 2:
        return None
    plt, fig = _figure()
    ax = fig.subplots()
    names, vals = zip(*scored[:30])
    metric = runs[0].metric
    ax.barh(range(len(vals)), vals, label=f"best {metric} on validation")
    ax.set_yticks(range(len(vals)), names, fontsize=7)
    ax.invert_yaxis()
    shown = "" if len(scored) <= 30 else f" (top 30 of {len(scored)})"
    ax.set(title=f"{metric} by run (best first){shown}", xlabel=metric, ylabel="run")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _save(plt, fig, path, described)


def _markdown(runs: list[Run], plots: list[Path], folder: Path, out: Path) -> str:
    keys = [k for k in ("test_ndcg_10", "test_hr_10", "test_mrr_10", "test_coverage_10", "baseline_pop_test_ndcg_10")
            if any(k in r.final for r in runs)]
    metric = runs[0].metric
    lines = [f"# rayrec report: {folder}", "", f"{len(runs)} run(s); selection metric `{metric}`; "
             "test metrics are full ranking from the best-on-validation weights.", "",
             "| run | epochs | " + " | ".join([metric] + keys) + " |", "|---|---:|" + "---:|" * (len(keys) + 1)]
    for r in sorted(runs, key=lambda r: -_best_value(r) if math.isfinite(_best_value(r)) else math.inf):
        epochs = r.final.get("epochs", r.final.get("epoch", r.history[-1]["epoch"] if r.history else ""))
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
    tested = [r for r in runs if any(METRIC_RE.match(k) for k in r.final)]  # an ASHA-stopped trial has no test
    best = max(tested or runs, key=lambda r: _best_value(r) if math.isfinite(_best_value(r)) else -math.inf)
    described: dict = {}
    plots = [p for p in (plot_curves(runs, out / "curves.png", described),
                         plot_metrics_at_k(best, out / "metrics_at_k.png", described),
                         plot_comparison(runs, out / "comparison.png", described)) if p is not None]
    (out / PLOTS_JSON).write_text(json.dumps(described, indent=1) + "\n")
    md = out / "report.md"
    md.write_text(_markdown(runs, plots, folder, out))
    return {"markdown": str(md), "plots": [str(p) for p in plots], "runs": [r.name for r in runs], "size": SIZE,
            "described": str(out / PLOTS_JSON)}
