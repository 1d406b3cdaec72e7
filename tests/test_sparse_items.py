"""Row-sparse item table (``train.item_grad=sparse``): the same gradient as the dense table, the
same first AdamW step, lazy updates afterwards, DDP over gloo, and a refusal where it cannot work."""
import pytest
import torch

from rayrec.config import LOOKUP_HEADS, ConfigError, load_config
from rayrec.models import build_model
from rayrec.train.loop import make_optimizer, train_step
from rayrec.train.optim import RowSparseAdamW, clip_grad_norm, use_sparse_items

N = 200


def batch(head: str, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, N + 1, (6, 8), generator=g)
    targets = torch.randint(1, N + 1, (6, 8), generator=g)
    items[:3, :2] = 0
    targets[:3, :2] = 0
    b = {"items": items, "targets": targets, "negatives": torch.randint(1, N + 1, (6, 8, 3), generator=g),
         "ratings": torch.rand(6, 8, generator=g) * 5}
    if head == "sampled_softmax":  # shared negatives: the (k,) batch-wide form
        b["shared_negatives"] = torch.randint(1, N + 1, (5,), generator=g)
        b["shared_allowed"] = torch.ones(6, 5, dtype=torch.bool)
    return b


def cfg(head: str, mode: str, *extra: str):
    shared = ["model.shared_negatives=true"] if head == "sampled_softmax" else []
    return load_config(None, [f"model.head={head}", f"train.item_grad={mode}", "model.dropout=0", "model.hidden=16",
                              "model.max_len=8", "model.num_heads=2", "model.num_negatives=3", *shared, *extra])


def trained(head: str, mode: str, steps: int, *extra: str):
    c = cfg(head, mode, *extra)
    torch.manual_seed(0)
    model = build_model(c.model, N)
    model.item_emb.sparse = use_sparse_items(c, N)
    opt = make_optimizer(model, c)
    grads = []
    for s in range(steps):
        train_step(model, opt, batch(head, seed=s + 1), c, world=1)
        g = model.item_emb.weight.grad
        grads.append(g.to_dense() if g.is_sparse else g.clone())
    return model, grads


@pytest.mark.parametrize("head", LOOKUP_HEADS)
def test_sparse_gradient_and_first_step_equal_the_dense_table(head):
    dense, gd = trained(head, "dense", 1)
    sparse, gs = trained(head, "sparse", 1)
    assert sparse.item_emb.weight.grad.is_sparse and not dense.item_emb.weight.grad.is_sparse
    # one table, two uses (input lookups and the head's scoring rows): both reach the sparse gradient
    torch.testing.assert_close(gs[0], gd[0], atol=1e-7, rtol=1e-5)
    assert gs[0].abs().sum() > 0
    for (n, a), (_, b) in zip(dense.state_dict().items(), sparse.state_dict().items()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=n)


def test_later_steps_update_only_touched_rows_lazily():
    model, grads = trained("bce", "sparse", 3)
    dense, _ = trained("bce", "dense", 3)
    touched = torch.stack(grads).abs().sum((0, 2)) > 0  # (N+2,)
    untouched = torch.nonzero(~touched[: N + 1]).flatten()
    torch.manual_seed(0)
    init = build_model(cfg("bce", "dense").model, N)
    assert len(untouched) > 1  # row 0 and items no batch drew
    assert torch.equal(model.item_emb.weight[untouched], init.item_emb.weight[untouched])
    # lazy Adam differs from dense Adam only through rows carried on by momentum, and not by much
    diff = (model.item_emb.weight - dense.item_emb.weight).abs().max().item()
    assert 0 < diff < 0.05
    torch.testing.assert_close(model.pos_emb.weight, dense.pos_emb.weight, atol=5e-3, rtol=0)


def test_optimizer_state_has_adamws_keys_so_checkpoints_move_between_modes():
    states = {}
    for mode in ("dense", "sparse"):
        c = cfg("sampled_softmax", mode)
        torch.manual_seed(0)
        model = build_model(c.model, N)
        model.item_emb.sparse = mode == "sparse"
        opt = make_optimizer(model, c)
        assert isinstance(opt, RowSparseAdamW)
        train_step(model, opt, batch("sampled_softmax"), c, world=1)
        states[mode] = opt.state_dict()
    d, s = states["dense"]["state"], states["sparse"]["state"]
    assert d.keys() == s.keys() and all(d[k].keys() == s[k].keys() for k in d)
    torch.manual_seed(0)
    model = build_model(cfg("sampled_softmax", "dense").model, N)
    make_optimizer(model, cfg("sampled_softmax", "dense")).load_state_dict(states["sparse"])  # resumes densely


def test_clip_grad_norm_with_a_sparse_gradient_equals_the_dense_clip():
    for mode in ("dense", "sparse"):
        c = cfg("bce", mode)
        torch.manual_seed(0)
        model = build_model(c.model, N)
        model.item_emb.sparse = mode == "sparse"
        loss, _ = model(batch("bce"))
        loss.backward()
        total = clip_grad_norm(model.parameters(), 0.01)
        g = model.item_emb.weight.grad
        if mode == "dense":
            ref_total, ref_g = total, g.clone()
        else:
            torch.testing.assert_close(total, ref_total)
            torch.testing.assert_close(g.to_dense(), ref_g, atol=1e-8, rtol=1e-5)


@pytest.mark.parametrize("extra, reason", [
    (["model.head=ce"], "scores the whole catalogue"),
    (["model.head=masked_diffusion", "model.attention=bidirectional"], "scores the whole catalogue"),
    (["train.l2_emb=0.001"], "train.l2_emb"),
    (["scale.use_gpu=true", "scale.num_workers=2"], "NCCL has no sparse all-reduce"),
])
def test_sparse_is_refused_where_it_cannot_work_and_auto_stays_dense(extra, reason):
    with pytest.raises(ConfigError, match=reason):
        load_config(None, ["train.item_grad=sparse", *extra])
    c = load_config(None, ["train.item_grad=auto", *extra])
    assert not use_sparse_items(c, 10 ** 7)


def test_auto_goes_sparse_from_the_threshold():
    c = load_config(None, ["model.head=sampled_softmax", "train.sparse_min_items=1000"])
    assert not use_sparse_items(c, 999) and use_sparse_items(c, 1000)
    assert not use_sparse_items(load_config(None, ["train.item_grad=dense"]), 10 ** 7)


@pytest.mark.ray
def test_the_row_sparse_table_learns_under_2_worker_ddp(ray_cluster, synthetic_log, tmp_path):
    from tests.test_train import SMALL, popularity_ndcg
    from rayrec.train.fit import fit

    c = load_config(None, [f"data.log={synthetic_log}", f"output_dir={tmp_path}", "name=sparse", "train.epochs=8",
                           "scale.num_workers=2", "scale.cpus_per_worker=0.5", "train.item_grad=sparse", *SMALL])
    res = fit(c)
    pop = popularity_ndcg(res.data, c)
    got = res.metrics["test_ndcg_10"]
    assert res.metrics["sparse_item_table"] == 1.0
    assert got > 2 * pop and got - pop > 0.05, (got, pop)
