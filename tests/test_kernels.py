"""The hand-written hot paths equal (or match in distribution) the torch ops they replace."""
import pytest
import torch
import torch.nn.functional as F

from rayrec.models.dropout import Dropout, dropout, keep_mask, random_bytes
from rayrec.models.softmax_ce import shared_sampled_softmax_sum, softmax_ce_sum


@pytest.mark.parametrize("chunk,item_block", [(1, None), (7, None), (64, None), (10_000, None), (7, 4), (64, 29), (3, 1)])
def test_chunked_softmax_ce_equals_cross_entropy(chunk, item_block):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(30, 8, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 30, (50,), generator=g)
    ref = F.cross_entropy(h @ w.T, y, reduction="sum")
    got = softmax_ce_sum(h, w, y, chunk, item_block)
    assert got.item() == pytest.approx(ref.item(), rel=1e-10)
    for a, b in zip(torch.autograd.grad(ref * 0.5, (h, w)), torch.autograd.grad(got * 0.5, (h, w))):
        torch.testing.assert_close(a, b)  # backward scales by the upstream gradient


def test_chunked_softmax_ce_empty_batch_keeps_graph():
    h = torch.zeros(0, 4, requires_grad=True)
    w = torch.randn(5, 4, requires_grad=True)
    loss = softmax_ce_sum(h, w, torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0 and w.grad is not None and (w.grad == 0).all()


@pytest.mark.parametrize("chunk", [1, 7, 64, None])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_shared_sampled_softmax_equals_log_softmax(chunk, with_bias):
    g = torch.Generator().manual_seed(0)
    B, V, k, N, D = 6, 40, 12, 15, 8
    emb = torch.randn(N + 1, D, generator=g, dtype=torch.float64, requires_grad=True)
    h = torch.randn(V, D, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randint(1, N + 1, (V,), generator=g)
    negs = torch.randint(1, N + 1, (k,), generator=g)  # with repeats, and hitting targets
    negs[:2] = t[0]
    row_of = torch.randint(0, B, (V,), generator=g).sort().values
    allowed = torch.rand(B, k, generator=g) > 0.3
    allowed[row_of[-1]] = False  # a row with no negative left: its loss is 0
    bias = torch.randn(N + 1, generator=g, dtype=torch.float64)
    bp, bn = (bias[t], bias[negs]) if with_bias else (None, None)
    pos = (h * emb[t]).sum(-1, keepdim=True) + (0 if bp is None else bp[:, None])
    neg = h @ emb[negs].T + (0 if bn is None else bn)
    keep = allowed[row_of] & (negs[None, :] != t[:, None])
    ref = -torch.log_softmax(torch.cat([pos, neg.masked_fill(~keep, float("-inf"))], 1), 1)[:, 0].sum()
    got = shared_sampled_softmax_sum(h, emb[t], emb[negs], allowed, row_of, t, negs, bp, bn, chunk)
    assert got.item() == pytest.approx(ref.item(), rel=1e-10)
    for a, b in zip(torch.autograd.grad(ref * 0.5, (h, emb)), torch.autograd.grad(got * 0.5, (h, emb))):
        torch.testing.assert_close(a, b)


def test_fused_shared_sampled_softmax_in_bf16_matches_fp32():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(30, 16, generator=g)
    w = torch.randn(20, 16, generator=g)
    t, negs = torch.randint(1, 20, (30,), generator=g), torch.randint(1, 20, (9,), generator=g)
    args = (torch.ones(1, 9, dtype=torch.bool), torch.zeros(30, dtype=torch.long), t, negs)
    hb = h.bfloat16().requires_grad_()
    got = shared_sampled_softmax_sum(hb, w.bfloat16()[t], w.bfloat16()[negs], *args)
    ref = shared_sampled_softmax_sum(hb.float(), w.bfloat16().float()[t], w.bfloat16().float()[negs], *args)
    assert got.dtype == torch.float32 and got.item() == pytest.approx(ref.item(), rel=1e-5)
    got.backward()
    assert hb.grad.dtype == torch.bfloat16


def test_dropout_rate_scale_and_gradient():
    torch.manual_seed(0)
    x = torch.ones(200_000, requires_grad=True)
    y = dropout(x, 0.2, training=True)
    kept = y != 0
    assert kept.float().mean().item() == pytest.approx(1 - 51 / 256, abs=0.005)  # 0.2 quantised to 51/256
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)  # unbiased
    y.sum().backward()
    assert torch.equal(x.grad != 0, kept)  # dropped elements get no gradient
    assert dropout(x, 0.2, training=False) is x


def test_dropout_mask_bytes_are_uniform():
    torch.manual_seed(1)
    keep, _ = keep_mask(torch.Size([300_001]), 0.5, torch.device("cpu"))  # odd size: a partial last word
    assert keep.shape == (300_001,)
    assert keep.float().mean().item() == pytest.approx(0.5, abs=0.005)
    # no byte of the 8 in a 64-bit word is stuck (int64's sign byte would be, drawn from [0, 2^63))
    groups = keep[: 300_001 // 8 * 8].view(-1, 8).float().mean(0)
    assert ((groups - 0.5).abs() < 0.02).all()
    b = random_bytes(80_000, torch.device("cpu")).view(-1, 8).float()
    assert ((b.mean(0) - 127.5).abs() < 2.0).all() and b.max() == 255 and b.min() == 0


def test_dropout_module_is_reproducible_under_seed_and_rejects_bad_p():
    d = Dropout(0.3).train()
    x = torch.randn(4, 100)
    torch.manual_seed(3)
    a = d(x)
    torch.manual_seed(3)
    assert torch.equal(a, d(x))
    with pytest.raises(ValueError, match="dropout"):
        Dropout(1.0)


def test_attention_dropout_path_is_masked_softmax_times_the_dropout_mask():
    from rayrec.models.attention import AttnContext, SelfAttention, causal_mask

    torch.manual_seed(0)
    items = torch.tensor([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])
    ctx = AttnContext(mask=causal_mask(items), keep=(items != 0).unsqueeze(-1).float())
    layer = SelfAttention(8, 2, 0.3).train()
    x = torch.randn(2, 6, 8, requires_grad=True)
    torch.manual_seed(5)
    got = layer(x, ctx)  # the per-head CPU dropout path
    got.square().sum().backward()
    grads = [t.grad.clone() for t in (x, layer.qkv.weight, layer.out.weight)]

    # the definition: heads from one projection, masked softmax, each head's (B, T, T) mask drawn in turn
    for t in (x, layer.qkv.weight, layer.out.weight):
        t.grad = None
    torch.manual_seed(5)
    q, k, v = (t.view(2, 6, 2, 4).transpose(1, 2) for t in layer.qkv(x).split(8, dim=-1))  # (B, H, T, Dh)
    probs = torch.softmax((q @ k.transpose(-1, -2) / 2.0).masked_fill(~ctx.mask, float("-inf")), dim=-1)
    masks = [keep_mask(torch.Size([2, 6, 6]), 0.3, torch.device("cpu")) for _ in range(2)]
    keep = torch.stack([m for m, _ in masks], dim=1)  # (B, H, T, T)
    scale = masks[0][1]
    want = layer.out(((probs * keep * scale) @ v).transpose(1, 2).reshape(2, 6, 8))
    torch.testing.assert_close(got, want)
    want.square().sum().backward()
    for g, t in zip(grads, (x, layer.qkv.weight, layer.out.weight)):
        torch.testing.assert_close(g, t.grad)
    assert not keep.all() and keep.any()
    bias = ctx.bias  # built by the first layer, shared by the next
    layer(x, ctx)
    assert ctx.bias is bias and torch.isinf(bias).sum() == (~ctx.mask).sum()
