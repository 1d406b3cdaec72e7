"""Worker failures, hung ranks and determinism on the shared local Ray cluster (2 DDP workers).

Faults come from RAYREC_FAULT (rayrec/train/faults.py), read by ``fit`` on the driver and forwarded
to the workers. Every run has a timeout: a hang must fail the test, not the CI job."""
import time
from pathlib import Path

import pytest
import torch

from rayrec.config import load_config
from rayrec.train import checkpoint as ckpt
from rayrec.train.fit import fit

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parent.parent
EPOCHS = 3


def quickstart(log, out, name, *extra):
    """The quickstart config (2 workers x 0.5 CPU), shrunk to seconds: fewer steps, a smaller model."""
    return load_config(ROOT / "configs" / "quickstart.yaml", [
        f"data.log={log}", f"output_dir={out}", f"name={name}", f"train.epochs={EPOCHS}", "train.max_steps_per_epoch=4",
        "train.batch_size=64", "model.max_len=20", "model.hidden=32", "train.warmup_steps=2", *extra])


def final_weights(res):
    folder = Path(res.checkpoint)
    assert folder.name == ckpt.dir_name(EPOCHS, final=True)
    return ckpt.load_weights(folder), ckpt.load_weights(folder, best=True)


@pytest.fixture(scope="module")
def clean(ray_cluster, synthetic_log, tmp_path_factory):
    return fit(quickstart(synthetic_log, tmp_path_factory.mktemp("clean"), "clean"))


def _assert_same_run(a, b):
    keys = [k for k in a.metrics if k.startswith(("val_", "test_", "best_"))]
    assert len(keys) > 10
    for k in keys:
        assert a.metrics[k] == b.metrics[k], k
    for wa, wb in zip(final_weights(a), final_weights(b)):
        assert wa.keys() == wb.keys()
        for k in wa:
            assert torch.equal(wa[k], wb[k]), k


def test_worker_failures_restart_from_the_last_checkpoint_and_match_a_clean_run_of_the_same_seed(
        clean, synthetic_log, tmp_path, monkeypatch):
    # two failures in one run, one of each kind: rank 1 raises at epoch 2, then rank 0's process dies at
    # epoch 3 (os._exit, like an OOM kill). Equal to the clean run also proves same config + seed = same run.
    monkeypatch.setenv("RAYREC_FAULT", "rank=1,epoch=2,kind=raise;rank=0,epoch=3,kind=exit")
    res = fit(quickstart(synthetic_log, tmp_path, "faults", "scale.max_failures=2"))
    assert len(list(res.run_dir.glob(".rayrec_fault_*"))) == 2, "a fault never fired"
    assert res.metrics["epoch"] == EPOCHS
    # each restart resumed from the newest checkpoint (epoch 1, then epoch 2), never from scratch
    assert ckpt.load_state(res.checkpoint)["resumed_at_epochs"] == [1, 2]
    kept = sorted(res.run_dir.glob("checkpoint_0*"))
    assert len(kept) == 3 and all(ckpt.verify(k) for k in kept)  # CheckpointConfig(num_to_keep=3)
    _assert_same_run(clean, res)


def test_without_retries_the_error_names_the_rank_and_the_cause(ray_cluster, synthetic_log, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYREC_FAULT", "rank=1,epoch=2,kind=raise")
    with pytest.raises(Exception) as e:
        fit(quickstart(synthetic_log, tmp_path, "no_retry", "scale.max_failures=0"))
    msg = str(e.value)
    assert "Rank 1" in msg and "InjectedFault" in msg and "rank 1 at epoch 2" in msg, msg


def test_a_hung_rank_fails_within_the_process_group_timeout_naming_the_rank(
        ray_cluster, synthetic_log, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYREC_FAULT", "rank=1,epoch=2,kind=hang")
    t0 = time.monotonic()
    with pytest.raises(Exception) as e:
        fit(quickstart(synthetic_log, tmp_path, "hang", "scale.timeout_s=5"))
    elapsed = time.monotonic() - t0
    msg = str(e.value)
    assert "CollectiveTimeout" in msg and "after 5 s" in msg and "stalled: rank 1 last at epoch 1" in msg, msg
    assert elapsed < 150, elapsed  # startup (~20 s) + epoch 1 + 5 s, not scale.timeout_s's default 30 minutes
