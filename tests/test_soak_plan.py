"""The soak's request plan and its judge of outcomes (vllm_bitcpm.testing.soak_plan), on hand-written
results: the end-to-end soak (tests/test_benchmarks.py::test_soak_short) only meets the cases a run
happens to produce, and a wrong judge would miscount lost requests as served."""

from __future__ import annotations

import pytest

from vllm_bitcpm.testing import soak_plan as sp

GOOD = {"phase": "mix", "kind": "good", "expected_tokens": 8}

#: (result fields, outcome), each written out by hand from the module docstring's definitions.
CASES = [
    ({**GOOD, "status": 200, "tokens": 8, "done": True}, "completed"),
    ({**GOOD, "status": 200, "tokens": 7, "done": True}, "failed"),  # short in the mix: a wrong answer
    ({**GOOD, "status": 200, "tokens": 8, "done": False}, "failed"),  # stream without [DONE]
    ({**GOOD, "status": 200, "tokens": 8, "done": True, "stream_errors": ["x"]}, "failed"),
    ({**GOOD, "status": 200, "tokens": 8, "done": True, "logprobs_ok": False}, "failed"),
    ({**GOOD, "status": None, "timed_out": False}, "lost"),  # no answer outside a shutdown
    ({**GOOD, "status": 500, "tokens": None}, "failed"),
    ({**GOOD, "phase": "shutdown", "status": None, "timed_out": False}, "cut_by_shutdown"),  # connection closed
    ({**GOOD, "phase": "shutdown", "status": None, "timed_out": True}, "lost"),  # a client left hanging
    ({**GOOD, "phase": "shutdown", "status": 200, "tokens": 3, "done": False}, "cut_by_shutdown"),
    ({**GOOD, "phase": "shutdown", "status": 500}, "cut_by_shutdown"),
    ({**GOOD, "phase": "shutdown", "status": 200, "tokens": 8, "done": True}, "completed"),
    ({"phase": "mix", "kind": "bad_json", "status": 400}, "rejected_4xx"),
    ({"phase": "mix", "kind": "unknown_model", "status": 404}, "rejected_4xx"),
    ({"phase": "mix", "kind": "negative_max_tokens", "status": 200, "tokens": 1, "done": True}, "failed"),
    ({"phase": "mix", "kind": "prompt_too_long", "status": 500}, "failed"),
    ({"phase": "mix", "kind": "client_abort", "status": 200, "aborted": True, "expected_tokens": 64},
     "aborted_by_client"),
    ({"phase": "mix", "kind": "client_abort", "status": 200, "tokens": 64, "done": True, "expected_tokens": 64},
     "completed"),  # finished before the client hung up
]


@pytest.mark.parametrize(("result", "outcome"), CASES)
def test_judge(result, outcome):
    assert sp.judge(result) == outcome


def test_plan_is_seeded_covers_every_bad_kind_and_places_the_edge_cases():
    first, again, other = sp.plan(300, 0.2, seed=3), sp.plan(300, 0.2, seed=3), sp.plan(300, 0.2, seed=4)
    assert first == again and first != other
    kinds = [r["kind"] for r in first]
    assert set(sp.BAD_KINDS) <= set(kinds) and "client_abort" in kinds
    assert all(kinds.count(k) == 3 for k in sp.EXTREME_KINDS)
    clamped = next(r for r in first if r["kind"] == "past_context_clamped")
    # one token past the context: vLLM serves what is left of it
    assert clamped["prompt_tokens"] + clamped["max_tokens"] == sp.MAX_MODEL_LEN + 1
    assert clamped["expected_tokens"] == sp.MAX_MODEL_LEN - sp.EDGE_PROMPT_TOKENS
    assert all(r["expected_tokens"] == r["max_tokens"] for r in first
               if "max_tokens" in r and r["kind"] != "past_context_clamped")
