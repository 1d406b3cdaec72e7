"""Ray Tune sweeps end to end: ASHA, outputs, failing trials, a killed driver resumed, bad spaces.

Sweeps run through ``jobs/tune.py`` in a subprocess with its own local Ray (with the dashboard, which
Ray Train's placement-group cleaner needs), exactly as a user runs them.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from rayrec.cli import main
from rayrec.config import ConfigError, load_config

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parent.parent
BASE = {
    "model": {"max_len": 20, "hidden": 32, "num_heads": 2, "dropout": 0.1},
    "train": {"epochs": 4, "batch_size": 64, "warmup_steps": 5, "lr": 0.005},
    "scale": {"num_workers": 1, "cpus_per_worker": 0.5},
}


def write_config(tmp_path, log, name, tune, **sections) -> Path:
    raw = {"name": name, "output_dir": str(tmp_path / "out"), "data": {"log": log}, **yaml.safe_load(yaml.safe_dump(BASE))}
    for k, v in sections.items():
        raw[k].update(v)
    raw["tune"] = tune
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_job(args, timeout=600, **kw):  # a hang guard: a 2-core AVX2 host needs ~200 s for the ASHA sweep
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kw)


def tb_content(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return acc.Tags()["scalars"], acc.PluginTagToContent("hparams")


# ---------------------------------------------------------------------------------------------
# bad spaces: no Ray, no trial, one clear message


@pytest.mark.parametrize("space, message", [
    ({"model.hiden": {"choice": [32, 64]}}, "unknown config key 'model.hiden'; valid keys under model"),
    ({"model": {"choice": [1]}}, "'model' is a config section, not a value"),
    ({"train.lr": {"normal": [0.1, 1]}}, "unknown distribution 'normal'; use one of"),
    ({"train.lr": {"loguniform": [0, 0.1]}}, "loguniform takes [low, high] numbers, 0 < low < high"),
    ({"train.lr": {"randint": [1, 5]}}, "train.lr is a number key, randint does not fit it; use uniform or loguniform"),
    ({"model.hidden": {"uniform": [16, 64]}}, "use randint or qrandint"),
    ({"model.head": {"choice": ["bce", "softmax"]}}, "'softmax' is not valid; choose one of"),
    ({"model.hidden": {"choice": []}}, "choice takes a non-empty list"),
    ({"name": {"choice": ["a", "b"]}}, "'name' cannot be searched"),
    ({"train.batch_size": {"qrandint": [32, 128]}}, "qrandint takes [low, high, q] integers"),
])
def test_bad_search_space_fails_before_any_trial(tmp_path, space, message):
    cfg = write_config(tmp_path, "unused.parquet", "bad", {"space": space})
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    assert message in str(e.value)
    # the CLI stops with the same message and starts nothing (no experiment folder)
    assert main(["tune", str(cfg)]) == 2
    assert not (tmp_path / "out").exists()


def test_tune_section_checks_name_the_fix():
    with pytest.raises(ConfigError, match="choosing on test leaks"):
        load_config(None, ["tune.metric=test_ndcg_10"])
    with pytest.raises(ConfigError, match="scale.num_workers >= 1"):
        load_config(None, ["scale.num_workers=0", "tune.space={train.lr: {uniform: [0.001, 0.01]}}"])
    with pytest.raises(ConfigError, match="optuna cannot expand grid"):
        load_config(None, ["tune.search_alg=optuna", "tune.space={train.lr: {grid: [0.001, 0.01]}}"])
    # the untouched tune section costs nothing: every run config still loads for jobs/train.py
    assert load_config(None, []).tune.space == {}


# ---------------------------------------------------------------------------------------------
# a 4-trial ASHA sweep and everything it leaves behind


CLEANER_PROBE = """
import ray
from ray.train.v2._internal.state.util import is_actor_alive
from rayrec.ray_env import start_local_ray

start_local_ray(num_cpus=1, include_dashboard=True)

@ray.remote(num_cpus=0)
class Idle:
    def ping(self):
        return 1

@ray.remote(num_cpus=0)
def alive(actor_id):  # what Ray Train's placement-group cleaner asks, from a worker of the cluster
    return is_actor_alive(actor_id, timeout=30)

a = Idle.remote()
ray.get(a.ping.remote())
aid = a._actor_id.hex()
before = ray.get(alive.remote(aid))
ray.kill(a)
import time
deadline = time.time() + 30
while ray.get(alive.remote(aid)) and time.time() < deadline:
    time.sleep(0.5)
print("RESULT", before, ray.get(alive.remote(aid)))
ray.shutdown()
"""


def test_a_local_sweep_cluster_finds_itself_beside_another_ray(ray_cluster, tmp_path):
    # the test session's Ray is a second instance on this machine: Ray Train's placement-group cleaner
    # used to fail here ("Found multiple active Ray instances") and leak the CPUs of stopped trials
    script = tmp_path / "probe.py"
    script.write_text(CLEANER_PROBE)
    proc = run_job([str(script)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RESULT True False" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.mark.parametrize("epochs, every, rungs", [(4, 1, [2, 1]), (20, 1, [16, 8, 4, 2, 1]), (20, 4, [4, 2, 1]),
                                                  (2, 1, [1]), (1, 1, None), (3, 4, None)])
def test_asha_rungs_sit_only_on_validation_passes_before_the_last(epochs, every, rungs, caplog):
    from ray.tune.schedulers import ASHAScheduler

    from rayrec.tune.sweep import _tuner_config

    cfg = load_config(None, [f"train.epochs={epochs}", f"train.eval_every={every}", "tune.scheduler=asha",
                             "tune.space={train.lr: {grid: [0.001, 0.01]}}"])
    scheduler = _tuner_config(cfg, []).scheduler
    if rungs is None:  # one pass: nothing before the last to stop at
        assert not isinstance(scheduler, ASHAScheduler) and "no pass before the last" in caplog.text
    else:
        assert [r for r, _ in scheduler._brackets[0]._rungs] == rungs


def test_concurrency_leaves_a_cpu_for_each_starting_trials_data_read(monkeypatch, caplog):
    import ray

    from rayrec.tune.sweep import _check_capacity

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    cfg = load_config(None, ["scale.num_workers=1", "scale.cpus_per_worker=0.9", "tune.max_concurrent_trials=8"])
    _check_capacity(cfg)  # 1 trial = 1.0 CPU; with 3 running, a 4th starting one would find 0.9 < 1 free
    assert cfg.tune.max_concurrent_trials == 3
    assert "tune.max_concurrent_trials 8 -> 3" in caplog.text
    cfg = load_config(None, ["scale.num_workers=1", "scale.cpus_per_worker=0.5", "tune.max_concurrent_trials=2"])
    _check_capacity(cfg)
    assert cfg.tune.max_concurrent_trials == 2  # the tests' own sweep: 2 - 0.6 - 0.1 = 1.3 free, untouched
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 1.0})
    with pytest.raises(ConfigError, match="1 free CPU for its Ray Data read"):
        _check_capacity(load_config(None, ["scale.num_workers=1", "scale.cpus_per_worker=0.5"]))


@pytest.fixture(scope="module")
def asha_sweep(ray_cluster, synthetic_log, tmp_path_factory):
    # ray_cluster: the session's Ray stays up beside the sweep's, the condition CI runs it in
    tmp = tmp_path_factory.mktemp("asha")
    # 1e-5 and 1e-4 barely move in 4 epochs: ASHA (grace 1 validation pass) must stop them
    cfg = write_config(tmp, synthetic_log, "asha", {
        "num_samples": 1, "max_concurrent_trials": 2, "scheduler": "asha", "grace_period": 1,
        "reduction_factor": 2, "search_alg": "random",
        "space": {"train.lr": {"grid": [0.01, 0.00001, 0.003, 0.0001]}, "model.dropout": 0.15},
    })
    t0 = time.perf_counter()
    proc = run_job(["jobs/tune.py", str(cfg)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "out" / "asha_tune", proc.stdout, time.perf_counter() - t0


def test_asha_sweep_finishes_and_stops_a_trial_early(asha_sweep):
    exp, stdout, _ = asha_sweep
    table = pd.read_parquet(exp / "results.parquet")
    assert len(table) == 4 and set(table["config/train.lr"]) == {0.01, 0.00001, 0.003, 0.0001}
    assert (table["config/model.dropout"] == 0.15).all()  # a fixed key reaches every trial
    assert (table["status"] == "stopped").sum() >= 1, table[["trial", "status", "epochs"]]
    stopped = table[table["status"] == "stopped"]
    # rungs at passes 1 and 2 only: a trial that reached its last pass (4) is never stopped there
    assert (stopped["epochs"] <= 2).all(), table[["trial", "status", "epochs"]]
    done = table[table["status"] == "completed"]
    assert len(done) >= 1 and (done["epochs"] == 4).all() and done["test_ndcg_10"].notna().all()
    # sorted best first; the best trial is the big learning rate, far above the tiny ones
    assert table.iloc[0]["config/train.lr"] == 0.01
    assert table.iloc[0]["best_val_ndcg_10"] > 2 * table["best_val_ndcg_10"].min()
    csv = pd.read_csv(exp / "results.csv")
    assert list(csv["trial"]) == list(table["trial"])
    assert (exp / "metric_by_epoch.png").stat().st_size > 5000
    # the leaderboard is printed with every trial
    assert "best_val_ndcg_10" in stdout and all(t in stdout for t in table["trial"])


def test_every_trial_has_tensorboard_scalars_and_hparams(asha_sweep):
    exp, _, _ = asha_sweep
    trials = sorted(p.name for p in exp.glob("trial_*"))
    assert trials == [f"trial_{i:05d}" for i in range(4)]  # deterministic names, no timestamps
    for t in trials:
        scalars, hparams = tb_content(exp / "runs" / t / "tensorboard")
        assert "epoch/val_ndcg_10" in scalars, (t, scalars)
        assert "_hparams_/session_start_info" in hparams, (t, hparams)
        assert b"train.lr" in hparams["_hparams_/session_start_info"]


def test_best_config_reruns_with_jobs_train(asha_sweep, tmp_path, capsys):
    exp, _, _ = asha_sweep
    best = exp / "best_config.yaml"
    cfg = load_config(best)
    assert cfg.train.lr == 0.01 and cfg.model.dropout == 0.15 and cfg.name == "asha_tune_best" and not cfg.resume
    assert f"python jobs/train.py {best}" in best.read_text()
    # what jobs/train.py runs (its whole body is this call), in-process on the session's Ray: a subprocess
    # would only add a Ray start, which the jobs/train.py tests in test_fault_cluster.py already cover
    assert main(["train", str(best), f"output_dir={tmp_path}", "train.epochs=1"]) in (0, None)
    assert json.loads((tmp_path / "asha_tune_best" / "final_metrics.json").read_text())["test_ndcg_10"] > 0
    assert "test_ndcg_10" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# a failing trial fails alone; a killed driver resumes without rerunning finished trials


def _statuses(exp: Path) -> dict[str, str]:
    out = {}
    for f in exp.glob("experiment_state-*.json"):
        try:
            state = json.loads(f.read_text())
        except (json.JSONDecodeError, OSError):  # caught mid-write
            continue
        for trial_json, _ in state.get("trial_data", []):
            t = json.loads(trial_json)
            out["trial_" + t["trial_id"].rsplit("_", 1)[-1]] = t["status"]
    return out


@pytest.mark.timeout(1200)
def test_killed_sweep_resumes_only_unfinished_trials(synthetic_log, tmp_path):
    # num_heads 3 does not divide hidden 32: that trial fails alone, at trial time
    cfg = write_config(tmp_path, synthetic_log, "res", {
        "max_concurrent_trials": 1, "scheduler": "none", "search_alg": "random",
        "space": {"model.num_heads": {"grid": [2, 3, 4]}},
    }, train={"epochs": 5})
    exp = tmp_path / "out" / "res_tune"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "TUNE_GLOBAL_CHECKPOINT_S": "0"}
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen([sys.executable, "jobs/tune.py", str(cfg)], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline:
            st = _statuses(exp)
            running = exp / "runs" / "trial_00002"
            if (st.get("trial_00000") == "TERMINATED" and st.get("trial_00001") == "ERROR"
                    and running.exists() and any(running.glob("checkpoint_*"))):
                break
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.2)
        else:
            pytest.fail("the sweep did not reach its second real trial in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and every Ray process it started
        proc.wait(timeout=30)
        log.close()
    assert _statuses(exp).get("trial_00002") != "TERMINATED"  # it really was cut off mid-run
    done_results = (exp / "trial_00000" / "result.json").read_text()
    error_file = next((exp / "trial_00001").glob("error*"))
    error_mtime = error_file.stat().st_mtime

    proc2 = run_job(["jobs/tune.py", "--resume", str(exp)])
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    table = pd.read_parquet(exp / "results.parquet").set_index("trial")
    assert table.loc["trial_00000", "status"] == "completed" and table.loc["trial_00002", "status"] == "completed"
    assert table.loc["trial_00001", "status"] == "error"
    assert "divisible by model.num_heads" in table.loc["trial_00001", "error"]
    # the finished trial was not rerun, the errored one not retried (resume_errored not asked)
    assert (exp / "trial_00000" / "result.json").read_text() == done_results
    assert error_file.stat().st_mtime == error_mtime
    # the interrupted trial continued from its checkpoint: its Train run resumed, not restarted
    epochs = [json.loads(line)["epoch"] for line in (exp / "trial_00002" / "result.json").read_text().splitlines()]
    assert epochs[0] > 1 and epochs[-1] == 5, epochs
    assert "resumed from" in (proc2.stdout + proc2.stderr)
    assert not any(t.startswith("trial_00003") for t in table.index)
