"""Batch inference: every user of the sequences dataset → ``recommendations.parquet``.

Ray Data reads the sequences the model was trained on, ``map_batches`` runs a pool of scoring
actors (one GPU each when asked or when the cluster has GPUs), and the result — ``user_id, rank,
item_id, score`` — is written as a Parquet dataset to any pyarrow/fsspec URL. At the end the rows
on storage are counted and checked against what the sequences imply (k per user, fewer only
when excluding a user's history leaves fewer than k items).
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa

from rayrec.data.batches import sorted_unique
from rayrec.data.log import DataError

log = logging.getLogger("rayrec.infer")
COLUMNS = ["user_idx", "user_id", "items", "timestamps"]


class Scorer:
    """One actor of the pool: holds the model and scores batches of sequences."""

    def __init__(self, rec_ref: list, k: int, exclude_seen: bool, device: str, threads: int):
        import ray
        import torch

        torch.set_num_threads(threads)
        # the Recommender travels through the object store: actors on other nodes need no shared disk
        self.rec = ray.get(rec_ref[0]).to(device)
        self.k, self.exclude_seen = k, exclude_seen

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.rec.recommend_sequences(batch, self.k, self.exclude_seen)


def expected_rows(batch: pa.Table, num_items: int, k: int, exclude_seen: bool) -> dict[str, np.ndarray]:
    """Rows each user must get: k, or the unseen items left when that is fewer."""
    k = min(k, num_items)
    n = batch.num_rows
    if not exclude_seen:
        return {"rows": np.array([n * k], dtype=np.int64)}
    items = batch["items"].combine_chunks()
    lengths = np.diff(items.offsets.to_numpy())
    rows = np.repeat(np.arange(n, dtype=np.int64), lengths)
    distinct = np.bincount(sorted_unique(rows * (num_items + 1) + items.flatten().to_numpy()) // (num_items + 1), minlength=n)
    return {"rows": np.array([np.minimum(k, num_items - distinct).sum()], dtype=np.int64)}


def _use_gpu(device: str) -> bool:
    import ray

    if device == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return device == "gpu"


def recommend_all(target: str, overrides: list[str] = (), progress: bool = True) -> dict[str, Any]:
    """Score every user of the checkpoint's sequences; returns a summary (output, users, rows, seconds)."""
    import ray

    from rayrec.data.log import resolve
    from rayrec.infer.recommender import Recommender
    from rayrec.ray_env import init_ray

    t0 = time.perf_counter()
    rec = Recommender.from_checkpoint(target, overrides)
    cfg, inf = rec.cfg, rec.cfg.infer
    init_ray()
    ray.data.DataContext.get_current().enable_progress_bars = progress
    seq_path = sequences_path(rec)
    out = inf.output or str(cfg.run_dir / "recommendations.parquet")
    gpu = _use_gpu(inf.device)
    ds = ray.data.read_parquet(seq_path).select_columns(COLUMNS)
    recs = ds.map_batches(
        Scorer, batch_size=inf.batch_size, batch_format="pyarrow", concurrency=inf.num_actors,
        fn_constructor_kwargs={"rec_ref": [ray.put(rec)], "k": inf.k, "exclude_seen": inf.exclude_seen,
                               "device": "cuda" if gpu else "cpu", "threads": max(1, int(inf.cpus_per_actor))},
        num_cpus=inf.cpus_per_actor, num_gpus=1 if gpu else 0,
    )
    fs, path = resolve(out)
    recs.write_parquet(path, filesystem=fs, mode="overwrite")
    want = int(ds.map_batches(expected_rows, batch_format="pyarrow", batch_size=None,
                              fn_kwargs={"num_items": rec.num_items, "k": inf.k, "exclude_seen": inf.exclude_seen}).sum("rows"))
    users = ds.count()
    written = ray.data.read_parquet(path, filesystem=fs).count()  # from the files' footers
    if written != want:
        raise DataError(f"{out} holds {written} rows but {users} users x k={inf.k} need {want}: "
                        "the write was incomplete or the folder holds files from elsewhere")
    summary = {"output": out, "checkpoint": rec.source, "users": users, "rows": written, "k": inf.k,
               "exclude_seen": inf.exclude_seen, "device": "gpu" if gpu else "cpu", "actors": inf.num_actors,
               "seconds": round(time.perf_counter() - t0, 2)}
    log.info("recommendations: %s", summary)
    return summary


def sequences_path(rec) -> str:
    """The sequences the checkpoint was trained on; their vocab must be the model's."""
    from rayrec.data.sequences import build_sequences

    if rec.data_root is not None:
        return f"{rec.data_root.rstrip('/')}/sequences"
    data = build_sequences(rec.cfg.data)  # a moved checkpoint or a bundle: find (or rebuild) the build by its key
    items = _read_items(f"{data.root}/vocab/items.parquet")
    if not items.equals(rec.item_ids):
        raise DataError(f"the item vocabulary built from data.log={rec.cfg.data.log} ({len(items)} items) is not the "
                        f"model's ({rec.num_items}): the log changed since training; point data.log at the training log")
    return data.sequences_path


def _read_items(uri: str) -> pa.Array:
    import pyarrow.parquet as pq

    from rayrec.data.log import resolve

    fs, path = resolve(uri)
    return pq.read_table(path, filesystem=fs).sort_by("item_idx")["item_id"].combine_chunks()
