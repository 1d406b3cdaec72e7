"""What a run prints: one clean line per epoch, in a terminal, a redirected file and ``ray job logs``;
Ray's own per-report, per-checkpoint and per-dataset lines only with RAYREC_VERBOSE=1."""
import http.server
import inspect
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from rayrec import ray_env
from rayrec.train.console import EpochClock, duration, epoch_line

ROOT = Path(__file__).resolve().parent.parent
EPOCH_LINE = re.compile(r"\bepoch (\d+)/(\d+)  loss [\d.]+  \d+ seq/s  (val_ndcg_10 [\d.]+  )?eta \S+$")


def test_duration_and_epoch_line():
    assert [duration(s) for s in (0, 42.4, 185, 7620, math.nan)] == ["0s", "42s", "3m05s", "2h07m", "?"]
    m = {"epoch": 3, "train_loss": 1.26641, "seq_per_s": 520.7}
    assert epoch_line(m, 30, "val_ndcg_10", 372) == "epoch 3/30  loss 1.2664  521 seq/s  eta 6m12s"
    line = epoch_line({**m, "val_ndcg_10": 0.07049}, 30, "val_ndcg_10", 372)
    assert line == "epoch 3/30  loss 1.2664  521 seq/s  val_ndcg_10 0.0705  eta 6m12s" and EPOCH_LINE.search(line)
    clock = EpochClock(first_epoch=4, epochs=10)  # a resumed run: the pace of the epochs this call ran
    clock.t0 -= 20.0
    assert math.isnan(clock.eta_s(4)) and clock.eta_s(6) == pytest.approx(10 * 4, rel=0.05)


def test_verbosity_switch(monkeypatch):
    from ray.train.v2._internal.execution import context

    # the logger quiet_train_worker turns down is the one Ray Train's per-report line goes to
    source = inspect.getsource(context)
    assert "logging.getLogger(__file__)" in source and "Reporting training result" in source
    report_logger = logging.getLogger(context.__file__)
    monkeypatch.setattr(report_logger, "level", logging.NOTSET)

    monkeypatch.delenv("RAYREC_VERBOSE", raising=False)
    assert ray_env.train_logging_config().log_level == "WARNING"
    assert ray_env.quiet_env() == {"RAY_DATA_LOG_LEVEL": "WARNING", "PYTHONWARNINGS": "ignore::DeprecationWarning"}
    ray_env.quiet_train_worker()
    assert report_logger.level == logging.WARNING

    monkeypatch.setenv("RAYREC_VERBOSE", "1")
    report_logger.setLevel(logging.NOTSET)
    assert ray_env.train_logging_config().log_level == "INFO" and ray_env.quiet_env() == {}
    ray_env.quiet_train_worker()
    assert report_logger.level == logging.NOTSET


def test_a_driver_joining_a_cluster_hands_the_settings_to_its_workers(monkeypatch):
    monkeypatch.delenv("RAYREC_VERBOSE", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert ray_env.worker_env() == ray_env.quiet_env()
    # keys the job's own runtime_env sets stay the job's (Ray refuses to merge a key given twice)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"env_vars": {"RAYREC_VERBOSE": "1"}}}))
    monkeypatch.setenv("RAYREC_VERBOSE", "1")
    assert ray_env.worker_env() == {}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://x.zip"}}))
    assert ray_env.worker_env() == {"RAYREC_VERBOSE": "1"}


def test_progress_bars_only_on_a_terminal(monkeypatch):
    from ray.data import DataContext

    ctx = DataContext.get_current()
    monkeypatch.setattr(ctx, "use_ray_tqdm", True)
    monkeypatch.setattr(ctx, "enable_progress_bars", True)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True, raising=False)
    ray_env.progress_bars_on_a_terminal()
    assert ctx.use_ray_tqdm and ctx.enable_progress_bars
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    ray_env.progress_bars_on_a_terminal()
    assert not ctx.use_ray_tqdm and not ctx.enable_progress_bars  # not even plain tqdm in the driver


class _OtherRaysDashboard(http.server.BaseHTTPRequestHandler):
    """Another Ray's dashboard on this machine, as far as the State API goes: it knows no actor."""

    def do_GET(self):  # noqa: N802 - http.server's name
        body = json.dumps({"result": True, "msg": "", "data": {"result": {"result": [], "total": 0}}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def other_ray_dashboard():
    """127.0.0.1:8265 answered by a dashboard that is not this run's (a sweep running beside it).
    Ray records that address for a local Ray without a dashboard; if something else already serves
    it, that is the same situation."""
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 8265), _OtherRaysDashboard)
    except OSError:
        yield
        return
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield
    server.shutdown()
    server.server_close()


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("workers", ["2", "0"])  # 0: the loop runs in the driver, where Train logs reports itself
def test_a_redirected_run_prints_one_clean_line_per_epoch(synthetic_log, tmp_path, other_ray_dashboard, workers):
    """jobs/train.py with stdout and stderr in a file, as under nohup, CI or `ray job logs`: every epoch
    on its own newline-terminated line, no progress-bar fragments, none of Ray's per-report lines. With
    another Ray's dashboard on 127.0.0.1:8265, Train's placement-group cleaner used to take this run's
    controller for dead and remove its placement group (the run died, or warned "Failed to register
    placement group with cleaner")."""
    epochs = 3
    quiet = ("RAY_DATA_LOG_LEVEL", "PYTHONWARNINGS", "RAY_COLOR_PREFIX", "RAYREC_VERBOSE", "RAY_ADDRESS", "RAYREC_FAULT")
    env = {k: v for k, v in os.environ.items() if k not in quiet}  # the run must set these itself
    ray_tmp = tempfile.mkdtemp(prefix="rr")  # its own Ray: short, for Ray's socket paths (< 107 bytes)
    env.update(RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), RAY_TMPDIR=ray_tmp)
    out = tmp_path / "run.log"
    with out.open("wb") as sink:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "jobs" / "train.py"), str(ROOT / "configs" / "quickstart.yaml"),
             f"data.log={synthetic_log}", f"output_dir={tmp_path / 'runs'}", "name=quiet", f"train.epochs={epochs}",
             "train.patience=0", "train.eval_every=2", "train.max_steps_per_epoch=3", "train.batch_size=64",
             "model.max_len=20", "model.hidden=32", "train.warmup_steps=2", f"scale.num_workers={workers}"],
            env=env, cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT, timeout=360, start_new_session=True)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    text = out.read_bytes().decode()
    assert proc.returncode == 0, text[-4000:]
    assert text.endswith("\n")
    lines = text.split("\n")
    epoch_lines = [m for m in map(EPOCH_LINE.search, lines) if m]
    assert [(int(m[1]), int(m[2])) for m in epoch_lines] == [(e, epochs) for e in range(1, epochs + 1)], text
    assert [bool(m[3]) for m in epoch_lines] == [False, True, True]  # the metric when the epoch was evaluated
    for noise in ("\r", "\x1b[", "TrainingReport", "Checkpoint successfully created", "Failed to register placement group",
                  "controller actor", "Deprecat", "row/s", "Running Dataset", "Traceback", "Reported metrics"):
        assert noise not in text, (noise, text)
    assert len(lines) <= 50, text  # start-up 3 lines, the epochs, the final metric table and paths
