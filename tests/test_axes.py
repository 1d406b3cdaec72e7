"""Every model the validator accepts: builds, trains a step with every parameter used (DDP-ready),
is causal where its attention is, ignores left padding; and each axis' "off" value equals the
baseline exactly where the math allows."""
import itertools
import typing

import pytest
import torch
import torch.nn.functional as F

from rayrec.config import ConfigError, ModelConfig, config_from_dict
from rayrec.models import build_model
from rayrec.models.attention import CAUSAL_KINDS, AttnContext, causal_mask
from rayrec.models.blocks import SubLayer, SwiGLU
from rayrec.models.time_interval import TimeIntervalAttention, time_intervals

N, U, T, B = 40, 9, 10, 4
AXES = ["block", "attention", "residual", "user", "head"]


def _choices(axis):
    return typing.get_args(typing.get_type_hints(ModelConfig)[axis])


def _overrides(combo):
    o = dict(zip(AXES, combo))
    o.update(hidden=16, num_heads=2, max_len=T, num_blocks=2, dropout=0.0, num_negatives=3)
    if o["user"] == "ssept":
        o.update(user_dim=4)
    return o


def _accepted():
    out = []
    for combo in itertools.product(*(_choices(a) for a in AXES)):
        try:
            config_from_dict({"model": _overrides(combo)})
        except ConfigError:
            continue
        out.append(combo)
    return out


COMBOS = _accepted()


def _batch(seed=0, k=3):
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, N + 1, (B, T), generator=g)
    items[0, :4] = 0  # left padding
    items[1, :1] = 0
    targets = torch.randint(1, N + 1, (B, T), generator=g) * (items != 0)
    stamps = torch.cumsum(torch.randint(0, 500, (B, T), generator=g), 1) * (items != 0)
    return {
        "items": items, "targets": targets, "timestamps": stamps,
        "user_idx": torch.randint(1, U + 1, (B,), generator=g),
        "negatives": torch.randint(1, N + 1, (B, T, k), generator=g),
        "ratings": torch.randint(1, 6, (B, T), generator=g).float(),
    }


def _model(combo, **extra):
    cfg = config_from_dict({"model": {**_overrides(combo), **extra}}).model
    torch.manual_seed(0)
    return build_model(cfg, N, U)


def test_the_grid_is_not_empty_and_rejects_nonsense():
    assert len(COMBOS) >= 48
    # no next-item head may see its target; the masked-item head needs both directions
    assert all((c[1] == "bidirectional") == (c[4] == "masked_diffusion") for c in COMBOS)
    assert any(c[4] == "masked_diffusion" for c in COMBOS)


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(c))
def test_trains_one_step_with_every_parameter(combo):
    m = _model(combo).train()
    loss, count = m(_batch())
    # masked_diffusion normalises per sequence (LLaDA): its count is the number of sequences
    want = (_batch()["targets"] != 0).any(1).sum() if combo[4] == "masked_diffusion" else (_batch()["targets"] != 0).sum()
    assert loss.shape == () and torch.isfinite(loss) and count == want
    (loss / count).backward()
    unused = [n for n, p in m.named_parameters() if p.grad is None]
    assert not unused, f"parameters without gradient (DDP would need find_unused_parameters): {unused}"
    scores = m.eval().score_last(_batch()["items"], _batch()["timestamps"], _batch()["user_idx"])
    assert scores.shape == (B, N + 1) and torch.isinf(scores[:, 0]).all() and torch.isfinite(scores[:, 1:]).all()


@pytest.mark.parametrize("combo", [c for c in COMBOS if c[1] in CAUSAL_KINDS], ids=lambda c: "-".join(c))
def test_future_items_never_change_earlier_outputs(combo):
    m = _model(combo).eval()
    b = _batch()
    h = m.encode(b["items"], b["timestamps"], b["user_idx"])
    items, stamps = b["items"].clone(), b["timestamps"].clone()
    items[:, -3:] = torch.randint(1, N + 1, (B, 3))
    stamps[:, -3:] = stamps[:, -3:] * 7 + 1  # a future interaction's time (and gap) changes too
    h2 = m.encode(items, stamps, b["user_idx"])
    torch.testing.assert_close(h[:, :-3], h2[:, :-3], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(h[:, -1], h2[:, -1])


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(c))
def test_left_padding_does_not_change_outputs(combo):
    m = _model(combo, max_len=T + 5).eval()
    b = _batch()
    pad = torch.zeros(B, 5, dtype=torch.long)
    h = m.encode(b["items"], b["timestamps"], b["user_idx"])
    h2 = m.encode(torch.cat([pad, b["items"]], 1), torch.cat([pad, b["timestamps"]], 1), b["user_idx"])
    torch.testing.assert_close(h2[:, 5:], h, atol=1e-5, rtol=1e-5)
    assert (h2[:, :5] == 0).all()


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(c))
def test_encoding_only_the_last_positions_equals_the_full_encoding(combo):
    m = _model(combo).eval()
    b = _batch()
    full = m.encode(b["items"], b["timestamps"], b["user_idx"])
    for k in (1, 3):
        last = m.encode(b["items"], b["timestamps"], b["user_idx"], last=k)
        assert last.shape == (B, k, full.shape[-1])
        torch.testing.assert_close(last, full[:, -k:], atol=1e-5, rtol=1e-5)
    assert torch.equal(m.encode(b["items"], b["timestamps"], b["user_idx"], last=T), full)


@pytest.mark.parametrize("combo", [c for c in COMBOS if c[2] == "plain"], ids=lambda c: "-".join(c))
def test_cpu_scoring_in_row_chunks_equals_one_call(combo, monkeypatch):
    import rayrec.models.seqrec as seqrec

    m = _model(combo).eval()
    b = _batch()
    whole = m.score_last(b["items"], b["timestamps"], b["user_idx"])
    calls = []
    monkeypatch.setattr(seqrec, "CPU_SCORE_CHUNK_BYTES", 3 * 16 * T * 4 * 3)  # 3 rows of (T, 3D) floats
    monkeypatch.setattr(m, "_score_query", lambda *a, f=m._score_query: calls.append(a[0].shape[0]) or f(*a))
    chunked = m.score_last(b["items"], b["timestamps"], b["user_idx"])
    assert calls == [2, 2]  # B = 4 rows in two equal chunks, users and timestamps sliced alike
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: "-".join(c))
def test_trimmed_evaluation_windows_score_like_full_windows(combo):
    import numpy as np

    from rayrec.data.batches import SequenceStore, eval_batch
    from rayrec.eval.evaluate import score_batch

    max_len = T + 5
    m = _model(combo, max_len=max_len).eval()
    g = np.random.default_rng(1)
    for lengths in ([3, 7, 5, 9], [1, 4, 20, 2]):  # trimmed to 10 columns; one history longer than max_len
        offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
        store = SequenceStore(user_idx=np.arange(1, 5), offsets=offsets,
                              items=g.integers(1, N + 1, offsets[-1]).astype(np.int32),
                              timestamps=np.cumsum(g.integers(0, 500, offsets[-1])).astype(np.int64),
                              eval_negatives=None, num_items=N)
        rows = np.arange(4)
        short = eval_batch(store, rows, max_len, "next", trim=True)
        assert short["items"].shape[1] == min(max_len, max(lengths) + 1)
        full = eval_batch(store, rows, max_len, "next")
        cpu = torch.device("cpu")
        torch.testing.assert_close(score_batch(m, short, cpu), score_batch(m, full, cpu), atol=1e-5, rtol=1e-5)


# ---- "off" values equal the baseline -------------------------------------------------------------

def test_gbce_with_t0_equals_bce():
    base = ("sasrec", "causal", "plain", "none")
    bce = _model(base + ("bce",), num_negatives=1)
    gbce = _model(base + ("gbce",), num_negatives=1, gbce_t=0.0)
    gbce.load_state_dict(bce.state_dict())
    b = _batch(k=1)
    assert torch.equal(bce(b)[0], gbce(b)[0])
    calibrated = _model(base + ("gbce",), num_negatives=1, gbce_t=1.0)
    assert calibrated.head.beta == pytest.approx(1 / (N - 1))  # t = 1: beta = alpha


def test_ssept_with_zero_width_user_and_no_sse_equals_sasrec():
    sas = _model(("sasrec", "causal", "plain", "none", "bce"))
    cfg = config_from_dict({"model": {**_overrides(("sasrec", "causal", "plain", "ssept", "bce")), "user_dim": 0}}).model
    ssept = build_model(cfg, N, U)
    missing, unexpected = ssept.load_state_dict(sas.state_dict(), strict=False)
    assert missing == ["user.user_emb.weight"] and not unexpected
    b = _batch()
    for m in (sas, ssept):
        m.train()
    assert torch.equal(sas(b)[0], ssept(b)[0])
    sas.eval(), ssept.eval()
    assert torch.equal(sas.score_last(b["items"], None, b["user_idx"]), ssept.score_last(b["items"], None, b["user_idx"]))


@pytest.mark.parametrize("attention,head", [("causal", "bce"), ("bidirectional", "masked_diffusion")])
def test_ssept_user_and_item_halves_of_the_input_start_at_one_scale(attention, head):
    cfg = config_from_dict({"model": {**_overrides(("sasrec", attention, "plain", "ssept", head)),
                                      "hidden": 256, "user_dim": 128}}).model
    torch.manual_seed(0)
    m = build_model(cfg, 2000, 2000)
    items = torch.randint(1, 2001, (64, T))
    x = m.user.embed(m.item_emb(items) * m.scale, torch.randint(1, 2001, (64,)))
    item_half, user_half = x[..., :128].std().item(), x[..., 128:].std().item()
    assert 0.8 < user_half / item_half < 1.25, (item_half, user_half)


def test_ligr_gate_reads_the_stream_and_its_ffn_is_four_wide():
    """As eSASRec's reference layer: the gate sees the un-normalised stream (so it can react to
    the stream's scale, which the pre-norm removes) and the SwiGLU hidden width is 4d."""
    torch.manual_seed(0)
    sub = SubLayer(SwiGLU(16, 0.0), 16, 0.0, norm_first=True, gated=True).eval()
    assert sub.body.down.in_features == 64
    torch.nn.init.normal_(sub.gate.weight)
    x = torch.randn(2, T, 16)
    assert torch.allclose(sub.pre_norm(x), sub.pre_norm(3 * x), atol=1e-5)  # the body sees the same input
    assert not torch.allclose(sub(x, None), sub(3 * x, None), atol=1e-3)  # the gate does not


def test_time_interval_with_zero_intervals_is_attention_with_key_value_positions():
    torch.manual_seed(0)
    att = TimeIntervalAttention(d=16, heads=2, dropout=0.0, time_span=8, max_len=T).eval()
    with torch.no_grad():
        att.rel_k.weight.zero_()
        att.rel_v.weight.zero_()
    items = _batch()["items"]
    same_time = torch.full((B, T), 1000) * (items != 0)
    ctx = AttnContext(mask=causal_mask(items), keep=(items != 0).unsqueeze(-1).float(),
                      intervals=time_intervals(items, same_time, 8))
    assert (ctx.intervals == 0).all()
    x = torch.randn(B, T, 16)
    q, k, v = (att._heads(t) for t in att.qkv(x).split(16, dim=-1))
    pos = torch.arange(T - 1, -1, -1)
    ref = F.scaled_dot_product_attention(q, k + att._heads(att.pos_k(pos)), v + att._heads(att.pos_v(pos)), attn_mask=ctx.mask)
    ref = att.out(ref.transpose(1, 2).reshape(B, T, 16))
    torch.testing.assert_close(att(x, ctx), ref, atol=1e-5, rtol=1e-5)


def test_time_intervals_by_hand():
    items = torch.tensor([[0, 1, 2, 3, 4]])
    stamps = torch.tensor([[0, 100, 110, 110, 150]])  # gaps 10, 0, 40: the prefix scale is 10 from position 2 on
    r = time_intervals(items, stamps, time_span=3)
    assert r[0, 2].tolist() == [0, 1, 0, 0, 3]  # |110-150|/10 = 4, clipped to 3
    assert r[0, 1].tolist() == [0, 0, 3, 3, 3]  # no gap seen yet at position 1: scale 1, |100-110| = 10 -> 3
    assert r[0, 4, 1].item() == 3 and r[0, 4, 3].item() == 3  # (150-110)/10 = 4 -> 3
    assert (r[0, 0] == 0).all()  # padding has no relations


# ---- heads against hand computation ----------------------------------------------------------------

def _hidden(m, b):
    h = m.encode(b["items"], b["timestamps"], b.get("user_idx"))
    return h, m.output_embeddings()


def test_sampled_softmax_per_row_and_shared_match_hand_computation():
    base = ("sasrec", "causal", "plain", "none", "sampled_softmax")
    m = _model(base).eval()
    b = _batch()
    loss, n = m(b)
    h, E = _hidden(m, b)
    ref = 0.0
    for r, t in itertools.product(range(B), range(T)):
        y = b["targets"][r, t]
        if y == 0:
            continue
        negs = b["negatives"][r, t]
        logits = torch.cat([(h[r, t] @ E[y])[None], (h[r, t] @ E[negs].T).masked_fill(negs == y, float("-inf"))])
        ref = ref - torch.log_softmax(logits, 0)[0]
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-5)
    # shared negatives, one disallowed for row 2, with a log-Q correction
    shared = _model(base, shared_negatives=True, neg_sampler="popularity").eval()
    shared.load_state_dict(m.state_dict())
    negs = torch.tensor([3, 7, 11])
    allowed = torch.ones(B, 3, dtype=torch.bool)
    allowed[2, 1] = False
    logq = torch.log(torch.rand(N + 1) + 0.1)
    b2 = {**b, "shared_negatives": negs, "shared_allowed": allowed, "log_q": logq}
    del b2["negatives"]
    loss2, _ = shared(b2)
    ref2 = 0.0
    for r, t in itertools.product(range(B), range(T)):
        y = b["targets"][r, t]
        if y == 0:
            continue
        keep = allowed[r] & (negs != y)
        logits = torch.cat([(h[r, t] @ E[y] - logq[y])[None], (h[r, t] @ E[negs].T - logq[negs]).masked_fill(~keep, float("-inf"))])
        ref2 = ref2 - torch.log_softmax(logits, 0)[0]
    torch.testing.assert_close(loss2, ref2, atol=1e-4, rtol=1e-5)


def test_rating_heads_match_hand_computation():
    base = ("sasrec", "causal", "plain", "none")
    b = _batch()
    mse = _model(base + ("mse",)).eval()
    loss, n = mse(b)
    h, E = _hidden(mse, b)
    valid = b["targets"] != 0
    pred = (h[valid] * E[b["targets"][valid]]).sum(-1)
    torch.testing.assert_close(loss, ((pred - b["ratings"][valid]) ** 2).sum(), atol=1e-4, rtol=1e-5)
    soft = _model(base + ("soft_bce",), num_negatives=3).eval()
    soft.load_state_dict(mse.state_dict())
    loss, _ = soft(b)
    neg = torch.einsum("vd,vkd->vk", h[valid], E[b["negatives"][valid]])
    ref = F.binary_cross_entropy_with_logits(pred, b["ratings"][valid] / 5, reduction="sum") + F.softplus(neg).sum() / 3
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-5)


def test_popularity_sampler_draws_in_proportion():
    import numpy as np

    from rayrec.data.batches import sample_negatives

    probs = np.zeros(N + 1)
    probs[1:] = np.arange(1, N + 1, dtype=float)
    probs /= probs.sum()
    rng = np.random.default_rng(0)
    draws = sample_negatives(rng, None, None, N, (200_000,), probs=probs)
    freq = np.bincount(draws, minlength=N + 1) / draws.size
    assert freq[0] == 0 and np.abs(freq - probs).max() < 0.004
