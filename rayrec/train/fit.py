"""``fit(cfg)``: build (or reuse) the sequences, then run ``train_loop`` on Ray Train."""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayrec.config import Config, ConfigError
from rayrec.data.sequences import SequenceData, build_sequences
from rayrec.ray_env import init_ray, progress_bars_on_a_terminal, train_logging_config
from rayrec.train import checkpoint as ckpt
from rayrec.train import faults
from rayrec.train.loop import train_loop
from rayrec.train.preflight import check_output_dir, check_trainable
from rayrec.train.stages import chain_sft, check_init_from

log = logging.getLogger("rayrec.train")


class CapacityError(RuntimeError):
    """The cluster lacks the CPUs/GPUs for the worker group (a node was lost and did not come back);
    the message names what the workers need, what the cluster has, and the ways out."""


def capacity_retries() -> int:
    """How many worker-group starts Ray Train tries after the first one times out (-1: forever).

    Each try waits ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (Ray's default 60 s) for the
    placement group; with ``RAYREC_AUTOSCALING=1`` an autoscaler is expected to add nodes, so
    the wait is unbounded."""
    if os.environ.get("RAYREC_AUTOSCALING") == "1":
        return -1
    return int(os.environ.get("RAYREC_CAPACITY_RETRIES", "10"))


@dataclass
class FitResult:
    metrics: dict[str, Any]  # the final report: best val_* and test_* of the best-on-validation weights
    checkpoint: str | None  # folder of the final checkpoint (best weights)
    run_dir: Path
    data: SequenceData
    history: list[dict[str, Any]]  # every report of this fit() call, in order (the last one is ``metrics``)


def _check_run_dir(cfg: Config) -> None:
    """Same name + resume=true continues a run; a non-empty run folder without it is refused."""
    run_dir = cfg.run_dir
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run folder {run_dir} exists and is not a folder; choose another name=... or output_dir=...")
    entries = sorted(p.name for p in run_dir.iterdir()) if run_dir.exists() else []
    if entries and not cfg.resume:
        ckpts = [e for e in entries if e.startswith("checkpoint_") and (run_dir / e).is_dir()]
        what = f"{len(ckpts)} checkpoint folder(s)" if ckpts else f"files from an earlier run ({', '.join(entries[:4])})"
        raise ConfigError(
            f"run folder {run_dir} already holds {what}; pass resume=true to continue it, "
            "or choose a new name=... (nothing was overwritten)"
        )


SMALL_SEQUENCES_BYTES = 64 << 20  # on disk; read into this process whole below it


def sequences_dataset(path: str, small_bytes: int = SMALL_SEQUENCES_BYTES):
    """The built sequences as a Ray Dataset already in the object store: workers then only fetch
    blocks, so feeding them needs no free CPU (a 2-CPU node fully given to workers otherwise hangs
    waiting for read tasks; RAY_NOTES.md).

    Small local sequences are read here and put as one Arrow block: no read task means no Ray Data
    worker to start and import, which was most of the 1-3 s this step took before a run's first
    training step. ``from_blocks``, not ``from_arrow``: the latter computes the block's metadata in
    a remote task, which after a run needs a fresh worker process (1.1 s of each warm start here).
    Larger or remote ones are read by Ray Data tasks that ask for no CPU (in a Tune sweep the
    trials can hold every CPU; Parquet sampling still takes 1: tune/sweep.py caps concurrency
    for it)."""
    import pyarrow.parquet as pq
    import ray.data

    local = Path(path)
    if "://" not in path and local.is_dir():
        files = [f for f in local.rglob("*.parquet") if not f.name.startswith(("_", "."))]
        if files and sum(f.stat().st_size for f in files) <= small_bytes:
            return ray.data.from_blocks([pq.read_table(path)])
    return ray.data.read_parquet(path, num_cpus=0).materialize()


def trainer_for(cfg: Config, data: SequenceData, callbacks: list | None = None):
    """The TorchTrainer for a config: used by ``fit`` and by Tune trials alike."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from rayrec.train import failures

    s = cfg.scale
    backend = s.backend if s.backend != "auto" else ("nccl" if s.use_gpu else "gloo")
    progress_bars_on_a_terminal()  # before the dataset (it keeps a copy of the DataContext) and the trainer
    ds = sequences_dataset(data.sequences_path)
    storage = s.storage_path or str(cfg.run_dir.parent)
    return TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.to_dict(), "num_items": data.num_items, "num_users": data.num_users,
                           "fault": faults.from_env(),  # test-only fault injection (rayrec/train/faults.py)
                           "call": uuid.uuid4().hex,  # tags this call's reports in the run's history
                           "submitted_unix": time.time()},  # start of the time-to-first-step the worker reports
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker={"CPU": s.cpus_per_worker} if s.num_workers else None),
        torch_config=TorchConfig(backend=backend, timeout_s=s.timeout_s),
        datasets={"sequences": ds},
        # every worker sees the whole (small, columnar) dataset and keeps user_idx % world == rank:
        # a shard that is exact (no rows dropped to equalise) and independent of block order
        dataset_config=DataConfig(datasets_to_split=[]),
        run_config=RunConfig(
            # StopOnPermanent: a failure no retry can fix (unwritable run folder, bad data) ends the run at once
            name=cfg.name, storage_path=storage, callbacks=[*(callbacks or []), failures.StopOnPermanent()],
            # without capacity (a lost node) Ray retries the worker-group start forever, one try per
            # RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s): bound that, unless an autoscaler is expected
            failure_config=FailureConfig(max_failures=s.max_failures, controller_failure_limit=capacity_retries()),
            checkpoint_config=CheckpointConfig(num_to_keep=3),
            logging_config=train_logging_config(),  # per-checkpoint INFO lines: RAYREC_VERBOSE=1
        ),
    )


def _check_resources(cfg: Config) -> None:
    import ray

    s = cfg.scale
    total = ray.cluster_resources()
    want_cpu = s.num_workers * s.cpus_per_worker
    if os.environ.get("RAYREC_AUTOSCALING") == "1":  # the cluster grows on demand: let Ray wait for nodes
        return
    if want_cpu > total.get("CPU", 0) + 1e-9:
        raise ConfigError(
            f"scale asks for {s.num_workers} workers x {s.cpus_per_worker} CPU = {want_cpu} CPUs but the cluster has "
            f"{total.get('CPU', 0):g}; lower scale.num_workers or scale.cpus_per_worker (fractions are fine)"
        )
    if s.use_gpu and s.num_workers > total.get("GPU", 0):
        raise ConfigError(f"scale.use_gpu with {s.num_workers} workers but the cluster has {total.get('GPU', 0):g} GPUs")


def _capacity_error(cfg: Config, error: BaseException) -> CapacityError | None:
    """A ``CapacityError`` when ``error`` is Ray Train giving up on starting the worker group, else None."""
    from ray.train import ControllerError
    from ray.train.v2._internal.exceptions import InsufficientClusterResourcesError, WorkerGroupStartupTimeoutError

    cause = getattr(error, "controller_failure", None) if isinstance(error, ControllerError) else None
    if not isinstance(cause, (WorkerGroupStartupTimeoutError, InsufficientClusterResourcesError)):
        return None
    import ray

    s = cfg.scale
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    have = sum(n.get("Resources", {}).get("CPU", 0) for n in nodes)
    per_node = sorted((n.get("Resources", {}).get("CPU", 0) for n in nodes), reverse=True)
    want = f"{s.num_workers} workers x {s.cpus_per_worker:g} CPU = {s.num_workers * s.cpus_per_worker:g} CPUs"
    if s.use_gpu:
        want += f" and {s.num_workers} GPUs (cluster: {sum(n.get('Resources', {}).get('GPU', 0) for n in nodes):g})"
    tries = capacity_retries() + 1
    timeout = os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
    return CapacityError(
        f"not enough cluster resources to (re)start the training workers: they need {want}, but the cluster now "
        f"has {have:g} CPUs on {len(nodes)} alive node(s) (CPUs per node: {', '.join(f'{c:g}' for c in per_node)}); "
        f"Ray Train gave up after {tries} start attempt(s) of {timeout} s each (a node was lost and did not come "
        "back?). Fix: add nodes, lower scale.num_workers or scale.cpus_per_worker (fractions are fine), or set "
        "RAYREC_AUTOSCALING=1 on a cluster with an autoscaler; RAYREC_CAPACITY_RETRIES (now "
        f"{capacity_retries()}) and RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S bound the wait. Checkpoints written so "
        f"far are kept: rerun with resume=true. Ray's error: {cause}")


def _history(result) -> list[dict[str, Any]]:
    """Every report of this fit() call, from the final checkpoint's state (``loop.run`` keeps them
    there): Ray's ``metrics_dataframe`` holds only the reports of the checkpoints it retains."""
    from rayrec.train import checkpoint as ckpt

    state = {}
    if result.checkpoint is not None:
        try:
            with result.checkpoint.as_directory() as folder:
                state = ckpt.load_state(folder)
        except (OSError, ValueError, ckpt.CheckpointError) as e:
            log.warning("could not read the run's history from %s (%s); keeping Ray's", result.checkpoint.path, e)
    if "history" in state:
        call = state["history"][-1].get("call") if state["history"] else None
        return [{k: v for k, v in h.items() if k != "call"} for h in state["history"] if h.get("call") == call]
    df = result.metrics_dataframe
    return df.to_dict("records") if df is not None else []


def _prune_unregistered(run_dir: Path, result) -> None:
    """Delete the run folder's checkpoint folders that Ray does not hold: written by a worker whose
    report Ray lost when the worker group failed (RAY_NOTES.md), so ``CheckpointConfig(num_to_keep)``
    never counted them. ``resume_source`` may have resumed from one; once the run has finished, what
    Ray kept (the newest ``num_to_keep``, the final one among them) is the run's checkpoint set."""
    import shutil

    from rayrec.train import checkpoint as ckpt

    here = run_dir.resolve()
    kept = {Path(c.path).name for c, _ in (result.best_checkpoints or []) if Path(c.path).resolve().parent == here}
    if not kept:  # local mode, or storage elsewhere (remote, another storage_path): nothing here is Ray's
        return
    stale = [p for p in ckpt.candidates(run_dir) if p.name not in kept]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    gone = [p.name for p in stale if not p.exists()]
    if gone:
        log.info("removed %d checkpoint folder(s) Ray never registered (beside the %d it kept), left by a "
                 "restarted worker group: %s", len(gone), len(kept), ", ".join(gone))
    if len(gone) < len(stale):
        log.warning("could not remove %s; delete by hand", ", ".join(p.name for p in stale if p.exists()))


def fit(cfg: Config, callbacks: list | None = None) -> FitResult:
    """Train one config; ``callbacks`` are Ray Train callbacks (a Tune trial passes TuneReportCallback)."""
    check_output_dir(cfg)  # before starting Ray: a refused run costs nothing
    _check_run_dir(cfg)
    if cfg.resume and (found := ckpt.candidates(cfg.run_dir)):
        # a refused checkpoint: one error here, before Ray starts, not a traceback from every worker
        ckpt.check_loadable(ckpt.require_valid(found, f"to resume {cfg.name} from"))
    init_ray()
    _check_resources(cfg)
    check_init_from(cfg)
    data = build_sequences(cfg.data)
    check_trainable(cfg, data.meta)  # before the trainer: no run folder, no checkpoint for nothing
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    (run_dir / "data_meta.json").write_text(json.dumps(data.meta, indent=2, default=str))
    try:
        result = trainer_for(cfg, data, callbacks=callbacks).fit()
        if result.error:
            raise result.error
    except Exception as e:
        from rayrec.train import failures

        stop = failures.unwrap(e) or _capacity_error(cfg, e)
        if stop is None:
            raise
        raise stop from e
    _prune_unregistered(run_dir, result)
    metrics = dict(result.metrics or {})
    ck = result.checkpoint.path if result.checkpoint else None
    (run_dir / "final_metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    result = FitResult(metrics, ck, run_dir, data, _history(result))
    return chain_sft(cfg, result) if cfg.train.sft_epochs else result
