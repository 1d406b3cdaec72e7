"""Worker-side batches: windows, split, negatives."""
import numpy as np
import pyarrow as pa
import pytest

from rayrec.data.batches import SequenceStore, eval_batch, sample_negatives, shared_allowed, sorted_unique, train_batch


def _table(seqs):
    return pa.table({
        "user_idx": pa.array(np.arange(1, len(seqs) + 1), pa.int64()),
        "items": pa.array(seqs, pa.list_(pa.int32())),
        "timestamps": pa.array([list(range(len(s))) for s in seqs], pa.list_(pa.int64())),
    })


def store(seqs, num_items=20, negs=None):
    t = _table(seqs)
    if negs is not None:
        t = t.append_column("eval_negatives", pa.array(negs, pa.list_(pa.int32())))
    return SequenceStore.from_tables([t], num_items)


def test_leave_last_two_out_windows():
    s = store([[1, 2, 3, 4, 5, 6], [7, 8], [9]])
    assert s.eval_users().tolist() == [0] and s.train_users().tolist() == [0, 1]
    b = train_batch(s, np.array([0, 1]), 4)
    assert b["items"].tolist() == [[0, 1, 2, 3], [0, 0, 0, 7]]  # train prefix [1..4] -> inputs [1,2,3]
    assert b["targets"].tolist() == [[0, 2, 3, 4], [0, 0, 0, 8]]
    v = eval_batch(s, np.array([0]), 3, "val")
    assert v["items"].tolist() == [[2, 3, 4]] and v["target"].tolist() == [5]
    assert sorted(v["seen_items"].tolist()) == [1, 2, 3, 4]  # whole history, beyond the window
    t = eval_batch(s, np.array([0]), 3, "test")
    assert t["items"].tolist() == [[3, 4, 5]] and t["target"].tolist() == [6]
    assert sorted(t["seen_items"].tolist()) == [1, 2, 3, 4, 5]


def test_trimmed_windows_are_the_full_windows_without_their_all_padding_columns():
    s = store([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10], [11, 12, 13]])
    rows = np.array([1, 2])
    full, short = train_batch(s, rows, 8), train_batch(s, rows, 8, trim=True)
    assert short["items"].shape == (2, 1) and (full["items"][:, :-1] == 0).all()
    for k in ("items", "targets", "timestamps"):
        assert (short[k] == full[k][:, -1:]).all(), k
    assert train_batch(s, np.array([0, 1]), 3, trim=True)["items"].shape == (2, 3)  # never wider than max_len
    e = eval_batch(s, rows, 8, "test", trim=True)  # histories of 3 and 2 items, one spare column
    assert e["items"].tolist() == [[0, 7, 8, 9], [0, 0, 11, 12]]


def _epoch(seqs, rank=0, world=1, **train):
    from rayrec.config import load_config
    from rayrec.train.loop import EpochBatches

    cfg = load_config(None, ["model.max_len=30", "model.head=ce", *[f"train.{k}={v}" for k, v in train.items()]])
    s = SequenceStore.from_tables([_table(seqs)], 50, rank, world)
    users = s.train_users()
    steps = -(-len(users) // 8)
    head = type("Head", (), {"needs_negatives": False, "needs_ratings": False})()
    return list(EpochBatches(s, None, users, cfg, rank, 8, steps, head).epoch(3))


def test_length_buckets_keep_every_user_cut_padding_and_keep_the_objective():
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(1, 51, n)) for n in rng.integers(4, 34, 64)]
    plain, bucketed = _epoch(seqs), _epoch(seqs, bucket_by_length="true")
    users = [sorted(np.concatenate([b["user_idx"] for b in e]).tolist()) for e in (plain, bucketed)]
    assert users[0] == users[1] and len(users[0]) == 64  # the same users, each once
    cells = [sum(b["items"].size for b in e) for e in (plain, bucketed)]
    assert cells[1] < 0.7 * cells[0], cells
    targets = [sum(int((b["targets"] != 0).sum()) for b in e) for e in (plain, bucketed)]
    assert targets[0] == targets[1]  # trimming drops padding only
    # each step is normalised by the epoch's mean targets per step, not its own count
    norms = {float(b["norm_count"][0]) for b in bucketed}
    assert len(norms) == 1 and norms.pop() == pytest.approx(targets[1] / len(bucketed))
    assert "norm_count" not in plain[0]
    # two ranks walk their length quantiles in the same step order: similar widths at every step
    w = [[b["items"].shape[1] for b in _epoch(seqs, r, 2, bucket_by_length="true")] for r in (0, 1)]
    assert np.corrcoef(w[0], w[1])[0, 1] > 0.8, w


def test_sharding_by_user_is_exact_and_disjoint():
    seqs = [[i % 19 + 1, i % 17 + 1, 3] for i in range(11)]
    t = pa.table({"user_idx": pa.array(np.arange(1, 12), pa.int64()), "items": pa.array(seqs, pa.list_(pa.int32())),
                  "timestamps": pa.array([[0, 1, 2]] * 11, pa.list_(pa.int64()))})
    shards = [SequenceStore.from_tables([t.slice(0, 5), t.slice(5)], 20, r, 3) for r in range(3)]
    got = sorted(u for s in shards for u in s.user_idx.tolist())
    assert got == list(range(1, 12))


def test_negatives_avoid_history_and_eval_candidates():
    rng = np.random.default_rng(0)
    s = store([[1, 2, 3, 4, 5], [6, 7, 8]], num_items=12, negs=[[9, 10], [11, 12]])
    f = s.forbidden_keys()
    neg = sample_negatives(rng, np.array([0, 1] * 50), f, 12, (100, 4, 3))
    for r in range(100):
        bad = {1, 2, 3, 4, 5, 9, 10} if r % 2 == 0 else {6, 7, 8, 11, 12}
        assert not (set(neg[r].ravel().tolist()) & bad)
        assert neg[r].min() >= 1


def test_shared_negatives_are_masked_per_row_for_its_history_and_eval_candidates():
    s = store([[1, 2, 3, 4, 5], [6, 7, 8], [2, 3]], num_items=12, negs=[[9, 10], [11, 12], [1, 4]])
    negs = np.array([5, 9, 6, 5, 1, 12, 3, 7, 2])  # repeats are masked (or kept) together
    rows = np.array([2, 0, 1, 0])
    got = shared_allowed(rows, negs, s.forbidden_keys(), 12)
    bad = {0: {1, 2, 3, 4, 5, 9, 10}, 1: {6, 7, 8, 11, 12}, 2: {2, 3, 1, 4}}
    want = np.array([[n not in bad[r] for n in negs] for r in rows])
    assert np.array_equal(got, want)
    assert shared_allowed(rows, negs, None, 12).all()


def test_negative_sampling_is_bounded_when_nothing_is_left():
    rng = np.random.default_rng(0)
    s = store([[1, 2, 3, 4, 5], [1, 2]], num_items=5)
    neg = sample_negatives(rng, np.array([0, 1]), s.forbidden_keys(), 5, (2, 6, 2))
    assert (neg[0] == 0).all()  # nothing unseen: padding, ignored by the loss
    assert set(neg[1].ravel().tolist()) <= {3, 4, 5}


def test_prefetch_keeps_order_and_raises_producer_errors():
    from rayrec.train.loop import prefetch

    assert list(prefetch(iter(range(50)))) == list(range(50))

    def broken():
        yield 1
        raise ValueError("bad batch")

    it = prefetch(broken())
    assert next(it) == 1
    with pytest.raises(ValueError, match="bad batch"):
        next(it)
    gen = prefetch(iter(range(1000)), depth=1)
    assert next(gen) == 0
    gen.close()  # a consumer that stops early must not leave the producer blocked forever


def test_a_bucketed_step_is_normalised_by_the_epochs_mean_targets_not_its_own():
    import torch

    from rayrec.config import load_config
    from rayrec.models import build_model
    from rayrec.train.loop import to_device, train_step

    cfg = load_config(None, ["model.max_len=8", "model.hidden=8", "model.num_heads=1", "model.head=ce",
                             "model.dropout=0", "train.l2_emb=0"])
    s = store([[1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15, 16]])
    batch = to_device(train_batch(s, np.arange(3), 8, trim=True), torch.device("cpu"))
    count = float((batch["targets"] != 0).sum())

    def delta(norm=None):
        torch.manual_seed(0)
        model = build_model(cfg.model, 20, 4)
        before = model.item_emb.weight.detach().clone()
        b = dict(batch) if norm is None else {**batch, "norm_count": torch.tensor([norm])}
        train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), b, cfg, 1)
        return model.item_emb.weight.detach() - before

    plain = delta()
    assert plain.abs().sum() > 0
    torch.testing.assert_close(delta(count), plain)  # the mean equals the step's own count: the same step
    torch.testing.assert_close(delta(2 * count), plain / 2)  # a step with half the mean's targets weighs half


@pytest.mark.parametrize("n", [0, 1, 2, 7, 5000])
def test_sorted_unique_equals_numpy_unique(n):
    a = np.random.default_rng(n).integers(-20, 60, n).astype(np.int64)
    assert np.array_equal(sorted_unique(a), np.unique(a))
