"""MovieLens ratings (GroupLens releases) to the canonical interaction log.

Formats, detected from the file name (``--format`` to force):
  dat    ratings.dat  ML-1M / ML-10M   UserID::MovieID::Rating::Timestamp, no header
  udata  u.data       ML-100K          user<TAB>item<TAB>rating<TAB>timestamp, no header
  csv    ratings.csv  latest/20M/25M/32M  header userId,movieId,rating,timestamp

INPUT may be the ratings file, a gzip'd copy (.gz), a folder holding it, or the GroupLens .zip.

    python -m data_prep.movielens ~/Downloads/ml-1m.zip --out data/ml-1m
    python -m data_prep.movielens --download ml-latest-small --out data/ml-latest-small
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from data_prep.common import TIME_UNITS, DataPrepError, canonicalize, log, reading, run_cli, write_log

DATASETS = ("ml-100k", "ml-1m", "ml-10m", "ml-latest-small", "ml-latest", "ml-20m", "ml-25m", "ml-32m")
URL = "https://files.grouplens.org/datasets/movielens/{name}.zip"
DEFAULT_CACHE = Path("~/.cache/rayrec/movielens")
FORMATS = ("dat", "udata", "csv")
_NAMES = ("user_id", "item_id", "rating", "timestamp")
_TYPES = {"user_id": pa.int64(), "item_id": pa.int64(), "rating": pa.float32(), "timestamp": pa.int64()}


def detect_format(name: str) -> str | None:
    """The format a file name implies, or None when it is not a ratings file."""
    base = os.path.basename(name).lower()
    base = base[:-3] if base.endswith(".gz") else base
    if base == "u.data":
        return "udata"
    if base.startswith("ratings") and base.endswith(".dat"):
        return "dat"
    if base.startswith("ratings") and base.endswith(".csv"):
        return "csv"
    return None


def _pick(candidates: list[str], where: str, fmt: str | None) -> str:
    found = [c for c in candidates if detect_format(c) and (fmt is None or detect_format(c) == fmt)]
    if not found:
        raise DataPrepError(
            f"{where}: no MovieLens ratings file (ratings.dat, u.data or ratings.csv, optionally .gz) inside; "
            "pass the ratings file itself (and --format if its name is unusual)."
        )
    # The shallowest match wins (a release's top-level ratings file, not a copy in a sub-folder).
    found.sort(key=lambda c: (c.count("/"), c))
    depth = found[0].count("/")
    if len([c for c in found if c.count("/") == depth]) > 1:
        raise DataPrepError(f"{where}: several ratings files {found}; pass the one you want directly.")
    return found[0]


def _read(stream: Any, fmt: str, where: str) -> pa.Table:
    if fmt == "dat":
        # Splitting on ':' turns 'a::b' into 'a', '', 'b', so the fields are every other column;
        # this avoids copying the whole file to replace '::' and lets pyarrow stream it.
        names = [f"f{i}" for i in range(7)]
        keep = dict(zip(names[::2], _NAMES))
        read = pcsv.ReadOptions(column_names=names)
        parse = pcsv.ParseOptions(delimiter=":", quote_char=False)
        conv = pcsv.ConvertOptions(include_columns=list(keep), column_types={k: _TYPES[v] for k, v in keep.items()})
    elif fmt == "udata":
        keep = {n: n for n in _NAMES}
        read = pcsv.ReadOptions(column_names=list(_NAMES))
        parse = pcsv.ParseOptions(delimiter="\t", quote_char=False)
        conv = pcsv.ConvertOptions(column_types=_TYPES)
    elif fmt == "csv":
        keep = {"userId": "user_id", "movieId": "item_id", "rating": "rating", "timestamp": "timestamp"}
        read = pcsv.ReadOptions()
        parse = pcsv.ParseOptions(delimiter=",")
        conv = pcsv.ConvertOptions(include_columns=list(keep), column_types={k: _TYPES[v] for k, v in keep.items()})
    else:
        raise DataPrepError(f"unknown MovieLens format {fmt!r}; choose one of {FORMATS}")
    with reading(where):  # a truncated .gz: OSError
        try:
            table = pcsv.read_csv(stream, read_options=read, parse_options=parse, convert_options=conv)
        except (pa.ArrowInvalid, pa.ArrowKeyError) as e:
            raise DataPrepError(f"{where}: not a valid MovieLens {fmt!r} ratings file ({e}).") from None
    return table.rename_columns([keep[c] for c in table.column_names]).select(list(_NAMES))


def read_ratings(path: str | os.PathLike, fmt: str | None = None) -> tuple[pa.Table, str, Path]:
    """Read a ratings file, .gz, folder or .zip. Returns (raw table, format, file to fingerprint)."""
    path = Path(path).expanduser()
    if fmt is not None and fmt not in FORMATS:
        raise DataPrepError(f"unknown MovieLens format {fmt!r}; choose one of {FORMATS}")
    if not path.exists():
        raise DataPrepError(f"{path}: no such file or folder.")
    if path.is_dir():
        rel = [str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()]
        path = path / _pick(rel, str(path), fmt)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            member = _pick([n for n in zf.namelist() if not n.endswith("/")], str(path), fmt)
            fmt = fmt or detect_format(member)
            where = f"{path}!{member}"
            log.info("reading %s as %s", where, fmt)
            with zf.open(member) as f:
                stream = pa.PythonFile(f, "r")
                if member.endswith(".gz"):
                    stream = pa.CompressedInputStream(stream, "gzip")
                return _read(stream, fmt, where), fmt, path
    fmt = fmt or detect_format(path.name)
    if fmt is None:
        raise DataPrepError(
            f"{path}: cannot tell the MovieLens format from the name; pass --format {'|'.join(FORMATS)}."
        )
    log.info("reading %s as %s", path, fmt)
    # pyarrow decompresses by extension, so a .gz file streams without a temporary copy.
    return _read(pa.input_stream(str(path), compression="detect"), fmt, str(path)), fmt, path


def download(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the path of ``<name>.zip`` in the cache, fetching it from GroupLens if it is not there."""
    if name not in DATASETS:
        raise DataPrepError(f"unknown MovieLens dataset {name!r}; choose one of {DATASETS}")
    cache = Path(cache_dir or DEFAULT_CACHE).expanduser()
    dest = cache / f"{name}.zip"
    if dest.is_file() and zipfile.is_zipfile(dest):
        log.info("using cached %s", dest)
        return dest
    url = URL.format(name=name)
    part = dest.with_suffix(".zip.part")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s to %s", url, dest)
        with urllib.request.urlopen(url, timeout=60) as resp, open(part, "wb") as out:
            shutil.copyfileobj(resp, out, 1 << 20)
        if not zipfile.is_zipfile(part):
            raise OSError(f"{url} did not return a zip file")
        os.replace(part, dest)
    except (urllib.error.URLError, OSError) as e:
        part.unlink(missing_ok=True)
        raise DataPrepError(
            f"could not download {url} ({e}). If this machine is offline, download the zip by hand "
            f"(on a machine with internet access) and pass its path instead of --download, e.g.\n"
            f"  python -m data_prep.movielens /path/to/{name}.zip --out <dir>\n"
            f"or copy it to {dest} so --download {name} finds it in the cache."
        ) from None
    return dest


def _guess_dataset(path: Path) -> str | None:
    for part in (path.stem, path.parent.name, path.name):
        m = re.match(r"ml-[0-9a-z-]+?(?=\.|$)", part.lower())
        if m:
            return m.group(0)
    return None


def convert(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    fmt: str | None = None,
    min_rating: float | None = None,
    dataset: str | None = None,
    time_unit: str = "s",
    keep_duplicates: bool = False,
) -> Path:
    """Convert a MovieLens ratings file/.gz/folder/.zip to ``out_dir``; returns the parquet path.
    ``time_unit`` is the unit of the file's timestamps (GroupLens releases use seconds)."""
    with reading(path):
        raw, fmt, fingerprint = read_ratings(path, fmt)
    dataset = dataset or _guess_dataset(Path(path)) or _guess_dataset(fingerprint)
    table, drops, notes = canonicalize(raw, f"movielens:{path}", keep_duplicates=keep_duplicates, time_unit=time_unit)
    if min_rating is not None:
        keep = pc.greater_equal(table["rating"], pa.scalar(min_rating, pa.float32()))
        table = table.filter(keep)
        drops["below_min_rating"] = len(keep) - table.num_rows
        if table.num_rows == 0:
            raise DataPrepError(f"{path}: no ratings >= {min_rating} left.")
    extra = {"format": fmt, "dataset": dataset, "min_rating": min_rating, "time_unit": time_unit, **notes}
    return write_log(table, out_dir, source="movielens", inputs=[fingerprint], drops=drops, extra=extra)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("input", nargs="?", help="ratings file, .gz, folder or GroupLens .zip")
    src.add_argument("--download", choices=DATASETS, help="fetch this GroupLens zip (cached) and convert it")
    p.add_argument("--out", required=True, help="output folder for interactions.parquet + meta.json")
    p.add_argument("--format", choices=FORMATS, help="force the format instead of guessing from the file name")
    p.add_argument("--min-rating", type=float, help="keep only ratings >= this")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="where --download keeps zips (%(default)s)")
    p.add_argument("--time-unit", choices=list(TIME_UNITS), default="s",
                   help="unit of the file's timestamps, stored as seconds (default: s, as GroupLens releases)")
    p.add_argument("--keep-duplicates", action="store_true",
                   help="keep exact duplicate (user, item, time) rows; by default all but the first are dropped "
                   "and counted in meta.json (a repeated identical event is a logging artifact)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path = download(a.download, a.cache_dir) if a.download else a.input
    convert(path, a.out, fmt=a.format, min_rating=a.min_rating, dataset=a.download, time_unit=a.time_unit,
            keep_duplicates=a.keep_duplicates)


if __name__ == "__main__":
    run_cli(main)
