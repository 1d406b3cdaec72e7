"""The S3-Rec text layout to the canonical interaction log.

One user per line, ``<user> <item> <item> ...`` as integers separated by whitespace, items in time
order (Beauty.txt / Sports_and_Outdoors.txt / Toys_and_Games.txt from the S3-Rec repository). The
files have no timestamps, so strictly increasing ones are synthesized from the order, and
meta.json says so. The input may be gzip'd.

    python -m data_prep.s3rec_txt ../shared/data/s3rec/Beauty.txt.gz --out data/beauty
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_prep.common import DataPrepError, canonicalize, log, run_cli, synthesize_timestamps, write_log
from data_prep.sasrec_txt import TIMESTAMP_NOTE, _read_bytes, int64_ids, text_cli

_SHOW_BAD = 5


def read_s3rec(path: str | os.PathLike, *, skip_bad_lines: bool = False) -> tuple[pa.Table, dict[str, int]]:
    """user_id/item_id/timestamp (synthesized) in file order, plus drop counts."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataPrepError(f"{path}: no such file.")
    users, items, bad = [], [], []
    for no, line in enumerate(_read_bytes(path).splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        try:
            ids = np.array(int64_ids(fields, path, no), dtype=np.int64)
            if len(ids) < 2:
                raise ValueError
        except DataPrepError:
            raise
        except ValueError:
            bad.append((no, line))
            continue
        users.append(np.full(len(ids) - 1, ids[0]))
        items.append(ids[1:])
    if bad and not skip_bad_lines:
        shown = "\n".join(f"  line {no}: {line[:80].decode('utf-8', 'replace')!r}" for no, line in bad[:_SHOW_BAD])
        raise DataPrepError(
            f"{path}: {len(bad)} malformed line(s); expected '<user int> <item int> [<item int> ...]':\n{shown}\n"
            "Fix the file or pass --skip-bad-lines to drop them (they are counted in meta.json)."
        )
    if bad:
        log.warning("%s: dropped %d malformed lines", path, len(bad))
    if not users:
        raise DataPrepError(f"{path}: no interactions found")
    table = pa.table({"user_id": np.concatenate(users), "item_id": np.concatenate(items)})
    table = table.append_column("timestamp", pa.array(synthesize_timestamps(table.num_rows)))
    return table, ({"bad_line": len(bad)} if bad else {})


def convert(path: str | os.PathLike, out_dir: str | os.PathLike, *, skip_bad_lines: bool = False,
            keep_duplicates: bool = False) -> Path:
    raw, drops = read_s3rec(path, skip_bad_lines=skip_bad_lines)
    table, null_drops, notes = canonicalize(raw, f"s3rec_txt:{path}", keep_duplicates=keep_duplicates)
    extra = {"format": "s3rec_txt", "timestamps": TIMESTAMP_NOTE, **notes}
    return write_log(table, out_dir, source="s3rec_txt", inputs=[path], drops={**drops, **null_drops}, extra=extra)


def main(argv: list[str] | None = None) -> None:
    text_cli(__doc__, convert, argv)


if __name__ == "__main__":
    run_cli(main)
