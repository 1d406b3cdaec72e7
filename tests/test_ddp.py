"""One DDP step over 2 gloo ranks equals one single-process step over the same global batch:
same loss and same (all-reduced) gradients, with unequal target counts on the two ranks; with a
dense item table and with a row-sparse one (train.item_grad=sparse)."""
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rayrec.config import load_config
from rayrec.models import build_model
from rayrec.train.loop import make_optimizer, train_step
from rayrec.train.optim import use_sparse_items

N = 30


def batch():
    g = torch.Generator().manual_seed(1)
    items = torch.randint(1, N + 1, (8, 10), generator=g)
    targets = torch.randint(1, N + 1, (8, 10), generator=g)
    for r in range(8):  # unequal padding, so the two ranks hold different numbers of targets
        items[r, : r + (3 if r < 4 else 0)] = 0
        targets[r, : r + (3 if r < 4 else 0)] = 0
    negatives = torch.randint(1, N + 1, (8, 10, 2), generator=g)
    timestamps = torch.cumsum(torch.randint(0, 5000, (8, 10), generator=g), 1) * (items != 0)
    return {"items": items, "targets": targets, "negatives": negatives, "timestamps": timestamps}


def cfg(head, item_grad, extra=()):
    # the row-sparse table refuses a whole-table L2 penalty
    l2 = "train.l2_emb=0.001" if item_grad == "dense" else "train.l2_emb=0"
    return load_config(None, [f"model.head={head}", "model.dropout=0", "model.hidden=16", "model.max_len=10",
                              "model.num_heads=2", "model.num_negatives=2", "train.weight_decay=0.1", l2,
                              f"train.item_grad={item_grad}", *extra])


def step(rank, world, head, out):
    """``head`` is "<head>:<item_grad>[:<override>,<override>...]" (a string: it crosses the spawn)."""
    head, item_grad, *extra = head.split(":")
    c = cfg(head, item_grad, extra[0].split(",") if extra else ())
    torch.manual_seed(0)
    model = build_model(c.model, N)
    model.item_emb.sparse = use_sparse_items(c, N)
    opt = make_optimizer(model, c)
    ddp = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
    b = batch()
    rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
    loss = train_step(ddp, opt, {k: v[rows] for k, v in b.items()}, c, world)
    assert model.item_emb.weight.grad.is_sparse == (item_grad == "sparse")
    if rank == 0:
        # a sparse gradient arrives all-reduced (gloo gathers every rank's rows) and averaged like a dense one
        grads = {n: p.grad.to_dense() if p.grad.is_sparse else p.grad.clone()
                 for n, p in model.named_parameters() if p.grad is not None}
        torch.save({"grads": grads, "loss": loss}, out)


def _worker(rank, world, path, head, out):
    # a file rendezvous: no port to race for
    store = dist.FileStore(path, world)
    # bounded waits: a rank that fails must not leave its peer in a collective for gloo's 30 minutes
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        step(rank, world, head, out)
    finally:
        # a rank that tears gloo down while its peer is still inside a collective aborts the peer
        # ("terminate called without an active exception"); a barrier alone is not enough, since
        # returning from it on one rank does not mean the other has. Each rank leaves only once
        # every rank has said, through the store rather than gloo's sockets, that it is done.
        store.set(f"done{rank}", "1")
        store.wait([f"done{r}" for r in range(world)], timedelta(seconds=60))
        dist.destroy_process_group()


@pytest.mark.parametrize("head", ["bce:dense", "ce:dense", "bce:sparse", "sampled_softmax:sparse"])
def test_ddp_step_equals_single_process_step(tmp_path, head):
    single, multi = tmp_path / "single.pt", tmp_path / "ddp.pt"
    step(0, 1, head, single)
    mp.start_processes(_worker, args=(2, str(tmp_path / "store"), head, str(multi)), nprocs=2, start_method="spawn", join=True)
    a, b = torch.load(single, weights_only=True), torch.load(multi, weights_only=True)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    # gradients, not post-Adam weights: Adam's first step turns float noise in a near-zero gradient
    # (e.g. the key bias, to which softmax is invariant) into a full +-lr move
    assert a["grads"].keys() == b["grads"].keys() and len(a["grads"]) > 10
    for k in a["grads"]:
        assert torch.allclose(a["grads"][k], b["grads"][k], atol=1e-6, rtol=1e-4), k
    assert a["grads"]["item_emb.weight"].abs().sum() > 0  # not vacuous
