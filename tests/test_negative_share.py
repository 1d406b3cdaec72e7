"""Settings that follow the data: negatives as a share of the catalogue, an lr decay point in epochs."""
import numpy as np
import pytest

from rayrec.config import ConfigError, load_config, negatives_for
from rayrec.data.batches import SequenceStore
from rayrec.models import build_model
from rayrec.train.loop import EpochBatches, lr_factor


def model_cfg(*o):
    return load_config(None, list(o)).model


def test_a_count_stays_a_count_and_a_share_follows_the_catalogue():
    assert negatives_for(model_cfg("model.num_negatives=4096"), 12_101) == 4096
    share = model_cfg("model.num_negatives=0.3385")  # esasrec_beauty's 4096 of Beauty's 12,101 items
    assert [negatives_for(share, n) for n in (12_101, 3_416, 57_289)] == [4096, 1156, 19_392]
    assert negatives_for(model_cfg("model.num_negatives=0.001"), 40) == 1  # at least one


@pytest.mark.parametrize("bad", ["1.5", "0", "-0.2", "2048.5"])
def test_a_fractional_count_or_a_non_positive_value_is_refused(bad):
    with pytest.raises(ConfigError, match=r"model.num_negatives must be a whole count >= 1 .* or a share of the catalogue in \(0, 1\)"):
        load_config(None, [f"model.num_negatives={bad}"])


def test_heads_and_the_sampler_use_the_resolved_count():
    N = 200
    cfg = load_config(None, ["model.head=gbce", "model.num_negatives=0.1", "model.max_len=6", "model.hidden=8"])
    head = build_model(cfg.model, N).head
    assert head.beta == pytest.approx(1 - 0.75 * (1 - 20 / (N - 1)))
    assert build_model(load_config(None, ["model.num_negatives=0.1"]).model, N).head.k == 20
    g = np.random.default_rng(0)
    offsets = np.arange(0, 41, 10, dtype=np.int64)
    store = SequenceStore(user_idx=np.arange(1, 5), offsets=offsets, items=g.integers(1, N + 1, 40).astype(np.int32),
                          timestamps=np.arange(40, dtype=np.int64), eval_negatives=None, num_items=N)
    for shared in (False, True):
        c = load_config(None, ["model.head=sampled_softmax", "model.num_negatives=0.1", "model.max_len=6",
                               f"model.shared_negatives={str(shared).lower()}"])
        batches = EpochBatches(store, store.forbidden_keys(), np.arange(4), c, 0, 4, 1, build_model(c.model, N).head)
        b = next(iter(batches.epoch(0)))
        got = b["shared_negatives"].shape if shared else b["negatives"].shape
        assert got[-1] == 20, got


def test_the_shipped_beauty_config_keeps_its_measured_4096_negatives_on_beauty():
    cfg = load_config("configs/esasrec_beauty.yaml")
    assert negatives_for(cfg.model, 12_101) == 4096  # bench/results/variants.json's esasrec_beauty row


def test_an_lr_decay_in_epochs_falls_at_the_same_epoch_on_logs_of_any_size():
    t = load_config(None, ["train.lr_schedule=step", "train.lr_decay_epochs=80", "train.lr_decay_rate=0.3",
                           "train.warmup_steps=0"]).train
    for steps_per_epoch in (48, 7, 1_000):  # ML-1M at batch 128, a small log, a large one
        at = [lr_factor(e * steps_per_epoch, 0, t, steps_per_epoch) for e in (0, 79, 80, 159, 160)]
        assert at == pytest.approx([1, 1, 0.3, 0.3, 0.09]), (steps_per_epoch, at)
    by_steps = load_config(None, ["train.lr_schedule=step", "train.lr_decay_step=3840", "train.warmup_steps=0"]).train
    assert lr_factor(3840, 0, by_steps, 7) == pytest.approx(by_steps.lr_decay_rate)  # 0 epochs: the step count


def test_an_lr_decay_in_epochs_without_the_step_schedule_is_refused():
    with pytest.raises(ConfigError, match="train.lr_decay_epochs needs train.lr_schedule=step"):
        load_config(None, ["train.lr_decay_epochs=80"])
    with pytest.raises(ConfigError, match="train.lr_decay_epochs must be >= 0"):
        load_config(None, ["train.lr_schedule=step", "train.lr_decay_epochs=-1"])
