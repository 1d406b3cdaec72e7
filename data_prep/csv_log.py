"""Any CSV or Parquet event log to the canonical interaction log.

INPUT is a CSV (optionally .gz), a Parquet file, or a folder of Parquet files (read in sorted
file-name order, so row order is file order then row order). Name the columns to use; the time
column may hold integers or floats (``--time-unit``, default seconds), date/time values, or strings
parsed with ``--time-format`` (strptime syntax) or as ISO 8601 when no format is given. Times
without a zone are taken as UTC. Empty fields count as missing and their rows are dropped.

    python -m data_prep.csv_log events.csv.gz --out data/events \\
        --user-col visitor --item-col product --time-col ts --time-format "%Y-%m-%d %H:%M:%S"
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from data_prep.common import TIME_UNITS as _UNITS
from data_prep.common import DataPrepError, canonicalize, mixed_units_message, reading, run_cli, write_log
_PARQUET_EXT = (".parquet", ".pq")


def _is_parquet(path: Path) -> bool:
    if path.is_dir() or path.suffix.lower() in _PARQUET_EXT:
        return True
    with open(path, "rb") as f:
        return f.read(4) == b"PAR1"


def _check(have: list[str], want: list[str], where: str) -> None:
    missing = [c for c in dict.fromkeys(want) if c not in have]
    if missing:
        hint = " (only one column: is --sep right?)" if len(have) == 1 else ""
        raise DataPrepError(f"{where}: missing column(s) {missing}; available columns: {have}{hint}")


def _read_parquet(path: Path, want: list[str]) -> tuple[pa.Table, list[Path]]:
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in _PARQUET_EXT) if path.is_dir() else [path]
    if not files:
        raise DataPrepError(f"{path}: folder holds no .parquet files.")
    tables = []
    for f in files:
        with reading(f):
            _check(pq.read_schema(f).names, want, str(f))
            tables.append(pq.read_table(f, columns=list(dict.fromkeys(want))))
    # Writers differ in int widths or string kinds between files; promote rather than fail.
    return pa.concat_tables(tables, promote_options="permissive"), files


def _read_csv(path: Path, want: list[str], sep: str, no_header: bool, as_string: list[str]) -> pa.Table:
    read = pcsv.ReadOptions(autogenerate_column_names=no_header)
    parse = pcsv.ParseOptions(delimiter=sep)
    try:
        with pcsv.open_csv(str(path), read_options=read, parse_options=parse) as r:
            have = r.schema.names
    except pa.ArrowInvalid as e:
        raise DataPrepError(f"{path}: cannot read as CSV with sep {sep!r} ({e}).") from None
    _check(have, want, str(path))
    conv = pcsv.ConvertOptions(
        include_columns=list(dict.fromkeys(want)),
        column_types={c: pa.string() for c in as_string},
        # Only an empty field is missing: 'NA' or 'null' may be real ids.
        null_values=[""],
        strings_can_be_null=True,
    )
    try:
        return pcsv.read_csv(str(path), read_options=read, parse_options=parse, convert_options=conv)
    except pa.ArrowInvalid as e:
        fix = "; re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 IN > OUT)" if "utf8" in str(e).lower() else ""
        raise DataPrepError(f"{path}: cannot parse CSV ({e}){fix}.") from None


def _examples(col: pa.ChunkedArray, mask: pa.ChunkedArray, n: int = 3) -> list:
    return col.filter(mask).slice(0, n).to_pylist()


def _check_units(col: pa.ChunkedArray, where: str) -> None:
    """Mixed units must be caught before --time-unit rescales them (afterwards the seconds of a
    s/ms mix no longer look like dates)."""
    ts = np.nan_to_num(pc.fill_null(pc.cast(col, pa.float64()), 0).to_numpy(), nan=0.0)
    msg = mixed_units_message(ts, lambda i: f"data row {i + 1}: {col[i].as_py()}", where or "time column")
    if msg:
        raise DataPrepError(msg + ".")


def to_unix_seconds(
    col: pa.ChunkedArray, *, time_format: str | None = None, unit: str = "s", where: str = ""
) -> pa.ChunkedArray:
    """Turn a time column of any supported kind into int64 unix seconds (nulls stay null)."""
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    t = col.type
    if time_format and (pa.types.is_string(t) or pa.types.is_large_string(t)):
        parsed = pc.strptime(col, format=time_format, unit="s", error_is_null=True)
        bad = pc.and_(pc.is_valid(col), pc.is_null(parsed))
        if pc.any(bad).as_py():
            raise DataPrepError(
                f"{where}: {pc.sum(bad).as_py()} time value(s) do not match --time-format {time_format!r}, "
                f"e.g. {_examples(col, bad)}."
            )
        col, t = parsed, parsed.type
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        for typ in (pa.int64(), pa.float64(), pa.timestamp("ns"), pa.timestamp("ns", tz="UTC")):
            try:
                col = pc.cast(col, typ)
                break
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                continue
        else:
            raise DataPrepError(
                f"{where}: cannot parse time values such as {_examples(col, pc.is_valid(col))} as numbers or "
                "ISO 8601; pass --time-format (strptime syntax, e.g. '%d/%m/%Y %H:%M')."
            )
        t = col.type
    if pa.types.is_date(t):
        col, t = pc.cast(col, pa.timestamp("s")), pa.timestamp("s")
    if pa.types.is_timestamp(t):
        return pc.cast(pc.cast(col, pa.timestamp("s"), safe=False), pa.int64())
    if pa.types.is_integer(t):
        _check_units(col, where)
        return pc.divide(pc.cast(col, pa.int64()), _UNITS[unit])
    if pa.types.is_floating(t) or pa.types.is_decimal(t):
        col = pc.cast(col, pa.float64())
        _check_units(col, where)
        # NaN must become null before the int cast, which would otherwise turn it into INT64_MIN.
        col = pc.if_else(pc.is_nan(col), pa.scalar(None, pa.float64()), col)
        return pc.cast(pc.floor(pc.divide(col, float(_UNITS[unit]))), pa.int64(), safe=False)
    raise DataPrepError(f"{where}: time column of type {t} is not a number, date/time or string.")


def _int_if_integral(col: pa.ChunkedArray, name: str, where: str) -> pa.ChunkedArray:
    """Float ids (pandas turns int columns with a gap into float, and a CSV column with one '12.0'
    is read as float) become int64 if they are whole, so '12.0' and '12' are the same id. Beyond
    2**53 a float no longer holds every integer, so distinct ids could merge: that is an error."""
    if pa.types.is_unsigned_integer(col.type):
        too_big = pc.greater_equal(pc.cast(col, pa.uint64()), pa.scalar(2**63, pa.uint64()))
        if pc.any(too_big).as_py():
            raise DataPrepError(f"{where}: column {name!r} has ids >= 2**63 such as {_examples(col, too_big)}, "
                                "too large for int64; pass --string-ids (CSV) or store the ids as strings.")
        return pc.cast(col, pa.int64())
    if not pa.types.is_floating(col.type):
        return col
    col = pc.if_else(pc.is_nan(col), pa.scalar(None, col.type), col)
    frac = pc.not_equal(col, pc.floor(col))
    if pc.any(frac).as_py():
        raise DataPrepError(f"{where}: column {name!r} has non-integer ids such as {_examples(col, frac)}; "
                            "pass --string-ids to keep them as text.")
    huge = pc.greater_equal(pc.abs(col), 2.0**53)
    if pc.any(huge).as_py():
        raise DataPrepError(
            f"{where}: column {name!r} has ids too large to read as numbers exactly, such as "
            f"{[int(v) if v == v else v for v in _examples(col, huge)]} (ids >= 2**53 in a column read as float, "
            "or >= 2**63); pass --string-ids to read the ids as text.")
    return pc.cast(col, pa.int64())


def convert(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    user_col: str,
    item_col: str,
    time_col: str,
    rating_col: str | None = None,
    sep: str = ",",
    time_format: str | None = None,
    time_unit: str = "s",
    fmt: str | None = None,
    no_header: bool = False,
    string_ids: bool = False,
    keep_duplicates: bool = False,
) -> Path:
    """Convert a CSV/Parquet log to ``out_dir``; returns the parquet path.

    ``fmt`` is 'csv' or 'parquet' (default: guessed); ``no_header`` names CSV columns f0, f1, ...;
    ``string_ids`` keeps CSV ids as text (so '007' and '7' stay distinct users; surrounding
    whitespace is stripped and counted); ``keep_duplicates`` keeps exact duplicate events.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataPrepError(f"{path}: no such file or folder.")
    if time_unit not in _UNITS:
        raise DataPrepError(f"time unit must be one of {list(_UNITS)}, got {time_unit!r}")
    mapping = {"user_id": user_col, "item_id": item_col, "timestamp": time_col}
    if rating_col:
        mapping["rating"] = rating_col
    want = list(mapping.values())
    fmt = fmt or ("parquet" if _is_parquet(path) else "csv")
    if fmt == "parquet":
        raw, inputs = _read_parquet(path, want)
    elif fmt == "csv":
        as_string = ([user_col, item_col] if string_ids else []) + ([time_col] if time_format else [])
        with reading(path):
            raw, inputs = _read_csv(path, want, sep, no_header, as_string), [path]
    else:
        raise DataPrepError(f"format must be 'csv' or 'parquet', got {fmt!r}")

    where = str(path)
    cols = {k: raw[v] for k, v in mapping.items()}
    if time_format and pa.types.is_integer(cols["timestamp"].type):
        cols["timestamp"] = pc.cast(cols["timestamp"], pa.string())  # e.g. 20240131 read as an int
    cols["timestamp"] = to_unix_seconds(cols["timestamp"], time_format=time_format, unit=time_unit, where=where)
    for k in ("user_id", "item_id"):
        cols[k] = _int_if_integral(cols[k], mapping[k], where)
    if "rating" in cols:
        try:
            cols["rating"] = pc.cast(cols["rating"], pa.float32())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise DataPrepError(f"{where}: rating column {rating_col!r} is not numeric ({e}).") from None
    table, drops, notes = canonicalize(pa.table(cols), f"csv_log:{path}", keep_duplicates=keep_duplicates)
    extra = {"format": fmt, "source_columns": mapping, "time_format": time_format, "time_unit": time_unit, **notes}
    return write_log(table, out_dir, source="csv_log", inputs=inputs, drops=drops, extra=extra)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="CSV (.csv/.csv.gz/...), Parquet file, or folder of Parquet files")
    p.add_argument("--out", required=True, help="output folder for interactions.parquet + meta.json")
    p.add_argument("--user-col", required=True)
    p.add_argument("--item-col", required=True)
    p.add_argument("--time-col", required=True)
    p.add_argument("--rating-col")
    p.add_argument("--sep", default=",", help=r"CSV field separator (default ','; '\t' for tab)")
    p.add_argument("--time-format", help="strptime format of string times, e.g. '%%Y-%%m-%%d %%H:%%M:%%S'")
    p.add_argument("--time-unit", choices=list(_UNITS), default="s", help="unit of numeric times (default: s)")
    p.add_argument("--format", choices=["csv", "parquet"], help="force the input format")
    p.add_argument("--no-header", action="store_true", help="CSV has no header; columns are named f0, f1, ...")
    p.add_argument("--string-ids", action="store_true",
                   help="read CSV user/item ids as text, not numbers: '007' and '7', or '12.0' and '12', are then "
                   "different ids ('5', ' 5' and '5 ' are one: surrounding whitespace is stripped and counted in "
                   "meta.json). Without it ids are parsed as numbers: '12.0' and '12' are the same id 12, a "
                   "non-integer id or one too large for an exact int64 is an error")
    p.add_argument("--keep-duplicates", action="store_true",
                   help="keep exact duplicate (user, item, time) rows; by default all but the first are dropped "
                   "and counted in meta.json (a repeated identical event is a logging artifact)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    convert(
        a.input, a.out, user_col=a.user_col, item_col=a.item_col, time_col=a.time_col, rating_col=a.rating_col,
        sep="\t" if a.sep in ("\\t", "tab") else a.sep, time_format=a.time_format, time_unit=a.time_unit,
        fmt=a.format, no_header=a.no_header, string_ids=a.string_ids, keep_duplicates=a.keep_duplicates,
    )


if __name__ == "__main__":
    run_cli(main)
