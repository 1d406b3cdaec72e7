"""Large catalogues: the scalable synthetic generator, and a 100k-item run on 2 Ray Train workers
that takes the row-sparse item table by default (train.item_grad=auto)."""
import math

import numpy as np
import pytest

from data_prep.synthetic import SyntheticSpec, generate_large


def test_generate_large_has_distinct_items_per_user_zipf_popularity_and_successor_chains():
    spec = SyntheticSpec(users=3000, items=50_000, mean_len=30, seed=1)
    t = generate_large(spec)
    u, i, ts = (t[c].to_numpy() for c in ("user_id", "item_id", "timestamp"))
    assert len(np.unique(u * (spec.items + 1) + i)) == len(u)  # no repeats within a user
    assert (np.diff(ts) >= 0).all() and i.min() >= 1 and i.max() <= spec.items
    counts = np.sort(np.bincount(i))[::-1]
    assert counts[0] > 20 * np.median(counts[counts > 0])  # a heavy head, as Zipf
    # sequential signal: the most frequent successor of an item recurs far above chance
    order = np.lexsort((ts, u))
    u, i = u[order], i[order]
    same = u[1:] == u[:-1]
    pairs = i[:-1][same] * (spec.items + 1) + i[1:][same]
    _, n = np.unique(pairs, return_counts=True)
    assert (n >= 3).sum() > 1000


@pytest.mark.ray
def test_a_100k_item_catalogue_trains_on_2_workers_with_the_row_sparse_table(ray_cluster, tmp_path):
    from data_prep.common import write_log
    from rayrec.config import load_config
    from rayrec.train.fit import fit

    log = write_log(generate_large(SyntheticSpec(users=8000, items=130_000, mean_len=40, zipf=0.8, seed=2)), tmp_path / "log",
                    source="synthetic")
    cfg = load_config(None, [f"data.log={log}", f"output_dir={tmp_path}", "name=big", "data.eval_negatives=0",
                             "model.head=sampled_softmax", "model.shared_negatives=true", "model.num_negatives=256",
                             "model.hidden=32", "model.max_len=20", "model.num_heads=1", "train.epochs=3",
                             "train.max_steps_per_epoch=5", "train.batch_size=64", "train.warmup_steps=0", "train.lr=0.01", "eval.max_users=200",
                             "scale.num_workers=2", "scale.cpus_per_worker=0.5"])
    res = fit(cfg)
    assert res.data.num_items > 100_000  # items seen in the log: the model's catalogue
    assert res.metrics["sparse_item_table"] == 1.0  # auto: 100k items >= train.sparse_min_items
    losses = [h["train_loss"] for h in res.history if "train_loss" in h]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert res.metrics["test_users"] == 200 and math.isfinite(res.metrics["test_ndcg_10"])
    assert 0 < res.history[0]["peak_rss_gib"] < 4
