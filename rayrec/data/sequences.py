"""Build per-user, time-ordered item sequences from the interaction log with Ray Data.

Steps (DESIGN.md): read row-group units (global row offset = tie-break) → validate →
count users and items on the driver, apply the min-interaction filters / k-core (filters.py) and
build the item vocab (1..N, 0 = padding) → for split=time find the cut and the pre-cut items
(split.py) → bucket users by hash → drop rows no user can keep, block by block (max_history,
post-cut events after the holdout) → group by *bucket* (never by user), sort inside each bucket
with pyarrow, drop exact duplicate events (data.drop_duplicates) and place the split → encode users → persist evaluation negatives → write a Parquet
sequences dataset, vocab, data_report.json and meta.json.

The result is cached under ``<cache root>/<key>/``, keyed by the input files' sha256 and the data
config; ``meta.json`` is written last, so a half-written build is never mistaken for a cache hit.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rayrec.config import DataConfig
from rayrec.data.batches import SPLIT_COLUMNS, sorted_unique
from rayrec.data.filters import Counts, apply_filters, row_mask, scan
from rayrec.data.integrity import UnitCensus, duplicates, per_user, repeat_targets
from rayrec.data.log import DataError, ReadUnit, fingerprint, ignored_files, list_files, plan, read_unit, resolve
from rayrec.data.split import SplitSpec, block_keep, exact_quantile, positions

log = logging.getLogger("rayrec.data")
BUILD_VERSION = 4  # bump when the sequence format or the build's semantics change (4: duplicate events dropped)


@dataclass
class SequenceData:
    """Where a built dataset lives and what it holds."""

    root: str  # cache folder (URI or local path)
    num_items: int
    num_users: int
    meta: dict[str, Any]

    @property
    def sequences_path(self) -> str:
        return f"{self.root}/sequences"


def _join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def cache_root(cfg: DataConfig, fs: pafs.FileSystem, log_path: str) -> str:
    """``data.cache_dir``, or ``_rayrec_cache`` next to the log. A remote log keeps its URL scheme:
    ``log_path`` is scheme-less (``bucket/key``), and Ray's writers and readers would take it for
    a local path."""
    if cfg.cache_dir:
        return cfg.cache_dir
    is_dir = fs.get_file_info(log_path).type == pafs.FileType.Directory
    if "://" not in cfg.log:
        return _join(log_path if is_dir else log_path.rsplit("/", 1)[0], "_rayrec_cache")
    if "?" in cfg.log:
        raise DataError(f"data.log={cfg.log!r} carries URL options, which cannot be passed on to the cache "
                        "folder next to it: set data.cache_dir, or configure the store through environment "
                        "variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)")
    base = cfg.log.rstrip("/")
    return _join(base if is_dir else base.rsplit("/", 1)[0], "_rayrec_cache")


def _hash_users(user: pa.Array, buckets: int) -> np.ndarray:
    # pyarrow has no stable hash kernel; hash ids through numpy (ints) or their UTF-8 bytes (strings)
    if pa.types.is_integer(user.type):
        x = user.to_numpy(zero_copy_only=False).astype(np.uint64)
    else:
        codes = pc.dictionary_encode(user)
        if isinstance(codes, pa.ChunkedArray):
            codes = codes.combine_chunks()
        # Python's hash() is salted per process; a keyed digest is the same on every worker
        per = np.array([int.from_bytes(hashlib.blake2b(u.encode(), digest_size=8).digest(), "little")
                        for u in codes.dictionary.to_pylist()], dtype=np.uint64)
        x = per[codes.indices.to_numpy()]
    # splitmix64 finaliser: consecutive ids land in different buckets
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x % np.uint64(buckets)).astype(np.int32)


def _read_batch(batch: pa.Table, fs: pafs.FileSystem, buckets: int, with_rating: bool) -> pa.Table:
    out = []
    for u in batch.to_pylist():
        unit = ReadUnit(**u["unit"])
        t = read_unit(fs, unit, with_rating)
        user = t["user_id"].combine_chunks()
        cols = {
            "user_id": user,
            "item_id": t["item_id"],
            "timestamp": pc.cast(t["timestamp"], pa.int64()),
            "row": pa.array(np.arange(unit.offset, unit.offset + t.num_rows, dtype=np.int64)),
            "bucket": pa.array(_hash_users(user, buckets)),
        }
        if with_rating:
            cols["rating"] = t["rating"]
        out.append(pa.table(cols))
    return pa.concat_tables(out)


def _filter_sort(t: pa.Table, item_vocab: pa.Array, keep_users: pa.Array | None) -> tuple[pa.Table, np.ndarray]:
    """Rows of kept items (and users), with the dense item index, sorted by (user, time, log row);
    plus each user's run length. Ties in time keep log order, never item order."""
    idx = pc.index_in(t["item_id"], value_set=item_vocab)
    keep = pc.is_valid(idx)
    if keep_users is not None:
        keep = pc.and_(keep, pc.is_in(t["user_id"], value_set=keep_users))
    t = t.filter(keep).append_column("item", pc.add(pc.cast(idx.filter(keep), pa.int32()), 1))
    t = t.sort_by([("user_id", "ascending"), ("timestamp", "ascending"), ("row", "ascending")])
    n = t.num_rows
    if not n:
        return t, np.zeros(0, np.int64)
    enc = pc.dictionary_encode(t["user_id"]).combine_chunks().indices.to_numpy()
    starts = np.flatnonzero(np.r_[True, enc[1:] != enc[:-1]])
    return t, np.diff(np.r_[starts, n])


def _np(col) -> np.ndarray:
    return col.combine_chunks().to_numpy(zero_copy_only=False) if isinstance(col, pa.ChunkedArray) else col.to_numpy(zero_copy_only=False)


def _dedupe(t: pa.Table, lengths: np.ndarray) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """Drop exact duplicate (user, item, timestamp) rows of a sorted table, keeping the first in
    log order; returns (table, new run lengths, rows dropped per user). No user loses every row."""
    if not t.num_rows:
        return t, lengths, np.zeros(len(lengths), np.int64)
    dup = duplicates(lengths, _np(t["timestamp"]), _np(t["item"]))
    n = per_user(lengths, dup)
    return (t.filter(pa.array(~dup)), lengths - n, n) if n.any() else (t, lengths, n)


def _pretruncate(t: pa.Table, item_vocab: pa.Array, keep_users: pa.Array | None, spec: SplitSpec,
                 drop_duplicates: bool = True) -> pa.Table:
    """One input block: drop rows that cannot be among a user's stored events (split.block_keep),
    so a user with a huge share of the log cannot make its bucket's task explode. The counts of
    dropped rows ride on one kept row per user and block. Duplicates go first: a copy of an event
    must not take the place of an older event among the user's most recent ``max_history``."""
    t, lengths = _filter_sort(t, item_vocab, keep_users)
    t, lengths, dups = _dedupe(t, lengths) if drop_duplicates else (t, lengths, np.zeros(len(lengths), np.int64))
    stamps = _np(t["timestamp"])
    keep = block_keep(lengths, stamps, _np(t["item"]), spec)
    user = np.repeat(np.arange(len(lengths)), lengths)
    pre = stamps < spec.cut if spec.kind == "time" else np.ones(len(stamps), bool)
    U = len(lengths)
    skip_pre = np.bincount(user, weights=~keep & pre, minlength=U).astype(np.int64)
    skip_post = np.bincount(user, weights=~keep & ~pre, minlength=U).astype(np.int64)
    first_kept = np.full(U, -1, np.int64)
    kept_rows = np.flatnonzero(keep)
    first_kept[user[kept_rows][::-1]] = kept_rows[::-1]  # smallest kept row of each user
    carried = {}
    for name, per in (("_skip_pre", skip_pre), ("_skip_post", skip_post), ("_dups", dups)):
        carried[name] = np.zeros(len(stamps), np.int64)
        carried[name][first_kept] = per
    t = t.drop_columns(["item"])
    for name, col in carried.items():
        t = t.append_column(name, pa.array(col))
    return t.filter(pa.array(keep))


def _carried(t: pa.Table, lengths: np.ndarray, name: str) -> np.ndarray | None:
    """Per-user sum of a count that ``_pretruncate`` put on some of the user's rows."""
    if name not in t.column_names or not t.num_rows:
        return None
    return per_user(lengths, _np(t[name]))


def _on_first_rows(lengths: np.ndarray, per: np.ndarray | None) -> np.ndarray | None:
    if per is None:
        return None
    col = np.zeros(int(lengths.sum()), np.int64)
    col[(np.cumsum(lengths) - lengths)[lengths > 0]] = per[lengths > 0]
    return col


def _bucket_sequences(t: pa.Table, item_vocab: pa.Array, keep_users: pa.Array | None, spec: SplitSpec,
                      drop_duplicates: bool = True) -> pa.Table:
    """All users of one bucket: stable-sort, drop duplicate events, place the split
    (split.positions), cut list columns.

    Every user that reached the bucket is returned, with ``_keep`` false for users the split drops,
    so the driver can count them; ``_n_in``/``_truncated``/``_unused``/``_dups`` count the user's
    rows (``_dups``: duplicates dropped, or with ``drop_duplicates`` off, duplicates stored) and
    ``_val_repeat``/``_test_repeat`` flag a target that already occurs earlier in the sequence."""
    t, lengths = _filter_sort(t, item_vocab, keep_users)
    # counts carried from _pretruncate are summed before deduplication, which may drop their row
    carried = {c: _carried(t, lengths, c) for c in ("_skip_pre", "_skip_post", "_dups")}
    if drop_duplicates:
        t, lengths, dups = _dedupe(t, lengths)
        dups = dups + (carried["_dups"] if carried["_dups"] is not None else 0)
    stamps = _np(t["timestamp"]) if t.num_rows else np.zeros(0, np.int64)
    items = _np(t["item"]) if t.num_rows else np.zeros(0, np.int32)
    skips = [_on_first_rows(lengths, carried[c]) for c in ("_skip_pre", "_skip_post")]
    p = positions(lengths, stamps, items, spec, *skips)
    user = np.repeat(np.arange(len(lengths)), lengths)
    kept_len = np.bincount(user[p.keep_row], minlength=len(lengths))
    if not drop_duplicates:
        dups = per_user(kept_len, duplicates(kept_len, stamps[p.keep_row], items[p.keep_row]))
    offsets = pa.array(np.r_[0, np.cumsum(kept_len)].astype(np.int32))
    starts = (np.cumsum(lengths) - lengths).astype(np.int64)
    n_in = lengths + sum(np.bincount(user, weights=s, minlength=len(lengths)).astype(np.int64) for s in skips if s is not None)
    cols = {
        "user_id": t["user_id"].take(pa.array(starts, pa.int64())),
        "items": pa.ListArray.from_arrays(offsets, pa.array(items[p.keep_row], pa.int32())),
        "timestamps": pa.ListArray.from_arrays(offsets, pa.array(stamps[p.keep_row], pa.int64())),
    }
    if "rating" in t.column_names:
        ratings = _np(t["rating"])[p.keep_row]
        cols["ratings"] = pa.ListArray.from_arrays(offsets, pa.array(ratings, pa.float32()))
    cols.update({"train_len": p.train_len, "val_pos": p.val_pos, "test_pos": p.test_pos, "_keep": p.keep_user,
                 "_n_in": n_in.astype(np.int64), "_truncated": p.truncated.astype(np.int64), "_unused": p.unused_post.astype(np.int64),
                 "_dups": np.asarray(dups, np.int64),
                 "_val_repeat": repeat_targets(kept_len, items[p.keep_row], p.val_pos.astype(np.int64)),
                 "_test_repeat": repeat_targets(kept_len, items[p.keep_row], p.test_pos.astype(np.int64))})
    return pa.table(cols)


def _splitmix(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def eval_negatives(user_idx: np.ndarray, offsets: np.ndarray, items: np.ndarray, num_items: int, k: int, seed: int) -> np.ndarray:
    """``k`` distinct items per user, none in the user's history, a pure function of (seed, user).

    Drawn once at build time and stored with the sequences, so every run and every protocol
    scores the same candidates; training negatives later exclude them.
    """
    n = len(user_idx)
    lengths = np.diff(offsets)
    rows = np.repeat(np.arange(n, dtype=np.int64), lengths)
    hist = sorted_unique(rows * (num_items + 1) + items)
    seen = np.bincount(hist // (num_items + 1), minlength=n)
    short = np.flatnonzero(num_items - seen < k)
    if short.size:
        raise DataError(
            f"{short.size} user(s) have fewer than data.eval_negatives={k} unseen items (e.g. user_idx "
            f"{int(user_idx[short[0]])} has {num_items - int(seen[short[0]])}); lower data.eval_negatives"
        )
    draws = 2 * k + 32
    j = np.arange(draws, dtype=np.uint64)
    base = _splitmix(np.uint64(seed) * np.uint64(0x100000001B3) + user_idx.astype(np.uint64))
    cand = (_splitmix(base[:, None] ^ (j[None, :] * np.uint64(0xD6E8FEB86659FD93))) % np.uint64(num_items)).astype(np.int64) + 1
    keys = np.arange(n, dtype=np.int64)[:, None] * (num_items + 1) + cand
    ok = ~np.isin(keys, hist)
    flat = keys.ravel()
    first = np.zeros(flat.size, dtype=bool)
    first[np.unique(flat, return_index=True)[1]] = True
    ok &= first.reshape(keys.shape)
    ok &= np.cumsum(ok, axis=1) <= k
    out = np.zeros((n, k), dtype=np.int32)
    full = ok.sum(1) == k
    out[full] = cand[full][ok[full]].reshape(-1, k)
    for r in np.flatnonzero(~full):  # rare: a user who has seen most of the catalogue
        rng = np.random.default_rng([seed, int(user_idx[r])])
        allowed = np.setdiff1d(np.arange(1, num_items + 1), items[offsets[r]: offsets[r + 1]])
        out[r] = rng.choice(allowed, size=k, replace=False)
    return out


def _finish_batch(t: pa.Table, user_vocab: pa.Array, num_items: int, k: int, seed: int) -> pa.Table:
    t = t.filter(t["_keep"])
    user_idx = pc.add(pc.cast(pc.index_in(t["user_id"], value_set=user_vocab), pa.int64()), 1)
    t = t.append_column("user_idx", user_idx)
    if k:
        items = t["items"].combine_chunks()
        negs = eval_negatives(
            user_idx.to_numpy(), items.offsets.to_numpy() - items.offsets[0].as_py(),
            items.flatten().to_numpy(), num_items, k, seed,
        )
        t = t.append_column("eval_negatives", pa.FixedSizeListArray.from_arrays(pa.array(negs.ravel()), k).cast(pa.list_(pa.int32())))
    extra = ["ratings"] if "ratings" in t.column_names else []
    return t.select(["user_idx", "user_id", "items", "timestamps"] + extra + list(SPLIT_COLUMNS) + (["eval_negatives"] if k else []))


def _write_json(fs: pafs.FileSystem, path: str, obj: dict) -> None:
    with fs.open_output_stream(path) as f:
        f.write((json.dumps(obj, indent=2, default=str) + "\n").encode())


def _clear_output(fs: pafs.FileSystem, root: str) -> None:
    """A forced rebuild, or one after a crash, writes into a folder that may hold an earlier build:
    Ray's writer adds uniquely named files, so stale ones would be read as duplicate users."""
    for sub in ("meta.json", "data_report.json"):  # first: a crash from here on reads as no build
        if fs.get_file_info(_join(root, sub)).type == pafs.FileType.File:
            fs.delete_file(_join(root, sub))
    for sub in ("sequences", "vocab"):
        if fs.get_file_info(_join(root, sub)).type == pafs.FileType.Directory:
            fs.delete_dir(_join(root, sub))


def read_meta(fs: pafs.FileSystem, root: str) -> dict | None:
    try:
        with fs.open_input_stream(_join(root, "meta.json")) as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError):
        return None


def build_sequences(cfg: DataConfig, force: bool = False) -> SequenceData:
    """Build (or find in the cache) the sequences dataset for ``cfg.log``. Needs Ray initialised."""
    import ray

    ctx = ray.data.DataContext.get_current()
    strategy = ctx.shuffle_strategy
    if "RAY_DATA_DEFAULT_SHUFFLE_STRATEGY" not in os.environ:
        # the bucket groupby under Ray 2.60's default (shuffle_v2) starts aggregator actors per build:
        # 11 s against 0.5 s for the task-based sort shuffle on a small log (tests/bench measure it)
        ctx.shuffle_strategy = ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        return _build(cfg, force)
    except ray.exceptions.RayError as e:
        # a DataError raised inside a Ray Data task reaches the driver wrapped; show the user's problem
        cause = _data_error_in(e)
        if cause is not None:
            raise DataError(str(cause)) from None
        # Ray Data keeps only the text of a failed UDF's exception: recover the DataError line
        m = re.search(r"DataError: (.+)", str(e))
        if m:
            raise DataError(m.group(1).strip()) from None
        raise
    finally:
        ctx.shuffle_strategy = strategy


def _data_error_in(e: BaseException | None, depth: int = 0) -> DataError | None:
    while e is not None and depth < 20:
        if isinstance(e, DataError):
            return e
        nxt = getattr(e, "cause", None)
        e = nxt if isinstance(nxt, BaseException) and nxt is not e else e.__cause__
        depth += 1
    return None


def _first_pass(ds, progress: bool, where: str) -> tuple[pa.Table, pa.Table, int, int]:
    """User counts, item counts and the timestamp range in one stream over the log; a log whose
    timestamps mix units (seconds and milliseconds, ...) is refused here."""
    cu, ci = Counts(), Counts()
    units = UnitCensus()
    lo, hi = None, None
    for t in scan(ds, ["user_id", "item_id", "timestamp", "row"], "counting" if progress else None):
        units.add(t)
        cu.add(t["user_id"])
        ci.add(t["item_id"])
        mm = pc.min_max(t["timestamp"])
        lo = mm["min"].as_py() if lo is None else min(lo, mm["min"].as_py())
        hi = mm["max"].as_py() if hi is None else max(hi, mm["max"].as_py())
    units.check(where)
    schema = ds.schema().base_schema
    return cu.table(schema.field("user_id").type), ci.table(schema.field("item_id").type), int(lo), int(hi)


def _time_spec(ds, cfg: DataConfig, rows_in: int, lo: int, hi: int, item_vocab: pa.Array, keep_users, progress: bool) -> tuple[SplitSpec, dict]:
    def stamps():
        for t in scan(ds, ["timestamp"]):
            yield _np(t["timestamp"]).astype(np.int64)

    cut = exact_quantile(stamps, rows_in, cfg.time_quantile, lo, hi)
    pre_rows = 0
    seen = Counts()
    for t in scan(ds, ["user_id", "item_id", "timestamp"], "time split" if progress else None):
        m = row_mask(t, keep_users, item_vocab)
        pre = pc.less(t["timestamp"], cut)
        t = t.filter(pre if m is None else pc.and_(m, pre))
        pre_rows += t.num_rows
        seen.add(t["item_id"])
    pre_items = np.zeros(len(item_vocab) + 1, bool)
    ids = seen.table(item_vocab.type)["v"]
    pre_items[pc.add(pc.index_in(ids, value_set=item_vocab), 1).to_numpy(zero_copy_only=False)] = True
    info = {"cut_timestamp": cut, "time_quantile": cfg.time_quantile, "pre_cut_rows_kept": pre_rows,
            "pre_cut_items": int(pre_items.sum())}
    return SplitSpec("time", cfg.max_history, cut, pre_items), info


def _drops(steps: list[dict]) -> dict[str, int]:
    """Rows removed by each kind of filter step (the step names say which filter ran)."""
    out = {"rare_item_rows": 0, "short_user_rows": 0}
    for prev, cur in zip(steps, steps[1:]):
        key = "rare_item_rows" if cur["step"].startswith("min_item") else "short_user_rows"
        out[key] += prev["rows"] - cur["rows"]
    return out


def _no_sequences(cfg: DataConfig, steps: list[dict], what: str) -> DataError:
    trail = "; ".join(f"{s['step']}: {s['rows']:,} rows, {s['users']:,} users, {s['items']:,} items" for s in steps)
    return DataError(f"no sequences after filtering ({what}); filter counts: {trail}. Lower "
                     "data.min_user_interactions / data.min_item_interactions (or turn off data.kcore), "
                     f"or check data.split={cfg.split}")


REPORT_KEYS = ("rows_in", "rows_out", "users_in", "users_out", "items_in", "items_out", "drops", "duplicates", "steps", "split",
               "users_by_length", "inputs", "ignored_files", "buckets", "timings")


def _build(cfg: DataConfig, force: bool) -> SequenceData:
    import ray

    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 3)
        return now

    fs, path = resolve(cfg.log)
    files = list_files(fs, path)
    units, schema = plan(fs, files)
    with_rating = "rating" in schema.names
    inputs = fingerprint(fs, files)
    key_src = {"inputs": [(i["sha256"], i["bytes"]) for i in inputs], "version": BUILD_VERSION,
               "min_user": cfg.min_user_interactions, "min_item": cfg.min_item_interactions,
               "eval_negatives": cfg.eval_negatives, "seed": cfg.seed, "drop_duplicates": cfg.drop_duplicates}
    key_src.update(split=cfg.split, time_quantile=cfg.time_quantile if cfg.split == "time" else None,
                   kcore=cfg.kcore, max_history=cfg.max_history)
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
    root_uri = _join(cache_root(cfg, fs, path), key)
    rfs, root = resolve(root_uri) if "://" in root_uri else (fs, root_uri)
    meta = None if force else read_meta(rfs, root)
    if meta and meta.get("build_version") == BUILD_VERSION:
        log.info("sequences cache hit: %s", root)
        return SequenceData(root_uri, meta["items_out"], meta["users_out"], meta)
    t = lap("plan_and_hash_s", t0)

    rows_in = sum(u.rows for u in units)
    progress = rows_in >= 5_000_000  # a bar only where a build takes long enough to wonder
    buckets = cfg.num_buckets or max(2, min(256, math.ceil(rows_in / 2_000_000)))
    log.info("building sequences from %d rows in %d file(s), %d read units, %d user buckets", rows_in, len(files), len(units), buckets)
    ds = ray.data.from_items([{"unit": asdict(u)} for u in units], override_num_blocks=min(len(units), 1000))
    ds = ds.map_batches(_read_batch, fn_kwargs={"fs": fs, "buckets": buckets, "with_rating": with_rating}, batch_size=1, batch_format="pyarrow")
    ds = ds.materialize()
    t = lap("read_s", t)

    user_counts, item_counts, ts_lo, ts_hi = _first_pass(ds, progress, f"data.log {cfg.log!r}")
    f = apply_filters(ds, user_counts, item_counts, cfg.min_user_interactions, cfg.min_item_interactions, cfg.kcore, progress)
    if f.items.num_rows == 0 or f.steps[-1]["users"] == 0:
        raise _no_sequences(cfg, f.steps, "the min-interaction filters removed every row")
    item_vocab = f.items["v"].combine_chunks()
    num_items = f.items.num_rows
    t = lap("count_and_filter_s", t)

    split_info: dict[str, Any] = {"kind": cfg.split}
    if cfg.split == "time":
        spec, info = _time_spec(ds, cfg, rows_in, ts_lo, ts_hi, item_vocab, f.keep_users, progress)
        split_info.update(info)
    else:
        spec = SplitSpec("leave_last_two", cfg.max_history)
    t = lap("split_cut_s", t)

    src = ds
    if cfg.max_history or cfg.split == "time":
        src = ds.map_batches(_pretruncate, batch_size=None, batch_format="pyarrow",
                             fn_kwargs={"item_vocab": item_vocab, "keep_users": f.keep_users, "spec": spec,
                                        "drop_duplicates": cfg.drop_duplicates})
    # one shuffle partition per user bucket: a bucket is the unit of work, never a user
    seqs = src.groupby("bucket", num_partitions=buckets).map_groups(
        _bucket_sequences, batch_format="pyarrow",
        fn_kwargs={"item_vocab": item_vocab, "keep_users": f.keep_users, "spec": spec, "drop_duplicates": cfg.drop_duplicates},
    ).materialize()
    users, lengths, parts = [], [], []
    counters = ("_n_in", "_truncated", "_unused", "_dups", "_val_repeat", "_test_repeat")
    for b in scan(seqs, ["user_id", "items", *SPLIT_COLUMNS, "_keep", *counters]):
        keep = b["_keep"].to_numpy(zero_copy_only=False)
        users.append(b["user_id"].filter(b["_keep"]))
        lengths.append(pc.list_value_length(b["items"]).to_numpy(zero_copy_only=False)[keep])
        parts.append({c: _np(b[c]) for c in (*SPLIT_COLUMNS, *counters)} | {"_keep": keep})
    cat = {c: np.concatenate([p[c] for p in parts]) if parts else np.zeros(0, np.int64) for c in
           (*SPLIT_COLUMNS, *counters, "_keep")}
    kept = cat["_keep"].astype(bool)
    users = pa.chunked_array(users, seqs.schema().base_schema.field("user_id").type)
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    if len(users) == 0:
        raise _no_sequences(cfg, f.steps, f"no user has an event before the time cut {split_info.get('cut_timestamp')}"
                            if cfg.split == "time" else "no user left")
    user_vocab = users.take(pc.sort_indices(users)).combine_chunks()
    seqs = seqs.map_batches(
        _finish_batch, batch_format="pyarrow",
        fn_kwargs={"user_vocab": user_vocab, "num_items": num_items, "k": cfg.eval_negatives, "seed": cfg.seed},
    )
    seq_uri = _join(root_uri, "sequences")
    _clear_output(rfs, root)
    seqs.write_parquet(seq_uri)
    rows_out = int(lengths.sum())
    t = lap("sequences_s", t)

    rfs.create_dir(_join(root, "vocab"), recursive=True)
    pq.write_table(pa.table({"item_idx": pa.array(np.arange(1, num_items + 1, dtype=np.int32)), "item_id": item_vocab, "count": f.items["n"]}),
                   _join(root, "vocab", "items.parquet"), filesystem=rfs)
    pq.write_table(pa.table({"user_idx": pa.array(np.arange(1, len(user_vocab) + 1, dtype=np.int64)), "user_id": user_vocab}),
                   _join(root, "vocab", "users.parquet"), filesystem=rfs)
    drops = _drops(f.steps)
    drops["truncated_rows"] = int(cat["_truncated"][kept].sum())  # data.max_history
    # counted after the min-interaction filters, which count a user's or item's rows as logged
    n_dup = int(cat["_dups"].sum() if cfg.drop_duplicates else cat["_dups"][kept].sum())
    drops["duplicate_rows"] = n_dup if cfg.drop_duplicates else 0
    duplicates = {"rows": n_dup, "dropped": cfg.drop_duplicates}
    if cfg.split == "time":
        drops["post_cut_unused_rows"] = int(cat["_unused"][kept].sum())
        drops["post_cut_only_user_rows"] = int(cat["_n_in"][~kept].sum())
    users_in = user_counts.num_rows
    drops["users_dropped"] = users_in - int(len(user_vocab))
    tl, vp, tp = cat["train_len"][kept], cat["val_pos"][kept], cat["test_pos"][kept]
    split_info.update({
        "val_users": int((vp >= 0).sum()), "test_users": int((tp >= 0).sum()),
        "train_only_users": int(((vp < 0) & (tp < 0) & (tl >= 2)).sum()),
        "no_training_pair_users": int((tl < 2).sum()),
        # the target already occurs earlier in the user's sequence (eval.repeat_targets decides)
        "val_repeat_targets": int(cat["_val_repeat"][kept].sum()), "test_repeat_targets": int(cat["_test_repeat"][kept].sum()),
    })
    if cfg.split == "time":
        split_info.update({"users_without_pre_cut_events": int((~kept).sum()),
                           "users_without_eligible_holdout": int((tp < 0).sum())})
    meta = {
        "build_version": BUILD_VERSION, "key": key, "root": root_uri, "log": cfg.log, "inputs": inputs,
        "ignored_files": ignored_files(fs, path),
        "data_config": asdict(cfg),
        "rows_in": rows_in, "rows_out": rows_out, "users_in": users_in, "users_out": int(len(user_vocab)),
        "items_in": int(item_counts.num_rows), "items_out": num_items,
        "drops": drops, "duplicates": duplicates, "steps": f.steps, "split": split_info,
        "users_by_length": {
            "evaluable (>=3: train + valid + test)": int((lengths >= 3).sum()),
            "train_only (2: too short for valid/test)": int((lengths == 2).sum()),
            "unusable (1: no training pair)": int((lengths == 1).sum()),
        } if cfg.split == "leave_last_two" else {},
        "buckets": buckets,
        "timings": timings,
    }
    timings["total_s"] = round(time.perf_counter() - t0, 3)
    _write_json(rfs, _join(root, "data_report.json"), {k: meta[k] for k in REPORT_KEYS})
    _write_json(rfs, _join(root, "meta.json"), meta)  # last: marks the build complete
    log.info("sequences: %d users, %d items, %d of %d rows kept, drops %s -> %s",
             meta["users_out"], num_items, rows_out, rows_in, meta["drops"], root_uri)
    return SequenceData(root_uri, num_items, meta["users_out"], meta)
