"""Subprocess driver for ``tests/test_fault_cluster.py``: a 2-node ``ray.cluster_utils.Cluster``
loses its worker node mid-run. Writes what happened (timings, errors, checkpoints) to RESULT_JSON.

Usage: RAY_TMPDIR=$(mktemp -d /tmp/rrXXXX) python tests/node_loss_run.py MODE LOG OUT_DIR RESULT_JSON

MODE ``recover``: the node goes after the epoch-2 checkpoint, interrupted checkpoint folders appear
(a newer one without a manifest, one whose manifest does not match its files, and a complete copy
still named ``.partial``), then a node with the same CPUs joins; the run must resume once from the
newest checkpoint that verifies and finish.
MODE ``no_capacity``: the node goes and never comes back; ``fit`` must raise ``CapacityError``.

Run it in its own process group (the test kills the group on timeout): the cluster's raylets and
workers are children of this process.
"""
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rayrec.ray_env import set_env  # noqa: E402

set_env()

EPOCHS = {"recover": 8, "no_capacity": 30}


def fake_interrupted_checkpoints(run: Path, ckpt, valid: str) -> list[str]:
    """What a node lost mid-upload (or a killed copy) leaves in the run folder, all 'newer' than ``valid``."""
    no_manifest = run / ckpt.dir_name(99)  # files written, manifest never was
    no_manifest.mkdir()
    (no_manifest / ckpt.STATE).write_text(json.dumps({"epoch": 99, "global_step": 999}))
    (no_manifest / ckpt.MODEL).write_bytes(b"\0" * 100)
    truncated = run / ckpt.dir_name(98)  # manifest present, the weights cut short
    shutil.copytree(valid, truncated)
    model = truncated / ckpt.MODEL
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    # complete copies that were never renamed into place: only the name says they are not checkpoints
    partials = [run / f".{ckpt.dir_name(97)}.partial", run / f"{ckpt.dir_name(96)}.partial"]
    for p in partials:
        shutil.copytree(valid, p)
        state = json.loads((p / ckpt.STATE).read_text())
        (p / ckpt.STATE).write_text(json.dumps({**state, "epoch": 96}))
        ckpt.write_manifest(p)  # verifies: a loader that looked at it would take it
    return [no_manifest.name, truncated.name] + [p.name for p in partials]


def train(mode: str, log: str, out: str, result_path: str) -> None:
    """The training driver: ``fit`` on the cluster at RAY_ADDRESS; its outcome to RESULT_JSON."""
    from rayrec.train import checkpoint as ckpt
    from rayrec.train.fit import fit

    try:
        res = fit(config(mode, log, out))
        state = ckpt.load_state(res.checkpoint)
        events = dict(ok=True, epoch=res.metrics["epoch"], checkpoint=res.checkpoint,
                      resumed_at_epochs=state.get("resumed_at_epochs", []))
    except Exception as e:  # noqa: BLE001 - reported to the test
        events = dict(ok=False, error_type=type(e).__name__, error=str(e))
    Path(result_path).write_text(json.dumps(events))


def config(mode: str, log: str, out: str):
    from rayrec.config import load_config

    return load_config(None, [
        f"data.log={log}", f"output_dir={out}", "name=nodeloss", f"train.epochs={EPOCHS[mode]}",
        "train.max_steps_per_epoch=3", "train.batch_size=64", "model.max_len=20", "model.hidden=32",
        "model.num_heads=2", "scale.num_workers=2", "scale.cpus_per_worker=0.9", "scale.max_failures=2",
        "scale.timeout_s=30"])


def main(mode: str, log: str, out: str, result_path: str) -> None:
    """The cluster and its churn, on this process's main thread: ``Cluster.add_node`` installs a SIGTERM
    handler, which Python allows on the main thread only (from a helper thread it raises ValueError and
    the node never comes back). ``fit`` runs in a child process, a driver like any other."""
    import os
    import subprocess

    import ray
    from ray.cluster_utils import Cluster

    from rayrec.train import checkpoint as ckpt

    t0 = time.monotonic()
    events: dict = {"mode": mode}

    def mark(what):
        events.setdefault("timeline", []).append([what, round(time.monotonic() - t0, 1)])
        print(f"[node_loss_run] {time.monotonic() - t0:6.1f}s {what}", flush=True)

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    node = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    mark("cluster up")
    trainer_result = Path(result_path).with_suffix(".train.json")
    trainer = subprocess.Popen([sys.executable, __file__, "train", mode, log, out, str(trainer_result)],
                               env={**os.environ, "RAY_ADDRESS": cluster.address})
    run = config(mode, log, out).run_dir
    try:
        while (latest := ckpt.latest(run)) is None or ckpt.load_state(latest)["epoch"] < 2:
            if trainer.poll() is not None:
                raise RuntimeError("the training driver ended before the node could be removed")
            time.sleep(0.1)
        events["removed_after"] = ckpt.load_state(latest)["epoch"]
        cluster.remove_node(node)  # a worker node lost mid-run
        mark(f"node removed after {Path(latest).name}")
        if mode == "recover":
            events["fakes"] = fake_interrupted_checkpoints(run, ckpt, latest)
            time.sleep(2)
            # the newest checkpoint that verifies when capacity returns (rank 0, on the head, may have added one
            # after the removal); checked without ckpt.latest, whose "skipping" warnings the test looks for
            valid = [p for p in ckpt.candidates(run) if _verifies(ckpt, p)]
            events["newest_valid"] = ckpt.load_state(valid[0])["epoch"]
            cluster.add_node(num_cpus=1)  # capacity returns
            mark("node added")
        while trainer.poll() is None:  # what the log shows when the restart does not come
            time.sleep(1)
            if int(time.monotonic() - t0) % 5 == 0:
                pgs = {k[:8]: (v["state"], [b.get("CPU") for b in v["bundles"].values()])
                       for k, v in ray.util.placement_group_table().items() if v["state"] != "REMOVED"}
                mark(f"free {ray.available_resources().get('CPU', 0):.2f} of {ray.cluster_resources().get('CPU', 0):g} "
                     f"CPUs; placement groups {pgs}")
        mark("fit returned")
        events.update(json.loads(trainer_result.read_text()))
    finally:
        if trainer.poll() is None:
            trainer.kill()
        Path(result_path).write_text(json.dumps(events))
        ray.shutdown()
        cluster.shutdown()


def _verifies(ckpt, folder) -> bool:
    try:
        ckpt.verify(folder)
        return True
    except ckpt.CheckpointError:
        return False


if __name__ == "__main__":
    if sys.argv[1] == "train":
        train(*sys.argv[2:6])
    else:
        main(*sys.argv[1:5])
