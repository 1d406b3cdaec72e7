"""``rayrec report``: PNGs of the expected size with something drawn on them, legends and axis labels
(from the plots.json the report writes), each Tune trial once, and a markdown summary; a run's one
HParams session."""
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rayrec.config import ConfigError, load_config
from rayrec.infer.report import SIZE, Run, describe, load_run, plot_curves, plot_metrics_at_k, write_report

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def experiment(ray_cluster, synthetic_log, tmp_path_factory):
    """A real run, and a Tune-style trial folder (result.json) next to it."""
    from rayrec.train.fit import fit

    out = tmp_path_factory.mktemp("report")
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [
        f"data.log={synthetic_log}", f"output_dir={out / 'exp'}", "name=run_a", "train.epochs=3", "scale.num_workers=0",
        "model.max_len=20", "model.hidden=32", "model.num_heads=2", "train.batch_size=64", "model.head=ce"])
    res = fit(cfg)
    folder = out / "exp"
    trial = folder / "trial_b"
    trial.mkdir()
    # local mode keeps no metrics dataframe: the trial replays the run's TensorBoard epochs and final report
    rows = load_run(res.run_dir, folder).history + [res.metrics]
    lines = [json.dumps({k: (v * 0.5 if isinstance(v, float) and k.startswith(("val_", "test_")) else v)
                         for k, v in r.items() if isinstance(v, (int, float)) and math.isfinite(v)}) for r in rows]
    (trial / "result.json").write_text("\n".join(lines) + "\n")
    return folder, res


def _check_png(path):
    img = Image.open(path)
    assert img.format == "PNG" and img.size == SIZE
    px = np.asarray(img.convert("L"), dtype=np.float32)
    assert px.std() > 5 and (px < 128).mean() > 0.005, f"{path} looks blank"  # axes, lines and text were drawn


def _check_labels(report: dict, runs: list[str] | None = None) -> dict:
    """Every PNG the report made was drawn with axis labels on every axes and a legend (plots.json:
    read from each figure before it was saved)."""
    described = json.loads(Path(report["described"]).read_text())
    assert sorted(described) == sorted(Path(p).name for p in report["plots"])
    for png, d in described.items():
        for ax in d["axes"]:
            assert ax["xlabel"] and ax["ylabel"], (png, ax)
        assert d["figure_legend"] or any(ax["legend"] for ax in d["axes"]), png
    if runs is not None and "curves.png" in described:
        d = described["curves.png"]
        legend = d["figure_legend"] or next(ax["legend"] for ax in d["axes"] if ax["legend"])
        assert sorted(legend) == sorted(runs)
        styles = [(ln["color"], ln["linestyle"]) for ln in d["axes"][0]["lines"]]
        assert len(styles) == len(runs) and len(set(styles)) == len(styles), styles  # one look per run
    return described


def test_report_of_an_experiment_compares_runs(experiment, tmp_path):
    folder, res = experiment
    r = write_report(folder, tmp_path / "rep")
    names = sorted(Path(p).name for p in r["plots"])
    assert names == ["comparison.png", "curves.png", "metrics_at_k.png"]
    for p in r["plots"]:
        _check_png(p)
    described = _check_labels(r, ["run_a", "trial_b"])
    # the popularity baseline has its MRR bars (the run keeps baseline_pop_test_mrr_*), no "n/a"
    assert res.metrics["baseline_pop_test_mrr_10"] > 0
    bars = described["metrics_at_k.png"]["axes"][0]
    assert "most popular" in bars["legend"] and "n/a" not in bars["texts"]
    md = Path(r["markdown"]).read_text()
    assert "| `run_a` |" in md and "| `trial_b` |" in md and "![curves](curves.png)" in md
    # best first: the trial halves every validation number of the real run
    assert md.index("`run_a`") < md.index("`trial_b`")
    assert f"{res.metrics['test_ndcg_10']:.4f}" in md


def test_report_of_one_run_through_the_cli(experiment, capsys):
    from rayrec.cli import main

    folder, _ = experiment
    run = folder / "run_a"
    assert main(["report", str(run)]) == 0
    made = sorted(p.name for p in (run / "report").glob("*.png"))
    assert made == ["curves.png", "metrics_at_k.png"]  # nothing to compare with a single run
    for p in (run / "report").glob("*.png"):
        _check_png(p)
    assert "report.md" in capsys.readouterr().out


def _sweep_like(folder: Path, run: Path) -> Path:
    """A Tune sweep's layout around copies of a real run: ``trial_X/result.json`` (Tune's) and
    ``runs/trial_X`` (the Train run) for a completed trial and an ASHA-stopped one."""
    sweep = folder / "sw_tune"
    (sweep / "runs").mkdir(parents=True)
    (sweep / "sweep.yaml").write_text("name: sw\n")
    rows = load_run(run, run.parent).history
    for i, keep in enumerate((len(rows), 1)):
        name = f"trial_{i:05d}"
        shutil.copytree(run, sweep / "runs" / name, ignore=shutil.ignore_patterns("checkpoint_*", "report"))
        trial_rows = [dict(r, training_iteration=r["epoch"]) for r in rows[:keep]]
        if keep < len(rows):  # stopped early: no final metrics in its run either
            (sweep / "runs" / name / "final_metrics.json").unlink()
        (sweep / name).mkdir()
        (sweep / name / "result.json").write_text("".join(json.dumps(r) + "\n" for r in trial_rows))
    return sweep


def test_report_counts_each_tune_trial_once_and_keeps_tensorboard_quiet(experiment, tmp_path, caplog):
    from rayrec.cli import main

    folder, _ = experiment
    root = tmp_path / "runs"
    shutil.copytree(folder / "run_a", root / "single", ignore=shutil.ignore_patterns("checkpoint_*", "report"))
    _sweep_like(root, folder / "run_a")
    caplog.set_level(logging.INFO)
    assert main(["report", str(root)]) == 0
    # was 5: every trial twice, as sw_tune/runs/trial_X and sw_tune/trial_X
    md = (root / "report" / "report.md").read_text()
    assert md.count("| `") == 3 and "3 run(s)" in md, md
    assert all(f"| `{n}` |" in md for n in ("single", "sw_tune/trial_00000", "sw_tune/trial_00001")), md
    r = {"plots": [str(p) for p in (root / "report").glob("*.png")], "described": root / "report" / "plots.json"}
    assert len(r["plots"]) == 3
    for p in r["plots"]:
        _check_png(p)
    _check_labels(r, ["single", "sw_tune/trial_00000", "sw_tune/trial_00001"])
    # TensorBoard's event reader logs each file switch at INFO; none of it reaches the command's output
    assert not [rec for rec in caplog.records if rec.name.startswith("tensorboard")], caplog.text[-2000:]


def test_many_runs_get_distinct_styles_and_one_legend(tmp_path):
    runs = [Run(name=f"trial_{i:05d}", folder=tmp_path, metric="val_ndcg_10",
                history=[{"epoch": e, "train_loss": 1 / (e + i), "val_ndcg_10": e * (i + 1) / 100} for e in (1, 2, 3)])
            for i in range(24)]
    described: dict = {}
    plot_curves(runs, tmp_path / "curves.png", described)
    _check_png(tmp_path / "curves.png")
    d = described["curves.png"]
    assert d["figure_legend"] == [r.name for r in runs]
    styles = {(ln["color"], ln["linestyle"]) for ln in d["axes"][1]["lines"]}
    assert len(styles) == 24
    assert [(ax["xlabel"], ax["ylabel"]) for ax in d["axes"]] == [("epoch", "training loss (mean per step)"),
                                                                  ("epoch", "val_ndcg_10")]


def test_a_missing_popularity_metric_reads_na_not_zero(tmp_path):
    final = {f"test_{m}_{k}": 0.3 for m in ("ndcg", "hr", "mrr") for k in (5, 10)}
    final.update({f"baseline_pop_test_{m}_{k}": 0.1 for m in ("ndcg", "hr") for k in (5, 10)})  # a run before MRR
    described: dict = {}
    plot_metrics_at_k(Run(name="old", folder=tmp_path, final=final), tmp_path / "m.png", described)
    _check_png(tmp_path / "m.png")
    ax = described["m.png"]["axes"][0]
    assert ax["texts"] == ["n/a", "n/a"] and ax["legend"] == ["old", "most popular"], ax
    assert ax["xlabel"] and ax["ylabel"]
    final = {k: v for k, v in final.items() if not k.startswith("baseline_pop")}  # none at all
    plot_metrics_at_k(Run(name="older", folder=tmp_path, final=final), tmp_path / "m.png", described)
    ax = described["m.png"]["axes"][0]
    assert ax["texts"] == ["n/a"] * 6 and ax["legend"][1].startswith("most popular (n/a")


def test_a_run_has_one_hparams_session_in_its_own_folder(experiment):
    from rayrec.train.tb import hparams_sessions

    folder, res = experiment
    logdir = folder / "run_a" / "tensorboard"
    assert not (logdir / "hparams").exists()  # was a separate run called "hparams"
    sessions = hparams_sessions(folder / "run_a")
    assert len(sessions) == 1 and sessions[0]["name"] == "tensorboard", sessions
    hp = sessions[0]["hparams"]
    assert hp["model.norm_first"] is True and hp["model.head"] == "ce" and hp["train.lr"] > 0  # a bool, not 1.0
    assert sessions[0]["metrics"]["final/test_ndcg_10"] == pytest.approx(res.metrics["test_ndcg_10"], rel=1e-5)


def test_report_refuses_a_folder_without_runs(tmp_path):
    with pytest.raises(ConfigError, match="no run under"):
        write_report(tmp_path)
