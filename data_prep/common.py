"""The canonical interaction log every converter writes, and the checks every converter shares.

Contract (DESIGN.md): ``interactions.parquet`` with columns
``user_id`` (string or int64), ``item_id`` (string or int64), ``timestamp`` (int64) and an optional
``rating`` (float32), plus ``meta.json`` describing where it came from and what was dropped.
Row order is preserved: it is the tie-break for equal timestamps downstream.
"""
from __future__ import annotations

import datetime as _dt
import gzip
import hashlib
import json
import logging
import os
import sys
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

log = logging.getLogger("data_prep")

LOG_FILE = "interactions.parquet"
META_FILE = "meta.json"
ID_TYPES = (pa.string(), pa.large_string(), pa.int64(), pa.int32())


class DataPrepError(ValueError):
    """A raw input that cannot become a valid interaction log; the message says how to fix it."""


# What a damaged or mis-encoded input raises from pyarrow, gzip or zlib.
_READ_ERRORS = (pa.ArrowException, OSError, EOFError, UnicodeDecodeError, zlib.error, gzip.BadGzipFile)


@contextmanager
def reading(path: str | os.PathLike, hint: str = ""):
    """Turn a failure to read ``path`` into a DataPrepError naming the file and the fix."""
    try:
        yield
    except DataPrepError:
        raise
    except _READ_ERRORS as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "utf8" in msg.lower() or "utf-8" in msg.lower() or isinstance(e, UnicodeDecodeError):
            fix = "the file is not UTF-8 text: re-encode it as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        elif "parquet" in msg.lower() or "magic bytes" in msg.lower():
            fix = "it is empty, truncated or not Parquet: re-create or re-download it"
        elif "truncated" in msg.lower() or "compressed" in msg.lower() or isinstance(e, (EOFError, zlib.error)):
            fix = "the compressed file is truncated or damaged: re-download it (gzip -t checks a copy)"
        else:
            fix = "check that the file is complete and in the expected format"
        raise DataPrepError(f"{path}: cannot read ({msg}); {hint or fix}.") from None


def run_cli(main: Callable[[], None]) -> None:
    """Entry point of every converter: a user error is one ``error: ...`` line and exit code 2
    (as ``rayrec prepare``), never a traceback, and nothing is written."""
    try:
        main()
    except DataPrepError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# Plausible dates (1990..2100) in each unit; the ranges are > 100x apart, so a positive time falls
# in at most one. Times outside all of them (order positions, synthetic clocks) say nothing.
TIME_UNITS = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}
_PLAUSIBLE_S = (631_152_000, 4_102_444_800)
_UNIT_NAMES = {"s": "seconds", "ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds"}


def time_units(ts: np.ndarray) -> dict[str, np.ndarray]:
    """For each unit, a mask of the times that are a plausible 1990..2100 date in that unit."""
    ts = np.asarray(ts)
    return {u: (ts >= _PLAUSIBLE_S[0] * f) & (ts < _PLAUSIBLE_S[1] * f) for u, f in TIME_UNITS.items()}


def units_message(found: dict[str, tuple[int, list[str]]], where: str) -> str:
    """The error for times in several units: ``found`` maps a unit to (row count, example rows)."""
    parts = "; ".join(f"{n:,} look like {_UNIT_NAMES[u]} (e.g. {', '.join(ex)})" for u, (n, ex) in found.items())
    return (f"{where}: timestamps are in mixed units: {parts}. A time split or time-interval model needs one "
            "unit; convert the source's times to one unit (seconds) before preparing it")


def mixed_units_message(ts: np.ndarray, describe: Callable[[int], str], where: str) -> str | None:
    """None when the times are in one unit; otherwise a message naming example rows per unit.
    ``describe(i)`` names row i (e.g. its line, user and time)."""
    found = {u: np.flatnonzero(m) for u, m in time_units(ts).items() if m.any()}
    if len(found) < 2:
        return None
    return units_message({u: (len(i), [describe(int(r)) for r in i[:2]]) for u, i in found.items()}, where)


def check_time_units(table: pa.Table, where: str) -> None:
    """Raise DataPrepError when the integer timestamps of ``table`` mix units (s and ms, ...)."""
    ts = table["timestamp"].to_numpy() if isinstance(table["timestamp"], pa.Array) else \
        table["timestamp"].combine_chunks().to_numpy(zero_copy_only=False)
    ts = np.asarray(ts, dtype=np.float64) if ts.dtype.kind == "f" else ts

    def describe(i: int) -> str:
        row = table.slice(i, 1).to_pylist()[0]
        return f"row {i + 1}: user {row['user_id']!r}, timestamp {row['timestamp']}"

    msg = mixed_units_message(ts, describe, where)
    if msg:
        raise DataPrepError(msg + ".")


def _strip_ids(cols: dict[str, pa.ChunkedArray]) -> dict[str, int]:
    """' 5', '5 ' and '5' are one id: strip surrounding whitespace from string ids (an id that is only
    whitespace becomes missing); returns how many ids changed per column."""
    changed = {}
    for name in ("user_id", "item_id"):
        col = cols[name]
        if not pa.types.is_string(col.type):
            continue
        stripped = pc.utf8_trim_whitespace(col)
        n = pc.sum(pc.not_equal(col, stripped)).as_py() or 0
        if n:
            changed[name] = int(n)
            cols[name] = pc.if_else(pc.equal(stripped, ""), pa.scalar(None, pa.string()), stripped)
    return changed


def duplicate_mask(table: pa.Table) -> np.ndarray:
    """True for every row that repeats an earlier row's (user, item, timestamp) exactly."""
    n = table.num_rows
    keys = table.select(["user_id", "item_id", "timestamp"]).append_column("_row", pa.array(np.arange(n)))
    first = keys.group_by(["user_id", "item_id", "timestamp"]).aggregate([("_row", "min")])["_row_min"]
    dup = np.ones(n, bool)
    dup[first.to_numpy()] = False
    return dup


class Canonical(NamedTuple):
    table: pa.Table
    drops: dict[str, int]  # rows removed, by reason (meta.json "drops")
    notes: dict[str, Any]  # other counts for meta.json (duplicates kept or dropped, ids changed)


def canonicalize(table: pa.Table, source: str, *, keep_duplicates: bool = False, time_unit: str = "s") -> Canonical:
    """Cast to the canonical schema, drop rows with null/NaN fields and count every drop.

    Also: string ids lose surrounding whitespace (counted); integer times in ``time_unit`` become
    seconds, and times in mixed units (some seconds, some milliseconds, ...) are an error; exact
    duplicate (user, item, timestamp) rows are dropped, keeping the first, unless
    ``keep_duplicates`` (an identical event logged twice is a logging artifact, and as a user's
    last event it would make the held-out target a repeat of the event before it).
    Raises when nothing is left or a column is missing, because an empty log is never what the user meant.
    """
    if time_unit not in TIME_UNITS:
        raise DataPrepError(f"time unit must be one of {list(TIME_UNITS)}, got {time_unit!r}")
    missing = [c for c in ("user_id", "item_id", "timestamp") if c not in table.column_names]
    if missing:
        raise DataPrepError(
            f"{source}: missing column(s) {missing}; have {table.column_names}. "
            "Name the user/item/time columns on the command line (--user-col/--item-col/--time-col)."
        )
    drops: dict[str, int] = {}
    notes: dict[str, Any] = {}
    cols = {}
    for name in ("user_id", "item_id"):
        col = table[name]
        if col.type not in ID_TYPES:
            if pa.types.is_integer(col.type):
                col = pc.cast(col, pa.int64())
            elif pa.types.is_floating(col.type):
                raise DataPrepError(f"{source}: column {name!r} is {col.type}; ids must be integers or strings.")
            else:
                try:
                    col = pc.cast(col, pa.string())
                except pa.ArrowInvalid as e:
                    raise DataPrepError(
                        f"{source}: column {name!r} holds bytes that are not UTF-8 text ({e}); re-encode the file "
                        "as UTF-8 (e.g. iconv -f latin1 -t utf-8 IN > OUT)."
                    ) from None
        elif col.type == pa.int32():
            col = pc.cast(col, pa.int64())
        elif col.type == pa.large_string():
            col = pc.cast(col, pa.string())
        cols[name] = col
    stripped = _strip_ids(cols)
    if stripped:
        notes["ids_whitespace_stripped"] = stripped
        log.warning("%s: stripped surrounding whitespace from ids: %s", source, stripped)
    ts = table["timestamp"]
    if pa.types.is_timestamp(ts.type):
        ts = pc.cast(pc.cast(ts, pa.timestamp("s")), pa.int64())
    elif pa.types.is_floating(ts.type):
        ts = pc.if_else(pc.is_nan(ts), pa.scalar(None, ts.type), ts)  # NaN must count as a null, not cast to INT64_MIN
        ts = pc.cast(pc.floor(ts), pa.int64(), safe=False) if len(ts) else pc.cast(ts, pa.int64())
    elif not pa.types.is_integer(ts.type):
        try:
            ts = pc.cast(ts, pa.int64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise DataPrepError(
                f"{source}: column 'timestamp' of type {ts.type} is not convertible to int64 seconds ({e})."
            ) from None
    cols["timestamp"] = pc.cast(ts, pa.int64())
    if "rating" in table.column_names:
        cols["rating"] = pc.cast(table["rating"], pa.float32())
    out = pa.table(cols)

    valid = None
    for name in out.column_names:
        col = out[name]
        ok = pc.is_valid(col)
        if pa.types.is_floating(col.type):
            ok = pc.and_(ok, pc.invert(pc.is_nan(col)))
        bad = len(col) - pc.sum(ok).as_py() if len(col) else 0
        if bad:
            drops[f"null_{name}"] = int(bad)
        valid = ok if valid is None else pc.and_(valid, ok)
    if valid is not None and drops:
        out = out.filter(valid)
        log.warning("%s: dropped %s rows with null/NaN fields: %s", source, sum(drops.values()), drops)
    if out.num_rows == 0:
        raise DataPrepError(f"{source}: no valid interaction rows (drops: {drops or 'input was empty'}).")
    check_time_units(out, source)
    if time_unit != "s":
        ts = out["timestamp"].combine_chunks().to_numpy(zero_copy_only=False)
        out = out.set_column(out.column_names.index("timestamp"), "timestamp", pa.array(ts // TIME_UNITS[time_unit]))
    dup = duplicate_mask(out)
    n_dup = int(dup.sum())
    notes["duplicate_rows"] = {"found": n_dup, "dropped": not keep_duplicates}
    if n_dup and not keep_duplicates:
        out = out.filter(pa.array(~dup))
        drops["duplicate_rows"] = n_dup
        log.warning("%s: dropped %d exact duplicate (user, item, timestamp) rows, keeping the first of each "
                    "(--keep-duplicates keeps them)", source, n_dup)
    elif n_dup:
        log.warning("%s: kept %d exact duplicate (user, item, timestamp) rows (--keep-duplicates)", source, n_dup)
    return Canonical(out, drops, notes)


def write_log(
    table: pa.Table,
    out_dir: str | os.PathLike,
    *,
    source: str,
    inputs: list[str | os.PathLike] = (),
    drops: dict[str, int] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``interactions.parquet`` and ``meta.json`` to ``out_dir`` (atomically per file)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (LOG_FILE + ".tmp")
    pq.write_table(table, tmp, row_group_size=1 << 20)
    os.replace(tmp, out / LOG_FILE)
    ts = table["timestamp"]
    meta = {
        "source": source,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "rows": table.num_rows,
        "users": pc.count_distinct(table["user_id"]).as_py(),
        "items": pc.count_distinct(table["item_id"]).as_py(),
        "timestamp_min": pc.min(ts).as_py(),
        "timestamp_max": pc.max(ts).as_py(),
        "columns": {f.name: str(f.type) for f in table.schema},
        "drops": drops or {},
        "inputs": [
            {"path": str(p), "bytes": os.path.getsize(p), "sha256": sha256_file(p)} for p in inputs
        ],
        "sha256": sha256_file(out / LOG_FILE),
    }
    meta.update(extra or {})
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    log.info("wrote %s rows, %s users, %s items to %s", meta["rows"], meta["users"], meta["items"], out / LOG_FILE)
    return out / LOG_FILE


def synthesize_timestamps(num_rows: int, start: int = 1_000_000_000) -> np.ndarray:
    """Strictly increasing timestamps for sources whose line order is the only time information."""
    return start + np.arange(num_rows, dtype=np.int64)
