"""Engine modes beyond the eager single-process default: tensor parallel and torch.compile."""

from __future__ import annotations

import os

import pytest

from vllm_bitcpm.ops import cpu as cpu_kernel
from vllm_bitcpm.testing.sidebyside import EngineJob, run_engine_jobs
from vllm_bitcpm.testing import isa_mode
from tests.conftest import FIGURES, LOGPROBS, MAX_TOKENS
from tests.test_engine import _outputs, compare_greedy


def _per_row_job(checkpoint_dir, prompt_ids, **overrides) -> EngineJob:
    return EngineJob(model=str(checkpoint_dir / "per_row"), prompts=prompt_ids,
                     max_tokens=MAX_TOKENS, logprobs=LOGPROBS, **overrides)


def test_tensor_parallel_2_gives_the_same_greedy_tokens(checkpoint_dir, prompt_ids, plugin_runs):
    """TP=2 over vLLM's gloo backend on CPU: each rank detects and packs its own shard."""
    (run,) = run_engine_jobs(
        [_per_row_job(checkpoint_dir, prompt_ids, tensor_parallel_size=2)],
        plugin=True,
        # vLLM's CPU workers need explicit cores when there are fewer NUMA nodes than ranks.
        extra_env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"},
    )
    identical, excused, failures = compare_greedy(plugin_runs["per_row"], run)
    FIGURES.append(f"TP=2 vs TP=1: {identical}/{len(prompt_ids)} identical, {excused} near-ties excused")
    assert not failures, failures
    assert len(run["layers"]) == 2
    for rank in run["layers"]:
        assert rank["dense_layers"] == 0 and rank["packed_layers"] > 0
    assert run["layers"][0]["packed_bytes"] < plugin_runs["per_row"]["layers"][0]["packed_bytes"]


def test_torch_compile_mode_traces_the_op(checkpoint_dir, prompt_ids, plugin_runs, tmp_path):
    """vLLM's default (compiled) mode, with a fresh compile cache so the graph is really built."""
    (run,) = run_engine_jobs(
        [_per_row_job(checkpoint_dir, prompt_ids, llm_kwargs={"enforce_eager": False})],
        plugin=True,
        extra_env={"VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache")},
    )
    assert "Warming up model for the compilation" in run["log"]
    identical, excused, failures = compare_greedy(plugin_runs["per_row"], run)
    FIGURES.append(f"compiled vs eager: {identical}/{len(prompt_ids)} identical, {excused} near-ties excused")
    assert not failures, failures
    assert len(_outputs(run)) == len(prompt_ids)


def test_torch_compile_in_avx2_mode_matches_eager(checkpoint_dir, prompt_ids, plugin_runs, tmp_path):
    """Compiled engine with every library on its AVX2 paths (what an AVX2-only CPU runs): inductor
    generates AVX2 code around the plugin's AVX2 kernels and must still give the eager tokens."""
    if not cpu_kernel.AVAILABLE or "avx2" not in cpu_kernel.isa_available():
        pytest.skip("needs the CPU kernel and an AVX2 CPU")
    avx2_env = {k: v for k, v in isa_mode.isa_mode_env("avx2").items() if os.environ.get(k) != v}
    (run,) = run_engine_jobs(
        [_per_row_job(checkpoint_dir, prompt_ids, llm_kwargs={"enforce_eager": False})],
        plugin=True,
        extra_env={**avx2_env, "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache"),
                   "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor-cache")},
    )
    assert "Warming up model for the compilation" in run["log"]
    (paths,) = run["isa_paths"]  # one worker
    assert paths["bitcpm_kernel_isa"] == "avx2" and paths["aten_cpu_capability"] == "AVX2", paths
    assert paths["vllm_c_library"] == "_C_AVX2", paths
    identical, excused, failures = compare_greedy(plugin_runs["per_row"], run)
    FIGURES.append(f"compiled (AVX2 mode) vs eager: {identical}/{len(prompt_ids)} identical, {excused} near-ties excused")
    assert not failures, failures
    assert len(_outputs(run)) == len(prompt_ids)
