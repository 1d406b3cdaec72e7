"""Time split, filters, k-core, max_history, the data report and order invariance of the build."""
import hashlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayrec.config import ConfigError, DataConfig, load_config
from rayrec.data.batches import SequenceStore, eval_batch, train_batch
from rayrec.data.log import DataError
from rayrec.data.sequences import build_sequences
from rayrec.data.split import exact_quantile
from tests.conftest import write_parquet_log


def by_user(data):
    """{raw user: (raw items, train_len, val_pos, test_pos)} of a build."""
    t = pq.read_table(data.sequences_path)
    vocab = pq.read_table(f"{data.root}/vocab/items.parquet")
    raw = dict(zip(vocab["item_idx"].to_pylist(), vocab["item_id"].to_pylist()))
    return {r["user_id"]: ([raw[i] for i in r["items"]], r["train_len"], r["val_pos"], r["test_pos"]) for r in t.to_pylist()}


def digest(data) -> str:
    """Hash of the sequences in raw ids, independent of file, block and bucket order."""
    t = pq.read_table(data.sequences_path)
    t = t.drop_columns([c for c in ("user_idx",) if c in t.column_names])
    t = t.sort_by("user_id")
    return hashlib.sha256(json.dumps(t.to_pylist(), sort_keys=True).encode()).hexdigest()


@pytest.mark.parametrize("q", [0.0, 0.3, 0.5, 0.95, 0.999])
@pytest.mark.parametrize("kind", ["spread", "ties", "huge_range"])
def test_exact_quantile_matches_sorting(q, kind):
    rng = np.random.default_rng(1)
    ts = {"spread": rng.integers(0, 10**9, 5000), "ties": rng.integers(0, 3, 5000),
          "huge_range": np.r_[rng.integers(-2**62, 2**62, 4000), rng.integers(0, 10, 1000)]}[kind].astype(np.int64)
    chunks = np.array_split(ts, 7)
    got = exact_quantile(lambda: iter(chunks), len(ts), q, int(ts.min()), int(ts.max()), bins=64)
    assert got == np.sort(ts)[min(len(ts) - 1, int(np.floor(q * len(ts))))]


TIME_ROWS = [
    # user a: pre-cut 1,2,3,4 (ts 1..4); post-cut: item 99 (never seen before the cut) then item 2
    ("a", 1, 1), ("a", 2, 2), ("a", 3, 3), ("a", 4, 4), ("a", 99, 12), ("a", 2, 13), ("a", 3, 14),
    # user b: pre-cut 3, 1; post-cut 4: eligible at once
    ("b", 3, 2), ("b", 1, 5), ("b", 4, 11),
    # user c: only post-cut events: no pre-cut history, dropped and counted
    ("c", 1, 15), ("c", 2, 16),
    # user d: pre-cut only: trains and validates, no test
    ("d", 2, 1), ("d", 4, 3), ("d", 1, 6),
    # filler: puts the 0.7 quantile at timestamp 11
    ("e", 5, 7), ("e", 6, 8), ("e", 7, 9), ("e", 8, 10),
]


def test_time_split_holdout_history_and_counts(ray_cluster, tmp_path):
    log = write_parquet_log(tmp_path / "log.parquet", TIME_ROWS)
    n = len(TIME_ROWS)
    data = build_sequences(DataConfig(log=log, split="time", time_quantile=0.7, eval_negatives=0))
    m = data.meta
    assert m["split"]["cut_timestamp"] == sorted(r[2] for r in TIME_ROWS)[int(0.7 * n)] == 11
    u = by_user(data)
    # a: item 99 was never seen before the cut, so the next post-cut event (item 2) is the holdout;
    # the post-cut events before and after it are not stored
    assert u["a"] == ([1, 2, 3, 4, 2], 3, 3, 4)
    assert u["b"] == ([3, 1, 4], 2, -1, 2)  # 2 pre-cut events: too few to validate, tested on item 4
    assert u["d"] == ([2, 4, 1], 2, 2, -1)
    assert "c" not in u
    assert m["split"]["users_without_pre_cut_events"] == 1 and m["drops"]["post_cut_only_user_rows"] == 2
    assert m["drops"]["post_cut_unused_rows"] == 2  # a's item 99 and its last event
    assert m["rows_out"] + sum(v for k, v in m["drops"].items() if k.endswith("rows")) == m["rows_in"]
    assert m["split"]["test_users"] == 2 and m["split"]["val_users"] == 3

    store = SequenceStore.from_tables([pq.read_table(data.sequences_path)], data.num_items)
    # training sees only pre-cut events, minus the validation target
    cut = m["split"]["cut_timestamp"]
    tb = train_batch(store, store.train_users(), 8)
    assert (tb["timestamps"][tb["items"] > 0] < cut).all()
    test_rows = store.eval_users("test")
    b = eval_batch(store, test_rows, 8, "test")
    assert (b["timestamps"][b["items"] > 0] < cut).all()  # the input is the pre-cut history only
    vocab = pq.read_table(f"{data.root}/vocab/items.parquet")
    raw = dict(zip(vocab["item_idx"].to_pylist(), vocab["item_id"].to_pylist()))
    assert sorted(raw[i] for i in b["target"].tolist()) == [2, 4]
    assert len(store.eval_users("val")) == 3


def test_time_split_evaluates_through_the_shared_path(ray_cluster, synthetic_log, tmp_path):
    import torch

    from rayrec.config import EvalConfig
    from rayrec.eval.baselines import MostPopular
    from rayrec.eval.evaluate import evaluate

    # users advance in lock-step (timestamp = position * 1000 + user), so the cut crosses every history
    t = pq.read_table(synthetic_log).sort_by([("user_id", "ascending"), ("timestamp", "ascending")])
    user = t["user_id"].to_numpy()
    pos = np.arange(len(user)) - np.searchsorted(user, user)
    t = t.set_column(t.schema.get_field_index("timestamp"), "timestamp", pa.array(pos * 1000 + user, pa.int64()))
    pq.write_table(t, tmp_path / "lockstep.parquet")
    data = build_sequences(DataConfig(log=str(tmp_path / "lockstep.parquet"), split="time", time_quantile=0.8))
    store = SequenceStore.from_tables([pq.read_table(data.sequences_path)], data.num_items)
    assert data.meta["split"]["test_users"] > 300 and data.meta["split"]["val_users"] > 300
    pop = MostPopular(store)
    ev = EvalConfig(protocol="both")
    val = evaluate(pop, store, ev, 50, "val", torch.device("cpu"))
    test = evaluate(pop, store, ev, 50, "test", torch.device("cpu"))
    assert val["val_users"] == data.meta["split"]["val_users"] and test["test_users"] == data.meta["split"]["test_users"]
    assert 0 < test["test_hr_20"] < 1 and 0 < test["test_sampled_hr_10"] <= 1
    # evaluation negatives stay out of training negatives under this split too
    keys = store.forbidden_keys()
    r = store.eval_users("test")[0]
    assert np.isin(r * (store.num_items + 1) + store.eval_negatives[r], keys).all()


def test_kcore_iterates_until_both_filters_hold(ray_cluster, tmp_path):
    # items 1..3 are popular among users 1..3; user 4 has 2 events on item 1 and item 9 (rare):
    # dropping item 9 leaves user 4 with 1 event; dropping user 4 leaves item 1 with 2 events
    rows = [(u, i, 10 * u + i) for u in (1, 2, 3) for i in (1, 2, 3)]
    rows += [(4, 1, 50), (4, 9, 51), (5, 9, 60), (5, 2, 61), (5, 3, 62)]
    log = write_parquet_log(tmp_path / "l.parquet", rows)
    one = build_sequences(DataConfig(log=log, min_user_interactions=3, min_item_interactions=3, eval_negatives=0))
    core = build_sequences(DataConfig(log=log, min_user_interactions=3, min_item_interactions=3, kcore=True, eval_negatives=0))
    # item 9 (2 events) goes, then users 4 (1 left) and 5 (2 left); a second round changes nothing
    assert sorted(by_user(core)) == [1, 2, 3]
    counts = pq.read_table(f"{core.root}/vocab/items.parquet")["count"].to_pylist()
    assert min(counts) >= 3
    steps = core.meta["steps"]
    assert steps[0] == {"step": "input", "rows": 14, "users": 5, "items": 4}
    assert steps[-1]["rows"] == 9 and "k-core" in steps[-1]["step"]
    assert one.meta["drops"]["rare_item_rows"] + one.meta["drops"]["short_user_rows"] == 5


def test_kcore_needs_a_second_round(ray_cluster, tmp_path):
    # min 2/2: item 7 has one event → dropped; user 9 then has 1 event → dropped; item 8 then has 1 → dropped
    rows = [(1, 1, 1), (1, 2, 2), (2, 1, 3), (2, 2, 4), (9, 7, 5), (9, 8, 6), (3, 8, 7), (3, 1, 8), (3, 2, 9)]
    log = write_parquet_log(tmp_path / "l.parquet", rows)
    single = build_sequences(DataConfig(log=log, min_user_interactions=2, min_item_interactions=2, eval_negatives=0))
    core = build_sequences(DataConfig(log=log, min_user_interactions=2, min_item_interactions=2, kcore=True, eval_negatives=0))
    assert 8 in pq.read_table(f"{single.root}/vocab/items.parquet")["item_id"].to_pylist()
    assert pq.read_table(f"{core.root}/vocab/items.parquet")["item_id"].to_pylist() == [1, 2]
    assert by_user(core)[3][0] == [1, 2]
    assert any("round 2" in s["step"] for s in core.meta["steps"])


def test_max_history_keeps_the_most_recent_events_and_bounds_a_skewed_user(ray_cluster, tmp_path):
    rng = np.random.default_rng(0)
    heavy = [("whale", int(i), int(t)) for t, i in enumerate(rng.integers(1, 40, 3000))]
    light = [(f"u{u}", int(1 + (u + k) % 39), 5000 + k) for u in range(20) for k in range(6)]
    rows = heavy + light
    files = tmp_path / "log"
    files.mkdir()
    for j, part in enumerate(np.array_split(np.arange(len(rows)), 6)):
        write_parquet_log(files / f"part-{j}.parquet", [rows[k] for k in part])
    data = build_sequences(DataConfig(log=str(files), max_history=50, eval_negatives=0, num_buckets=3))
    u = by_user(data)
    assert u["whale"][0] == [r[1] for r in heavy[-50:]]
    assert u["whale"][1:] == (48, 48, 49)
    assert u["u0"][0] == [r[1] for r in light[:6]]
    assert data.meta["drops"]["truncated_rows"] == len(heavy) - 50
    assert data.meta["rows_out"] + data.meta["drops"]["truncated_rows"] == data.meta["rows_in"]


@pytest.mark.parametrize("split", ["leave_last_two", "time"])
def test_sequences_identical_whatever_file_row_and_bucket_order(ray_cluster, synthetic_log, tmp_path, split):
    t = pq.read_table(synthetic_log)
    perm = np.random.default_rng(7).permutation(t.num_rows)
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    # shuffled rows across 5 files whose names sort in another order than the rows were cut
    for j, part in enumerate(np.array_split(perm, 5)):
        pq.write_table(t.take(pa.array(part)), shuffled / f"part-{(3 * j) % 5}.parquet", row_group_size=2000)
    (shuffled / "_SUCCESS").write_text("")
    kw = dict(split=split, time_quantile=0.8, max_history=20, eval_negatives=5)
    a = build_sequences(DataConfig(log=synthetic_log, cache_dir=str(tmp_path / "c1"), num_buckets=2, **kw))
    b = build_sequences(DataConfig(log=str(shuffled), cache_dir=str(tmp_path / "c2"), num_buckets=7, **kw))
    # ties in time keep log order, so only a log without ties can be row-shuffled safely
    assert t.group_by(["user_id", "timestamp"]).aggregate([]).num_rows == t.num_rows
    assert digest(a) == digest(b)
    assert b.meta["ignored_files"] == [str(shuffled / "_SUCCESS")]
    assert a.meta["drops"] == b.meta["drops"]


def test_data_report_and_log_from_an_fsspec_url(ray_cluster, tmp_path):
    # a URL pyarrow cannot open itself goes through fsspec, pickled to every read task: the code
    # path of s3://, gs:// and friends (memory:// cannot be used: it lives in one process)
    rows = [(u, 1 + (u * 3 + k) % 11, k) for u in range(1, 15) for k in range(5)]
    (tmp_path / "log").mkdir()
    local = write_parquet_log(tmp_path / "log" / "part-0.parquet", rows)
    url = f"simplecache::file://{tmp_path}/log"
    data = build_sequences(DataConfig(log=url, cache_dir=str(tmp_path / "cache"), eval_negatives=0))
    assert data.num_items == 11 and data.num_users == 14
    report = json.loads(open(f"{data.root}/data_report.json").read())
    assert report["rows_in"] == report["rows_out"] == 70
    assert report["inputs"][0]["sha256"] == hashlib.sha256(open(local, "rb").read()).hexdigest()
    assert {"read_s", "sequences_s", "total_s"} <= set(report["timings"])
    from rayrec.data.prepare import report_table

    table = report_table(data.meta)
    assert "rows in / out" in table and "70 / 70" in table


def test_everything_filtered_out_names_the_filter_counts(ray_cluster, tmp_path):
    log = write_parquet_log(tmp_path / "l.parquet", [(u, u, u) for u in range(6)])
    with pytest.raises(DataError, match=r"no sequences after filtering .*min_item_interactions>=2: 0 rows"):
        build_sequences(DataConfig(log=log, min_item_interactions=2, eval_negatives=0))
    with pytest.raises(DataError, match="no sequences after filtering .*time cut"):
        # every event at the same time: the cut is that time and nothing is before it
        build_sequences(DataConfig(log=write_parquet_log(tmp_path / "t.parquet", [(1, 1, 5), (1, 2, 5), (2, 1, 5)]),
                                   split="time", eval_negatives=0))


@pytest.mark.parametrize("override, message", [
    (["data.split=random"], "choose one of ['leave_last_two', 'time']"),
    (["data.time_quantile=1.0"], "data.time_quantile must be in (0, 1)"),
    (["data.max_history=2"], "data.max_history must be 0 (keep all) or >= 3"),
    (["data.kcore=true"], "data.kcore=true iterates the min_*_interactions filters"),
])
def test_bad_data_config(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert message in str(e.value)
