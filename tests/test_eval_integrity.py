"""No masked target counts as a hit, NaN scores are refused, and a held-out item the user already
has (a repeat target) is handled by the stated ``eval.repeat_targets`` policy and counted."""
import math

import numpy as np
import pytest
import torch

from rayrec.config import ConfigError, EvalConfig, load_config
from rayrec.data.batches import SequenceStore
from rayrec.eval.evaluate import evaluate
from rayrec.eval.metrics import metric_sums, rank_of_target

INF = float("-inf")


@pytest.mark.parametrize("row, target, k, hit", [
    ([INF] * 7, 3, 10, 0.0),  # every item masked: the masked target is a miss, not rank 0
    ([0.1, 0.2, INF, INF], 2, 10, 0.0),  # 2 unmasked items < k: the masked target stays out of the top k
    ([0.1, 0.2, INF, INF], 3, 2, 0.0),  # ... also at a cut-off equal to the unmasked count
    ([0.1, 0.2, 0.3, INF], 2, 10, 1.0),  # an unmasked target among few candidates is a real hit
    ([0.1, float("nan"), INF], 1, 10, 0.0),  # a NaN target never ranks first
])
def test_a_masked_target_is_a_miss_whatever_k_and_the_candidate_count(row, target, k, hit):
    s = torch.tensor([row])
    r, t = rank_of_target(s, s[:, target])
    assert metric_sums(r, [k], t)[f"hr_{k}"] == hit


def store_of(seqs: list[list[int]], num_items: int) -> SequenceStore:
    lens = [len(s) for s in seqs]
    return SequenceStore(user_idx=np.arange(1, len(seqs) + 1), offsets=np.r_[0, np.cumsum(lens)].astype(np.int64),
                         items=np.concatenate(seqs).astype(np.int32), timestamps=np.arange(sum(lens), dtype=np.int64),
                         eval_negatives=None, num_items=num_items)


class Oracle(torch.nn.Module):
    """Scores the next item of each history (given as a table) highest; every other item alike below."""

    def __init__(self, next_of: dict[tuple, int], num_items: int):
        super().__init__()
        self.next_of, self.n = next_of, num_items

    def score_last(self, items, timestamps=None, users=None):
        out = torch.zeros(items.shape[0], self.n + 1)
        out[:, 0] = INF
        for r, row in enumerate(items.tolist()):
            out[r, self.next_of[tuple(i for i in row if i)]] = 10.0
        out[:, 1:] += torch.linspace(0, 1e-3, self.n)  # no ties among the others
        return out


# users 1 and 2: test target is new; user 3: the test target (3) is already in the history; user 4:
# the validation target repeats (no two histories alike: the oracle looks them up)
SEQS = [[1, 2, 3, 4], [5, 6, 7, 8], [1, 3, 2, 3], [4, 5, 4, 6]]


def oracle() -> Oracle:
    nxt = {}
    for s in SEQS:
        for p in (len(s) - 2, len(s) - 1):
            nxt[tuple(s[:p])] = s[p]
    return Oracle(nxt, 8)


def test_repeat_targets_are_found_per_stage():
    st = store_of(SEQS, 8)
    assert st.repeat_targets("test").tolist() == [False, False, True, False]
    assert st.repeat_targets("val").tolist() == [False, False, False, True]


@pytest.mark.parametrize("policy, users, hr", [
    ("drop", 3, 1.0),  # the repeat user is left out (RecTools / eSASRec leave-one-out protocol)
    ("miss", 4, 0.75),  # kept, masked with the history: a miss
    ("rank", 4, 1.0),  # kept, the target alone unmasked: the oracle ranks it first
])
def test_repeat_target_policy_is_applied_and_counted(policy, users, hr):
    st = store_of(SEQS, 8)
    cfg = EvalConfig(ks=[1, 10], repeat_targets=policy)
    m = evaluate(oracle(), st, cfg, max_len=10, stage="test", device=torch.device("cpu"))
    assert m["test_users"] == users and m["test_repeat_targets"] == 1
    assert m["test_hr_10"] == pytest.approx(hr) and m["test_hr_1"] == pytest.approx(hr)
    v = evaluate(oracle(), st, cfg, max_len=10, stage="val", device=torch.device("cpu"))
    assert v["val_repeat_targets"] == 1 and v["val_users"] == users


def test_a_store_with_no_evaluable_user_reports_nan_not_zero():
    st = store_of([[1, 2, 3, 1]], 3)  # the only test target repeats
    m = evaluate(oracle_for_one(), st, EvalConfig(ks=[10]), max_len=10, stage="test", device=torch.device("cpu"))
    assert m["test_users"] == 0 and m["test_repeat_targets"] == 1 and math.isnan(m["test_ndcg_10"])


def oracle_for_one() -> Oracle:
    return Oracle({(1, 2): 3, (1, 2, 3): 1}, 3)


def test_nan_scores_are_refused_with_a_message():
    class Diverged(torch.nn.Module):
        def score_last(self, items, timestamps=None, users=None):
            return torch.full((items.shape[0], 9), float("nan"))

    with pytest.raises(FloatingPointError, match="scored NaN for 4 test user"):
        evaluate(Diverged(), store_of(SEQS, 8), EvalConfig(repeat_targets="miss"), 10, "test", torch.device("cpu"))


def test_repeat_targets_policy_is_validated():
    assert load_config(None, []).eval.repeat_targets == "drop"
    with pytest.raises(ConfigError, match="repeat_targets"):
        load_config(None, ["eval.repeat_targets=keep"])
