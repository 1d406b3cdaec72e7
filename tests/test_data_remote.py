"""The sequence build on remote storage (S3 on a loopback server) and on a two-node Ray cluster.

Each build runs in a subprocess with its own Ray and a private RAY_TMPDIR (see test_fault_cluster.py):
the S3 one because Ray's workers must inherit the AWS_* variables, the two-node one because the
shared session cluster must not be disturbed. Only the processes a test started are killed."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rayrec.config import DataConfig
from rayrec.data.sequences import build_sequences

ROOT = Path(__file__).resolve().parent.parent
SPLIT = ("train_len", "val_pos", "test_pos")


@pytest.fixture
def ray_tmp():
    """A private, short RAY_TMPDIR (Ray's unix socket paths must stay under 107 bytes)."""
    path = tempfile.mkdtemp(prefix="rr")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(ray_tmp: str, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",) and not k.startswith("AWS_")}
    env.update(RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), RAY_TMPDIR=ray_tmp, **extra)
    return env


def _run(code: str, args: dict, env: dict, timeout: int) -> dict:
    """Run ``code`` (reads sys.argv[1] as JSON, writes its result to args['out']) in its own process group."""
    log = Path(args["out"]).with_suffix(".log")  # a file, not a pipe: Ray's daemons may inherit and hold it
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(args)], env=env, cwd=ROOT,
                                start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the driver's group: its Ray processes too, if any were left
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
    assert proc.returncode == 0 and Path(args["out"]).exists(), f"rc={proc.returncode}\n{log.read_text()[-6000:]}"
    return json.loads(Path(args["out"]).read_text())


# shared by the subprocess scripts: users -> (raw item ids, split columns), and a hash of it
_BY_USER = r'''
import hashlib, json
import pyarrow.parquet as pq

def by_user(root):
    t = pq.read_table(root + "/sequences")
    vocab = pq.read_table(root + "/vocab/items.parquet")
    raw = dict(zip(vocab["item_idx"].to_pylist(), vocab["item_id"].to_pylist()))
    return {str(r["user_id"]): [[raw[i] for i in r["items"]], r["train_len"], r["val_pos"], r["test_pos"]]
            for r in t.to_pylist()}

def digest(root):
    return hashlib.sha256(json.dumps(by_user(root), sort_keys=True).encode()).hexdigest()
'''

_S3_BUILD = _BY_USER + r'''
import sys, ray
from rayrec.config import DataConfig
from rayrec.data.sequences import build_sequences

a = json.loads(sys.argv[1])
ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=300 << 20)
ray.data.DataContext.get_current().enable_progress_bars = False
beside = build_sequences(DataConfig(log=a["s3_log"]))  # default cache: _rayrec_cache next to the log
remote = build_sequences(DataConfig(log=a["s3_log"], cache_dir=a["s3_cache"]))
again = build_sequences(DataConfig(log=a["s3_log"], cache_dir=a["s3_cache"]))
local = build_sequences(DataConfig(log=a["local_log"], cache_dir=a["local_cache"]))
res = {"beside_root": beside.root, "root": remote.root, "users": remote.num_users,
       "hit": again.meta["timings"] == remote.meta["timings"],
       "rows_read_by_ray": ray.data.read_parquet(remote.sequences_path).count(),  # what training reads
       "ignored": remote.meta["ignored_files"],
       "beside": digest(beside.root), "remote": digest(remote.root), "local": digest(local.root)}
ray.shutdown()
open(a["out"], "w").write(json.dumps(res))
'''


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_sequences_build_on_s3_matches_a_local_build(synthetic_log, tmp_path, ray_tmp):
    pytest.importorskip("moto", reason="needs moto[server] (the dev extra)")
    boto3 = pytest.importorskip("boto3")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    aws = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "rayrec-test", "AWS_SECRET_ACCESS_KEY": "rayrec-test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
           # no credentials or config from this machine's ~/.aws
           "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              env=_env(ray_tmp), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "moto_server did not come up"
                time.sleep(0.2)
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="rayrec-test",
                          aws_secret_access_key="rayrec-test", region_name="us-east-1")
        s3.create_bucket(Bucket="rayrec")
        log_dir = Path(synthetic_log).parent  # interactions.parquet and meta.json (an ignored file)
        for f in sorted(p for p in log_dir.iterdir() if p.is_file()):  # not a local _rayrec_cache of other tests
            s3.upload_file(str(f), "rayrec", f"log/{f.name}")

        res = _run(_S3_BUILD, {"s3_log": "s3://rayrec/log", "s3_cache": "s3://rayrec/cache", "local_log": synthetic_log,
                               "local_cache": str(tmp_path / "local"), "out": str(tmp_path / "res.json")},
                   _env(ray_tmp, **aws), timeout=240)

        assert res["remote"] == res["local"] == res["beside"], res
        assert res["root"].startswith("s3://rayrec/cache/") and res["hit"], res
        assert res["beside_root"].startswith("s3://rayrec/log/_rayrec_cache/"), res
        assert res["rows_read_by_ray"] == res["users"] > 0, res
        assert res["ignored"] == ["rayrec/log/meta.json"], res
        key = res["root"].removeprefix("s3://rayrec/")
        names = {o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket="rayrec", Prefix=key)
                 for o in page.get("Contents", [])}
        assert {f"{key}/{n}" for n in ("meta.json", "data_report.json", "vocab/items.parquet", "vocab/users.parquet")} <= names
        assert any(n.startswith(f"{key}/sequences/") and n.endswith(".parquet") for n in names), sorted(names)
    finally:
        try:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server.wait(timeout=30)


_TWO_NODE_BUILD = r'''
import json, os, sys, uuid
import ray
from ray.cluster_utils import Cluster
import rayrec.data.sequences as seq
from rayrec.config import DataConfig

a = json.loads(sys.argv[1])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                         "object_store_memory": 200 << 20})
try:
    cluster.add_node(num_cpus=1, object_store_memory=200 << 20)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False

    def traced(fn, stage):  # each read and bucket task leaves a mark naming its node
        def run(*args, **kw):
            node = ray.get_runtime_context().get_node_id()
            open(os.path.join(a["marks"], f"{stage}.{node}.{uuid.uuid4().hex}"), "w").close()
            return fn(*args, **kw)
        return run

    seq._read_batch = traced(seq._read_batch, "read")
    seq._bucket_sequences = traced(seq._bucket_sequences, "bucket")
    data = seq.build_sequences(DataConfig(log=a["log"], cache_dir=a["cache"], num_buckets=4))
    res = {"root": data.root, "nodes": len(ray.nodes()), "buckets": data.meta["buckets"]}
    ray.shutdown()
finally:
    cluster.shutdown()
open(a["out"], "w").write(json.dumps(res))
'''


def _by_user(root: str) -> dict:
    t = pq.read_table(f"{root}/sequences")
    vocab = pq.read_table(f"{root}/vocab/items.parquet")
    raw = dict(zip(vocab["item_idx"].to_pylist(), vocab["item_id"].to_pylist()))
    return {r["user_id"]: ([raw[i] for i in r["items"]], *(r[c] for c in SPLIT)) for r in t.to_pylist()}


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_node_build_equals_a_one_node_build(ray_cluster, synthetic_log, tmp_path, ray_tmp):
    # the same log cut into row groups: several read units, so reads spread over the nodes as well
    log = tmp_path / "log.parquet"
    pq.write_table(pq.read_table(synthetic_log), log, row_group_size=2500)
    marks = tmp_path / "marks"
    marks.mkdir()
    res = _run(_TWO_NODE_BUILD, {"log": str(log), "cache": str(tmp_path / "two"), "marks": str(marks),
                                 "out": str(tmp_path / "res.json")}, _env(ray_tmp), timeout=240)
    assert res["nodes"] == 2 and res["buckets"] == 4, res
    nodes = {m.name.split(".")[1] for m in marks.iterdir()}
    assert len(nodes) == 2, sorted(m.name for m in marks.iterdir())  # tasks ran on both nodes

    one = build_sequences(DataConfig(log=str(log), cache_dir=str(tmp_path / "one"), num_buckets=4))
    two, ref = _by_user(res["root"]), _by_user(one.root)
    assert len(two) == one.num_users > 0
    assert two == ref  # users, their raw item lists and the split columns


class _OneFile:
    """A filesystem stub: every path is a file."""

    def get_file_info(self, path):
        import pyarrow.fs as pafs

        return pafs.FileInfo(path, type=pafs.FileType.File)


def test_default_cache_of_a_remote_log_keeps_its_scheme():
    from rayrec.data.log import DataError
    from rayrec.data.sequences import cache_root

    assert cache_root(DataConfig(log="s3://b/logs/x.parquet"), _OneFile(), "b/logs/x.parquet") == "s3://b/logs/_rayrec_cache"
    assert cache_root(DataConfig(log="/d/x.parquet"), _OneFile(), "/d/x.parquet") == "/d/_rayrec_cache"
    assert cache_root(DataConfig(log="s3://b/x.parquet", cache_dir="s3://c/k"), _OneFile(), "b/x.parquet") == "s3://c/k"
    with pytest.raises(DataError, match="data.cache_dir"):
        cache_root(DataConfig(log="s3://b/x.parquet?region=eu-west-1"), _OneFile(), "b/x.parquet")
