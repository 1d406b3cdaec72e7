"""Quantization: each quantizer against its paper on hand-made tensors, "off" == float exactly,
learnable quantizer parameters move, INT8 conversion agrees with fake quantization, AdaRound's
post-training pass beats round-to-nearest, bad configs fail at load time, and QAT learns and
resumes through the whole Ray pipeline."""
import math

import pytest
import torch

from rayrec.config import ConfigError, Config, config_from_dict, load_config
from rayrec.models import build_model
from rayrec.quant import prepare, quant_penalty, quantizers, set_fake_quant
from rayrec.quant.adaround import AdaRound
from rayrec.quant.apot import APoTWeight, apot_levels
from rayrec.quant.base import QuantControl
from rayrec.quant.convert import convert, int8_available
from rayrec.quant.dorefa import DoReFaAct, DoReFaWeight
from rayrec.quant.lsq import LSQ
from rayrec.quant.pact import PACT
from rayrec.quant.ptq import adaround_ptq
from rayrec.quant.ste import STEAct, STEWeight
from rayrec.train.loop import make_optimizer, train_step
from tests.test_axes import _batch

METHODS = ["lsq", "pact", "adaround", "apot", "dorefa", "ste"]
N, U = 40, 9


def t(*v):
    return torch.tensor(v, dtype=torch.float32)


def ready(q, **values):
    """A quantizer with hand-set values, marked initialised (no data-driven init)."""
    for k, v in values.items():
        getattr(q, k).data.copy_(v if torch.is_tensor(v) else torch.tensor(v))
    q.initialized.fill_(True)
    return q


def grads(q, x, upstream=None):
    x = x.clone().requires_grad_(True)
    y = q(x)
    y.backward(upstream if upstream is not None else torch.ones_like(y))
    return y.detach(), x.grad


# --- each quantizer, by hand --------------------------------------------------------------------


def test_lsq_forward_gradients_and_init():
    q = ready(LSQ(2, signed=True), s=0.5)  # Q_N = -2, Q_P = 1
    y, gx = grads(q, t(-1.2, 0.26, 0.74, 3.0))
    assert torch.equal(y, t(-1.0, 0.5, 0.5, 0.5))  # round(clip(x / s, -2, 1)) * s
    assert torch.equal(gx, t(0, 1, 0, 0))  # straight through inside the range only
    # ds: -Q_N outside low (-2), -x/s + round(x/s) inside (-0.52 + 1), Q_P outside high (1, 1),
    # times g = 1 / sqrt(N Q_P) with N = 4 features
    assert q.s.grad.item() == pytest.approx((-2 + 0.48 + 1 + 1) / math.sqrt(4 * 1))
    fresh = LSQ(4, signed=False)
    fresh(t(1.0, 3.0))
    assert fresh.s.item() == pytest.approx(2 * 2.0 / math.sqrt(15))  # 2 <|v|> / sqrt(Q_P)
    w = LSQ(8, per_channel=True, is_weight=True, channels=2)
    w(torch.tensor([[1.0, -1.0], [4.0, 0.0]]))
    assert w.s.shape == (2, 1) and w.s[:, 0].tolist() == pytest.approx([2 / math.sqrt(127), 4 / math.sqrt(127)])


def test_pact_clip_gradient_and_penalty():
    q = ready(PACT(2, signed=False, l2=0.1), alpha=2.0)  # 3 steps of 2/3
    y, gx = grads(q, t(-1.0, 0.5, 1.2, 3.0))
    assert y.tolist() == pytest.approx([0, 2 / 3, 4 / 3, 2])
    assert gx.tolist() == [0, 1, 1, 0]
    assert q.alpha.grad.item() == 1.0  # d y_q / d alpha = 1 only where x >= alpha (eq. 3)
    assert q.penalty().item() == pytest.approx(0.1 * 4.0)
    s = ready(PACT(3, signed=True), alpha=1.5)  # signed: 3 levels of 0.5 per side
    y, _ = grads(s, t(-2.0, -0.3, 0.8, 2.0), t(1, 2, 3, 4))
    assert y.tolist() == pytest.approx([-1.5, -0.5, 1.0, 1.5])
    assert s.alpha.grad.item() == -1 + 4  # -1 where x <= -alpha, +1 where x >= alpha


def test_dorefa_weights_and_activations():
    w = torch.tensor([[0.5, -1.0], [0.0, 2.0]])
    y = DoReFaWeight(2)(w)
    # tanh, / (2 max|tanh|) + 1/2, round to thirds, 2 q - 1, times max|w| = 2 (no BatchNorm to absorb it)
    assert y.tolist() == [pytest.approx([2 / 3, -2.0]), pytest.approx([2 / 3, 2.0])]
    y, gx = grads(DoReFaAct(2, signed=False), t(-0.5, 0.2, 0.5, 1.5))
    assert y.tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert gx.tolist() == [0, 1, 1, 0]
    assert DoReFaAct(3, signed=True)(t(-3.0, 0.2, 0.5)).tolist() == pytest.approx([-1.0, 1 / 3, 2 / 3])


def test_apot_levels_projection_and_clip_gradient():
    assert apot_levels(2).tolist() == [0, 2 ** -3, 2 ** -2, 2 ** -1]  # the authors' B = 2 table
    four = {a + b for a in (0, 2 ** -1, 2 ** -3, 2 ** -5) for b in (0, 2 ** -2, 2 ** -4, 2 ** -6)}
    assert apot_levels(4).tolist() == sorted(four)  # B = 4: two additive power-of-two terms
    assert len(apot_levels(7)) == 128  # 8-bit weights: 2^7 distinct magnitudes
    q = ready(APoTWeight(3), alpha=1.0)  # magnitudes {0, 1/4, 1/2, 1}
    w = t(-3.0, -1.0, 1.0, 3.0)
    std = w.std().item()
    xa = (w / std).tolist()  # weight normalisation (mean 0)
    y, _ = grads(q, w.view(1, 4), t(1, 2, 3, 4).view(1, 4))
    assert y.flatten().tolist() == pytest.approx([-std, -0.5 * std, 0.5 * std, std])
    # RCF: sign(x) outside the clip, (q - x / alpha) inside; the output is scaled back by std
    expect = (-1 * 1 + 4 * 1) + 2 * (-0.5 - xa[1]) + 3 * (0.5 - xa[2])
    assert q.alpha.grad.item() == pytest.approx(std * expect, rel=1e-5)


def test_adaround_rectified_sigmoid_hard_rounding_and_annealing():
    q = ready(AdaRound(4, False, (1, 3), reg=1.0, warmup=0.2, steps=100), V=t(10.0, -10.0, 0.0).view(1, 3))
    q.s.fill_(0.5)
    w = t(0.3, 0.8, -0.6).view(1, 3)  # w / s = 0.6, 1.6, -1.2: floors 0, 1, -2
    assert q.train()(w).flatten().tolist() == pytest.approx([0.5, 0.5, -0.75])  # h(V) = 1, 0, 0.5
    assert q.eval()(w).flatten().tolist() == pytest.approx([0.5, 0.5, -0.5])  # hard: h = [V >= 0]
    assert q.round_loss(2.0).item() == pytest.approx(1.0)  # only the undecided weight costs
    betas = []
    for step in (10, 20, 60, 100):
        q.t = step
        betas.append(q.beta())
    assert betas == [None, 20.0, pytest.approx(11.0), 2.0]  # warm start, then 20 -> 2 linearly
    fresh = AdaRound(4, False, (1, 3))
    fresh(w)  # init: h(V) equals the fractional part of w / s
    frac = (w / fresh.s - torch.floor(w / fresh.s)).clamp(0.01, 0.99)
    assert torch.allclose(torch.sigmoid(fresh.V) * 1.2 - 0.1, frac, atol=1e-5)


def test_ste_symmetric_weights_and_affine_activations():
    w = torch.tensor([[0.1, -0.4], [1.0, 0.3]])
    y = STEWeight(3, per_channel=True, channels=2)(w)  # s = max|row| / 3
    assert y.tolist() == [pytest.approx([0.4 / 3, -0.4]), pytest.approx([1.0, 1 / 3])]
    a = STEAct(2, signed=True).eval()
    a.lo.fill_(-1.0)
    a.hi.fill_(2.0)
    a.initialized.fill_(True)  # s = 1, z = 1
    y, gx = grads(a, t(-2.0, -0.4, 0.6, 3.0))
    assert y.tolist() == [-1, 0, 1, 2] and gx.tolist() == [0, 1, 1, 0]  # clipped straight-through


# --- the transform on whole models --------------------------------------------------------------


def _cfg(method, **quant):
    return config_from_dict({"model": {"hidden": 16, "num_heads": 2, "max_len": 10, "dropout": 0.0, "num_negatives": 3},
                             "quant": {"method": method, **quant}})


def _model(cfg):
    torch.manual_seed(0)
    return prepare(build_model(cfg.model, N, U), cfg)


@pytest.mark.parametrize("method", METHODS)
def test_quantization_off_equals_the_float_model_exactly(method):
    float_model = _model(_cfg("none"))
    off = _model(_cfg(method, start_step=10 ** 6, embedding=True, scoring=True))
    assert any(True for _ in quantizers(off)) and not quantizers(float_model)
    b = _batch()
    assert torch.equal(float_model.train()(b)[0], off.train()(b)[0])
    assert torch.equal(float_model.eval().score_last(b["items"]), off.eval().score_last(b["items"]))
    # and switching it on changes the output
    on = _model(_cfg(method, embedding=True, scoring=True))
    set_fake_quant(on, True)
    assert not torch.equal(float_model.train()(b)[0], on.train()(b)[0])


@pytest.mark.parametrize("method", METHODS)
def test_learnable_quantizer_parameters_get_gradients_and_move(method):
    cfg = _cfg(method, weight_bits=4, act_bits=4, embedding=True, scoring=True, adaround_warmup=0.0, pact_l2=0.01)
    model = _model(cfg).train()
    opt = make_optimizer(model, cfg)  # built after prepare: must hold every quantizer parameter
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    qparams = {n: p for n, p in model.named_parameters() if "_quant." in n or "parametrizations.weight.0." in n}
    assert all(id(p) in in_opt for p in qparams.values())
    train_step(model, opt, _batch(), cfg, world=1)  # first step: data-driven init, then an update
    before = {n: p.detach().clone() for n, p in qparams.items()}
    for step in range(2):
        train_step(model, opt, _batch(step + 1), cfg, world=1)
    moved = [n for n, p in qparams.items() if not torch.equal(before[n], p.detach())]
    if method in ("dorefa",) or (method == "ste"):  # no learnable quantizer parameters by definition
        assert not qparams
    else:
        assert qparams and sorted(moved) == sorted(qparams), set(qparams) - set(moved)
    if method == "lsq":
        assert any(n.endswith("w_quant.s") for n in moved) and any(n.endswith("a_quant.s") for n in moved)
    if method in ("pact", "adaround"):
        assert float(quant_penalty(model)) > 0
    assert int(model.quant_ctrl.step) == 3


def test_start_step_switches_quantization_on_and_the_step_is_state():
    cfg = _cfg("lsq", start_step=2)
    model = _model(cfg).train()
    ctrl: QuantControl = model.quant_ctrl
    seen = []
    for _ in range(3):
        seen.append(ctrl.enabled())
        model(_batch())
    assert seen == [False, False, True] and "quant_ctrl.step" in model.state_dict()
    model.eval()(_batch())  # evaluation does not count
    assert int(ctrl.step) == 3


@pytest.mark.skipif(not int8_available(), reason="this PyTorch build has no oneDNN INT8 kernels")
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("method", METHODS)
def test_int8_model_agrees_with_the_fake_quant_model(method, bits):
    cfg = _cfg(method, weight_bits=bits, act_bits=bits, embedding=True, scoring=True)
    cfg.model.hidden = 32
    # embeddings at a trained model's scale: untrained 0.02 tables score every item within +-0.4,
    # where the re-quantized 8-bit grids' rounding is 2.5% of that range (1% at std 0.1)
    cfg.model.emb_init_std = 0.1
    model = _model(cfg).train()
    for s in range(2):
        model(_batch(s))  # calibrates ranges / initialises learned scales
    model.eval()
    items = _batch(7)["items"]
    fake = model.score_last(items)[:, 1:]
    q = convert(model)
    assert {type(m).__name__ for m in q.modules()} >= {"Int8Linear", "Int8Embedding"}
    got = q.score_last(items)[:, 1:]
    rel = (got - fake).abs().max().item() / fake.abs().max().item()
    # exact int8 grids: equal up to fp32 summation order. APoT / DoReFa 8-bit levels (and PACT's
    # DoReFa weights) are no int8 grid and are re-quantized to per-row int8: within 2%
    exact = method in ("lsq", "adaround", "ste") or bits <= 6
    assert rel < (1e-5 if exact else 2e-2), rel
    if not exact:  # (exact grids tie often at 4 bits, so top-k order is only checked here)
        top_fake, top_int8 = fake.topk(10).indices, got.topk(10).indices
        overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top_fake, top_int8)) / top_fake.numel()
        assert overlap >= 0.8


def test_adaround_post_training_rounding_beats_round_to_nearest():
    cfg = _cfg("adaround", weight_bits=3, act_bits=8)
    cfg.model.hidden = 32
    model = _model(cfg)
    batches = [{"items": _batch(s)["items"]} for s in range(4)]
    report = adaround_ptq(model, batches, iters=300)
    assert len(report) == 4 * cfg.model.num_blocks // 2 * 2  # qkv, out, 2 FFN per block
    for name, r in report.items():
        assert r["rec_adaround"] < r["rec_nearest"], (name, r)
    assert sum(r["flipped"] for r in report.values()) > 0  # some weights round away from nearest
    for m in quantizers(model):
        if isinstance(m, AdaRound):
            assert not m.training  # hard rounding from here on


@pytest.mark.parametrize("method", ["lsq", "adaround"])  # the data-initialised table quantizers
def test_table_quantizer_takes_its_range_from_the_loaded_float_weights(method):
    from rayrec.quant.prepare import load_float_weights

    cfg = _cfg(method, embedding=True, granularity="per_channel")
    trained = build_model(cfg.model, N, U).state_dict()
    trained["item_emb.weight"] = trained["item_emb.weight"] * 20  # a trained table is wider than its init
    model = _model(cfg)
    model(_batch())  # even a forward before loading must not fix the ranges
    load_float_weights(model, trained)
    w = trained["item_emb.weight"]
    got = model.item_emb.weight  # the fake-quantized table
    assert (got - w).abs().max() < 0.05 * w.abs().max()


@pytest.mark.skipif(not int8_available(), reason="this PyTorch build has no oneDNN INT8 kernels")
def test_adaround_post_training_with_table_and_scoring_converts_to_int8():
    cfg = _cfg("adaround", weight_bits=8, act_bits=8, granularity="per_channel", embedding=True, scoring=True)
    cfg.model.hidden, cfg.model.emb_init_std = 32, 0.1
    model = _model(cfg)
    adaround_ptq(model, [{"items": _batch(s)["items"]} for s in range(3)], iters=20)
    # every quantizer has seen data: the scoring input's range came from the calibration windows
    assert all(bool(q.initialized) for q in quantizers(model))
    items = _batch(7)["items"]
    fake = model.eval().score_last(items)[:, 1:]
    got = convert(model).score_last(items)[:, 1:]
    assert (got - fake).abs().max().item() / fake.abs().max().item() < 1e-5


@pytest.mark.parametrize("bad, match", [
    (["quant.method=int4"], "quant.method='int4' is not valid"),
    (["quant.method=lsq", "quant.weight_bits=9"], r"must be in \[2, 8\]"),
    (["quant.method=lsq", "quant.act_bits=1"], r"must be in \[2, 8\]"),
    (["quant.method=apot", "quant.granularity=per_channel"], "set quant.granularity=per_tensor"),
    (["quant.method=dorefa", "quant.granularity=per_channel"], "set quant.granularity=per_tensor"),
    (["quant.method=lsq", "quant.scoring=true"], "set quant.embedding=true"),
    (["quant.method=adaround", "quant.adaround_beta=[2, 20]"], "start >= end"),
    (["quant.granularity=per_row"], "choose one of"),
])
def test_bad_quant_configs_fail_at_load_time(bad, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, bad)


def test_include_patterns_that_match_nothing_name_the_layers():
    with pytest.raises(ConfigError, match="match no Linear layer.*blocks.0.sublayers.0.body.qkv"):
        _model(_cfg("lsq", include=["encoder.*"]))


def test_old_model_quant_key_is_read_as_an_alias():
    assert load_config(None, ["model.quant=none"]).quant.method == "none"
    assert load_config(None, ["model.quant=lsq"]).quant.method == "lsq"
    assert isinstance(load_config(None, ["quant.method=pact", "quant.act_bits=4"]), Config)


# --- through Ray ----------------------------------------------------------------------------------

SMALL = ["model.max_len=20", "model.hidden=32", "model.num_heads=2", "model.dropout=0.1", "train.lr=0.005",
         "train.warmup_steps=5", "train.batch_size=64"]


@pytest.mark.ray
def test_lsq_qat_learns_under_2_worker_ddp(ray_cluster, synthetic_log, tmp_path):
    from rayrec.train import checkpoint as ckpt
    from rayrec.train.fit import fit

    cfg = load_config(None, [f"data.log={synthetic_log}", f"output_dir={tmp_path}", "name=qat", "train.epochs=8",
                             "scale.num_workers=2", "scale.cpus_per_worker=0.5", "quant.method=lsq",
                             "quant.weight_bits=4", "quant.act_bits=8", "quant.granularity=per_channel", *SMALL])
    res = fit(cfg)
    got, pop = res.metrics["test_ndcg_10"], res.metrics["baseline_pop_test_ndcg_10"]
    assert got > 2 * pop and got - pop > 0.05, (got, pop)
    w = ckpt.load_weights(res.checkpoint)
    steps = [k for k in w if k.endswith("_quant.s")]
    assert len(steps) == 2 * 4 * 2 and int(w["quant_ctrl.step"]) > 0  # weight + input step of 8 Linears


@pytest.mark.ray
def test_qat_checkpoint_resumes_and_evaluates_as_int8(ray_cluster, synthetic_log, tmp_path):
    from rayrec.eval.offline import evaluate_checkpoint
    from rayrec.train import checkpoint as ckpt
    from rayrec.train.fit import fit

    base = [f"data.log={synthetic_log}", f"output_dir={tmp_path}", "name=qr", "scale.num_workers=0",
            "quant.method=pact", "quant.embedding=true", "quant.scoring=true", "quant.start_step=3", *SMALL]
    first = fit(load_config(None, base + ["train.epochs=1"]))
    step1 = int(ckpt.load_weights(first.checkpoint)["quant_ctrl.step"])
    resumed = fit(load_config(None, base + ["train.epochs=3", "resume=true"]))
    w = ckpt.load_weights(resumed.checkpoint)
    assert resumed.metrics["epoch"] == 3 and int(w["quant_ctrl.step"]) == 3 * step1  # one step axis
    assert resumed.metrics["test_ndcg_10"] > resumed.metrics["baseline_pop_test_ndcg_10"]
    fake, _ = evaluate_checkpoint(resumed.run_dir)
    assert fake["test_ndcg_10"] == pytest.approx(resumed.metrics["test_ndcg_10"], abs=1e-9)
    if int8_available():
        int8, _ = evaluate_checkpoint(resumed.run_dir, int8=True)
        assert int8["int8"] and int8["test_ndcg_10"] == pytest.approx(fake["test_ndcg_10"], abs=0.01)
