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
    except OSError as e:  # S3 asks the bucket for its region here: the first network call
        raise storage_error(uri, e) from None
    if "://" not in uri:
        import os

        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = fsspec.core.url_to_fs(uri)
    return PyFileSystem(FSSpecHandler(fs)), path


_UNREACHABLE = ("network_connection", "could not connect", "could not resolve", "connection refused", "timed out",
                "timeout was reached", "name or service not known", "network is unreachable", "no route to host")
_REFUSED = ("access_denied", "accessdenied", "invalidaccesskeyid", "signaturedoesnotmatch", "expiredtoken",
            "invalidtoken", "forbidden", "unauthorized", "permission denied", "no credentials")


def storage_error(location: str, e: OSError) -> DataError:
    """One line for a storage call that failed: unreachable, unauthorised, or something else.

    pyarrow's S3 errors are plain ``OSError`` with the AWS error name in the text, so the text is
    what tells a network failure (retry, fix the endpoint) from refused credentials (fix access);
    a missing key is not an error here but a ``NotFound`` answer (``list_files``)."""
    text, where = " ".join(str(e).split()), repr(location)
    low = text.lower()
    if any(s in low for s in _UNREACHABLE):
        region = (" (set AWS_DEFAULT_REGION to skip the bucket's region lookup)"
                  if "resolving region" in low else "")
        return DataError(f"cannot reach the storage holding {where}: check the network, the endpoint "
                         f"(AWS_ENDPOINT_URL) and the region{region}; nothing was read. Storage said: {text}")
    if isinstance(e, PermissionError) or any(s in low for s in _REFUSED):
        return DataError(f"access to {where} was refused (unauthorised): check the credentials (for S3: "
                         f"AWS_ACCESS_KEY_ID, AWS_PROFILE or the instance role) and the bucket policy; nothing was read. "
                         f"Storage said: {text}")
    return DataError(f"cannot read {where}: {text}")


def _shown(fs: pafs.FileSystem, path: str) -> str:
    return f"{fs.type_name}://{path}" if fs.type_name in ("s3", "gcs", "hdfs") else path


def file_info(fs: pafs.FileSystem, path: str) -> pafs.FileInfo:
    """``fs.get_file_info(path)``, with a storage failure as a :class:`DataError` naming the cause."""
    try:
        return fs.get_file_info(path)
    except OSError as e:
        raise storage_error(_shown(fs, path), e) from None


def list_files(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    info = file_info(fs, path)
    if info.type == pafs.FileType.NotFound:
        where = "the storage answered that no such key or bucket exists" if fs.type_name != "local" else "no such file"
        raise DataError(f"interaction log {_shown(fs, path)!r} does not exist ({where}); run jobs/prepare.py first "
                        "or fix data.log")
    if info.type == pafs.FileType.File:
        return [info]
    try:
        listing = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except OSError as e:
        raise storage_error(_shown(fs, path), e) from None
    files = [f for f in listing
             if f.type == pafs.FileType.File and f.path.endswith(".parquet") and "/_rayrec_cache/" not in f.path]
    if not files:
        raise DataError(f"no .parquet files under {_shown(fs, path)!r}")
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
