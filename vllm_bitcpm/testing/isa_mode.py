"""AVX2 mode: run on an AVX512 machine what an AVX2-only CPU runs, and record which ISA paths ran.

Most x86 CPUs users have (Intel client parts, AMD Zen 2/3, many cloud VMs) lack AVX512, and on
them every library picks other code: oneDNN has no bf16 matmul, ATen's vectorized kernels are
the AVX2 build, MKL runs its AVX2 sgemm, vLLM loads its ``_C_AVX2`` library (no
``cpu_gemm_wna16``, AVX2 attention), and the plugin's kernels take their AVX2 paths. Each has a
switch, set here together before any of them loads:

* ``VLLM_BITCPM_ISA=avx2``: the plugin's kernels (kernels/cpu/cpu_features.h);
* ``ATEN_CPU_CAPABILITY=avx2``: ATen's vectorized CPU kernels;
* ``ONEDNN_MAX_CPU_ISA=AVX2``: oneDNN's primitives (its bf16 matmul then fails, as on AVX2);
* ``MKL_ENABLE_INSTRUCTIONS=AVX2``: MKL's GEMMs;
* ``avx2_site/sitecustomize.py`` on ``PYTHONPATH`` (with ``VLLM_BITCPM_EMULATE_CPU=avx2``):
  ``torch.cpu._is_avx512_supported()`` and ``_is_avx512_bf16_supported()`` answer False, which
  is how vLLM chooses its ``_C`` build and CPU attention ISA.

What stays different from a real AVX2-only CPU: the core itself (an AVX512 core runs AVX2 code
at its own speed, memory bandwidth and cache sizes), and code that asks the CPU directly
(cpuid) without one of these switches. So AVX2-mode figures show which paths run and how they
compare in one run; absolute tok/s belong to an AVX2 machine.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

SITE_DIR = Path(__file__).resolve().parent / "avx2_site"

#: The environment of AVX2 mode (PYTHONPATH is added by isa_mode_env).
AVX2_ENV = {
    "VLLM_BITCPM_ISA": "avx2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "VLLM_BITCPM_EMULATE_CPU": "avx2",
}

MODES = ("native", "avx2")


def isa_mode_env(mode: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default os.environ) with the switches of ``mode`` ("native": unchanged)."""
    env = dict(os.environ if base is None else base)
    if mode == "avx2":
        env.update(AVX2_ENV)
        paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        if str(SITE_DIR) not in paths:
            env["PYTHONPATH"] = os.pathsep.join([str(SITE_DIR), *paths])
    elif mode != "native":
        raise ValueError(f"unknown ISA mode {mode!r}; expected one of {', '.join(MODES)}")
    return env


def active_mode() -> str:
    return "avx2" if os.environ.get("VLLM_BITCPM_EMULATE_CPU") == "avx2" else "native"


def ensure_mode(mode: str) -> None:
    """Re-run this script in ``mode`` unless it already runs there: the switches are read when
    torch, oneDNN and MKL load, so they must be in the environment from the process start."""
    if mode == active_mode():
        return
    env = isa_mode_env(mode)
    print(f"restarting in ISA mode {mode!r}", flush=True)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def _loaded_vllm_c_library() -> str | None:
    """Which of vLLM's ``_C`` builds this process loaded (``_C``, ``_C_AVX512``, ``_C_AVX2``)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return None
    names = {line.rsplit("/", 1)[-1].split(".", 1)[0] for line in maps.read_text().splitlines() if "/vllm/_C" in line}
    return ",".join(sorted(names)) or None


def _vllm_platform_class() -> str | None:
    if "vllm" not in sys.modules:
        return None
    from vllm.platforms import current_platform

    return type(current_platform).__name__


def isa_paths() -> dict[str, Any]:
    """The ISA paths this process actually runs, for benchmark JSON: ATen's capability, the
    caps in the environment, the plugin's kernels (where this process loaded them: never in a
    stock engine) and vLLM's ``_C`` build where loaded."""
    import torch

    info: dict[str, Any] = {
        "isa_mode": active_mode(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
        "mkl_enable_instructions": os.environ.get("MKL_ENABLE_INSTRUCTIONS"),
        "torch_sees_avx512": bool(torch.cpu._is_avx512_supported()),
        "torch_sees_avx512_bf16": bool(torch.cpu._is_avx512_bf16_supported()),
        # CpuPlatform, or ZenCpuPlatform (dense layers through zentorch) where vLLM took it
        "vllm_platform": _vllm_platform_class(),
    }
    if "vllm_bitcpm.ops" not in sys.modules:  # a stock engine: the plugin's kernels never loaded
        info["vllm_c_library"] = _loaded_vllm_c_library()
        return info
    from vllm_bitcpm.ops import cpu as cpu_kernel

    info["bitcpm_kernel_isa"] = cpu_kernel.ISA
    info["bitcpm_cpu_isa_uncapped"] = cpu_kernel.CPU_ISA
    if cpu_kernel.AVAILABLE:
        info["bitcpm_bf16_gemv_isa"] = str(torch.ops.bitcpm_cpu.bf16_gemv_isa())
        info["bitcpm_int8_gemv_isa"] = str(torch.ops.bitcpm_cpu.int8_gemv_isa())
    info["vllm_c_library"] = _loaded_vllm_c_library()
    return info
