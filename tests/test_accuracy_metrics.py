"""Agreement metrics on tiny vocabularies whose expected values are worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from vllm_bitcpm.testing.accuracy import (
    ACCURACY_BAR,
    bar_failures,
    compare_next_token,
    meets_accuracy_bar,
    summarize,
)


def _logits(probs):
    return torch.tensor(probs, dtype=torch.float64).log()


REF = [0.5, 0.25, 0.125, 0.125]
CAND = [0.4, 0.3, 0.2, 0.1]


def test_full_distribution_metrics_by_hand():
    c = compare_next_token(_logits(REF), _logits(CAND))
    assert (c.ref_top1, c.cand_top1, c.top1_match, c.top5_inclusion) == (0, 0, True, True)
    assert c.top10_overlap == 4  # the whole 4-token vocabulary
    assert c.ref_top1_prob == pytest.approx(0.5)
    assert c.top1_prob_rel_error == pytest.approx(0.2)              # |0.4 - 0.5| / 0.5
    assert c.top10_prob_mae == pytest.approx(0.0625)    # (0.1 + 0.05 + 0.075 + 0.025) / 4
    assert c.max_abs_error == pytest.approx(0.1)
    assert c.rmse == pytest.approx(0.0684653197)                    # sqrt(0.01875 / 4)
    # 0.5 ln(5/4) + 0.25 ln(5/6) + 0.125 ln(5/8) + 0.125 ln(5/4)
    assert c.kl == pytest.approx(0.0351338767)


def test_logits_and_log_probs_are_interchangeable():
    shifted = compare_next_token(_logits(REF) + 7.0, _logits(CAND) - 3.0)
    plain = compare_next_token(_logits(REF), _logits(CAND))
    for field, value in vars(plain).items():
        assert getattr(shifted, field) == pytest.approx(value, abs=1e-12), field


def test_identical_distributions_have_zero_error():
    c = compare_next_token(_logits(REF), _logits(REF))
    assert c.top1_match and c.top1_prob_rel_error == 0 and c.max_abs_error == 0
    assert c.kl == pytest.approx(0.0, abs=1e-15)


def test_top1_mismatch():
    c = compare_next_token(_logits([0.1, 0.6, 0.3]), _logits([0.1, 0.3, 0.6]))
    assert (c.ref_top1, c.cand_top1, c.top1_match, c.top5_inclusion) == (1, 2, False, True)
    assert c.top1_prob_rel_error == pytest.approx(0.5)              # |0.3 - 0.6| / 0.6


def test_top5_inclusion_fails_when_reference_top1_ranks_sixth():
    ref = torch.tensor([9.0, 5, 4, 3, 2, 1, 0, -1])
    cand = torch.tensor([0.5, 5, 4, 3, 2, 1, 0, -1])  # token 0 is sixth for the candidate
    c = compare_next_token(ref, cand)
    assert not c.top1_match and not c.top5_inclusion and c.cand_top1 == 1


def test_ties_with_the_candidate_best_count_as_agreement():
    c = compare_next_token(torch.tensor([0.0, 2.0, 1.0]), torch.tensor([2.0, 2.0, 1.0]))
    assert c.ref_top1 == 1 and c.top1_match and c.top5_inclusion


def test_top10_overlap_counts_shared_tokens():
    ref = -torch.arange(12, dtype=torch.float64)                    # top-10: tokens 0..9
    cand = ref.clone()
    cand[[8, 9]] = -20.0                                # tokens 10, 11 take their places
    assert compare_next_token(ref, cand).top10_overlap == 8


def test_top_k_dict_candidate():
    ref = -torch.arange(12, dtype=torch.float64)                    # p(i) proportional to e^-i
    cand = {0: math.log(0.5), 1: math.log(0.2), 10: math.log(0.1), 11: math.log(0.05)}
    c = compare_next_token(ref, cand)
    p0 = (1 - math.exp(-1)) / (1 - math.exp(-12))                   # geometric series
    assert c.ref_top1_prob == pytest.approx(p0)
    assert c.top1_match and c.top5_inclusion and c.cand_top1 == 0
    assert c.top10_overlap == 2                                     # {0..9} & {0, 1, 10, 11}
    assert c.top1_prob_rel_error == pytest.approx(abs(0.5 - p0) / p0)
    # Tokens 2..9 are missing from the dict and count as probability 0.
    ref_p = [math.exp(-i) * p0 for i in range(10)]
    expected_mae = (abs(0.5 - ref_p[0]) + abs(0.2 - ref_p[1]) + sum(ref_p[2:])) / 10
    assert c.top10_prob_mae == pytest.approx(expected_mae)
    assert c.max_abs_error is None and c.rmse is None and c.kl is None


def test_dict_candidate_missing_reference_top1():
    c = compare_next_token(torch.tensor([3.0, 0.0, 0.0]), {1: math.log(0.6), 2: math.log(0.4)})
    assert not c.top1_match and not c.top5_inclusion
    assert c.top1_prob_rel_error == pytest.approx(1.0)


def test_vocab_size_mismatch_is_an_error():
    with pytest.raises(ValueError, match="vocab"):
        compare_next_token(torch.zeros(4), torch.zeros(5))


def test_summary_aggregates_by_hand():
    good = compare_next_token(_logits(REF), _logits(CAND))          # match, rel 0.2, kl 0.0351
    bad = compare_next_token(_logits([0.1, 0.6, 0.3]), _logits([0.1, 0.3, 0.6]))  # miss, rel 0.5
    s = summarize([good, bad])
    assert s["num_prompts"] == 2
    assert s["top1_match_rate"] == 0.5 and s["top5_inclusion_rate"] == 1.0
    assert s["mean_top10_overlap"] == 3.5 and s["min_top10_overlap"] == 3   # 4 and 3 tokens
    assert s["mean_top1_prob_rel_error"] == pytest.approx(0.35)
    assert s["max_top1_prob_rel_error"] == pytest.approx(0.5)
    assert s["max_abs_error"] == pytest.approx(0.3)
    # KL of the second: 0.6 ln 2 + 0.3 ln(1/2) = 0.3 ln 2
    assert s["mean_kl"] == pytest.approx((0.0351338767 + 0.3 * math.log(2)) / 2)


def test_summary_with_top_k_candidates_has_no_full_metrics():
    s = summarize([compare_next_token(torch.tensor([1.0, 0.0]), {0: math.log(0.7)})])
    assert s["mean_kl"] is None and s["max_abs_error"] is None


def test_bar():
    passing = {"top1_match_rate": 1.0, "mean_top10_overlap": 9.5, "mean_top1_prob_rel_error": 0.009}
    assert meets_accuracy_bar(passing) and bar_failures(passing) == []
    assert ACCURACY_BAR["mean_top1_prob_rel_error"] == 0.01
    for key, value in [("top1_match_rate", 0.99), ("mean_top10_overlap", 9.4),
                       ("mean_top1_prob_rel_error", 0.01)]:
        failing = dict(passing, **{key: value})
        assert not meets_accuracy_bar(failing)
        assert len(bar_failures(failing)) == 1
    with pytest.raises(ValueError):
        summarize([])
