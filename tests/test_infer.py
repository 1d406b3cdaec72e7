"""From a trained quickstart checkpoint to recommendations: the API, batch inference, export."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from rayrec.config import ConfigError, EvalConfig, load_config
from rayrec.data.batches import SequenceStore
from rayrec.data.log import DataError
from rayrec.eval.evaluate import evaluate
from rayrec.infer import Recommender, UnknownItemsError

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.max_len=20", "model.hidden=32", "model.num_heads=2", "model.dropout=0.1", "model.head=ce",
        "train.lr=0.005", "train.warmup_steps=5", "train.batch_size=64", "train.epochs=3", "scale.num_workers=0"]


@pytest.fixture(scope="module")
def trained(ray_cluster, synthetic_log, tmp_path_factory):
    from rayrec.train.fit import fit

    out = tmp_path_factory.mktemp("infer")
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [f"data.log={synthetic_log}", f"output_dir={out}", "name=qs", *TINY])
    return fit(cfg)


@pytest.fixture(scope="module")
def rec(trained):
    return Recommender.from_checkpoint(trained.run_dir)


@pytest.fixture(scope="module")
def raw_sequences(trained, rec):
    """Every user's whole history in raw ids, in time order: {user_id: [item_id, ...]}."""
    t = pq.read_table(trained.data.sequences_path).sort_by("user_idx")
    return {u: rec.item_id(np.asarray(s)).to_pylist() for u, s in zip(t["user_id"].to_pylist(), t["items"].to_pylist())}


def test_round_trip_raw_ids_in_raw_ids_out(rec, raw_sequences):
    users = list(raw_sequences)[:6]
    hist = {u: raw_sequences[u] for u in users}
    out = rec.recommend(hist, k=7)
    assert list(out.columns) == ["user_id", "rank", "item_id", "score"]
    vocab = set(rec.item_ids.to_pylist())
    for u in users:
        rows = out[out.user_id == u]
        assert rows["rank"].tolist() == list(range(1, 8))  # k respected
        assert set(rows.item_id) <= vocab and not set(rows.item_id) & set(hist[u])  # raw ids, seen excluded
        assert np.all(np.diff(rows.score.to_numpy()) <= 0)
    # one flat list is one history; exclude_seen=False may return history items
    single = rec.recommend(hist[users[0]], k=7)
    assert single.item_id.tolist() == out[out.user_id == users[0]].item_id.tolist()
    unmasked = rec.recommend(hist[users[0]], k=rec.num_items, exclude_seen=False)
    assert len(unmasked) == rec.num_items and set(hist[users[0]]) <= set(unmasked.item_id)


def test_recommendation_and_evaluation_share_one_scoring_path(rec, trained, raw_sequences):
    """The API's top-1 after s[:L-1] is what evaluation ranks first, and its top-10 reproduces test HR/NDCG@10."""
    ev = load_config(trained.run_dir / "config.yaml").eval
    t = pq.read_table(trained.data.sequences_path)
    store = SequenceStore.from_tables([t], rec.num_items)
    users = store.eval_users()
    seqs = [store.items[store.offsets[r]: store.offsets[r + 1]] for r in users]
    hist = {int(store.user_idx[r]): rec.item_id(s[:-1]).to_pylist() for r, s in zip(users, seqs)}
    out = rec.recommend(hist, k=10)
    ranks = out.assign(item_idx=rec.item_index(out.item_id.to_numpy())).groupby("user_id")
    target = {int(store.user_idx[r]): int(s[-1]) for r, s in zip(users, seqs)}
    hit_rank = np.array([next((rk for it, rk in zip(g.item_idx, g["rank"]) if it == target[u]), 0) for u, g in ranks])
    metrics = evaluate(rec.model, store, ev, rec.cfg.model.max_len, "test", torch.device("cpu"))
    assert (hit_rank > 0).mean() == pytest.approx(metrics["test_hr_10"], abs=1e-9)
    ndcg = (np.where(hit_rank > 0, 1.0, 0.0) / np.log2(np.maximum(hit_rank, 1) + 1.0)).mean()
    assert ndcg == pytest.approx(metrics["test_ndcg_10"], abs=1e-9)
    # put the API's top-1 in the test position: evaluation must rank it first for every user
    top1 = out[out["rank"] == 1].set_index("user_id").item_id
    probe = SequenceStore(
        user_idx=store.user_idx[users], offsets=np.r_[0, np.cumsum([len(s) for s in seqs])],
        items=np.concatenate([np.r_[s[:-1], rec.item_index([top1[int(store.user_idx[r])]])] for r, s in zip(users, seqs)]).astype(np.int32),
        timestamps=np.concatenate([store.timestamps[store.offsets[r]: store.offsets[r + 1]] for r in users]),
        eval_negatives=None, num_items=rec.num_items)
    assert evaluate(rec.model, probe, EvalConfig(ks=[1]), rec.cfg.model.max_len, "test", torch.device("cpu"))["test_hr_1"] == 1.0


def test_unknown_items_follow_the_policy(rec, raw_sequences):
    u = next(iter(raw_sequences))
    hist = raw_sequences[u]
    with pytest.raises(UnknownItemsError, match=r"not in the model's vocabulary: \[-5, -9\]") as e:
        rec.recommend({u: [-5] + hist + [-9]}, k=5)
    assert e.value.items == [-5, -9]
    skipped = rec.recommend({u: [-5] + hist + [-9]}, k=5, unknown_items="skip")
    assert skipped.item_id.tolist() == rec.recommend({u: hist}, k=5).item_id.tolist()
    with pytest.raises(DataError, match="cannot be read as the vocabulary"):
        rec.recommend([["not-an-int"]], k=5)


def test_empty_histories_get_popular_items_or_an_error(rec, raw_sequences):
    u, hist = next(iter(raw_sequences.items()))
    out = rec.recommend({-1: [], u: hist, -2: [-1]}, k=5, unknown_items="skip")
    popular = rec.item_id(np.argsort(-rec.popularity[1:], kind="stable")[:5] + 1).to_pylist()
    assert out[out.user_id == -1].item_id.tolist() == popular
    assert out[out.user_id == -2].item_id.tolist() == popular  # every item unknown: empty after skipping
    assert out[out.user_id == u].item_id.tolist() == rec.recommend({u: hist}, k=5).item_id.tolist()
    with pytest.raises(DataError, match="no known history item.*empty_history='popular'"):
        rec.recommend([[]], k=5, empty_history="error")


def test_api_edge_cases_are_documented_behaviour_or_one_clear_error(rec, raw_sequences):
    popular = rec.item_id(np.argsort(-rec.popularity[1:], kind="stable")[:3] + 1).to_pylist()
    assert rec.recommend([], k=3).item_id.tolist() == popular  # a flat list is one history, here empty
    assert len(rec.recommend({}, k=3)) == 0  # no users: nothing to recommend
    hist = next(iter(raw_sequences.values()))
    assert len(rec.recommend(hist, k=4)) == 4 and len(rec.recommend(hist)) == rec.cfg.infer.k
    for k in (0, -1, 2.5, True):
        with pytest.raises(DataError, match="k must be a positive integer"):
            rec.recommend(hist, k=k)
    with pytest.raises(DataError, match="must share one type, got int .*str"):
        rec.recommend([hist[0], str(hist[1])], k=3)
    with pytest.raises(DataError, match="must share one type"):
        rec.score([hist], candidates=[hist[0], str(hist[1])])


def test_tables_and_score_agree_with_recommend(rec, raw_sequences):
    users = list(raw_sequences)[:3]
    rows = [(u, it, t) for u in users for t, it in enumerate(raw_sequences[u])]
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).sample(frac=1.0, random_state=0)  # any row order
    from_table = rec.recommend(df, k=5)
    from_dict = rec.recommend({u: raw_sequences[u] for u in users}, k=5)
    assert from_table.item_id.tolist() == from_dict.item_id.tolist()
    cands = from_dict[from_dict.user_id == users[0]].item_id.tolist()[::-1]
    s = rec.score({users[0]: raw_sequences[users[0]]}, cands)
    expected = from_dict[from_dict.user_id == users[0]].set_index("item_id").score
    np.testing.assert_allclose(s.score.to_numpy(), expected.loc[cands].to_numpy(), rtol=1e-5)
    with pytest.raises(UnknownItemsError, match="candidate"):
        rec.score({users[0]: raw_sequences[users[0]]}, [cands[0], -3])
    assert np.isnan(rec.score({users[0]: raw_sequences[users[0]]}, [cands[0], -3], unknown_items="skip").score.iloc[1])


def test_batch_inference_writes_k_rows_per_user_matching_the_api(rec, trained, raw_sequences, tmp_path):
    from rayrec.infer.batch import recommend_all

    out = tmp_path / "recs" / "recommendations.parquet"
    s = recommend_all(str(trained.run_dir), [f"infer.output={out}", "infer.k=5", "infer.batch_size=128",
                                             "infer.cpus_per_actor=0.5"], progress=False)
    recs = pq.read_table(out).to_pandas()
    assert s["rows"] == len(recs) == 5 * len(raw_sequences) and s["users"] == len(raw_sequences)
    assert list(recs.columns) == ["user_id", "rank", "item_id", "score"]
    assert recs.groupby("user_id")["rank"].apply(lambda r: sorted(r) == [1, 2, 3, 4, 5]).all()
    sample = list(raw_sequences)[::97]
    api = rec.recommend({u: raw_sequences[u] for u in sample}, k=5)
    got = recs[recs.user_id.isin(sample)].sort_values(["user_id", "rank"]).reset_index(drop=True)
    assert got.item_id.tolist() == api.sort_values(["user_id", "rank"]).item_id.tolist()
    np.testing.assert_allclose(got.score, api.sort_values(["user_id", "rank"]).score, rtol=1e-5)
    # a second run overwrites instead of appending: the row check would catch duplicates
    assert recommend_all(str(trained.run_dir), [f"infer.output={out}", "infer.k=5", "infer.cpus_per_actor=0.5"],
                         progress=False)["rows"] == s["rows"]


def test_exported_models_agree_with_eager(rec, trained, raw_sequences, tmp_path):
    from rayrec.infer.export import export_bundle, run_onnx

    m = export_bundle(str(trained.run_dir), tmp_path / "bundle", overrides=["infer.k=5"])
    for fmt in ("torchscript", "onnx"):
        a = m["agreement"][fmt]
        assert a["max_abs_score_diff"] < 1e-4 and a["topk_agree"] == 1.0, (fmt, a)
    # real histories shorter than the window: the graphs' in-window exclusion equals the API's
    T = rec.cfg.model.max_len
    users = [u for u, h in raw_sequences.items() if len(h) <= T][:8]
    items = torch.zeros(len(users), T, dtype=torch.long)
    for r, u in enumerate(users):
        idx = rec.item_index(raw_sequences[u])
        items[r, T - len(idx):] = torch.from_numpy(idx)
    stamps = torch.cumsum((items > 0).long(), 1)
    api = rec.recommend({u: raw_sequences[u] for u in users}, k=5)
    want = rec.item_index(api.item_id.to_numpy()).reshape(len(users), 5)
    ts_scores, ts_idx = torch.jit.load(str(tmp_path / "bundle" / m["files"]["torchscript"]))(items, stamps)
    onnx_scores, onnx_idx = run_onnx(tmp_path / "bundle" / m["files"]["onnx"], (items, stamps))
    np.testing.assert_array_equal(ts_idx.numpy(), want)
    np.testing.assert_array_equal(onnx_idx, want)
    np.testing.assert_allclose(onnx_scores, api.score.to_numpy().reshape(len(users), 5), rtol=1e-4, atol=1e-4)
    # the bundle is a checkpoint of its own: vocab inside, same recommendations
    again = Recommender.from_checkpoint(tmp_path / "bundle").recommend({u: raw_sequences[u] for u in users}, k=5)
    assert again.item_id.tolist() == api.item_id.tolist()


def test_bad_infer_config_names_the_key():
    with pytest.raises(ConfigError, match="infer.k"):
        load_config(None, ["infer.k=0"])
    with pytest.raises(ConfigError, match=r"infer.unknown_items='drop' is not valid; choose one of \['error', 'skip'\]"):
        load_config(None, ["infer.unknown_items=drop"])


@pytest.mark.parametrize("cmd", ["recommend", "export", "report", "tune", "evaluate"])
def test_cli_subcommands_have_help(cmd, capsys):
    from rayrec.cli import main

    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0 and "usage: rayrec " + cmd in capsys.readouterr().out


def test_recommend_job_shows_help():
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "recommend.py"), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "infer.k" in out.stdout and "key.sub=value" in out.stdout


def test_a_run_folder_that_does_not_exist_is_named_as_missing_with_the_nearest_runs(tmp_path):
    from rayrec.config import ConfigError
    from rayrec.eval.offline import find_checkpoint

    (tmp_path / "quickstart-20261206-101500").mkdir()
    with pytest.raises(ConfigError, match=r"quickstart does not exist; did you mean .*quickstart-20261206-101500"):
        find_checkpoint(tmp_path / "quickstart")
    with pytest.raises(ConfigError, match=r"nothing does not exist; give the run folder"):
        find_checkpoint(tmp_path / "nothing")
    with pytest.raises(ConfigError, match="neither a checkpoint folder"):
        find_checkpoint(tmp_path / "quickstart-20261206-101500")
