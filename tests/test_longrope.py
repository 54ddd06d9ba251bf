"""LongRoPE past original_max_position_embeddings: vLLM + plugin against the float64 reference.

BitCPM4 ships original == max (32768), where only the short factors ever apply (covered by every
engine test). Here the checkpoint's original context is 64 tokens and the engine's max_model_len
256, so vLLM switches to the long factors and the attention factor sqrt(1 + ln(s)/ln(orig)) for
the whole engine (vLLM chooses per engine, not per sequence; the reference's use_long_factors
mirrors that). The short-factor reference must then disagree, or the check could not fail.
"""

from __future__ import annotations

import random

import pytest

from vllm_bitcpm.testing import accuracy, synthetic
from vllm_bitcpm.testing.reference_model import ReferenceMiniCPM
from vllm_bitcpm.testing.sidebyside import EngineJob, run_engine_jobs
from tests.conftest import FIGURES
from tests.test_engine import _outputs

ORIGINAL_CONTEXT = 64


@pytest.fixture(scope="module")
def long_context(tmp_path_factory):
    path = synthetic.write_checkpoint(tmp_path_factory.mktemp("longrope") / "tiny", shape="tiny",
                                      original_max_position_embeddings=ORIGINAL_CONTEXT)
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, 1000) for _ in range(length - 1)] for length in (100, 150, 200, 240)]
    (run,) = run_engine_jobs([EngineJob(model=str(path), prompts=prompts, max_tokens=1, logprobs=10,
                                        llm_kwargs={"max_model_len": 256})], plugin=True)
    return path, prompts, run


def _summary(path, prompts, run, use_long_factors):
    reference = ReferenceMiniCPM.from_pretrained(path, use_long_factors=use_long_factors)
    return accuracy.summarize([
        accuracy.compare_next_token(reference.next_token_logits(ids),
                                    {int(t): lp for t, lp in out["logprobs"][0].items()})
        for ids, out in zip(prompts, _outputs(run))
    ])


def test_long_positions_match_the_long_factor_reference(long_context):
    summary = _summary(*long_context, use_long_factors=True)
    FIGURES.append(f"LongRoPE long factors, prompts of 100-240 tokens (original context {ORIGINAL_CONTEXT}): "
                   f"top-1 {summary['top1_match_rate']:.0%}, mean top-10 overlap {summary['mean_top10_overlap']:.2f}, "
                   f"mean top-1 prob rel error {summary['mean_top1_prob_rel_error']:.4%}")
    assert accuracy.meets_accuracy_bar(summary), accuracy.bar_failures(summary)


def test_short_factor_reference_is_told_apart(long_context):
    assert not accuracy.meets_accuracy_bar(_summary(*long_context, use_long_factors=False))
