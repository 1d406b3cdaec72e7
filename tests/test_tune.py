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


def strict_json(path: Path):
    def refuse(name):
        raise ValueError(f"{path} holds a bare {name}: not strict JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_asha_sweep_finishes_and_stops_a_trial_early(asha_sweep):
    exp, stdout, _ = asha_sweep
    table = pd.read_parquet(exp / "results.parquet")
    summary = strict_json(exp / "summary.json")  # stopped trials' NaN test metrics are null, not NaN
    assert summary["complete"] and summary["resume"] is None and summary["best"]["trial"] == table.iloc[0]["trial"]
    assert set(summary["by_status"]) <= {"completed", "stopped"}
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


def test_every_trial_has_tensorboard_scalars_and_one_hparams_session(asha_sweep):
    from rayrec.train.tb import hparams_sessions

    exp, _, _ = asha_sweep
    trials = sorted(p.name for p in exp.glob("trial_*"))
    assert trials == [f"trial_{i:05d}" for i in range(4)]  # deterministic names, no timestamps
    for t in trials:
        scalars, hparams = tb_content(exp / "runs" / t / "tensorboard")
        assert "epoch/val_ndcg_10" in scalars, (t, scalars)
        assert "_hparams_/session_start_info" in hparams, (t, hparams)
        assert not (exp / "runs" / t / "tensorboard" / "hparams").exists()  # no second "hparams" run
    table = pd.read_parquet(exp / "results.parquet").set_index("trial")
    # what TensorBoard's HParams dashboard lists, read through its own plugin: one session per trial,
    # named by the sweep's keys, for --logdir <experiment>/runs and for the whole experiment folder
    # (was 2 per finished trial: the run's own "hparams" sub-run with other names and no metrics,
    # plus Tune's copy under <experiment>/trial_*)
    for logdir in (exp / "runs", exp):
        sessions = hparams_sessions(logdir)
        assert len(sessions) == 4, [s["name"] for s in sessions]
        for s in sessions:
            trial = s["hparams"]["trial"]
            assert s["name"].endswith(f"{trial}/tensorboard"), s["name"]
            assert set(s["hparams"]) == {"train.lr", "model.dropout", "trial"}, s["hparams"]
            assert s["hparams"]["train.lr"] == table.loc[trial, "config/train.lr"]
            assert "epoch/val_ndcg_10" in s["metrics"], s["metrics"]  # stopped trials too: their last pass
            if table.loc[trial, "status"] == "completed":
                assert s["metrics"]["final/test_ndcg_10"] == pytest.approx(table.loc[trial, "test_ndcg_10"], rel=1e-5)


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


def _checkpoint_epochs(run: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in run.glob("checkpoint_*") if p.name.split("_")[1].isdigit())


def _result_rows(trial: Path) -> list[dict]:
    return [json.loads(line) for line in (trial / "result.json").read_text().splitlines() if line.strip()]


@pytest.mark.timeout(1500)
def test_killed_then_interrupted_sweep_resumes_with_every_trials_whole_history(synthetic_log, tmp_path):
    # num_heads 3 does not divide hidden 32: that trial fails alone, at trial time
    cfg = write_config(tmp_path, synthetic_log, "res", {
        "max_concurrent_trials": 1, "scheduler": "none", "search_alg": "random",
        "space": {"model.num_heads": {"grid": [2, 3, 4]}},
    }, train={"epochs": 5})
    exp = tmp_path / "out" / "res_tune"
    run = exp / "runs" / "trial_00002"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "TUNE_GLOBAL_CHECKPOINT_S": "0"}

    def start(args, log_name, **extra_env):
        log = open(tmp_path / log_name, "w")
        proc = subprocess.Popen([sys.executable, "jobs/tune.py", *args], cwd=ROOT, env={**env, **extra_env},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        return proc, log

    def wait_for(proc, log_name, ready, what, limit=420):
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if ready():
                return
            assert proc.poll() is None, (tmp_path / log_name).read_text()[-3000:]
            time.sleep(0.2)
        pytest.fail(f"the sweep did not reach {what} in time")

    def stop_group(proc):
        """SIGKILL the driver's process group and every process of its session (Ray's workers keep
        training for seconds after the group is killed), and wait until they are gone: no checkpoint
        of this attempt may appear after this returns."""
        def session():
            ps = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout.split("\n")
            return [int(pid) for pid, sid in (line.split() for line in ps if line.strip()) if int(sid) == proc.pid]

        for kill in (lambda: os.killpg(proc.pid, signal.SIGKILL), *(lambda p=p: os.kill(p, signal.SIGKILL) for p in session())):
            try:
                kill()
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 60
        while (left := session()) and time.monotonic() < deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)

    # 1. the driver and every Ray process it started die at once (SIGKILL) in the middle of trial_00002
    proc, log = start([str(cfg)], "first.log")
    try:
        wait_for(proc, "first.log", lambda: (_statuses(exp).get("trial_00000") == "TERMINATED"
                                             and _statuses(exp).get("trial_00001") == "ERROR"
                                             and bool(_checkpoint_epochs(run))), "its second real trial")
    finally:
        stop_group(proc)
        proc.wait(timeout=30)
        log.close()
    assert _statuses(exp).get("trial_00002") != "TERMINATED"  # it really was cut off mid-run
    killed_at = _checkpoint_epochs(run)[-1]
    assert killed_at <= 4, killed_at
    done_results = (exp / "trial_00000" / "result.json").read_text()
    error_file = next((exp / "trial_00001").glob("error*"))
    error_mtime = error_file.stat().st_mtime

    # 2. resumed, then Ctrl-C (SIGINT to the driver) while trial_00002 stalls before an epoch (test-only
    # fault: its Train run hangs there once), so the interrupt lands mid-trial every time
    hang_at = min(killed_at + 2, 5)  # after at least one more epoch when there is room for one
    proc, log = start(["--resume", str(exp)], "second.log", RAYREC_FAULT=f"rank=0,epoch={hang_at},kind=hang")
    try:
        wait_for(proc, "second.log", lambda: hang_at - 1 in _checkpoint_epochs(run) and any(run.glob(".rayrec_fault_*")),
                 f"the stall before epoch {hang_at}")
        time.sleep(1)  # Tune takes the report of epoch hang_at - 1
        os.kill(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=180)
    finally:
        stop_group(proc)
        log.close()
    out = (tmp_path / "second.log").read_text()
    assert rc == 130, out[-3000:]
    assert f"python jobs/tune.py --resume {exp}" in out and "Tuner.restore(" not in out, out[-3000:]
    table = pd.read_parquet(exp / "results.parquet").set_index("trial")
    assert table.loc["trial_00002", "status"] == "interrupted", table[["status", "epochs"]]  # not "stopped"
    summary = strict_json(exp / "summary.json")  # the interrupted trial's NaN test metrics: null, never NaN
    assert summary["by_status"] == {"completed": 1, "error": 1, "interrupted": 1}, summary
    assert not summary["complete"] and summary["unfinished"] == ["trial_00002"]
    assert summary["resume"] == f"python jobs/tune.py --resume {exp}"
    # the interim best is a finished trial, never the interrupted one (whose test metrics do not exist)
    assert summary["best"]["trial"] == "trial_00000" and summary["best"]["test_ndcg_10"] > 0
    assert "Best trial trial_00000 (completed)" in (exp / "best_config.yaml").read_text()

    # 3. resumed again: it finishes
    proc3 = run_job(["jobs/tune.py", "--resume", str(exp)])
    assert proc3.returncode == 0, proc3.stderr[-3000:]
    table = pd.read_parquet(exp / "results.parquet").set_index("trial")
    assert table.loc["trial_00000", "status"] == "completed" and table.loc["trial_00002", "status"] == "completed"
    assert table.loc["trial_00001", "status"] == "error"
    assert "divisible by model.num_heads" in table.loc["trial_00001", "error"]
    assert table.loc["trial_00002", "epochs"] == 5
    assert strict_json(exp / "summary.json")["complete"]
    # the finished trial was not rerun, the errored one not retried (resume_errored not asked)
    assert (exp / "trial_00000" / "result.json").read_text() == done_results
    assert error_file.stat().st_mtime == error_mtime
    # the interrupted trial continued from its checkpoints (its Train run resumed, twice) and its Tune log
    # kept its whole history across both restores: every epoch once, then the final report
    assert "resumed from" in (proc3.stdout + proc3.stderr)
    rows = _result_rows(exp / "trial_00002")
    assert [r.get("epoch") for r in rows[:-1]] == [1, 2, 3, 4, 5], [(r.get("epoch"), r.get("final")) for r in rows]
    assert [r["training_iteration"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[-1]["final"] == 1 and rows[-1]["epochs"] == 5 and "epoch" not in rows[-1]
    progress = pd.read_csv(exp / "trial_00002" / "progress.csv")
    assert list(progress["training_iteration"]) == [1, 2, 3, 4, 5, 6] and progress["test_ndcg_10"].notna().iloc[-1]
    assert not any(t.startswith("trial_00003") for t in table.index)
