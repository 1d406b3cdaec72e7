"""``rayrec report``: PNGs of the expected size with something drawn on them, and a markdown summary."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rayrec.config import ConfigError, load_config
from rayrec.infer.report import SIZE, load_run, write_report

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


def test_report_of_an_experiment_compares_runs(experiment, tmp_path):
    folder, res = experiment
    r = write_report(folder, tmp_path / "rep")
    names = sorted(Path(p).name for p in r["plots"])
    assert names == ["comparison.png", "curves.png", "metrics_at_k.png"]
    for p in r["plots"]:
        _check_png(p)
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


def test_report_refuses_a_folder_without_runs(tmp_path):
    with pytest.raises(ConfigError, match="no run under"):
        write_report(tmp_path)
