"""mHC residual: Sinkhorn projection, the exact plain-residual point, distinct streams, whole model."""
import itertools

import pytest
import torch

from rayrec.config import ModelConfig, load_config
from rayrec.models import build_model
from rayrec.models.attention import AttnContext, SelfAttention, causal_mask
from rayrec.models.blocks import PointWiseFFN, SubLayer, SwiGLU
from rayrec.models.mhc import MHCResidual, sinkhorn
from rayrec.models.residual import PlainResidual

D, N = 16, 20


def _ctx(items: torch.Tensor) -> AttnContext:
    return AttnContext(mask=causal_mask(items), keep=(items != 0).unsqueeze(-1).float())


def _items(B: int = 3, T: int = 8, pad: int = 3) -> torch.Tensor:
    items = torch.randint(1, N + 1, (B, T))
    items[0, :pad] = 0  # left padding
    return items


def _sublayers(gated: bool) -> list[SubLayer]:
    body = SwiGLU(D, 0.0) if gated else PointWiseFFN(D, 0.0)
    return [SubLayer(SelfAttention(D, 2, 0.0), D, 0.0, norm_first=True, gated=gated),
            SubLayer(body, D, 0.0, norm_first=True, gated=gated)]


@pytest.mark.parametrize("n", [1, 2, 4, 7])
def test_sinkhorn_is_doubly_stochastic(n):
    torch.manual_seed(n)
    p = sinkhorn(torch.randn(5, 6, n, n), 20)  # logits of spread ~1, as H_res sees; far larger ones need more iterations
    assert p.shape == (5, 6, n, n) and (p >= 0).all()
    assert torch.allclose(p.sum(-1), torch.ones(5, 6, n), atol=1e-4)
    assert torch.allclose(p.sum(-2), torch.ones(5, 6, n), atol=1e-4)


def test_sinkhorn_is_float32_under_autocast():
    logits = torch.randn(4, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert sinkhorn(logits, 20).dtype == torch.float32
        assert sinkhorn(torch.randn(4, 4), 20).dtype == torch.float32


@pytest.mark.parametrize("gated", [False, True])
def test_off_point_is_exactly_the_plain_residual(gated):
    torch.manual_seed(0)
    cfg = ModelConfig(hidden=D, mhc_streams=4)
    subs = _sublayers(gated)
    mhc, plain = MHCResidual.off(cfg, D, len(subs)), PlainResidual(cfg, D, len(subs))
    assert mhc.n == 1
    items = _items()
    ctx = _ctx(items)
    x = torch.randn(3, 8, D) * ctx.keep
    s = mhc.expand(x)
    assert s.shape == (3, 8, 1, D) and torch.equal(s[..., 0, :], x)
    for i, sub in enumerate(subs):
        s, x = mhc.connect(i, s, sub, ctx), plain.connect(i, x, sub, ctx)
        # equal at real positions; plain leaves padding rows unzeroed (no real position reads them)
        assert torch.equal(s[..., 0, :], x * ctx.keep)
    assert torch.equal(mhc.reduce(s), x * ctx.keep)


def test_streams_are_distinct_after_expand_and_connect():
    torch.manual_seed(0)
    cfg = ModelConfig(hidden=D, mhc_streams=4)
    subs = _sublayers(False)
    mhc = MHCResidual(cfg, D, len(subs))
    items = _items(pad=0)
    ctx = _ctx(items)
    s = mhc.connect(0, mhc.expand(torch.randn(3, 8, D)), subs[0], ctx)  # (B, T, n, D)
    assert s.shape == (3, 8, 4, D)
    for k, j in itertools.combinations(range(4), 2):
        assert ((s[..., k, :] - s[..., j, :]).abs().amax(-1) > 1e-4).all(), (k, j)


def _model():
    torch.manual_seed(0)
    cfg = load_config(None, ["model.residual=mhc", "model.hidden=16", "model.max_len=8",
                             "model.num_heads=2", "model.dropout=0"]).model
    return build_model(cfg, num_items=N)


def test_model_trains_every_parameter():
    m = _model()
    items = _items()
    targets = torch.roll(items, -1, 1)
    targets[:, -1] = torch.randint(1, N + 1, (3,))
    targets[items == 0] = 0
    negs = torch.randint(1, N + 1, (3, 8, 1))
    loss, count = m({"items": items, "targets": targets, "negatives": negs})
    assert torch.isfinite(loss) and count > 0
    loss.backward()
    missing = [name for name, p in m.named_parameters() if p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_model_is_causal_and_padding_invariant():
    m = _model().eval()
    items = _items()
    with torch.no_grad():
        h = m.encode(items)
        for j in (4, 6, 7):
            y = items.clone()
            y[:, j] = (y[:, j] % N) + 1
            h2 = m.encode(y)
            assert torch.equal(h[:, :j], h2[:, :j])
            assert not torch.allclose(h[:, j], h2[:, j])
        seq = torch.randint(1, N + 1, (2, 5))
        short = m.encode(seq)  # (2, 5, D)
        padded = m.encode(torch.cat([torch.zeros(2, 3, dtype=torch.long), seq], 1))  # (2, 8, D)
    assert torch.allclose(short, padded[:, 3:], atol=1e-5)
    assert torch.all(padded[:, :3] == 0)
