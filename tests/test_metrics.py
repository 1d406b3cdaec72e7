import math

import pytest
import torch

from rayrec.eval.metrics import MISS_RANK, metric_sums, rank_of_target


def test_metrics_match_hand_computed_values():
    ranks = torch.tensor([0, 1, 4, 9, 10, 50])
    s = metric_sums(ranks, [1, 5, 10])
    assert s["hr_1"] == 1 and s["hr_5"] == 3 and s["hr_10"] == 4
    assert s["ndcg_1"] == pytest.approx(1.0)
    assert s["ndcg_5"] == pytest.approx(1 + 1 / math.log2(3) + 1 / math.log2(6))
    assert s["ndcg_10"] == pytest.approx(1 + 1 / math.log2(3) + 1 / math.log2(6) + 1 / math.log2(11))
    assert s["mrr_10"] == pytest.approx(1 + 1 / 2 + 1 / 5 + 1 / 10)
    assert s["mrr_5"] == pytest.approx(1 + 1 / 2 + 1 / 5)


def test_rank_counts_strictly_higher_scores_and_ignores_masked():
    scores = torch.tensor([[float("-inf"), 0.9, 0.5, 0.7, float("-inf")], [float("-inf"), 0.1, 0.2, 0.3, 0.4]])
    target = torch.tensor([3, 1])
    r, ties = rank_of_target(scores, scores[torch.arange(2), target])
    assert r.tolist() == [1, 3] and ties.tolist() == [0, 0]


def test_ties_count_as_a_random_order_not_in_the_targets_favour():
    # a model that scores every item alike must not rank every target first
    n = 100
    scores = torch.zeros(3, n)
    scores[1, :4] = 1.0  # target tied with 3 others at the top
    scores[2, 5] = float("-inf")  # a masked target is a miss, whatever it ties with
    scores[2, :5] = float("-inf")
    target = torch.tensor([7, 2, 5])
    ranks, ties = rank_of_target(scores, scores[torch.arange(3), target])
    assert ranks.tolist() == [0, 0, MISS_RANK] and ties.tolist() == [n - 1, 3, 0]
    s = metric_sums(ranks[:1], [1, 10], ties[:1])
    assert s["hr_1"] == pytest.approx(1 / n) and s["hr_10"] == pytest.approx(10 / n)
    assert s["ndcg_10"] == pytest.approx(sum(1 / math.log2(p + 2) for p in range(10)) / n)
    assert s["mrr_10"] == pytest.approx(sum(1 / (p + 1) for p in range(10)) / n)
    s = metric_sums(ranks[1:2], [1, 2, 5], ties[1:2])  # positions 0..3, each with probability 1/4
    assert s["hr_1"] == pytest.approx(0.25) and s["hr_2"] == pytest.approx(0.5) and s["hr_5"] == pytest.approx(1.0)
    assert s["ndcg_5"] == pytest.approx(sum(1 / math.log2(p + 2) for p in range(4)) / 4)
    # sampled protocol: the target is not among the candidates, so it is not its own tie
    negs = torch.tensor([[0.5, 0.5, 0.2]])
    assert [t.tolist() for t in rank_of_target(negs, torch.tensor([0.5]), target_in_scores=False)] == [[0], [2]]
    # no ties: the expectation is the plain metric
    plain = torch.tensor([0, 3, 12])
    assert metric_sums(plain, [5, 10], torch.zeros(3, dtype=torch.long)) == pytest.approx(metric_sums(plain, [5, 10]))
