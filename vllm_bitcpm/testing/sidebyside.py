"""Run the same workload through stock vLLM and through vLLM with this plugin, side by side.

Plugins register process-wide (model registry, quantization methods), so stock and plugin runs
cannot share a process. Each :func:`run_engine_jobs` call starts one child process
(``python -m vllm_bitcpm.testing.sidebyside``) with ``VLLM_PLUGINS`` set to enable or disable the
plugin; the child runs every job with the real ``vllm.LLM`` engine, in-process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, a small KV cache) so each engine starts in seconds, and
returns tokens, per-step top-k logprobs and what the plugin did to the linear layers.
Tests, the demo and the benchmarks share it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Any

PLUGIN_NAME = "bitcpm"
_RESULT_MARKER = "BITCPM_SIDEBYSIDE_RESULT "


@dataclasses.dataclass
class EngineJob:
    """One engine start and the prompts it generates for (greedy)."""

    model: str
    prompts: list[list[int]]  # token ids, so stock and plugin see identical inputs
    max_tokens: int = 32
    logprobs: int = 10
    dtype: str = "float32"
    quantization: str | None = None
    tensor_parallel_size: int = 1
    trust_remote_code: bool = False
    llm_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


def default_llm_kwargs() -> dict[str, Any]:
    """Small-machine engine settings: eager, small KV cache, no RAM-share check."""
    return {
        "enforce_eager": True,
        "kv_cache_memory_bytes": 128 * 1024 * 1024,
        "gpu_memory_utilization": 0.05,
        "max_model_len": 2048,
        "seed": 0,
    }


def child_env(plugin: bool, extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of an engine child: plugin on or off, engine in-process unless told otherwise.
    ``extra_env`` wins, except that its PYTHONPATH goes in front of the inherited one."""
    env = dict(os.environ)
    env["VLLM_PLUGINS"] = PLUGIN_NAME if plugin else ""
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    extra = dict(extra_env or {})
    if "PYTHONPATH" in extra:
        paths = [p for p in (extra.pop("PYTHONPATH"), env.get("PYTHONPATH", "")) if p]
        env["PYTHONPATH"] = os.pathsep.join(paths)
    env.update(extra)
    return env


def run_child(
    argv: list[str], payload: Any, plugin: bool, timeout: float = 900,
    extra_env: dict[str, str] | None = None,
) -> tuple[Any, str]:
    """Run ``argv`` (a Python child that ends with :func:`emit_result`) with ``payload`` as
    JSON on stdin; return its result and its whole log (vLLM logs to stdout)."""
    proc = subprocess.run(
        argv, input=json.dumps(payload), capture_output=True, text=True,
        env=child_env(plugin, extra_env), timeout=timeout,
    )
    log = proc.stdout + proc.stderr
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT_MARKER):
            return json.loads(line[len(_RESULT_MARKER):]), log
    raise RuntimeError(f"engine child exited with {proc.returncode} and no result\n--- log ---\n{log[-8000:]}")


def read_payload() -> Any:
    return json.loads(sys.stdin.read())


def emit_result(result: Any) -> None:
    sys.stdout.write("\n" + _RESULT_MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()


def run_engine_jobs(
    jobs: list[EngineJob], plugin: bool, timeout: float = 900, extra_env: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """Run ``jobs`` in a fresh process with the plugin enabled or disabled; one result per job.

    A job that fails reports ``{"error": "<Type>: <message>"}`` instead of outputs, so callers
    can assert on the message users would see.
    """
    results, log = run_child(
        [sys.executable, "-m", "vllm_bitcpm.testing.sidebyside"],
        [dataclasses.asdict(job) for job in jobs], plugin, timeout, extra_env,
    )
    for result in results:
        result["log"] = log
    return results


# --------------------------------------------------------------------------------------------
# Child side


def inspect_linear_layers(model) -> dict[str, Any]:
    """Count packed vs dense linear layers and their weight bytes (runs inside the worker)."""
    import torch
    from vllm.model_executor.layers.linear import LinearBase

    packed, dense, packed_bytes, dense_bytes, packed_weights = 0, 0, 0, 0, 0
    for module in model.modules():
        if not isinstance(module, LinearBase):
            continue
        # ReplicatedLinear (e.g. MiniCPM3's q_a_proj) has no *_per_partition sizes.
        in_features = getattr(module, "input_size_per_partition", module.input_size)
        out_features = getattr(module, "output_size_per_partition", module.output_size)
        low_bit = {"native": ("weight_codes", "weight_scales"), "reference": ("weight_codes", "weight_scales"),
                   "int4": ("qweight", "scales")}.get(getattr(module, "bitcpm_backend", None))
        if low_bit:
            packed += 1
            packed_bytes += sum(getattr(module, n).numel() * getattr(module, n).element_size() for n in low_bit)
            packed_weights += out_features * in_features
        else:
            # vLLM's CPU GEMM dispatch moves dense weights into oneDNN handles, so count their
            # logical size rather than the (emptied) parameter.
            dense += 1
            itemsize = torch.empty((), dtype=module.params_dtype).element_size()
            dense_bytes += out_features * in_features * itemsize
    return {
        "packed_layers": packed,
        "dense_layers": dense,
        "packed_bytes": packed_bytes,
        "dense_bytes": dense_bytes,
        "bits_per_packed_weight": 8.0 * packed_bytes / packed_weights if packed_weights else None,
    }


def worker_isa_paths(model) -> dict[str, Any]:
    """The ISA paths the worker holding ``model`` runs (vllm_bitcpm.testing.isa_mode.isa_paths)."""
    from vllm_bitcpm.testing.isa_mode import isa_paths

    return isa_paths()


def _run_job(job: dict[str, Any]) -> dict[str, Any]:
    import gc

    from vllm import LLM, SamplingParams

    kwargs = default_llm_kwargs()
    kwargs.update(job["llm_kwargs"])
    started = time.perf_counter()
    try:
        llm = LLM(
            model=job["model"],
            dtype=job["dtype"],
            quantization=job["quantization"],
            tensor_parallel_size=job["tensor_parallel_size"],
            trust_remote_code=job["trust_remote_code"],
            **kwargs,
        )
    except Exception as err:  # noqa: BLE001 - reported to the caller, who asserts on it
        return {"error": f"{type(err).__name__}: {err}"}
    load_seconds = time.perf_counter() - started
    params = SamplingParams(
        max_tokens=job["max_tokens"], temperature=0.0, logprobs=job["logprobs"], ignore_eos=True
    )
    requests = [{"prompt_token_ids": ids} for ids in job["prompts"]]
    started = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    generate_seconds = time.perf_counter() - started
    results = []
    for out in outputs:
        completion = out.outputs[0]
        steps = [
            {str(tok): lp.logprob for tok, lp in step.items()} for step in (completion.logprobs or [])
        ]
        results.append({"token_ids": list(completion.token_ids), "logprobs": steps})
    layers = llm.apply_model(inspect_linear_layers)
    isa = llm.apply_model(worker_isa_paths)
    del llm
    gc.collect()
    return {
        "outputs": results,
        "layers": layers,
        "isa_paths": isa,
        "load_seconds": load_seconds,
        "generate_seconds": generate_seconds,
    }


if __name__ == "__main__":
    emit_result([_run_job(job) for job in read_payload()])
