"""Full ranking, coverage and top-k recommendation over catalogue pieces give exactly the dense
results (same floats, same items, same order) for every model axis and chunk size; the user sample
of eval.max_users is seeded, exact in size and the same whatever the sharding. No Ray, but for one
2-worker run that checks the sample against a single-process evaluation."""
import numpy as np
import pyarrow as pa
import pytest
import torch

import rayrec.models.seqrec as seqrec
from rayrec.config import ConfigError, EvalConfig, load_config
from rayrec.data.batches import SequenceStore, eval_batch
from rayrec.eval.baselines import MostPopular
from rayrec.eval.chunked import ItemScores, SeenMask, top_items, topk_stable
from rayrec.eval.evaluate import evaluate, mask_seen, sample_bound, score_batch, stage_users, user_keys
from rayrec.eval.metrics import metric_sums, rank_of_target
from tests.test_axes import COMBOS, N, T, U, _model

CPU = torch.device("cpu")
CHUNKS = [1, 7, N, N + 1, 1000]  # one item; not dividing N+1; N; the whole catalogue; more than it


def store(seed=0, users=U, repeat=True) -> SequenceStore:
    """Histories of 4..14 items over N items (user 1's test target repeats an earlier item), with 12
    sampled negatives each."""
    g = np.random.default_rng(seed)
    seqs = [list(g.choice(np.arange(1, N + 1), size=g.integers(4, 15), replace=False)) for _ in range(users)]
    if repeat:
        seqs[1][-1] = seqs[1][0]
    lens = [len(s) for s in seqs]
    negs = np.stack([g.choice(np.setdiff1d(np.arange(1, N + 1), s), 12, replace=False) for s in seqs]).astype(np.int32)
    return SequenceStore(user_idx=np.arange(1, users + 1), offsets=np.r_[0, np.cumsum(lens)].astype(np.int64),
                         items=np.concatenate(seqs).astype(np.int32),
                         timestamps=np.cumsum(g.integers(0, 500, sum(lens))).astype(np.int64),
                         eval_negatives=negs, num_items=N)


def dense_scores_as_before(m, b):
    """``SeqRec.score_last`` as it was before chunking: one (B, N+1) matmul."""
    items, stamps = torch.from_numpy(b["items"]).long(), torch.from_numpy(b["timestamps"])
    users = torch.from_numpy(b["user_idx"]).long()
    if hasattr(m.head, "query"):
        items, stamps = m.head.query(items), None
    h_item, offset = m.user.split(m.encode(items, stamps, users, last=1), users)
    s = h_item[:, 0] @ m.output_embeddings().T
    if offset is not None:
        s = s + offset
    s[:, 0] = float("-inf")
    return s.float()


@torch.no_grad()
def evaluate_as_before(m, st, cfg, stage):
    """The evaluator before chunking, restated densely (its coverage counts finite top-10 items)."""
    users = st.eval_users(stage)
    repeat = st.repeat_targets(stage)[users]
    users = users[~repeat] if cfg.repeat_targets == "drop" else users
    users = users[np.argsort(st.target_pos(stage)[users], kind="stable")]
    sums, hits = {}, torch.zeros(N + 1, dtype=torch.float64)
    for lo in range(0, len(users), cfg.batch_size):
        b = eval_batch(st, users[lo: lo + cfg.batch_size], T, stage, trim=True)
        target, scores = torch.from_numpy(b["target"]), dense_scores_as_before(m, b)
        rows = torch.arange(len(target))
        full = mask_seen(scores.clone(), b) if cfg.exclude_seen else scores.clone()
        if cfg.exclude_seen and cfg.repeat_targets == "rank":
            full[rows, target] = scores[rows, target]
        parts = [("", *rank_of_target(full, full[rows, target])),
                 ("sampled_", *rank_of_target(scores.gather(1, torch.from_numpy(b["negatives"])), scores[rows, target],
                                              target_in_scores=False))]
        for pre, ranks, ties in parts:
            for k, v in metric_sums(ranks, cfg.ks, ties).items():
                sums[pre + k] = sums.get(pre + k, 0.0) + v
        top = full.topk(10, dim=1)
        hits.index_fill_(0, top.indices[torch.isfinite(top.values)], 1.0)
    out = {f"{stage}_{k}": v / len(users) for k, v in sums.items()}
    out[f"{stage}_coverage_10"] = hits[1:].sum().item() / N
    return out


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(c))
def test_chunked_full_ranking_equals_the_dense_evaluator_exactly(combo):
    m = _model(combo).eval()
    st = store()
    for policy, exclude in (("drop", True), ("miss", True), ("rank", True), ("drop", False)):
        want = evaluate_as_before(m, st, EvalConfig(ks=[1, 5, 10], repeat_targets=policy, exclude_seen=exclude, batch_size=3), "test")
        for chunk in CHUNKS if policy == "drop" and exclude else (7, N + 1):
            cfg = EvalConfig(ks=[1, 5, 10], protocol="both", repeat_targets=policy, exclude_seen=exclude,
                             chunk_items=chunk, batch_size=3)
            got = evaluate(m, st, cfg, T, "test", CPU)
            assert {k: got[k] for k in want} == want, (policy, exclude, chunk)


@pytest.mark.parametrize("combo", [("sasrec", "causal", "plain", "ssept", "bce"),
                                   ("ligr", "time_interval", "mhc", "none", "ce"),
                                   ("ligr", "bidirectional", "plain", "ssept", "masked_diffusion")], ids="-".join)
def test_scores_tile_the_same_whatever_the_tile_and_chunk(combo, monkeypatch):
    """Catalogues wider than a tile (here 16 items): the dense matrix is the tiles side by side, and
    the chunked evaluation and top-k read the very same floats from them."""
    m = _model(combo).eval()
    st = store(1)
    cfg = EvalConfig(ks=[1, 10], protocol="both", repeat_targets="miss")
    monkeypatch.setattr(seqrec, "SCORE_TILE", 16)
    monkeypatch.setattr("rayrec.eval.chunked.SCORE_TILE", 16)
    users = st.eval_users("val")
    b = eval_batch(st, users[np.argsort(st.target_pos("val")[users], kind="stable")], T, "val", trim=True)  # evaluate's one batch
    dense = score_batch(m, b, CPU)
    assert torch.equal(torch.cat([t for _, t in ItemScores.of(m, b, CPU).pieces(5)], 1), dense)
    want = evaluate(FixedScores(dense), st, cfg, T, "val", CPU)  # the dense path over the same floats
    dense_top = topk_stable(mask_seen(dense.clone(), b), 10)
    for chunk in CHUNKS:
        got = evaluate(m, st, EvalConfig(**{**cfg.__dict__, "chunk_items": chunk}), T, "val", CPU)
        assert got == want, chunk
        top = top_items(ItemScores.of(m, b, CPU), SeenMask.of(b, CPU), 10, chunk)
        assert all(torch.equal(x, y) for x, y in zip(top, dense_top)), chunk


class FixedScores(torch.nn.Module):
    """A model with only ``score_last`` (the dense path), scoring one known batch."""

    def __init__(self, dense):
        super().__init__()
        self.dense = dense

    def score_last(self, items, timestamps=None, users=None):
        assert items.shape[0] == self.dense.shape[0]
        return self.dense.clone()


def test_the_dense_fallback_ties_and_nan_are_handled_alike():
    st = store(2)
    pop = MostPopular(st)  # integer counts: many ties
    cfg = EvalConfig(ks=[1, 10], protocol="both", repeat_targets="rank", batch_size=5)
    want = evaluate(pop, st, cfg, T, "test", CPU)
    for chunk in CHUNKS:
        assert evaluate(pop, st, EvalConfig(**{**cfg.__dict__, "chunk_items": chunk}), T, "test", CPU) == want
    m = _model(COMBOS[0]).eval()
    with torch.no_grad():
        m.item_emb.weight[7] = float("nan")
    with pytest.raises(FloatingPointError, match=f"scored NaN for {len(st.eval_users('test')) - 1} test user"):
        evaluate(m, st, EvalConfig(chunk_items=3), T, "test", CPU)


def test_topk_breaks_ties_by_lower_item_and_merges_pieces_exactly():
    s = torch.tensor([[0.0, 3.0, 1.0, 3.0, 3.0, float("-inf"), 1.0, 3.0],  # the 5th place is shared
                      [float("-inf")] * 6 + [2.0, 2.0],  # fewer than 5 finite
                      [5.0, 4.0, 3.0, 3.0, 2.0, 1.0, 0.0, -1.0],  # a tie inside the top 5 only
                      [float("nan"), 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])  # NaN counts as -inf
    vals, idx = topk_stable(s, 5)
    assert idx.tolist() == [[1, 3, 4, 7, 2], [6, 7, 0, 1, 2], [0, 1, 2, 3, 4], [7, 6, 5, 4, 3]]
    assert vals[0].tolist() == [3.0, 3.0, 3.0, 3.0, 1.0]
    from rayrec.eval.chunked import RunningTopK

    for chunk in (1, 3, 8):
        top = RunningTopK(5)
        for lo in range(0, 8, chunk):
            top.add(s[:, lo: lo + chunk], lo)
        assert torch.equal(top.items, idx) and torch.equal(top.values, vals)


def test_recommend_top_k_is_chunk_free_and_matches_the_dense_topk():
    from rayrec.infer import Recommender

    combo = ("sasrec", "causal", "plain", "ssept", "bce")
    m = _model(combo).eval()
    with torch.no_grad():
        m.item_emb.weight[9] = m.item_emb.weight[30]  # items 9 and 30 always tie
    cfg = load_config(None, [f"model.{k}={v}" for k, v in zip(["block", "attention", "residual", "user", "head"], combo)]
                      + ["model.hidden=16", "model.num_heads=2", f"model.max_len={T}", "model.user_dim=4"])
    counts = np.arange(N) % 5  # popularity ties for the empty-history fallback
    rec = Recommender(m, cfg, pa.array([f"i{i}" for i in range(1, N + 1)]), counts,
                      pa.array([f"u{u}" for u in range(1, U + 1)]))
    hist = {f"u{u}": [f"i{i}" for i in np.random.default_rng(u).choice(np.arange(1, N + 1), 6, replace=False)]
            for u in range(1, U + 1)}
    hist["u3"] = []
    outs = []
    for chunk in CHUNKS:
        rec.cfg.eval.chunk_items = chunk
        outs.append(rec.recommend(hist, k=N, empty_history="popular"))
    for o in outs[1:]:
        assert o.equals(outs[0])
    keys, st = rec.encode({u: h for u, h in hist.items() if h})
    b = eval_batch(st, np.arange(len(keys)), T, "next", trim=True)  # the one batch _top scores
    unmasked = score_batch(m, b, CPU)
    dense = mask_seen(unmasked.clone(), b)
    v, i = topk_stable(dense, 12)
    got = outs[0][outs[0].user_id != "u3"].groupby("user_id", sort=False).head(12)
    assert got.item_id.tolist() == rec.item_id(i.flatten().numpy()).to_pylist()
    assert np.array_equal(got.score.to_numpy(), v.flatten().numpy())
    pos = {u: g.item_id.tolist() for u, g in outs[0].groupby("user_id")}
    both = torch.isfinite(dense[:, 9]) & torch.isfinite(dense[:, 30])
    assert both.any() and torch.equal(dense[both, 9], dense[both, 30])
    assert all(p.index("i9") < p.index("i30") for u, p in pos.items() if u != "u3" and "i9" in p and "i30" in p)
    assert pos["u3"][:4] == ["i5", "i10", "i15", "i20"]  # counts 0..4 repeat: ties go to the lower item
    # candidate scores are read from the same tiles, never from a (users, N+1) matrix
    got = rec.score(hist, ["i1", "i9", "i30", "i40"]).score.to_numpy().reshape(U, 4)
    model_users = [r for r in range(U) if r != 2]
    assert np.array_equal(got[model_users], unmasked[:, [1, 9, 30, 40]].double().numpy())
    assert np.array_equal(got[2], counts[[0, 8, 29, 39]].astype(np.float64))


def test_user_sample_is_seeded_exact_and_independent_of_sharding():
    st = store(3, users=60, repeat=False)
    cfg = EvalConfig(max_users=17, sample_seed=5)
    users, _, total = stage_users(st, "val", cfg, CPU)
    assert len(users) == 17 and total == 60
    assert np.array_equal(stage_users(st, "val", cfg, CPU)[0], users)  # every epoch the same users
    other = stage_users(st, "val", EvalConfig(max_users=17, sample_seed=6), CPU)[0]
    assert not np.array_equal(other, users)
    keys = user_keys(st.user_idx, 5)
    assert len(np.unique(keys)) == len(keys)
    # three ranks holding user_idx % 3: each keeps its share of one global sample
    shards = [keys[st.user_idx % 3 == r] for r in range(3)]
    bound = sample_bound(17, lambda b: sum(int((s <= np.uint64(b)).sum()) for s in shards))
    picked = np.sort(np.concatenate([st.user_idx[st.user_idx % 3 == r][s <= np.uint64(bound)] for r, s in enumerate(shards)]))
    assert np.array_equal(picked, np.sort(st.user_idx[users]))
    m = evaluate(_model(COMBOS[0]).eval(), st, cfg, T, "val", CPU)
    assert m["val_users"] == 17 and m["val_users_sampled_from"] == 60
    assert "val_users_sampled_from" not in evaluate(_model(COMBOS[0]).eval(), st, EvalConfig(), T, "val", CPU)
    assert stage_users(st, "val", EvalConfig(max_users=100), CPU)[2] == 60  # fewer users than asked: all of them


def test_chunk_and_sample_knobs_are_validated():
    assert load_config(None, []).eval.chunk_items == 0 and load_config(None, []).eval.max_users == 0
    for bad in ("eval.chunk_items=-1", "eval.max_users=-5"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, [bad])


@pytest.mark.ray
def test_a_user_sample_under_2_worker_ddp_is_the_single_process_sample(ray_cluster, synthetic_log, tmp_path):
    from rayrec.eval.offline import evaluate_checkpoint
    from rayrec.train.fit import fit

    cfg = load_config(None, [f"data.log={synthetic_log}", f"output_dir={tmp_path}", "name=sample", "model.max_len=20",
                             "model.hidden=32", "model.num_heads=2", "train.batch_size=64", "train.epochs=1",
                             "eval.max_users=50", "eval.chunk_items=7", "scale.num_workers=2", "scale.cpus_per_worker=0.5"])
    res = fit(cfg)
    m = res.metrics
    assert m["val_users"] == m["test_users"] == 50 and m["test_users_sampled_from"] > 50
    again, _ = evaluate_checkpoint(res.run_dir)  # one process holding every user picks the same 50
    assert again["test_users"] == 50 and again["test_users_sampled_from"] == m["test_users_sampled_from"]
    assert again["test_ndcg_10"] == pytest.approx(m["test_ndcg_10"], abs=1e-6)
