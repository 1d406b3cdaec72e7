"""Starting Ray with the settings that avoid the hangs measured on small machines (RAY_NOTES.md)."""
from __future__ import annotations

import os

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
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=num_cpus, include_dashboard=False, **kwargs)
