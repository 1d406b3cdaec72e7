"""The SASRec "user item" text format to the canonical interaction log.

One interaction per line, ``<user> <item>`` as integers separated by whitespace; within a user,
line order is time order (e.g. ml-1m.txt / Beauty.txt from the SASRec repository). The files have
no timestamps, so strictly increasing ones are synthesized from line order, and meta.json says so.
The input may be gzip'd.

    python -m data_prep.sasrec_txt data/raw/ml-1m.txt.gz --out data/sasrec-ml-1m
"""
from __future__ import annotations

import argparse
import gzip
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv

from data_prep.common import DataPrepError, canonicalize, log, reading, run_cli, synthesize_timestamps, write_log

TIMESTAMP_NOTE = "synthesized from line order (the source has none)"
_SHOW_BAD = 5


_INT64 = (-(2**63), 2**63)


def _read_bytes(path: Path) -> bytes:
    with reading(path):
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"  # by content: a renamed .gz should still work
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as f:
            return f.read()


def int64_ids(fields: list[bytes], path: Path, no: int) -> list[int]:
    """The line's fields as ints; ValueError for a non-number, DataPrepError for one beyond int64."""
    ids = [int(f) for f in fields]
    for v in ids:
        if not _INT64[0] <= v < _INT64[1]:
            raise DataPrepError(f"{path}: line {no}: id {v} does not fit in int64 (ids must be < 2**63); "
                                "convert the file with csv_log --string-ids to keep such ids as text.")
    return ids


def _fast(data: bytes) -> pa.Table | None:
    """Parse a well-formed file with pyarrow; None on any irregularity so the slow path can explain."""
    try:
        return pcsv.read_csv(
            pa.BufferReader(data),
            read_options=pcsv.ReadOptions(column_names=["user_id", "item_id"]),
            parse_options=pcsv.ParseOptions(delimiter=" ", quote_char=False),
            convert_options=pcsv.ConvertOptions(
                column_types={"user_id": pa.int64(), "item_id": pa.int64()}, null_values=[]
            ),
        )
    except pa.ArrowInvalid:
        return None


def _slow(data: bytes, source: str, skip_bad_lines: bool) -> tuple[pa.Table, int]:
    """Line-by-line parse that finds every bad line with its number; returns (table, bad count)."""
    users, items, bad = [], [], []
    for no, line in enumerate(data.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue  # blank lines carry no interaction (pyarrow skips them too)
        try:
            if len(fields) != 2:
                raise ValueError
            u, i = int64_ids(fields, Path(source), no)
        except DataPrepError:
            raise
        except ValueError:
            bad.append((no, line))
            continue
        users.append(u)
        items.append(i)
    if bad and not skip_bad_lines:
        hint = ""
        if all(len(line.split()) > 2 and line.replace(b" ", b"").isdigit() for _, line in bad[:_SHOW_BAD]):
            hint = "These look like '<user> <item> <item> ...' lines (S3Rec layout), not one interaction per line.\n"
        shown = "\n".join(f"  line {no}: {line[:80].decode('utf-8', 'replace')!r}" for no, line in bad[:_SHOW_BAD])
        more = f"\n  ... and {len(bad) - _SHOW_BAD} more" if len(bad) > _SHOW_BAD else ""
        raise DataPrepError(
            f"{source}: {len(bad)} malformed line(s); expected '<user int> <item int>':\n{shown}{more}\n{hint}"
            "Fix the file or pass --skip-bad-lines to drop them (they are counted in meta.json)."
        )
    table = pa.table({"user_id": np.array(users, dtype=np.int64), "item_id": np.array(items, dtype=np.int64)})
    return table, len(bad)


def read_sasrec(path: str | os.PathLike, *, skip_bad_lines: bool = False) -> tuple[pa.Table, dict[str, int]]:
    """Parse the file into user_id/item_id/timestamp (synthesized), in line order, plus drop counts."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataPrepError(f"{path}: no such file.")
    data = _read_bytes(path)
    table, n_bad = _fast(data), 0
    if table is None:
        table, n_bad = _slow(data, str(path), skip_bad_lines)
    if n_bad:
        log.warning("%s: dropped %d malformed lines", path, n_bad)
    table = table.append_column("timestamp", pa.array(synthesize_timestamps(table.num_rows)))
    return table, ({"bad_line": n_bad} if n_bad else {})


def convert(path: str | os.PathLike, out_dir: str | os.PathLike, *, skip_bad_lines: bool = False,
            keep_duplicates: bool = False) -> Path:
    """Convert a SASRec text file to ``out_dir``; returns the parquet path. Synthesized times are
    distinct, so no two rows are exact duplicates here."""
    raw, drops = read_sasrec(path, skip_bad_lines=skip_bad_lines)
    table, null_drops, notes = canonicalize(raw, f"sasrec_txt:{path}", keep_duplicates=keep_duplicates)
    extra = {"format": "sasrec_txt", "timestamps": TIMESTAMP_NOTE, **notes}
    return write_log(table, out_dir, source="sasrec_txt", inputs=[path], drops={**drops, **null_drops}, extra=extra)


def text_cli(doc: str, convert_fn, argv: list[str] | None) -> None:
    """The command line shared by the text-layout converters (this one and s3rec_txt)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="the .txt (or .txt.gz) file")
    p.add_argument("--out", required=True, help="output folder for interactions.parquet + meta.json")
    p.add_argument("--skip-bad-lines", action="store_true", help="drop malformed lines instead of failing")
    p.add_argument("--keep-duplicates", action="store_true",
                   help="keep exact duplicate rows (none arise here: the synthesized times are distinct)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    convert_fn(a.input, a.out, skip_bad_lines=a.skip_bad_lines, keep_duplicates=a.keep_duplicates)


def main(argv: list[str] | None = None) -> None:
    text_cli(__doc__, convert, argv)


if __name__ == "__main__":
    run_cli(main)
