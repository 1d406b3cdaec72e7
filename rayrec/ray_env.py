"""Starting Ray with the settings that avoid the hangs measured on small machines (RAY_NOTES.md)."""
from __future__ import annotations

import os
import re
import socket
import sys

DEFAULTS = {
    "RAY_TRAIN_V2_ENABLED": "1",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "OMP_NUM_THREADS": "1",
    # the V2 Parquet reader starts a FooterReader actor pool for every read: seconds of CPU per
    # run or Tune trial on small nodes, for footer statistics rayrec never pushes predicates into
    "RAY_DATA_USE_DATASOURCE_V2": "0",
    # Train's Prometheus metric callbacks cost CPU in every trial; export them with =1 when scraped
    "RAY_TRAIN_METRICS_ENABLED": "0",
}


VERBOSE_ENV = "RAYREC_VERBOSE"  # =1: Ray's own per-report, per-checkpoint and per-dataset lines come back


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_env() -> dict[str, str]:
    """Settings for every Ray process of a run that keep its output to one line per epoch; none when
    ``RAYREC_VERBOSE=1``. An explicit setting in the environment wins over these.

    - ``RAY_DATA_LOG_LEVEL=WARNING``: Ray Data's INFO lines (an execution plan, a "finished in" line
      and logged progress for every dataset a driver or Train worker runs) stay off the console and
      out of its session log ``ray-data.log``; warnings and errors still show.
    - ``PYTHONWARNINGS=ignore::DeprecationWarning``: deprecations that Ray's own code triggers in
      Ray's processes (Ray Train's data config sets ``ExecutionOptions.exclude_resources``), which
      no rayrec user can act on.
    """
    if verbose():
        return {}
    return {"RAY_DATA_LOG_LEVEL": "WARNING", "PYTHONWARNINGS": "ignore::DeprecationWarning"}


def set_env() -> None:
    """Before Ray starts (its processes inherit this process's environment): DEFAULTS, ``quiet_env()``,
    and, when stdout is not a terminal, worker log prefixes without colour codes (``RAY_COLOR_PREFIX=0``,
    read by this driver when it prints its workers' lines)."""
    for k, v in {**DEFAULTS, **quiet_env()}.items():
        os.environ.setdefault(k, v)
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def worker_env() -> dict[str, str]:
    """What a driver joining an existing cluster (``ray job submit``) hands its workers through the
    job's ``runtime_env``: the quiet settings and the verbosity switch, except keys the job's own
    runtime_env already sets (Ray refuses to merge a key given twice)."""
    import json

    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    job = json.loads(os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR) or "{}")
    taken = set(((job.get("runtime_env") or {}).get("env_vars") or {}))
    env = {k: os.environ.get(k, v) for k, v in quiet_env().items()}
    if verbose():
        env[VERBOSE_ENV] = os.environ[VERBOSE_ENV]
    return {k: v for k, v in env.items() if k not in taken}


def init_ray(num_cpus: int | None = None, address: str | None = None, **kwargs) -> None:
    """Connect to ``RAY_ADDRESS``/``address`` when given (a cluster, ``ray job submit``); else start locally."""
    set_env()
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if not sys.stdout.isatty():
        import logging

        logging.getLogger("ray._private.worker").addFilter(_PlainText())  # its connect message colours a URL
    if address:
        runtime_env = dict(kwargs.pop("runtime_env", None) or {})
        if env_vars := {**worker_env(), **runtime_env.get("env_vars", {})}:
            runtime_env["env_vars"] = env_vars
        ray.init(address=address, runtime_env=runtime_env or None, **kwargs)
    else:
        start_local_ray(num_cpus=num_cpus, include_dashboard=False, **kwargs)


def start_local_ray(**kwargs) -> str:
    """Start a new local Ray whose own processes know its address; returns that address.

    Ray code running inside the cluster sometimes finds "its" cluster by scanning the machine for GCS
    processes (Ray Train's placement-group cleaner does, through the State API). With a second Ray on
    the machine (another user's, a test session's) that lookup fails ("Found multiple active Ray
    instances") or picks the wrong cluster; the cleaner then never frees the CPUs of a trial that
    Tune stopped, and a sweep waits forever. So the GCS port is chosen here and every worker of this
    job gets ``RAY_ADDRESS`` pointing at it.
    """
    set_env()
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    port = free_port()
    address = f"{ray.util.get_node_ip_address()}:{port}"
    runtime_env = dict(kwargs.pop("runtime_env", None) or {})
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), "RAY_ADDRESS": address}
    if not kwargs.get("include_dashboard", True):
        runtime_env.setdefault("worker_process_setup_hook", quiet_local_workers)
        # Without a dashboard Ray still records 127.0.0.1:8265 as this cluster's API server, and Train's
        # placement-group cleaner asks whatever listens there whether this run's controller lives: with
        # another Ray's dashboard on the machine (a sweep) it hears "no such actor" and removes the
        # run's placement group, which kills the run (or, when that happens before the controller
        # registers, "Failed to register placement group with cleaner"). A port where nothing listens
        # makes its queries fail instead, and it keeps waiting (quiet_local_workers drops the warnings).
        kwargs.setdefault("dashboard_port", free_port())
    before = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read by the head node Ray starts in this process
    try:
        ray.init(address="local", runtime_env=runtime_env, **kwargs)
    finally:
        if before is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = before
    return address


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class _PlainText:
    """Strips terminal colour codes from a log record (logging filter)."""

    ANSI = re.compile(r"\x1b\[[0-9;]*m")

    def filter(self, record) -> bool:
        record.msg, record.args = self.ANSI.sub("", record.getMessage()), None
        return True


class _Drop:
    """Drops log records whose message holds ``text`` (logging filter)."""

    def __init__(self, text: str):
        self.text = text

    def filter(self, record) -> bool:
        return self.text not in record.getMessage()


LOCAL_NOISE = {  # logger -> message that means nothing on a local Ray without dashboard or autoscaler
    # the placement-group cleaner asks the State API, which the dashboard serves, whether the
    # controller is alive: once a second for the whole run; a local run's placement groups go with
    # the driver anyway
    "ray.train.v2._internal.execution.controller.placement_group_cleaner":
        "Failed to query Ray Train Controller actor state",
    # the controller asks an autoscaling coordinator for its workers' resources and waits 5 s for the
    # reply: on a busy machine the coordinator's process takes longer to start, and 18 lines of
    # traceback say it is "safe to ignore"; no autoscaler reads the request here
    "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client":
        "Failed to send resource request",
}


def quiet_local_workers() -> None:
    """Worker set-up hook for a local Ray without the dashboard: drops ``LOCAL_NOISE``."""
    import logging

    for name, text in LOCAL_NOISE.items():
        logging.getLogger(name).addFilter(_Drop(text))


def quiet_train_worker() -> None:
    """In a Ray Train worker, before its first report: Ray Train logs every ``ray.train.report`` of
    every rank at INFO ("Reporting training result N: TrainingReport(...)", every metric, up to 1,300
    characters) on a logger named after its source file, which ``LoggingConfig`` does not reach.
    Off unless RAYREC_VERBOSE=1."""
    import logging

    if verbose():
        return
    from ray.train.v2._internal.execution import context, train_fn_utils

    logging.getLogger(context.__file__).setLevel(logging.WARNING)
    # with scale.num_workers=0 the loop runs in the driver, where Train logs every report whole
    # ("Reported metrics: {...}") on this module's logger instead
    logging.getLogger(train_fn_utils.__name__).setLevel(logging.WARNING)


def train_logging_config():
    """Ray Train's own INFO lines (worker-group start, "Checkpoint successfully created" per
    checkpoint) only with RAYREC_VERBOSE=1; its warnings and errors always."""
    from ray.train import LoggingConfig

    return LoggingConfig(log_level="INFO" if verbose() else "WARNING")


def progress_bars_on_a_terminal() -> None:
    """Ray Data progress bars only when this process's stdout is a terminal. Train workers run their
    dataset shards with distributed tqdm bars that the driver redraws with carriage returns and
    cursor-up codes whatever its output is: in a file or ``ray job logs`` every epoch line then lands
    inside a bar that is re-printed every few seconds. Set before the trainer is built: Ray Train
    hands this DataContext to its workers, which then log progress (at INFO, see ``quiet_env``)."""
    from ray.data import DataContext

    if not sys.stdout.isatty():
        ctx = DataContext.get_current()
        # without ray's tqdm, Ray Data falls back to plain tqdm bars in the driver (e.g. "Parquet
        # dataset sampling" when a read starts), which write carriage returns into the file too
        ctx.use_ray_tqdm = ctx.enable_progress_bars = False
        import logging

        from ray.data._internal import progress  # it says once, at WARNING, that the bars are off

        logging.getLogger(progress.__name__).addFilter(_Drop("Progress bars disabled"))
