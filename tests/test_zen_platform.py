"""vLLM's ZenCpuPlatform (AMD Zen CPUs with zentorch installed): the plugin keeps working under it.

vLLM takes ZenCpuPlatform where zentorch imports and /proc/cpuinfo says AuthenticAMD with avx512;
stock's dense layers then run through ``zentorch_linear_unary`` on prepacked weights. Where the
suite's CPU is not such a one, the engine child answers that check as one would
(vllm_bitcpm/testing/zen_site/): zentorch, vLLM's platform and the engine are real.
"""

from __future__ import annotations

import platform

import pytest

from tests.conftest import FIGURES, LOGPROBS, MAX_TOKENS
from tests.test_engine import _next_token_summary, _outputs
from vllm_bitcpm.testing import accuracy, zentorch_site
from vllm_bitcpm.testing.sidebyside import EngineJob, run_engine_jobs

pytestmark = pytest.mark.skipif(
    platform.machine() != "x86_64" or not zentorch_site.installed(),
    reason=f"zentorch is not installed in {zentorch_site.SITE_DIR} (scripts/setup-cpu.sh, x86_64 only)")

def _zen_run(checkpoint_dir, prompt_ids, dtype="bfloat16", **extra_env) -> dict:
    job = EngineJob(model=str(checkpoint_dir / "per_row"), prompts=prompt_ids, max_tokens=MAX_TOKENS,
                    logprobs=LOGPROBS, dtype=dtype)
    (run,) = run_engine_jobs([job], plugin=True, extra_env={**zentorch_site.emulated_zen_env(), **extra_env})
    assert "error" not in run, run["error"] + "\n" + run["log"][-4000:]
    assert [w["vllm_platform"] for w in run["isa_paths"]] == ["ZenCpuPlatform"], run["isa_paths"]
    return run


def test_plugin_under_zen_platform_decodes_as_under_the_cpu_platform(checkpoint_dir, prompt_ids, plugin_runs):
    """The ternary layers, norms, RoPE and the decode head are the plugin's own kernels on both
    platforms: the same greedy tokens and log-probs, bit for bit."""
    run = _zen_run(checkpoint_dir, prompt_ids)
    (layers,) = run["layers"]
    assert layers["packed_layers"] > 0 and layers["dense_layers"] == 0
    assert _outputs(run) == _outputs(plugin_runs["bf16"])


def test_zentorch_head_under_the_plugin_matches_the_float64_reference(checkpoint_dir, prompt_ids, reference_logits):
    """With the plugin's fused CPU ops off, the head is stock's layer, which ZenCpuPlatform runs
    through zentorch_linear_unary on a prepacked copy. float32: zentorch's bf16 matmul needs
    AVX512-BF16 (which every CPU vLLM gives this platform has, and this suite's may lack)."""
    run = _zen_run(checkpoint_dir, prompt_ids, dtype="float32", VLLM_BITCPM_FUSED_CPU_OPS="0",
                   VLLM_LOGGING_LEVEL="DEBUG")
    assert "using zentorch_linear_unary" in run["log"], run["log"][-4000:]
    summary = _next_token_summary(run, reference_logits["per_row"])
    FIGURES.append(f"ZenCpuPlatform (zentorch head), plugin float32 vs float64: top-1 "
                   f"{summary['top1_match_rate']:.0%} / overlap {summary['mean_top10_overlap']:.2f}")
    assert accuracy.meets_accuracy_bar(summary), accuracy.bar_failures(summary)
