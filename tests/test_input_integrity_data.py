"""Issue 22 (integrity of every input), data side: duplicate events, timestamps in mixed units,
whitespace around string ids, and converter failures as one `error:` line with exit code 2."""
from __future__ import annotations

import gzip
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep import csv_log, movielens, s3rec_txt, sasrec_txt
from data_prep.common import DataPrepError
from rayrec.config import DataConfig
from tests.conftest import write_parquet_log

ROOT = Path(__file__).resolve().parents[1]
CSV_COLS = ["--user-col", "u", "--item-col", "i", "--time-col", "t"]


def read_out(out: Path) -> tuple[dict, dict]:
    return pq.read_table(out / "interactions.parquet").to_pydict(), json.loads((out / "meta.json").read_text())


# ------------------------------------------------------------ converter failures: the inputs

def _parquet_bytes() -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"u": [1, 2], "i": [1, 2], "t": [1_600_000_000, 1_600_000_001]}), buf)
    return buf.getvalue()


def _csv(n: int = 20000) -> bytes:
    return b"u,i,t\n" + b"".join(b"%d,%d,%d\n" % (k % 50, k, 1_600_000_000 + k) for k in range(n))


def _txt(n: int = 20000) -> bytes:
    return b"".join(b"%d %d\n" % (k % 50, k) for k in range(n))


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


# (case, file name, bytes, converter argv after the input, expected message pieces)
FAILURES = [
    ("empty parquet", "log.parquet", b"", ["-m", "data_prep.csv_log"], CSV_COLS,
     ["Parquet file size is 0 bytes", "re-create or re-download"]),
    ("truncated parquet", "log.parquet", _half(_parquet_bytes()), ["-m", "data_prep.csv_log"], CSV_COLS,
     ["magic bytes", "re-create or re-download"]),
    ("truncated csv.gz", "log.csv.gz", _half(gzip.compress(_csv())), ["-m", "data_prep.csv_log"], CSV_COLS,
     ["truncated or damaged: re-download"]),
    ("truncated txt.gz (sasrec)", "ml.txt.gz", _half(gzip.compress(_txt())), ["-m", "data_prep.sasrec_txt"], [],
     ["truncated or damaged: re-download"]),
    ("truncated txt.gz (s3rec, script)", "b.txt.gz", _half(gzip.compress(_txt())), ["data_prep/s3rec_txt.py"], [],
     ["truncated or damaged: re-download"]),
    ("truncated ratings.dat.gz", "ratings.dat.gz", _half(gzip.compress(b"1::2::5::978300760\n" * 5000)),
     ["-m", "data_prep.movielens"], [], ["truncated or damaged: re-download"]),
    ("non-UTF-8 ids", "latin.csv", "u,i,t\nJos\xe9,1,1600000000\nb,2,1600000001\n".encode("latin-1"),
     ["-m", "data_prep.csv_log"], CSV_COLS, ["not UTF-8", "re-encode the file as UTF-8"]),
    ("non-UTF-8 ids, --string-ids", "latin.csv", "u,i,t\nJos\xe9,1,1600000000\nb,2,1600000001\n".encode("latin-1"),
     ["-m", "data_prep.csv_log"], CSV_COLS + ["--string-ids"], ["invalid UTF8", "re-encode the file as UTF-8"]),
    ("id >= 2**63 (csv)", "big.csv", b"u,i,t\n9223372036854775808,1,1600000000\n1,2,1600000001\n",
     ["-m", "data_prep.csv_log"], CSV_COLS, ["too large to read as numbers exactly", "9223372036854775808",
                                             "--string-ids"]),
    ("id > 2**53 next to a float id", "f.csv", b"u,i,t\n9007199254740993,1,1600000000\n12.0,2,1600000001\n",
     ["-m", "data_prep.csv_log"], CSV_COLS, ["too large to read as numbers exactly", "--string-ids"]),
    ("id >= 2**63 (sasrec)", "big.txt", b"1 9223372036854775808\n", ["-m", "data_prep.sasrec_txt"], [],
     ["line 1: id 9223372036854775808 does not fit in int64"]),
    ("id >= 2**63 (s3rec)", "big.txt", b"1 2 9223372036854775808\n", ["-m", "data_prep.s3rec_txt"], [],
     ["line 1: id 9223372036854775808 does not fit in int64"]),
    ("mixed s/ms across users", "mixed.csv", b"u,i,t\n1,1,1600000000\n1,2,1600000100\n2,3,1600000000000\n",
     ["-m", "data_prep.csv_log"], CSV_COLS, ["timestamps are in mixed units", "2 look like seconds",
                                             "1 look like milliseconds", "data row 3: 1600000000000"]),
    ("mixed s/ms, --time-unit ms", "mixed.csv", b"u,i,t\n1,1,1600000000\n1,2,1600000100000\n",
     ["-m", "data_prep.csv_log"], CSV_COLS + ["--time-unit", "ms"], ["timestamps are in mixed units"]),
    ("mixed s/us in one user (movielens)", "ratings.dat", b"1::2::5::1600000000\n1::3::5::1600000000000000\n",
     ["-m", "data_prep.movielens"], [], ["mixed units", "seconds", "microseconds", "row 2: user 1"]),
]


@pytest.mark.parametrize("case, name, data, cmd, args, pieces", FAILURES, ids=[f[0] for f in FAILURES])
def test_converter_failure_is_one_error_line(tmp_path, case, name, data, cmd, args, pieces):
    src = tmp_path / name
    src.write_bytes(data)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, *cmd, str(src), "--out", str(out), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    err_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(err_lines) == 1, proc.stderr
    assert str(src) in err_lines[0]
    for piece in pieces:
        assert piece in proc.stderr, (piece, proc.stderr)
    assert not out.exists() and "wrote" not in proc.stderr + proc.stdout


def test_prepare_reports_a_converter_failure_as_error(tmp_path):
    """`jobs/prepare.py` converting data.source: the converter's message, exit 2, nothing written."""
    src = tmp_path / "log.csv.gz"
    src.write_bytes(_half(gzip.compress(_csv())))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  log: {tmp_path / 'data' / 'interactions.parquet'}\n"
                   f"  source: {{kind: csv, path: {src}, user_col: u, item_col: i, time_col: t}}\n")
    proc = subprocess.run([sys.executable, "jobs/prepare.py", str(cfg)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {src}: cannot read (Truncated compressed stream); the compressed file is truncated or damaged: "
        "re-download it (gzip -t checks a copy)."]
    assert not (tmp_path / "data").exists() and "ready" not in proc.stdout


# ----------------------------------------------------------- converters: counted handling

DUP_CSV = "u,i,t\n1,10,1600000000\n1,20,1600000001\n1,10,1600000000\n1,20,1600000002\n2,10,1600000000\n"


@pytest.mark.parametrize("flags, rows, drops, note", [
    ([], [10, 20, 20, 10], {"duplicate_rows": 1}, {"found": 1, "dropped": True}),
    (["--keep-duplicates"], [10, 20, 10, 20, 10], {}, {"found": 1, "dropped": False}),
])
def test_converter_duplicates_counted(tmp_path, caplog, flags, rows, drops, note):
    src = tmp_path / "e.csv"
    src.write_text(DUP_CSV)
    csv_log.main([str(src), "--out", str(tmp_path / "out"), *CSV_COLS, *flags])
    cols, meta = read_out(tmp_path / "out")
    assert cols["item_id"] == rows and meta["drops"] == drops and meta["duplicate_rows"] == note
    assert "1 exact duplicate" in caplog.text


@pytest.mark.parametrize("string_ids, users, stripped", [
    (True, ["5", "5", "5", "12.0", "12"], {"user_id": 2}),  # text: '12.0' and '12' are two ids
    (False, [5, 5, 5, 12, 12], None),  # numbers: one id 12
])
def test_string_ids_whitespace_and_float_ids(tmp_path, string_ids, users, stripped):
    src = tmp_path / "ws.csv"
    src.write_text('u,i,t\n"5",1,1600000000\n" 5",2,1600000001\n"5 ",3,1600000002\n12.0,4,1600000003\n12,5,1600000004\n')
    csv_log.convert(src, tmp_path / "out", user_col="u", item_col="i", time_col="t", string_ids=string_ids)
    cols, meta = read_out(tmp_path / "out")
    assert cols["user_id"] == users and meta["users"] == len(set(users))
    assert meta.get("ids_whitespace_stripped") == stripped


def test_whitespace_only_id_is_a_counted_missing_id(tmp_path):
    src = tmp_path / "ws.csv"
    src.write_text('u,i,t\n"  ",1,1600000000\na,2,1600000001\n')
    csv_log.convert(src, tmp_path / "out", user_col="u", item_col="i", time_col="t", string_ids=True)
    cols, meta = read_out(tmp_path / "out")
    assert cols["user_id"] == ["a"] and meta["drops"] == {"null_user_id": 1}


def test_movielens_time_unit_normalises_to_seconds(tmp_path):
    src = tmp_path / "ratings.dat"
    src.write_text("1::2::5::1600000000123\n1::3::4::1600000001999\n")
    movielens.main([str(src), "--out", str(tmp_path / "out"), "--time-unit", "ms"])
    cols, meta = read_out(tmp_path / "out")
    assert cols["timestamp"] == [1600000000, 1600000001] and meta["time_unit"] == "ms"


@pytest.mark.parametrize("module, text, rows", [(sasrec_txt, "1 5\n1 6\n2 5\n" * 3, 9),
                                               (s3rec_txt, "1 5 6 5\n2 7 8\n", 5)])
def test_order_only_timestamps_do_not_trip_the_unit_check(tmp_path, module, text, rows):
    """Synthesized times are distinct, so a repeated line is a repeat, not a duplicate event."""
    src = tmp_path / "x.txt"
    src.write_text(text)
    module.convert(src, tmp_path / "out")
    cols, meta = read_out(tmp_path / "out")
    assert meta["duplicate_rows"] == {"found": 0, "dropped": True} and len(cols["user_id"]) == rows


def test_canonicalize_rejects_mixed_units_in_process():
    from data_prep.common import canonicalize

    t = pa.table({"user_id": [1, 1], "item_id": [1, 2], "timestamp": [1_600_000_000, 1_600_000_000_000_000_000]})
    with pytest.raises(DataPrepError, match="seconds .*nanoseconds"):
        canonicalize(t, "x")
    # one unit, or times that are no date in any unit (order positions), pass
    canonicalize(pa.table({"user_id": [1, 1], "item_id": [1, 2], "timestamp": [0, 1]}), "x")


# ----------------------------------------------------------------------- the sequence build

def _seqs(data) -> dict:
    t = pq.read_table(data.sequences_path)
    vocab = pq.read_table(f"{data.root}/vocab/items.parquet")
    raw = dict(zip(vocab["item_idx"].to_pylist(), vocab["item_id"].to_pylist()))
    return {r["user_id"]: [raw[i] for i in r["items"]] for r in t.to_pylist()}


# u1's last event is logged twice; u2 has a duplicate far from its copy in log order; u3 re-buys
# item 5 at a later time (a real repeat, never dropped)
BUILD_ROWS = [("u1", 10, 1), ("u1", 20, 2), ("u1", 30, 3), ("u2", 1, 1), ("u2", 2, 2), ("u1", 30, 3),
              ("u3", 5, 1), ("u3", 6, 2), ("u3", 5, 3), ("u2", 3, 3), ("u2", 2, 2)]


@pytest.mark.ray
@pytest.mark.parametrize("drop, seqs, dup_drop, dups, val_rep, test_rep", [
    (True, {"u1": [10, 20, 30], "u2": [1, 2, 3], "u3": [5, 6, 5]}, 2, {"rows": 2, "dropped": True}, 0, 1),
    # kept: u1's test target repeats its val target; u2's val target (2) repeats
    (False, {"u1": [10, 20, 30, 30], "u2": [1, 2, 2, 3], "u3": [5, 6, 5]}, 0, {"rows": 2, "dropped": False}, 1, 2),
])
def test_build_counts_duplicates_and_repeat_targets(ray_cluster, tmp_path, drop, seqs, dup_drop, dups, val_rep, test_rep):
    from rayrec.data.prepare import report_table
    from rayrec.data.sequences import build_sequences

    log = write_parquet_log(tmp_path / "l.parquet", BUILD_ROWS)
    data = build_sequences(DataConfig(log=log, eval_negatives=0, drop_duplicates=drop))
    m = data.meta
    assert _seqs(data) == seqs
    assert m["drops"]["duplicate_rows"] == dup_drop and m["duplicates"] == dups
    assert m["rows_out"] + sum(v for k, v in m["drops"].items() if k.endswith("rows")) == m["rows_in"]
    assert (m["split"]["val_repeat_targets"], m["split"]["test_repeat_targets"]) == (val_rep, test_rep)
    report = json.loads((Path(data.root) / "data_report.json").read_text())
    assert report["duplicates"] == dups and report["split"]["test_repeat_targets"] == test_rep
    table = report_table(m)
    assert re.search(rf"duplicate events +{dups['rows']} {'dropped' if drop else 'kept in sequences'}", table)
    assert re.search(rf"test targets already in history +{test_rep} users", table)


@pytest.mark.ray
@pytest.mark.parametrize("kw", [{"max_history": 3}, {"split": "time", "time_quantile": 0.82}])
def test_build_drops_duplicates_before_truncation_and_across_files(ray_cluster, tmp_path, kw):
    """A copy must not push an older event out of the most recent max_history; copies in different
    files (read units) are found in the user's bucket."""
    from rayrec.data.sequences import build_sequences

    folder = tmp_path / "log"
    folder.mkdir()
    write_parquet_log(folder / "a.parquet", [("u", 1, 1), ("u", 2, 2), ("u", 3, 3), ("u", 3, 3), ("v", 1, 1),
                                             ("v", 2, 2), ("v", 3, 3), ("v", 4, 4)])
    write_parquet_log(folder / "b.parquet", [("u", 3, 3), ("u", 4, 4), ("v", 3, 3)])
    data = build_sequences(DataConfig(log=str(folder), eval_negatives=0, **kw))
    m = data.meta
    assert m["drops"]["duplicate_rows"] == 3
    assert m["rows_out"] + sum(v for k, v in m["drops"].items() if k.endswith("rows")) == m["rows_in"]
    if "max_history" in kw:
        assert _seqs(data) == {"u": [2, 3, 4], "v": [2, 3, 4]} and m["drops"]["truncated_rows"] == 2


@pytest.mark.ray
def test_build_without_duplicates_is_unchanged_by_the_option(ray_cluster, synthetic_log, tmp_path):
    from rayrec.data.sequences import build_sequences

    a = build_sequences(DataConfig(log=synthetic_log, cache_dir=str(tmp_path / "a"), eval_negatives=5))
    b = build_sequences(DataConfig(log=synthetic_log, cache_dir=str(tmp_path / "b"), eval_negatives=5,
                                   drop_duplicates=False))
    ta, tb = (pq.read_table(d.sequences_path).sort_by("user_idx") for d in (a, b))
    assert ta.equals(tb) and a.meta["duplicates"]["rows"] == b.meta["duplicates"]["rows"] == 0
    assert a.meta["split"] == b.meta["split"]


@pytest.mark.ray
def test_prepare_refuses_a_log_with_mixed_time_units(ray_cluster, tmp_path, capsys):
    from rayrec.cli import main

    log = write_parquet_log(tmp_path / "l.parquet", [("a", 1, 1_600_000_000), ("a", 2, 1_600_000_100),
                                                     ("b", 1, 1_600_000_000_000), ("b", 2, 1_600_000_100_000)])
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  log: {log}\n  eval_negatives: 0\n")
    assert main(["prepare", str(cfg)]) == 2
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "ready" not in out
    assert "timestamps are in mixed units: 2 look like seconds (e.g. log row 0: user 'a', timestamp 1600000000" in errors[0]
    assert "2 look like milliseconds (e.g. log row 2: user 'b', timestamp 1600000000000" in errors[0]
    assert not list((tmp_path / "_rayrec_cache").rglob("meta.json"))
