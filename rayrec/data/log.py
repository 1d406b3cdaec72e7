"""Find, check and plan reads of the canonical interaction log on any pyarrow/fsspec filesystem."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

REQUIRED = ("user_id", "item_id", "timestamp")


class DataError(ValueError):
    """Input data that cannot be trained on; the message names the problem and the fix."""


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and path for a local path, ``file://``, ``s3://``, ``gs://`` or any fsspec URL."""
    if not uri:
        raise DataError("data.log is empty: point it at interactions.parquet (or a folder of Parquet files)")
    try:
        return pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, ValueError):
        pass
    if "://" not in uri:
        import os

        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = fsspec.core.url_to_fs(uri)
    return PyFileSystem(FSSpecHandler(fs)), path


def list_files(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"interaction log {path!r} does not exist; run jobs/prepare.py first or fix data.log")
    if info.type == pafs.FileType.File:
        return [info]
    files = [
        f
        for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
        if f.type == pafs.FileType.File and f.path.endswith(".parquet") and "/_rayrec_cache/" not in f.path
    ]
    if not files:
        raise DataError(f"no .parquet files under {path!r}")
    return sorted(files, key=lambda f: f.path)


def ignored_files(fs: pafs.FileSystem, path: str) -> list[str]:
    """Files in a log folder that are not read (Spark/Hadoop markers like _SUCCESS, .crc, notes):
    listed in the data report so a misnamed data file is noticed."""
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    return sorted(f.path for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                  if f.type == pafs.FileType.File and not f.path.endswith(".parquet") and "/_rayrec_cache/" not in f.path)


@dataclass(frozen=True)
class ReadUnit:
    """One row group of one file; ``offset`` is its first row's position in the whole log."""

    path: str
    row_group: int
    offset: int
    rows: int


def plan(fs: pafs.FileSystem, files: list[pafs.FileInfo]) -> tuple[list[ReadUnit], pa.Schema]:
    """Check every file's schema and cut the log into row-group units with global row offsets.

    The global row offset is the stable tie-break for equal timestamps (DESIGN.md).
    """
    units: list[ReadUnit] = []
    schema = None
    offset = 0
    for f in files:
        try:
            with fs.open_input_file(f.path) as fh:
                md = pq.ParquetFile(fh).metadata
                file_schema = md.schema.to_arrow_schema()
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"{f.path} is not a readable Parquet file ({e}); re-create it with jobs/prepare.py") from None
        check_schema(file_schema, f.path)
        schema = schema or file_schema
        if ("rating" in file_schema.names) != ("rating" in schema.names):
            raise DataError(f"{f.path}: some log files have a 'rating' column and some do not; "
                            "convert them all the same way (or drop the column everywhere)")
        for rg in range(md.num_row_groups):
            n = md.row_group(rg).num_rows
            if n:
                units.append(ReadUnit(f.path, rg, offset, n))
                offset += n
    if offset == 0:
        raise DataError(f"the interaction log ({len(files)} file(s)) has no rows")
    return units, schema


def check_schema(schema: pa.Schema, where: str) -> None:
    missing = [c for c in REQUIRED if c not in schema.names]
    if missing:
        raise DataError(
            f"{where}: missing column(s) {missing} (have {schema.names}); the log needs "
            "user_id, item_id, timestamp: convert raw files with jobs/prepare.py"
        )
    for c in ("user_id", "item_id"):
        t = schema.field(c).type
        if not (pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise DataError(f"{where}: column {c!r} has type {t}; ids must be integers or strings")
    if "rating" in schema.names and not (pa.types.is_integer(schema.field("rating").type) or pa.types.is_floating(schema.field("rating").type)):
        raise DataError(f"{where}: column 'rating' has type {schema.field('rating').type}; ratings must be numbers "
                        "(or drop the column when the log has none)")
    t = schema.field("timestamp").type
    if not pa.types.is_integer(t):
        raise DataError(f"{where}: column 'timestamp' has type {t}; it must be int64 seconds (see data_prep/)")


def read_unit(fs: pafs.FileSystem, unit: ReadUnit, with_rating: bool = False) -> pa.Table:
    """Read one unit; nulls (and NaN ratings) are an error naming the column, the count and example rows."""
    cols = list(REQUIRED) + (["rating"] if with_rating else [])
    with fs.open_input_file(unit.path) as fh:
        t = pq.ParquetFile(fh).read_row_group(unit.row_group, columns=cols)
    if with_rating:
        import pyarrow.compute as pc

        r = pc.cast(t["rating"], pa.float32())
        t = t.set_column(cols.index("rating"), "rating", pc.if_else(pc.is_nan(r), None, r))  # NaN counts as null
    for c in cols:
        nulls = t[c].null_count
        if nulls:
            import pyarrow.compute as pc

            idx = pc.indices_nonzero(pc.is_null(t[c])).to_pylist()[:3]
            examples = [t.slice(i, 1).to_pylist()[0] for i in idx]
            raise DataError(
                f"{unit.path}: column {c!r} has {nulls} null value(s) in row group {unit.row_group} "
                f"(log rows {[unit.offset + i for i in idx]} e.g. {examples}); clean the log with "
                "data_prep (it drops and counts null rows)"
            )
    return t


def fingerprint(fs: pafs.FileSystem, files: list[pafs.FileInfo]) -> list[dict]:
    """sha256 and size of every input file: the cache key and the data report's provenance."""
    out = []
    for f in files:
        h = hashlib.sha256()
        with fs.open_input_stream(f.path) as s:
            while chunk := s.read(1 << 22):
                h.update(chunk)
        out.append({"path": f.path, "bytes": f.size, "sha256": h.hexdigest()})
    return out
