"""HSTU (model.block=hstu): causal in items and timestamps, blind to left padding, pointwise attention
that gives invisible keys exactly zero weight, cosine scoring; one 2-rank DDP step equals one
single-process step; and it learns on the synthetic log under 2-worker Ray Train DDP."""
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from rayrec.config import ConfigError, load_config
from rayrec.models import build_model
from rayrec.models.hstu import INVISIBLE, time_buckets

N, B, T = 40, 4, 12
HSTU = ["model.block=hstu", "model.hidden=16", "model.num_heads=2", "model.num_blocks=2", "model.dropout=0",
        f"model.max_len={T + 5}", "model.head=ce"]


def model(*extra):
    torch.manual_seed(0)
    return build_model(load_config(None, [*HSTU, *extra]).model, N).eval()


def history(seed=0):
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, N + 1, (B, T), generator=g)
    items[0, :4] = 0  # left padding
    stamps = torch.cumsum(torch.randint(0, 10 ** 6, (B, T), generator=g), 1) * (items != 0)
    return items, stamps


@pytest.mark.parametrize("bias", ["position_time", "position", "none"])
def test_a_future_item_or_its_time_never_changes_earlier_outputs(bias):
    m = model(f"model.hstu_rel_bias={bias}")
    items, stamps = history()
    h = m.encode(items, stamps)
    for j in (5, 8, 11):
        later_items, later_stamps = items.clone(), stamps.clone()
        later_items[:, j:] = later_items[:, j:] % N + 1
        later_stamps[:, j:] += 10 ** 7  # a later interaction far later in time
        h2 = m.encode(later_items, later_stamps)
        torch.testing.assert_close(h2[:, :j], h[:, :j], atol=1e-6, rtol=1e-6)
        assert not torch.allclose(h2[:, j], h[:, j])


def test_the_time_bias_reads_earlier_gaps():
    m = model("model.hstu_rel_bias=position_time")
    items, stamps = history()
    with torch.no_grad():
        for b in m.blocks:
            b.sublayers[0].body.rab.time.normal_()  # larger than the init's 0.02, so the effect is plain
    slower = stamps.clone()
    slower[:, 6:] += 10 ** 8  # the same items, a long pause before the 7th
    h, h2 = m.encode(items, stamps), m.encode(items, slower)
    torch.testing.assert_close(h2[:, :6], h[:, :6], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(h2[:, -1], h[:, -1])
    # the authors' buckets: ln(max(|dt|, 1)) / 0.301, at most 128
    assert time_buckets(torch.tensor([[0, 1, 3, 10 ** 18]])).tolist()[0][2] == [3, 2, 0, 128]


@pytest.mark.parametrize("extra", [[], ["model.similarity=cosine"]], ids=["dot", "cosine"])
def test_left_padding_does_not_change_outputs_or_scores(extra):
    m = model(*extra)
    items, stamps = history()
    pad = torch.zeros(B, 5, dtype=torch.long)
    h = m.encode(items, stamps)
    h2 = m.encode(torch.cat([pad, items], 1), torch.cat([pad, stamps], 1))
    torch.testing.assert_close(h2[:, 5:], h, atol=1e-5, rtol=1e-5)
    assert (h2[:, :5] == 0).all()
    s = m.score_last(items, stamps)
    torch.testing.assert_close(m.score_last(torch.cat([pad, items], 1), torch.cat([pad, stamps], 1)), s, atol=1e-5, rtol=1e-5)
    assert torch.isinf(s[:, 0]).all() and torch.isfinite(s[:, 1:]).all()


def test_invisible_keys_weigh_exactly_zero_and_pass_no_gradient():
    x = torch.tensor([INVISIBLE - 50.0, INVISIBLE, INVISIBLE + 500.0], requires_grad=True)
    y = F.silu(x)
    y.sum().backward()
    assert (y == 0).all() and (x.grad == 0).all()


def test_cosine_scores_are_cosines_over_the_temperature_and_train_on_unit_vectors():
    m = model("model.similarity=cosine", "model.temperature=0.1")
    items, stamps = history()
    E = m.output_embeddings()
    assert (E[0] == 0).all() and torch.allclose(E[1:].norm(dim=-1), torch.ones(N))
    h = m.encode(items, stamps, last=1)[:, 0]
    want = F.normalize(h, dim=-1) @ E.T / 0.1
    torch.testing.assert_close(m.score_last(items, stamps)[:, 1:], want[:, 1:], atol=1e-4, rtol=1e-5)
    loss, n = m.train()({"items": items, "timestamps": stamps, "targets": items})
    assert torch.isfinite(loss) and n == (items != 0).sum()


@pytest.mark.parametrize("bad,match", [
    (["model.attention=time_interval"], "model.block=hstu .* set model.attention=causal"),
    (["model.temperature=0.1"], "only acts with model.similarity=cosine"),
    (["model.similarity=cosine", "model.temperature=0"], "model.temperature must be > 0"),
    (["model.head=masked_diffusion", "model.attention=bidirectional"], "model.hstu_rel_bias=position"),
    (["model.similarity=cosine", "model.user=ssept", "model.user_dim=4"], "use model.similarity=dot"),
])
def test_bad_hstu_settings_are_refused_with_the_fix(bad, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [*HSTU, *bad])


def test_the_qat_wrapper_takes_every_hstu_linear():
    from rayrec.quant.prepare import QuantLinear, prepare

    cfg = load_config(None, [*HSTU, "quant.method=lsq"])
    torch.manual_seed(0)
    m = prepare(build_model(cfg.model, N), cfg)
    names = [n for n, mod in m.named_modules() if isinstance(mod, QuantLinear)]
    assert sorted(names) == sorted(f"blocks.{i}.sublayers.0.body.{p}" for i in range(2) for p in ("uvqk", "out"))
    items, stamps = history()
    loss, n = m.train()({"items": items, "timestamps": stamps, "targets": items})
    (loss / n).backward()
    assert torch.isfinite(loss)


def test_one_ddp_step_equals_one_single_process_step(tmp_path):
    from tests import test_ddp

    spec = "ce:dense:model.block=hstu,model.similarity=cosine"
    single, multi = tmp_path / "single.pt", tmp_path / "ddp.pt"
    test_ddp.step(0, 1, spec, single)
    mp.start_processes(test_ddp._worker, args=(2, str(tmp_path / "store"), spec, str(multi)), nprocs=2,
                       start_method="spawn", join=True)
    a, b = torch.load(single, weights_only=True), torch.load(multi, weights_only=True)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert a["grads"].keys() == b["grads"].keys() and any("rab.time" in k for k in a["grads"])
    for k in a["grads"]:
        assert torch.allclose(a["grads"][k], b["grads"][k], atol=1e-6, rtol=1e-4), k


@pytest.mark.ray
def test_hstu_beats_most_popular_under_2_worker_ddp(ray_cluster, synthetic_log, tmp_path):
    from rayrec.train.fit import fit
    from tests.test_train import SMALL, popularity_ndcg

    cfg = load_config(None, [f"data.log={synthetic_log}", f"output_dir={tmp_path}", "name=hstu", *SMALL,
                             "model.block=hstu", "model.head=ce", "model.similarity=cosine", "train.epochs=6",
                             "train.eval_every=3", "scale.num_workers=2", "scale.cpus_per_worker=0.5"])
    res = fit(cfg)
    pop = popularity_ndcg(res.data, cfg)
    got = res.metrics["test_ndcg_10"]
    assert got > 2 * pop and got - pop > 0.05, (got, pop)
