"""One local Ray cluster per test session, tiny synthetic data, small timeouts."""
from __future__ import annotations

import os

import pytest

from rayrec.ray_env import free_port, set_env

set_env()
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    # a private dashboard port, as start_local_ray gives: Ray records 8265 otherwise, and Train's placement-group
    # cleaner would ask another Ray's dashboard there whether our controllers live (rayrec/ray_env.py)
    ray.init(num_cpus=2, object_store_memory=1 << 30, log_to_driver=False, include_dashboard=False,
             dashboard_port=free_port())
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_log(tmp_path_factory):
    """A small log with sequential signal, shared by the Ray tests."""
    from data_prep.common import write_log
    from data_prep.synthetic import SyntheticSpec, generate

    out = tmp_path_factory.mktemp("synthetic")
    return str(write_log(generate(SyntheticSpec(users=600, items=200, mean_len=25, seed=3)), out, source="synthetic"))


def write_parquet_log(path, rows: list[tuple]) -> str:
    """A crafted log from (user, item, timestamp) rows, in the given row order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    u, i, t = zip(*rows)
    pq.write_table(pa.table({"user_id": list(u), "item_id": list(i), "timestamp": pa.array(t, pa.int64())}), path)
    return str(path)
