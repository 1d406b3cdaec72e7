"""From a config: make sure the canonical log exists (converting ``data.source``), build sequences,
and show what was kept and dropped."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from rayrec.config import DataConfig
from rayrec.data.log import DataError, file_info, resolve

log = logging.getLogger("rayrec.data")


def ensure_log(cfg: DataConfig, force: bool = False) -> str:
    """Return ``cfg.log``, first converting ``cfg.source`` into it when it is missing (or ``force``)."""
    fs, path = resolve(cfg.log)
    exists = file_info(fs, path).type.name != "NotFound"
    src = cfg.source
    if exists and not force:
        return cfg.log
    if src.kind == "none":
        raise DataError(f"data.log {cfg.log!r} does not exist and data.source.kind is 'none'; "
                        "convert your raw data with jobs/prepare.py (set data.source) or fix data.log")
    if "://" in cfg.log and not cfg.log.startswith("file://"):
        raise DataError("data.source converts to a local data.log; convert locally, then upload the log")
    out_dir = Path(path).parent if path.endswith(".parquet") else Path(path)
    if path.endswith(".parquet") and Path(path).name != "interactions.parquet":
        raise DataError(f"data.log must end in interactions.parquet when data.source converts into it, got {path}")
    log.info("converting %s source %r into %s", src.kind, src.path, out_dir)
    from data_prep.common import DataPrepError

    try:
        _convert(src, out_dir)
    except DataPrepError as e:  # the converter's message, shown as `error: ...` like any data error
        raise DataError(str(e)) from None
    return cfg.log


def _convert(src, out_dir: Path) -> None:
    if src.kind == "synthetic":
        from data_prep.common import write_log
        from data_prep.synthetic import SyntheticSpec, generate

        spec = SyntheticSpec(users=src.users, items=src.items, mean_len=src.mean_len, seed=src.seed)
        write_log(generate(spec), out_dir, source="synthetic", extra={"synthetic_spec": vars(spec)})
    elif src.kind == "movielens":
        from data_prep import movielens

        raw = src.path
        if raw in movielens.DATASETS and not os.path.exists(raw):
            raw = movielens.download(raw)
        movielens.convert(raw, out_dir, min_rating=src.min_rating or None)
    elif src.kind == "sasrec_txt":
        from data_prep import sasrec_txt

        sasrec_txt.convert(src.path, out_dir)
    elif src.kind == "s3rec_txt":
        from data_prep import s3rec_txt

        s3rec_txt.convert(src.path, out_dir)
    elif src.kind == "csv":
        from data_prep import csv_log

        csv_log.convert(src.path, out_dir, user_col=src.user_col, item_col=src.item_col, time_col=src.time_col)


def report_table(meta: dict) -> str:
    """A short, readable summary of a sequence build: counts, every filter step, drops, the split."""
    rows = [
        ("rows in / out", f"{meta['rows_in']:,} / {meta['rows_out']:,}"),
        ("users in / out", f"{meta['users_in']:,} / {meta['users_out']:,}"),
        ("items in / out", f"{meta['items_in']:,} / {meta['items_out']:,}"),
    ]
    rows += [(f"after {s['step']}", f"{s['rows']:,} rows, {s['users']:,} users, {s['items']:,} items")
             for s in meta.get("steps", [])[1:]]
    rows += [(f"dropped: {k}", f"{v:,}") for k, v in meta["drops"].items()]
    dup = meta.get("duplicates")
    if dup:
        rows.append(("duplicate events", f"{dup['rows']:,} " + ("dropped (data.drop_duplicates)" if dup["dropped"]
                                                                else "kept in sequences (data.drop_duplicates=false)")))
    split = meta.get("split", {})
    if split.get("kind") == "time":
        rows.append(("time cut", f"timestamp {split['cut_timestamp']} (quantile {split['time_quantile']})"))
    for k in ("val_users", "test_users", "train_only_users", "no_training_pair_users",
              "users_without_pre_cut_events", "users_without_eligible_holdout"):
        if k in split:
            rows.append((f"users: {k.replace('_users', '').replace('users_', '').replace('_', ' ')}", f"{split[k]:,}"))
    for stage in ("val", "test"):
        if f"{stage}_repeat_targets" in split:
            rows.append((f"{stage} targets already in history", f"{split[f'{stage}_repeat_targets']:,} users"))
    rows += [(f"users {k}", f"{v:,}") for k, v in meta.get("users_by_length", {}).items()]
    inputs = meta.get("inputs", [])
    rows.append(("input files", f"{len(inputs)} ({sum(i['bytes'] for i in inputs) / 2**20:,.1f} MiB)"))
    if meta.get("ignored_files"):
        rows.append(("ignored files", ", ".join(p.rsplit("/", 1)[-1] for p in meta["ignored_files"][:5])
                     + (" ..." if len(meta["ignored_files"]) > 5 else "")))
    timings = meta["timings"]
    rows.append(("build time", f"{timings['total_s']:.1f} s (" + ", ".join(
        f"{k[:-2]} {v:.1f}" for k, v in timings.items() if k != "total_s") + ")"))
    rows.append(("cache", meta.get("root", "")))
    w = max(len(r[0]) for r in rows)
    return "\n".join(f"  {a:<{w}}  {b}" for a, b in rows)
