"""End to end on Ray: learning under 2-worker DDP, and train -> checkpoint -> resume -> evaluate."""
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rayrec.config import ConfigError, load_config
from rayrec.data.batches import SequenceStore
from rayrec.eval.baselines import MostPopular
from rayrec.eval.evaluate import evaluate
from rayrec.train import checkpoint as ckpt
from rayrec.train.fit import fit, sequences_dataset

pytestmark = pytest.mark.ray
ROOT = Path(__file__).resolve().parent.parent
SMALL = ["model.max_len=20", "model.hidden=32", "model.num_heads=2", "model.dropout=0.1", "train.lr=0.005",
         "train.warmup_steps=5", "train.batch_size=64"]


def popularity_ndcg(data, cfg):
    store = SequenceStore.from_tables([pq.read_table(data.sequences_path)], data.num_items)
    return evaluate(MostPopular(store), store, cfg.eval, cfg.model.max_len, "test", torch.device("cpu"))["test_ndcg_10"]


def test_sasrec_beats_most_popular_under_2_worker_ddp(ray_cluster, synthetic_log, tmp_path):
    cfg = load_config(None, [f"data.log={synthetic_log}", f"output_dir={tmp_path}", "name=ddp", "train.epochs=8",
                             "scale.num_workers=2", "scale.cpus_per_worker=0.5", *SMALL])
    res = fit(cfg)
    pop = popularity_ndcg(res.data, cfg)
    got = res.metrics["test_ndcg_10"]
    assert got > 2 * pop and got - pop > 0.05, (got, pop)
    # the baseline computed inside the 2 ranks (popularity all-reduced) equals the single-process one
    assert res.metrics["baseline_pop_test_ndcg_10"] == pytest.approx(pop, abs=1e-9)
    assert res.metrics["test_users"] == res.data.meta["users_by_length"]["evaluable (>=3: train + valid + test)"]
    # metrics came from the best-on-validation epoch
    assert res.metrics["val_ndcg_10"] == pytest.approx(res.metrics["best_val_ndcg_10"])
    # every epoch's report, not only those of the 3 checkpoints Ray retains
    assert [h["epoch"] for h in res.history if "train_loss" in h] == list(range(1, 9))
    assert res.history[-1]["test_ndcg_10"] == res.metrics["test_ndcg_10"]
    # the first epoch says where the time before the first step went, and only the first
    first = res.history[0]
    parts = [first[k] for k in ("startup_worker_s", "startup_data_s", "startup_model_s")]
    assert all(p >= 0 for p in parts) and sum(parts) == pytest.approx(first["first_step_s"])
    assert 0 < first["first_step_s"] < 300
    assert not any("first_step_s" in h for h in res.history[1:])


def test_small_sequences_are_put_whole_and_large_ones_read_by_ray_data_with_the_same_rows(ray_cluster, synthetic_log,
                                                                                        monkeypatch):
    import ray.data

    from rayrec.data.sequences import build_sequences

    data = build_sequences(load_config(None, [f"data.log={synthetic_log}"]).data)
    large = sequences_dataset(data.sequences_path, small_bytes=0)
    with monkeypatch.context() as m:  # below the threshold no Ray Data read task starts
        m.setattr(ray.data, "read_parquet", lambda *a, **k: pytest.fail("small sequences went through read tasks"))
        small = sequences_dataset(data.sequences_path)
    rows = [ds.to_arrow_refs() for ds in (small, large)]
    tables = [pa.concat_tables(ray_cluster.get(r)).sort_by("user_idx") for r in rows]
    assert tables[0].num_rows == data.meta["users_out"] and tables[0].equals(tables[1])


@pytest.mark.parametrize("variant", [
    ["model.attention=time_interval", "model.num_negatives=4"],
    ["model.block=ligr", "model.head=sampled_softmax", "model.num_negatives=16", "model.residual=mhc",
     "model.mhc_streams=2"],
    ["model.user=ssept", "model.user_dim=8", "model.sse_user_prob=0.05", "model.head=ce"],
], ids=["tisasrec-bce", "ligr-mhc-sampled_softmax", "ssept-ce"])
def test_variants_learn_through_the_whole_pipeline(ray_cluster, synthetic_log, tmp_path, variant):
    cfg = load_config(None, [f"data.log={synthetic_log}", f"output_dir={tmp_path}", "name=v", "train.epochs=5",
                             "scale.num_workers=0", "train.eval_every=5", *SMALL, *variant])
    res = fit(cfg)
    pop = res.metrics["baseline_pop_test_ndcg_10"]
    assert res.metrics["test_ndcg_10"] > 2 * pop, (res.metrics["test_ndcg_10"], pop)


def test_rating_head_on_a_log_without_ratings_names_the_fix(ray_cluster, synthetic_log, tmp_path):
    t = pq.read_table(synthetic_log)
    unrated = tmp_path / "unrated.parquet"
    pq.write_table(t.drop_columns([c for c in t.column_names if c == "rating"]), unrated)
    cfg = load_config(None, [f"data.log={unrated}", f"output_dir={tmp_path}", "name=r", "train.epochs=1",
                             "scale.num_workers=0", "model.head=mse", *SMALL])
    with pytest.raises(Exception, match="no 'rating' column"):
        fit(cfg)


def _tb_steps(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_train_checkpoint_resume_evaluate_round_trip(ray_cluster, synthetic_log, tmp_path):
    from rayrec.eval.offline import evaluate_checkpoint

    base = [f"data.log={synthetic_log}", f"output_dir={tmp_path}", "name=rt", "scale.num_workers=0",
            "model.head=ce", "eval.protocol=both", *SMALL]
    first = fit(load_config(None, base + ["train.epochs=2"]))
    assert first.metrics["epoch"] == 2
    # local mode has a history too: every report of this fit call, epochs in order
    assert [h["epoch"] for h in first.history if "train_loss" in h] == [1, 2], first.history
    # reusing a run folder without resume is refused and overwrites nothing
    with pytest.raises(ConfigError, match="resume=true"):
        fit(load_config(None, base + ["train.epochs=4"]))
    resumed = fit(load_config(None, base + ["train.epochs=4", "resume=true"]))
    folder = Path(resumed.checkpoint)
    state = ckpt.load_state(folder)
    assert state["epoch"] == 4 and resumed.metrics["epoch"] == 4
    assert [h["epoch"] for h in resumed.history if "train_loss" in h] == [3, 4]  # this call's epochs only
    steps = _tb_steps(resumed.run_dir, "epoch/val_ndcg_10")
    assert len(steps) == 4 and steps == sorted(set(steps))  # one continuous step axis, no duplicates
    # checkpoints load without pickle: safetensors weights, optimizer state with weights_only=True
    assert ckpt.load_optimizer(folder)["optimizer"]["state"]
    metrics, _ = evaluate_checkpoint(resumed.run_dir)
    for k in ("test_ndcg_10", "test_hr_10", "test_sampled_ndcg_10", "val_ndcg_10"):
        assert metrics[k] == pytest.approx(resumed.metrics[k], abs=1e-9), k
    assert json.loads((resumed.run_dir / "evaluation_both.json").read_text())["test_ndcg_10"] == metrics["test_ndcg_10"]


@pytest.mark.parametrize("job", ["prepare", "train", "evaluate"])
def test_jobs_show_help(job):
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / f"{job}.py"), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "key.sub=value" in out.stdout


def test_cli_reports_bad_config_without_a_traceback(capsys):
    from rayrec.cli import main

    assert main(["train", str(ROOT / "configs" / "quickstart.yaml"), "model.head=nope"]) == 2
    assert "model.head='nope' is not valid" in capsys.readouterr().err
