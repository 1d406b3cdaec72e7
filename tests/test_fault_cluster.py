"""Failures that need their own Ray: a killed driver, a lost node, a job submitted to a head node.

Each runs in a subprocess (its own process group, its own Ray) with a timeout, and cleans up only
the processes it started. The shared session cluster is not used here."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from rayrec.config import ConfigError
from rayrec.submit import SubmitError, check_address, largest_paths, package_files, preflight
from rayrec.train import checkpoint as ckpt

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["train.max_steps_per_epoch=3", "train.batch_size=64", "model.max_len=20", "model.hidden=32",
         "model.num_heads=2", "train.warmup_steps=2"]


@pytest.fixture
def ray_tmp():
    """A private Ray temp dir (RAY_TMPDIR) per test. ``ray.init()`` without an address joins the cluster
    recorded in <tmp>/ray/ray_current_cluster: sharing /tmp/ray would let our clusters and other
    processes' on this machine find each other. Short, for Ray's unix socket paths (< 107 bytes)."""
    path = tempfile.mkdtemp(prefix="rr")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _env(ray_tmp, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAYREC_FAULT")}
    env.update(RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), RAY_TMPDIR=ray_tmp, **extra)
    # an activated venv: `python` in a job's entrypoint is this interpreter
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group this test created: the driver and its Ray
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _train(args, ray_tmp, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), *args], env=_env(ray_tmp), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, start_new_session=True)


def _tb_steps(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_driver_killed_and_resubmitted_resumes_after_the_last_checkpoint(synthetic_log, tmp_path, ray_tmp):
    args = [str(ROOT / "configs" / "quickstart.yaml"), f"data.log={synthetic_log}", f"output_dir={tmp_path}",
            "name=killed", "train.epochs=6", "scale.num_workers=1", "scale.cpus_per_worker=1", *SMALL]
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / "train.py"), *args], env=_env(ray_tmp), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while (ckpt.latest(run_dir) is None or ckpt.load_state(ckpt.latest(run_dir))["epoch"] < 2):
            assert proc.poll() is None, "the driver ended before it could be killed"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.2)
    finally:
        _kill_group(proc)  # SIGKILL: no cleanup, no final report
    before = {p.name: (p / ckpt.MANIFEST).read_text() for p in ckpt.candidates(run_dir) if (p / ckpt.MANIFEST).exists()}
    killed_at = max(ckpt.load_state(run_dir / n)["epoch"] for n in before)
    assert killed_at < 6 and not (run_dir / "final_metrics.json").exists()

    refused = _train(args, ray_tmp)
    assert refused.returncode == 2 and "resume=true" in refused.stderr, refused.stderr[-2000:]

    resumed = _train(args + ["resume=true"], ray_tmp)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    # a local run has no dashboard: Train's placement-group cleaner would warn once a second
    assert "Failed to query Ray Train Controller" not in resumed.stdout + resumed.stderr
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["epoch"] == 6
    # earlier checkpoints still present are byte-for-byte what they were (num_to_keep=3 may retire old ones)
    for name, manifest in before.items():
        if (run_dir / name).exists():
            assert (run_dir / name / ckpt.MANIFEST).read_text() == manifest, name
    assert ckpt.verify(run_dir / ckpt.dir_name(6, final=True))
    # one TensorBoard folder, continuous steps, nothing duplicated by the re-run epochs
    steps = _tb_steps(run_dir, "epoch/train_loss")
    assert len(steps) == 6 and steps == sorted(set(steps)), steps


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readme_submit_block(readme: Path = ROOT / "README.md") -> str:
    """The shell commands of the README's job-submission section (the one fenced block between
    ``<!-- submit:start -->`` and ``<!-- submit:end -->``)."""
    text = readme.read_text()
    section = text[text.index("<!-- submit:start -->"):text.index("<!-- submit:end -->")]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the submit section must hold exactly one ```bash block"
    return blocks[0]


def _own_processes(*marks: str) -> list[int]:
    """Pids of processes whose command line holds one of ``marks`` (this test's temp dir or ports)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                cmdline = (d / "cmdline").read_bytes().decode(errors="replace").replace("\0", " ")
                if any(m in cmdline for m in marks):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_readme_job_submission_runs_as_written_with_token_auth(synthetic_log, tmp_path, ray_tmp):
    """The README's submit block, run line by line in bash against a loopback head, token auth on.

    What the test adds, for isolation only: a private HOME (the generated token goes there, not to
    ~/.ray) and RAY_TMPDIR; a ``ray`` shell function that moves ``ray start``'s ports off Ray's fixed
    defaults (another Ray on this machine must not collide) while the clients find the job API through
    RAY_API_SERVER_ADDRESS, which ``ray job`` honours; and, appended to the job's command as later
    overrides, this test's small data, a temporary output folder and one short epoch. PATH holds no
    venv: the block's own ``source .venv/bin/activate`` is what gives the job its Python."""
    if not (ROOT / ".venv" / "bin" / "activate").exists():
        pytest.skip("the README's recipe activates .venv (scripts/setup.sh creates it)")
    block = readme_submit_block()
    job_lines = [line for line in block.splitlines() if "python jobs/train.py" in line]
    assert len(job_lines) == 1, job_lines
    extra = [f"data.log={synthetic_log}", f"output_dir={tmp_path / 'runs'}", "train.epochs=1", *SMALL]
    block = block.replace(job_lines[0], f"{job_lines[0]} {' '.join(extra)}")
    dash = _free_port()
    ports = " ".join(f"--{flag}={_free_port()}" for flag in (
        "port", "ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
        "metrics-export-port", "runtime-env-agent-port"))
    # exec: `ray start ... &` then stays the process whose pid is $!, which the block's `kill $HEAD` stops
    prelude = ('ray() { if [ "$1" = start ]; then shift; exec "$(type -P ray)" start "$@" '
               f'--dashboard-port={dash} {ports}; fi; command ray "$@"; }}\n')
    ours = (ray_tmp, f"--dashboard-port={dash}")  # command-line marks of this test's head processes
    home = tmp_path / "home"
    home.mkdir()
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAYREC_FAULT", "RAY_AUTH_MODE", "VIRTUAL_ENV", "PYTHONPATH")
           and not k.startswith("RAY_DATA") and k not in ("PYTHONWARNINGS", "RAY_COLOR_PREFIX")}
    env.update(HOME=str(home), RAY_TMPDIR=ray_tmp, OMP_NUM_THREADS="1", RAY_API_SERVER_ADDRESS=f"http://127.0.0.1:{dash}",
               PATH=os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin))
    transcript = tmp_path / "transcript.txt"
    with transcript.open("w") as sink:
        proc = subprocess.Popen(["bash", "-e", "-x", "-c", prelude + block], env=env, cwd=ROOT, start_new_session=True,
                                stdout=sink, stderr=subprocess.STDOUT)
    try:
        proc.wait(timeout=480)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        pytest.fail(f"the README's submit block did not finish within 480 s\n{transcript.read_text()[-6000:]}")
    finally:
        deadline = time.monotonic() + 90  # `kill $HEAD` returns at once; the head then stops its processes
        while _own_processes(*ours) and time.monotonic() < deadline:
            time.sleep(1)
        for pid in _own_processes(*ours):  # left by a failed run: only this test's head and its workers
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    out = transcript.read_text()
    assert proc.returncode == 0, out[-8000:]
    assert (home / ".ray" / "auth_token").stat().st_size > 0  # the token the head and the clients used
    assert re.search(r"Job 'quickstart-\d{8}-\d{6}' succeeded", out), out[-6000:]
    run = next((tmp_path / "runs").glob("quickstart-*"))
    assert json.loads((run / "final_metrics.json").read_text())["epoch"] == 1
    epoch_line = r"^.*\bepoch 1/1  loss [\d.]+  \d+ seq/s  val_ndcg_10 [\d.]+  eta \S+$"
    assert len(re.findall(epoch_line, out, re.M)) == 1, out[-6000:]  # as `ray job logs --follow` printed it
    # the job's log as the head keeps it (what `ray job logs` serves): one clean line per epoch, no Ray noise
    [job_log] = {p.resolve() for p in Path(ray_tmp).glob(f"ray/session_*/logs/job-driver-{run.name}.log")}
    log = job_log.read_text()
    assert len(re.findall(epoch_line, log, re.M)) == 1 and f"finished {run.name}" in log, log[-4000:]
    for noise in ("\r", "\x1b[", "TrainingReport", "Checkpoint successfully created", "Failed to register placement group",
                  "Deprecat", "row/s"):
        assert noise not in log, (noise, log[-4000:])
    assert not _own_processes(*ours)


def test_preflight_refuses_an_oversized_working_dir_and_lists_the_largest_paths(tmp_path):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "train.py").write_text("print('hi')\n")
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "blob.bin").write_bytes(b"x" * 300_000)
    (tmp_path / "data").mkdir()  # data folders never travel with the code
    (tmp_path / "data" / "interactions.parquet").write_bytes(b"x" * 900_000)
    (tmp_path / ".gitignore").write_text("ignored/\n")
    (tmp_path / "ignored").mkdir()
    (tmp_path / "ignored" / "x.bin").write_bytes(b"x" * 900_000)
    files = package_files(tmp_path)
    assert "big/blob.bin" in files and not any(f.startswith(("data/", "ignored/")) for f in files)
    assert largest_paths(files)[0] in (("big/blob.bin", 300_000), ("big/", 300_000))
    assert preflight(tmp_path, limit=1_000_000) < 1_000_000
    with pytest.raises(SubmitError, match=r"over Ray's package limit(.|\n)*big/blob.bin"):
        preflight(tmp_path, limit=200_000)
    assert preflight(ROOT) < 20 * 2**20  # this repository, as submitted


def test_submit_refuses_a_non_loopback_job_api_without_token_auth(monkeypatch):
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    for ok in ("http://127.0.0.1:8265", "localhost:8265", "http://[::1]:8265"):
        assert check_address(ok)
    with pytest.raises(ConfigError, match="token"):
        check_address("http://10.0.0.5:8265")
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert check_address("http://10.0.0.5:8265")


def _node_loss(mode, synthetic_log, tmp_path, ray_tmp, timeout, **env):
    """Run tests/node_loss_run.py MODE in its own process group; its result JSON, stdout and wall time."""
    result = tmp_path / "result.json"
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "node_loss_run.py"), mode, synthetic_log,
                             str(tmp_path / "out"), str(result)], env=_env(ray_tmp, **env), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        out = proc.stdout.read()
        pytest.fail(f"{mode}: no result within {timeout} s\n{out[-6000:]}")
    finally:
        _kill_group(proc)  # the cluster's raylets and workers, if the driver left any behind
    wall = time.monotonic() - t0
    assert result.exists(), f"{mode}: the driver wrote no result (rc {proc.returncode})\n{out[-6000:]}"
    return json.loads(result.read_text()), out, wall


def _since_removal(events):
    t = dict(events["timeline"])
    removed = next(v for k, v in t.items() if k.startswith("node removed"))
    return t["fit returned"] - removed


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(240)
def test_node_lost_for_good_fails_fast_with_a_capacity_error(synthetic_log, tmp_path, ray_tmp):
    # one start attempt after the loss, 5 s for the placement group: the default (10 x 60 s) waits minutes
    events, out, wall = _node_loss("no_capacity", synthetic_log, tmp_path, ray_tmp, timeout=200,
                                   RAYREC_CAPACITY_RETRIES="1", RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="5")
    assert events.get("ok") is False and events["error_type"] == "CapacityError", (events, out[-6000:])
    err = events["error"]
    for needed in ("2 workers x 0.9 CPU = 1.8 CPUs", "the cluster now has 1 CPUs on 1 alive node",
                   "2 start attempt(s) of 5 s", "add nodes", "scale.num_workers", "RAYREC_AUTOSCALING=1",
                   "resume=true"):
        assert needed in err, (needed, err)
    assert _since_removal(events) < 60, events["timeline"]
    assert ckpt.latest(tmp_path / "out" / "nodeloss") is not None  # what was written before the loss is kept
    print(f"no_capacity: {wall:.0f} s in all, failed {_since_removal(events):.0f} s after the node was removed")


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(300)
def test_node_lost_then_capacity_returns_resumes_from_the_newest_valid_checkpoint(synthetic_log, tmp_path, ray_tmp):
    events, out, wall = _node_loss("recover", synthetic_log, tmp_path, ray_tmp, timeout=260,
                                   RAYREC_CAPACITY_RETRIES="3", RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="20")
    assert events.get("ok") is True, (events, out[-8000:])
    assert events["epoch"] == 8
    run = tmp_path / "out" / "nodeloss"
    # resumed exactly once, from a real checkpoint written before the loss: never the newer folders that
    # do not verify (99: no manifest, 98: truncated weights) nor the complete copies named .partial (96, 97)
    (resumed,) = events["resumed_at_epochs"]
    assert events["removed_after"] <= events["newest_valid"] == resumed < 8, events
    assert f"{ckpt.dir_name(99)}: no {ckpt.MANIFEST}" in out
    assert f"{ckpt.dir_name(98)}: {ckpt.MODEL} has" in out
    resumed_from = {line.split("resumed from ")[1].split()[0] for line in out.splitlines() if "resumed from " in line}
    assert resumed_from == {str(run / ckpt.dir_name(resumed))}, resumed_from  # both ranks, one folder, no .partial
    assert ckpt.verify(run / ckpt.dir_name(8, final=True))
    assert (run / f"{ckpt.dir_name(96)}.partial").is_dir()  # left alone, never a candidate
    print(f"recover: {wall:.0f} s in all, resumed at epoch {resumed}, done {_since_removal(events):.0f} s after "
          "the node was removed")
