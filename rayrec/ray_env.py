"""Starting Ray with the settings that avoid the hangs measured on small machines (RAY_NOTES.md)."""
from __future__ import annotations

import os
import socket

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


def set_env() -> None:
    for k, v in DEFAULTS.items():
        os.environ.setdefault(k, v)


def init_ray(num_cpus: int | None = None, address: str | None = None, **kwargs) -> None:
    """Connect to ``RAY_ADDRESS``/``address`` when given (a cluster, ``ray job submit``); else start locally."""
    set_env()
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **kwargs)
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
