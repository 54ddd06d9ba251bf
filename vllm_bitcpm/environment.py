"""The plugin's ``VLLM_BITCPM_*`` environment variables, declared to vLLM.

vLLM checks every ``VLLM_*`` variable against its own table (``vllm.envs.environment_variables``):
one it does not know draws "Unknown vLLM environment variable detected" at every engine start,
and is refused outright under ``--fail-on-environ-validation``. The same table is the
environment part of vLLM's torch.compile cache key (``vllm.envs.compile_factors``). Ours change
the compiled graph (the activation mode is a constant argument of every ternary op, the backend
and the fused CPU ops change which ops are in it), so an undeclared variable would let a cache
compiled in one mode be loaded in another. Declaring them gives each setting its own cache and
no warning. Each name stays defined next to the code that reads it; this module only lists them.
"""

from __future__ import annotations

import functools
import os

#: vllm_bitcpm/ops/npu.py's WEIGHT_FORMAT_ENV, named here because importing that module imports
#: torch_npu, which register() must not do in every process (tests check the two agree).
NPU_WEIGHT_FORMAT = "VLLM_BITCPM_NPU_WEIGHT"

#: Read by tests and build scripts, not by the running plugin, but set in users' shells too.
TESTING_AND_BUILD_VARIABLES = (
    "VLLM_BITCPM_EMULATE_CPU",  # vllm_bitcpm/testing/: AVX2 mode (isa_mode.py), an AVX512 Zen (zentorch_site.py)
    "VLLM_BITCPM_NO_CPU_KERNEL",  # setup.py: install without building the CPU kernel
)


def plugin_variables() -> tuple[str, ...]:
    """Every ``VLLM_BITCPM_*`` name the package reads, runtime ones first."""
    from vllm_bitcpm import backends, cpu_fused, lm_head, quantization
    from vllm_bitcpm.ops import cpu

    runtime = (quantization.ACTIVATIONS_ENV, lm_head.LM_HEAD_ENV, backends.BACKEND_ENV, cpu.ISA_ENV,
               cpu_fused.FUSED_ENV, NPU_WEIGHT_FORMAT)
    return runtime + TESTING_AND_BUILD_VARIABLES


def declare_to_vllm() -> None:
    """Add our variables to vLLM's table (values read when vLLM asks; unset reads as None)."""
    from vllm import envs

    for name in plugin_variables():
        envs.environment_variables.setdefault(name, functools.partial(os.environ.get, name))
