"""SASRec: causality, padding invariance, heads, every axis value builds."""
import itertools

import pytest
import torch

from rayrec.config import ConfigError, ModelConfig
from rayrec.models import build_model

N = 40


def model(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(max_len=12, hidden=16, num_blocks=2, num_heads=2, dropout=0.0, **kw)
    return build_model(cfg, N).eval()


@pytest.mark.parametrize("norm_first", [True, False])
def test_changing_a_future_item_never_changes_earlier_outputs(norm_first):
    m = model(norm_first=norm_first)
    x = torch.randint(1, N + 1, (3, 12))
    x[0, :4] = 0  # left padding
    h = m.encode(x)
    for j in (5, 8, 11):
        y = x.clone()
        y[:, j] = (y[:, j] % N) + 1
        h2 = m.encode(y)
        assert torch.equal(h[:, :j], h2[:, :j])
        assert not torch.allclose(h[:, j], h2[:, j])


@pytest.mark.parametrize("norm_first", [True, False])
def test_left_padding_does_not_change_outputs(norm_first):
    m = model(norm_first=norm_first)
    seq = torch.randint(1, N + 1, (2, 5))
    short = m.encode(seq)  # (2, 5, D)
    padded = m.encode(torch.cat([torch.zeros(2, 7, dtype=torch.long), seq], 1))  # (2, 12, D)
    assert torch.allclose(short, padded[:, 7:], atol=1e-5)
    assert torch.all(padded[:, :7] == 0)
    assert torch.allclose(m.score_last(seq), m.score_last(torch.cat([torch.zeros(2, 7, dtype=torch.long), seq], 1)), atol=1e-5)


def test_all_padding_row_is_finite():
    m = model()
    x = torch.zeros(2, 12, dtype=torch.long)
    x[1, -1] = 3
    assert torch.isfinite(m.encode(x)).all()


def test_scores_never_rank_padding():
    m = model()
    s = m.score_last(torch.randint(1, N + 1, (4, 12)))
    assert s.shape == (4, N + 1) and torch.isinf(s[:, 0]).all() and torch.isfinite(s[:, 1:]).all()


def test_bce_head_matches_hand_computation():
    m = model(head="bce", num_negatives=2)
    x = torch.randint(1, N + 1, (2, 12))
    t = torch.randint(1, N + 1, (2, 12))
    t[0, :3] = 0
    neg = torch.randint(1, N + 1, (2, 12, 2))
    loss, count = m({"items": x, "targets": t, "negatives": neg})
    h = m.encode(x)
    E = m.output_embeddings()
    ref, n = 0.0, 0
    for b, j in itertools.product(range(2), range(12)):
        if t[b, j] == 0:
            continue
        n += 1
        pos = h[b, j] @ E[t[b, j]]
        negs = h[b, j] @ E[neg[b, j]].T
        ref += -torch.log(torch.sigmoid(pos)) - torch.log(1 - torch.sigmoid(negs)).mean()
    assert count == n and torch.allclose(loss, ref, atol=1e-4)


def test_ce_head_ignores_padding_targets():
    m = model(head="ce")
    x = torch.randint(1, N + 1, (2, 12))
    t = torch.randint(1, N + 1, (2, 12))
    loss_a, n_a = m({"items": x, "targets": t})
    t2 = t.clone()
    t2[:, :4] = 0
    loss_b, n_b = m({"items": x, "targets": t2})
    h = m.encode(x)[:, 4:].reshape(-1, 16)
    logits = h @ m.output_embeddings().T
    logits[:, 0] = float("-inf")
    ref = torch.nn.functional.cross_entropy(logits, t[:, 4:].reshape(-1), reduction="sum")
    assert n_a == 24 and n_b == 16 and torch.allclose(loss_b, ref, atol=1e-4)


def test_unknown_axis_value_is_refused():
    cfg = ModelConfig()
    object.__setattr__(cfg, "attention", "bogus")
    with pytest.raises(ConfigError, match="model.attention"):
        build_model(cfg, N)


def test_item_and_position_embeddings_start_at_the_configured_scale():
    torch.manual_seed(0)
    m = build_model(ModelConfig(hidden=64, max_len=50, emb_init_std=0.05), 2000)
    items, pos = m.item_emb.weight[1:].detach(), m.pos_emb.weight.detach()
    assert (m.item_emb.weight[0] == 0).all()
    assert items.std().item() == pytest.approx(0.05, rel=0.03) and pos.std().item() == pytest.approx(0.05, rel=0.1)


def test_embedding_init_by_head_small_for_next_item_unit_variance_for_masked_items():
    torch.manual_seed(0)
    causal = build_model(ModelConfig(hidden=64, max_len=50), 2000)
    masked = build_model(ModelConfig(hidden=64, max_len=50, attention="bidirectional", head="masked_diffusion"), 2000)
    assert causal.item_emb.weight[1:].std().item() == pytest.approx(0.02, rel=0.03)
    assert causal.pos_emb.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert masked.item_emb.weight[1:].std().item() == pytest.approx(1 / 8, rel=0.03)
    assert masked.pos_emb.weight.std().item() == pytest.approx(1.0, rel=0.1)
