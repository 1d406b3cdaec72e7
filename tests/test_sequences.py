"""The Ray Data sequence build on crafted logs: order, ties, split, filters, errors, cache."""
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayrec.config import DataConfig
from rayrec.data.batches import SequenceStore
from rayrec.data.log import DataError
from rayrec.data.sequences import build_sequences
from tests.conftest import write_parquet_log

pytestmark = pytest.mark.ray


def load(data):
    t = pq.read_table(data.sequences_path)
    vocab = pq.read_table(f"{data.root}/vocab/items.parquet")
    raw = dict(zip(vocab["item_idx"].to_pylist(), vocab["item_id"].to_pylist()))
    users = pq.read_table(f"{data.root}/vocab/users.parquet")
    uraw = dict(zip(users["user_idx"].to_pylist(), users["user_id"].to_pylist()))
    return {uraw[r["user_idx"]]: [raw[i] for i in r["items"]] for r in t.to_pylist()}, t


def test_time_order_with_stable_ties(ray_cluster, tmp_path):
    rows = [
        ("u1", 30, 5), ("u2", 1, 1), ("u1", 10, 1), ("u1", 99, 3),  # u1: ts 1, 3, then a tie at 5
        ("u1", 20, 5), ("u2", 7, 1), ("u1", 5, 9), ("u2", 3, 0),
    ]
    log = write_parquet_log(tmp_path / "log.parquet", rows)
    seqs, t = load(build_sequences(DataConfig(log=log, eval_negatives=0)))
    # ties keep log order (30 before 20), never item order; u2's tie at ts 1 keeps 1 before 7
    assert seqs["u1"] == [10, 99, 30, 20, 5]
    assert seqs["u2"] == [3, 1, 7]
    assert t.schema.field("items").type == pa.list_(pa.int32())


def test_ids_are_dense_and_padding_free(ray_cluster, tmp_path):
    rows = [(u, 1000 + (u * 7 + k) % 13, k) for u in range(1, 30) for k in range(6)]
    data = build_sequences(DataConfig(log=write_parquet_log(tmp_path / "l.parquet", rows), eval_negatives=3))
    t = pq.read_table(data.sequences_path)
    items = np.concatenate([np.array(x) for x in t["items"].to_pylist()])
    assert items.min() == 1 and items.max() == data.num_items == 13
    assert sorted(t["user_idx"].to_pylist()) == list(range(1, 30))
    # persisted evaluation negatives: distinct and never in the user's history
    for r in t.to_pylist():
        assert len(set(r["eval_negatives"])) == 3 and not set(r["eval_negatives"]) & set(r["items"])


def test_filters_count_every_drop(ray_cluster, tmp_path):
    rows = [(1, i, i) for i in (1, 2, 3, 4, 5)] + [(2, i, i) for i in (1, 2, 3)] + [(3, 1, 0), (3, 9, 1)]
    data = build_sequences(DataConfig(log=write_parquet_log(tmp_path / "l.parquet", rows),
                                      min_item_interactions=2, min_user_interactions=3, eval_negatives=0))
    m = data.meta
    assert m["rows_in"] == 10 and m["items_out"] == 3  # items 1, 2, 3 appear at least twice
    assert m["drops"]["rare_item_rows"] == 3  # items 4, 5, 9
    assert m["drops"]["short_user_rows"] == 1 and m["drops"]["users_dropped"] == 1  # user 3 kept only item 1
    assert m["rows_out"] + sum(v for k, v in m["drops"].items() if k.endswith("rows")) == m["rows_in"]
    stored = json.loads(open(f"{data.root}/meta.json").read())
    assert stored["drops"] == m["drops"]


def test_users_too_short_are_counted(ray_cluster, tmp_path):
    rows = [(1, 1, 0), (1, 2, 1), (1, 3, 2), (2, 1, 0), (2, 3, 1), (3, 2, 0)]
    data = build_sequences(DataConfig(log=write_parquet_log(tmp_path / "l.parquet", rows), eval_negatives=0))
    assert list(data.meta["users_by_length"].values()) == [1, 1, 1]
    store = SequenceStore.from_tables([pq.read_table(data.sequences_path)], data.num_items)
    # L=3: evaluable but its 1-item training prefix has no pair; L=2: trains on both items
    assert store.eval_users().tolist() == [0] and store.train_users().tolist() == [1]


def test_cache_hit_and_rebuild_on_new_config(ray_cluster, tmp_path):
    log = write_parquet_log(tmp_path / "l.parquet", [(u, u + i, i) for u in range(5) for i in range(1, 8)])
    a = build_sequences(DataConfig(log=log, eval_negatives=2))
    b = build_sequences(DataConfig(log=log, eval_negatives=2))
    c = build_sequences(DataConfig(log=log, eval_negatives=3))
    assert a.root == b.root != c.root
    assert b.meta["timings"] == a.meta["timings"]  # read back, not rebuilt
    # a forced rebuild into the same folder replaces the earlier files (Ray's writer only adds)
    d = build_sequences(DataConfig(log=log, eval_negatives=2), force=True)
    assert d.root == a.root and d.meta["timings"] != a.meta["timings"]
    assert pq.read_table(d.sequences_path).num_rows == d.meta["users_out"] == 5


@pytest.mark.parametrize("case", ["too_few_items", "null_item", "missing_col", "float_ts", "empty", "not_parquet", "missing_file", "text_rating"])
def test_bad_logs_fail_with_a_clear_message(ray_cluster, tmp_path, case):
    p = tmp_path / "log.parquet"
    if case == "too_few_items":
        write_parquet_log(p, [(u, i, i) for u in range(3) for i in range(1, 6)])
        want = "lower data.eval_negatives"
    elif case == "null_item":
        pq.write_table(pa.table({"user_id": [1, 2, 3], "item_id": pa.array([1, None, 3], pa.int64()), "timestamp": [1, 2, 3]}), p)
        want = "column 'item_id' has 1 null value(s)"
    elif case == "missing_col":
        pq.write_table(pa.table({"user_id": [1], "item": [1], "timestamp": [1]}), p)
        want = "missing column(s) ['item_id']"
    elif case == "text_rating":
        pq.write_table(pa.table({"user_id": [1], "item_id": [1], "timestamp": [1], "rating": ["good"]}), p)
        want = "column 'rating' has type string"
    elif case == "float_ts":
        pq.write_table(pa.table({"user_id": [1], "item_id": [1], "timestamp": [1.5]}), p)
        want = "must be int64 seconds"
    elif case == "empty":
        pq.write_table(pa.table({"user_id": pa.array([], pa.int64()), "item_id": pa.array([], pa.int64()),
                                 "timestamp": pa.array([], pa.int64())}), p)
        want = "has no rows"
    elif case == "not_parquet":
        p.write_text("user,item\n1,2\n")
        want = "not a readable Parquet file"
    else:
        want = "does not exist"
    with pytest.raises(DataError) as e:
        build_sequences(DataConfig(log=str(p), eval_negatives=2 if case == "too_few_items" else 0))
    assert want in str(e.value)


def test_ratings_travel_with_their_items(ray_cluster, tmp_path):
    rows = [("a", 1, 3, 4.0), ("a", 2, 1, 2.0), ("b", 1, 5, 1.0), ("a", 3, 2, 5.0), ("b", 2, 6, 3.5)]
    u, i, ts, r = zip(*rows)
    path = tmp_path / "rated.parquet"
    pq.write_table(pa.table({"user_id": list(u), "item_id": list(i), "timestamp": pa.array(ts, pa.int64()),
                             "rating": pa.array(r, pa.float32())}), path)
    data = build_sequences(DataConfig(log=str(path), eval_negatives=0))
    t = pq.read_table(data.sequences_path)
    by_user = {row["user_idx"]: row for row in t.to_pylist()}
    store = SequenceStore.from_tables([t], data.num_items)
    assert store.ratings is not None and len(store.ratings) == len(store.items)
    a = [row for row in by_user.values() if len(row["items"]) == 3][0]
    assert a["ratings"] == [2.0, 5.0, 4.0]  # time order: item 2 (ts 1), item 3 (ts 2), item 1 (ts 3)


def test_nan_rating_is_an_error_naming_the_column(ray_cluster, tmp_path):
    path = tmp_path / "nan.parquet"
    pq.write_table(pa.table({"user_id": ["a", "a"], "item_id": [1, 2], "timestamp": pa.array([1, 2], pa.int64()),
                             "rating": pa.array([1.0, float("nan")], pa.float32())}), path)
    with pytest.raises(DataError, match="'rating' has 1 null"):
        build_sequences(DataConfig(log=str(path), eval_negatives=0))
