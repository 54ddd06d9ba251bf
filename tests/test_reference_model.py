"""The reference forward is right where a hand can check it, and the oracle built on it can fail."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer

from vllm_bitcpm.testing.accuracy import bar_failures, compare_next_token, meets_accuracy_bar, summarize
from vllm_bitcpm.testing.reference_model import ReferenceMiniCPM, rms_norm, rope_cos_sin, rotate_half
from vllm_bitcpm.testing.synthetic import REPORT_PROMPTS, TEST_PROMPTS, write_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", shape="tiny")


@pytest.fixture(scope="module")
def prompt_ids(tiny):
    tokenizer = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    return [tokenizer.encode(p).ids for p in REPORT_PROMPTS + TEST_PROMPTS]


@pytest.fixture(scope="module")
def reference(tiny):
    return ReferenceMiniCPM.from_pretrained(tiny, dtype=torch.float64)


def _summary(reference, candidate, prompt_ids):
    return summarize([
        compare_next_token(reference.next_token_logits(ids), candidate.next_token_logits(ids))
        for ids in prompt_ids
    ])


# -- (a) sanity ---------------------------------------------------------------------


def test_float32_agrees_with_float64(tiny, reference, prompt_ids):
    float32 = ReferenceMiniCPM.from_pretrained(tiny, dtype=torch.float32)
    for ids in prompt_ids[:4]:
        diff = (float32.logits(ids).double() - reference.logits(ids)).abs().max()
        assert diff < 1e-3
    summary = _summary(reference, float32, prompt_ids)
    assert meets_accuracy_bar(summary), bar_failures(summary)
    assert summary["mean_kl"] < 1e-8


def test_causal_prefix_logits_do_not_depend_on_later_tokens(reference, prompt_ids):
    ids = prompt_ids[-1]
    full = reference.logits(ids)
    assert torch.allclose(full[:3], reference.logits(ids[:3]), rtol=0, atol=1e-10)


def test_greedy_follows_argmax_and_reports_gaps(reference, prompt_ids):
    ids = prompt_ids[0]
    result = reference.greedy(ids, max_new_tokens=3)
    assert len(result.tokens) == len(result.top2_gaps) == 3
    assert result.tokens[0] == int(reference.next_token_logits(ids).argmax())
    assert result.tokens[1] == int(reference.next_token_logits(ids + result.tokens[:1]).argmax())
    assert all(gap >= 0 for gap in result.top2_gaps)
    stopped = reference.greedy(ids, max_new_tokens=3, stop_token_ids=[result.tokens[0]])
    assert stopped.tokens == result.tokens[:1]


# -- (b) pieces against hand computation ----------------------------------------------


def test_rms_norm_by_hand():
    # rms([3, 4]) = sqrt(12.5) = 3.5355339; times weights [1, 2].
    out = rms_norm(torch.tensor([3.0, 4.0], dtype=torch.float64),
                   torch.tensor([1.0, 2.0], dtype=torch.float64), eps=0.0)
    assert out.tolist() == pytest.approx([0.8485281374, 2.2627416998], abs=1e-9)


def test_neox_rope_by_hand():
    # head_dim 4, theta 100: inv_freq = [1, 0.1]; at position 2 the angles are [2, 0.2].
    cos, sin = rope_cos_sin(torch.tensor([2]), head_dim=4, theta=100.0)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    rotated = x * cos + rotate_half(x) * sin
    # (x0, x2) rotates by 2 rad, (x1, x3) by 0.2 rad:
    # x0' = 1 cos2 - 3 sin2, x1' = 2 cos.2 - 4 sin.2, x2' = 3 cos2 + 1 sin2, x3' = 4 cos.2 + 2 sin.2
    assert rotated[0].tolist() == pytest.approx(
        [-3.1440391169, 1.1654558324, -0.3391430827, 4.3176049728], abs=1e-9)


def test_longrope_factors_divide_frequencies_by_hand():
    # factors [2, 4] on inv_freq [1, 0.1] give [0.5, 0.025]: at position 4, angles [2, 0.1].
    cos, sin = rope_cos_sin(torch.tensor([4]), head_dim=4, theta=100.0, factors=[2.0, 4.0],
                            attention_factor=2.0)
    assert cos[0].tolist() == pytest.approx([2 * math.cos(2), 2 * math.cos(0.1)] * 2, abs=1e-12)
    assert sin[0].tolist() == pytest.approx([2 * math.sin(2), 2 * math.sin(0.1)] * 2, abs=1e-12)


def test_longrope_picks_factors_by_sequence_length_and_scales_attention(tmp_path):
    # original 8 of 32768 positions: attention factor sqrt(1 + ln 4096 / ln 8) = sqrt(1 + 4).
    path = write_checkpoint(tmp_path / "ckpt", shape="tiny", original_max_position_embeddings=8)
    auto = ReferenceMiniCPM.from_pretrained(path, dtype=torch.float64)
    short = ReferenceMiniCPM.from_pretrained(path, dtype=torch.float64, use_long_factors=False)
    long = ReferenceMiniCPM.from_pretrained(path, dtype=torch.float64, use_long_factors=True)
    cos, _ = auto.rotary_cos_sin(8)
    assert cos[0].flatten().tolist() == pytest.approx([math.sqrt(5)] * auto.head_dim)
    assert torch.equal(auto.rotary_cos_sin(8)[1], short.rotary_cos_sin(8)[1])
    assert torch.equal(auto.rotary_cos_sin(9)[1], long.rotary_cos_sin(9)[1])
    assert not torch.equal(short.rotary_cos_sin(9)[1], long.rotary_cos_sin(9)[1])


# -- (c) the oracle can fail ---------------------------------------------------------

BREAKAGES = {
    "rope_theta=20000": {"rope_theta": 20000.0},
    "ignore_longrope_factors": {"ignore_longrope_factors": True},
    "long factors on short prompts": {"use_long_factors": True},
    "no_residual_scale": {"no_residual_scale": True},
    "no_causal_mask": {"no_causal_mask": True},
}


@pytest.mark.parametrize("breakage", BREAKAGES, ids=list(BREAKAGES))
def test_each_breakage_fails_the_bar(tiny, reference, prompt_ids, breakage):
    broken = ReferenceMiniCPM.from_pretrained(tiny, dtype=torch.float64, **BREAKAGES[breakage])
    summary = _summary(reference, broken, prompt_ids)
    assert not meets_accuracy_bar(summary)
    # Not a marginal miss: predictions change, far beyond the 1 % tolerance.
    assert summary["top1_match_rate"] < 0.9, summary
    assert summary["mean_top1_prob_rel_error"] > 0.05, summary
