"""Issue 22, defects 9-11: remote storage errors, refused checkpoints and permanent failures end in
one clear ``error:`` line (exit 2 from the CLI), never a raw traceback, a retry loop or an output
that claims success.

The CLI cases run ``jobs/*.py`` in a subprocess; the storage ones against loopback servers only
(a closed port, a server that answers 403 to everything, moto's S3 for a missing key)."""
import errno
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from ray.train.v2._internal.execution.callback import ReportCallback, WorkerGroupCallback

from rayrec.config import ConfigError, load_config
from rayrec.data.log import DataError, storage_error
from rayrec.train import checkpoint as ckpt
from rayrec.train import failures
from rayrec.train.faults import CollectiveTimeout, InjectedFault

ROOT = Path(__file__).resolve().parent.parent
SUCCESS = ("finished ", "checkpoint:", "sequences ready", "evaluation of", "run folder:")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(job: str, args: list[str], env: dict | None = None, timeout: int = 120) -> tuple[int, str, str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    full.update(RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env or {}))
    p = subprocess.run([sys.executable, str(ROOT / "jobs" / f"{job}.py"), *args], env=full, cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def _assert_one_error_line(rc: int, out: str, err: str, *fragments: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == 2 and len(lines) == 1, f"rc={rc}\n{err[-4000:]}"
    assert "Traceback" not in err and not any(s in out for s in SUCCESS), out + err
    for f in fragments:
        assert f in lines[0], lines[0]
    return lines[0]


# ---- 9: remote storage ------------------------------------------------------------------------

class _Deny(http.server.BaseHTTPRequestHandler):
    """An S3 endpoint that refuses every request, as S3 does for bad credentials."""

    def _deny(self):
        body = b'<?xml version="1.0"?><Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>'
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_PUT = do_POST = _deny

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def s3_endpoints(tmp_path_factory):
    """{kind: endpoint URL}: a closed port, a server answering 403, and moto's S3 with one empty bucket."""
    deny = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Deny)
    threading.Thread(target=deny.serve_forever, daemon=True).start()
    ends = {"unreachable": f"http://127.0.0.1:{_free_port()}", "unauthorised": f"http://127.0.0.1:{deny.server_port}"}
    moto = None
    moto_bin = Path(sys.executable).parent / "moto_server"
    if moto_bin.exists():
        port = _free_port()
        moto = subprocess.Popen([str(moto_bin), "-H", "127.0.0.1", "-p", str(port)], start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert moto.poll() is None and time.monotonic() < deadline, "moto_server did not come up"
                time.sleep(0.2)
        import boto3

        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="t", aws_secret_access_key="t",
                     region_name="us-east-1").create_bucket(Bucket="rayrec")
        ends["missing"] = f"http://127.0.0.1:{port}"
    yield ends
    deny.shutdown()
    if moto is not None:
        os.killpg(moto.pid, signal.SIGKILL)
        moto.wait(timeout=30)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind, log, fragments", [
    ("unreachable", "s3://rayrec/log.parquet",
     ["cannot reach the storage holding 's3://rayrec/log.parquet'", "AWS_ENDPOINT_URL", "NETWORK_CONNECTION"]),
    ("unauthorised", "s3://rayrec/log.parquet",
     ["access to 's3://rayrec/log.parquet' was refused (unauthorised)", "credentials", "ACCESS_DENIED"]),
    ("missing", "s3://rayrec/no/such.parquet", ["data.log 's3://rayrec/no/such.parquet' does not exist"]),
    ("missing", "s3://no-such-bucket/log.parquet", ["data.log 's3://no-such-bucket/log.parquet' does not exist"]),
], ids=["unreachable", "unauthorised", "missing-key", "missing-bucket"])
def test_remote_log_errors_are_one_line_telling_unreachable_unauthorised_and_missing_apart(
        s3_endpoints, tmp_path, kind, log, fragments):
    if kind not in s3_endpoints:
        pytest.skip("needs moto[server] (the dev extra)")
    cfg = tmp_path / "remote.yaml"
    cfg.write_text(f"name: remote\noutput_dir: {tmp_path / 'runs'}\n")
    env = {"AWS_ENDPOINT_URL": s3_endpoints[kind], "AWS_ACCESS_KEY_ID": "t", "AWS_SECRET_ACCESS_KEY": "t",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    t0 = time.monotonic()
    rc, out, err = _cli("train", [str(cfg), f"data.log={log}"], env)
    line = _assert_one_error_line(rc, out, err, *fragments)
    assert time.monotonic() - t0 < 60, "an unreachable endpoint must fail within seconds"
    if kind != "missing":
        assert "does not exist" not in line, line
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("text, cls, expect", [
    # pyarrow's own texts (S3FileSystem), as measured against each kind of endpoint
    ("When resolving region for bucket 'b': AWS Error NETWORK_CONNECTION during HeadBucket operation: curlCode: 6, "
     "Could not resolve hostname; Details: Could not resolve host: b.s3.us-east-1.amazonaws.com", OSError,
     ["cannot reach the storage", "set AWS_DEFAULT_REGION"]),
    ("When getting information for key 'k' in bucket 'b': AWS Error NETWORK_CONNECTION during HeadObject operation: "
     "curlCode: 7, Could not connect to server; Details: Failed to connect to 127.0.0.1:18403 after 0 ms", OSError,
     ["cannot reach the storage"]),
    ("When getting information for key 'k' in bucket 'b': AWS Error ACCESS_DENIED during HeadObject operation: "
     "No response body.", OSError, ["was refused (unauthorised)"]),
    ("[Errno 13] Permission denied: '/data/log.parquet'", PermissionError, ["was refused (unauthorised)"]),
    ("something else went wrong", OSError, ["cannot read 's3://b/k': something else"]),
], ids=["no-region-no-network", "closed-port", "access-denied", "local-permission", "other"])
def test_storage_errors_are_classified_from_pyarrow_texts(text, cls, expect):
    e = storage_error("s3://b/k", cls(text))
    assert isinstance(e, DataError) and "\n" not in str(e)
    for f in expect:
        assert f in str(e), str(e)


# ---- 10: refused checkpoints ------------------------------------------------------------------

def _checkpoint(folder: Path, epoch: int, log: str) -> Path:
    cfg = load_config(ROOT / "configs" / "quickstart.yaml",
                      [f"data.log={log}", "name=ck", f"output_dir={folder.parent.parent}"])
    w = {"w": torch.ones(2, 2)}
    return ckpt.save(folder, model_state=w, best_state=w, optimizer_state={"state": {}, "param_groups": []},
                     state={"epoch": epoch, "global_step": epoch}, config_yaml=cfg.to_yaml())


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _edit_state(f: Path, marker: Path):
    text = (f / ckpt.STATE).read_text()
    (f / ckpt.STATE).write_text(text.replace('"epoch": 1', '"epoch": 7'))  # same size, another sha256


def _no_manifest(f: Path, marker: Path):
    (f / ckpt.MANIFEST).unlink()


def _pickle_as_weights(f: Path, marker: Path):  # tampered, and the manifest rewritten to match
    torch.save(_Payload(marker), f / ckpt.MODEL)
    torch.save(_Payload(marker), f / ckpt.BEST)
    ckpt.write_manifest(f)


def _pickle_as_optimizer(f: Path, marker: Path):
    torch.save({"optimizer": _Payload(marker), "scheduler": None}, f / ckpt.OPTIM)
    ckpt.write_manifest(f)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("job, target, damage, fragments", [
    ("evaluate", "run", _edit_state,
     ["no checkpoint in", "passed its manifest check", "checkpoint_000001: state.json", "sha256"]),
    ("evaluate", "run", _no_manifest, ["no checkpoint in", "checkpoint_000001: no manifest.json"]),
    ("evaluate", "checkpoint", _pickle_as_weights, ["best_model.safetensors: not a valid safetensors file"]),
    ("train", "resume", _edit_state, ["no checkpoint to resume ck from", "checkpoint_000001: state.json"]),
    ("train", "resume", _pickle_as_optimizer, ["optimizer.pt: refused", "GLOBAL posix.system", "nothing in it was run"]),
    ("train", "resume", _pickle_as_weights, ["model.safetensors: not a valid safetensors file"]),
], ids=["evaluate-run-edited", "evaluate-run-no-manifest", "evaluate-tampered-weights", "resume-edited",
        "resume-tampered-optimizer", "resume-tampered-weights"])
def test_refused_checkpoints_are_one_line_naming_the_file_and_reason(synthetic_log, tmp_path, job, target, damage,
                                                                      fragments):
    run = tmp_path / "runs" / "ck"
    folder = _checkpoint(run / ckpt.dir_name(1), 1, synthetic_log)
    marker = tmp_path / "pwned"
    damage(folder, marker)
    if job == "evaluate":
        args = [str(run if target == "run" else folder)]
    else:
        args = [str(ROOT / "configs" / "quickstart.yaml"), f"data.log={synthetic_log}", "name=ck",
                f"output_dir={tmp_path / 'runs'}", "resume=true"]
    before = sorted(p.name for p in run.iterdir())
    rc, out, err = _cli(job, args)
    _assert_one_error_line(rc, out, err, *fragments)
    assert not marker.exists()  # nothing unsafe ran
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written: no evaluation_*.json, no new run


# ---- 11: permanent failures are not retried ---------------------------------------------------

class _Boom(Exception):
    pass


@pytest.mark.parametrize("err, permanent", [
    (PermissionError(errno.EACCES, "Permission denied"), True),
    (PermissionError(errno.EPERM, "Cannot create directory '/r/checkpoint_000002'. Detail: [errno 1]"), True),
    (OSError(errno.EROFS, "Read-only file system"), True),
    (OSError(errno.ENOSPC, "No space left on device"), True),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory"), True),
    (ConfigError("bad config"), True),
    (DataError("bad data"), True),
    (ckpt.CheckpointError("refused"), True),
    (OSError("When getting information for key 'k': AWS Error NETWORK_CONNECTION"), False),  # no errno: a blip
    (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), False),
    (InjectedFault("worker raised"), False),
    (CollectiveTimeout("rank 1 stalled"), False),
    (_Boom("anything else"), False),
], ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v))
def test_permanent_failures_are_classified(err, permanent):
    from ray.train import ControllerError, WorkerGroupError

    assert (failures.permanent_reason(err) is not None) == permanent
    # what fit raises: the worker's own error when its message is the whole story, else one named line
    got = failures.unwrap(WorkerGroupError("rank 0 failed", {1: _Boom("collateral"), 0: err}))
    assert (got is not None) == permanent
    if permanent:
        assert got is err if isinstance(err, failures.CLEAR) else "training stopped without retrying: rank 0" in str(got)
        assert failures.unwrap(ControllerError(got)) is got

    # the controller hook turns Ray's RETRY into a stop only for a permanent failure
    class Status:
        errors = {0: err}

    cb = failures.StopOnPermanent()
    cb.after_worker_group_poll_status(Status())
    decision = type("D", (), {"value": "RETRY"})()
    if permanent:
        with pytest.raises(type(failures.stop_error(err, 0))):
            cb.before_controller_execute_failure_decision(decision)
    else:
        cb.before_controller_execute_failure_decision(decision)


def test_cli_maps_a_permanent_failure_to_one_error_line(monkeypatch, capsys):
    import rayrec.data.prepare
    import rayrec.train.fit
    from rayrec.cli import main

    def fail(cfg, callbacks=None):
        raise failures.stop_error(PermissionError(errno.EPERM, "Operation not permitted"), 0)

    monkeypatch.setattr(rayrec.data.prepare, "ensure_log", lambda cfg: cfg.log)
    monkeypatch.setattr(rayrec.train.fit, "fit", fail)
    assert main(["train", str(ROOT / "configs" / "quickstart.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "training stopped without retrying: rank 0" in err, err


class _BreakRunDirAfterEpoch1(WorkerGroupCallback, ReportCallback):
    """Test-only Ray Train callback (runs in the controller): after epoch 1's report, the run folder
    becomes immutable (chattr +i: root cannot create files in it either), a real filesystem failure
    for every later checkpoint; every worker-group start leaves a mark in ``marks``."""

    def __init__(self, run_dir: Path, marks: Path):
        self.run_dir, self.marks = run_dir, marks

    def after_worker_group_start(self, worker_group):
        (self.marks / f"start-{uuid.uuid4().hex}").touch()

    def after_report(self, training_report, metrics):
        epoch = metrics[0].get("epoch")
        (self.marks / f"report-{epoch}-{uuid.uuid4().hex}").touch()
        if epoch == 1:
            subprocess.run(["chattr", "+i", str(self.run_dir)], check=True)


def _chattr_works(tmp_path: Path) -> bool:
    probe = tmp_path / "chattr-probe"
    probe.mkdir()
    try:
        if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode != 0:
            return False
        try:
            (probe / "x").touch()
            return False  # not enforced here
        except PermissionError:
            return True
    except FileNotFoundError:  # no chattr
        return False
    finally:
        subprocess.run(["chattr", "-i", str(probe)], capture_output=True)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_unwritable_run_folder_fails_once_without_retrying(ray_cluster, synthetic_log, tmp_path):
    from rayrec.train.fit import fit

    if not _chattr_works(tmp_path):
        pytest.skip("needs chattr +i on this filesystem (ext4/xfs, CAP_LINUX_IMMUTABLE)")
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [
        f"data.log={synthetic_log}", f"output_dir={tmp_path / 'runs'}", "name=unwritable", "train.epochs=6",
        "train.max_steps_per_epoch=2", "train.batch_size=64", "model.max_len=20", "model.hidden=32",
        "scale.max_failures=2"])
    marks = tmp_path / "marks"
    marks.mkdir()
    t0 = time.monotonic()
    try:
        with pytest.raises(failures.PermanentError) as e:
            fit(cfg, callbacks=[_BreakRunDirAfterEpoch1(cfg.run_dir, marks)])
    finally:
        subprocess.run(["chattr", "-i", str(cfg.run_dir)], capture_output=True)
    elapsed = time.monotonic() - t0
    msg = str(e.value)
    assert "training stopped without retrying" in msg and "PermissionError" in msg, msg
    assert "operation not permitted" in msg and "resume=true" in msg and "\n" not in msg, msg
    starts = [m for m in marks.iterdir() if m.name.startswith("start-")]
    reports = sorted(m.name.split("-")[1] for m in marks.iterdir() if m.name.startswith("report-"))
    assert len(starts) == 1, sorted(m.name for m in marks.iterdir())  # no retry: the worker group started once
    assert len(reports) == len(set(reports)), reports  # no epoch reported twice
    assert not (cfg.run_dir / "final_metrics.json").exists()
    assert elapsed < 150, elapsed
