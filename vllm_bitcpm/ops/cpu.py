"""Load the C++ CPU kernel of ``bitcpm::ternary_linear`` (built from ``kernels/cpu/``).

Importing the compiled module ``vllm_bitcpm._cpu_kernels`` runs its
``TORCH_LIBRARY_IMPL(bitcpm, CPU, m)`` registration, after which CPU tensors dispatch to it
instead of the composite PyTorch reference. It also defines ``torch.ops.bitcpm_cpu`` helpers
for tests and benchmarks: ``isa_available()``, ``current_isa()`` and
``ternary_linear_isa(..., isa)`` (force a path: "scalar", "avx2", "avx512", "avx512bf16" on
x86, "neon", "neon-dotprod" on aarch64).

The instruction set is picked at run time from what the running CPU supports, capped by
``VLLM_BITCPM_ISA`` (``auto``, ``scalar`` and this architecture's paths: ``avx512bf16``,
``avx512``, ``avx2`` on x86, ``neon-dotprod``, ``neon`` on aarch64) so that an AVX512 machine can
run, test and time what an AVX2-only CPU runs. When the
extension was not built (no torch at build time, or a build failure), import still succeeds
and the reference is used; either way the choice is logged once. Where the best path is
"scalar" (x86 without AVX2; ppc64le, s390x) the kernel loads, but
``VLLM_BITCPM_BACKEND=auto`` does not give it layers (vllm_bitcpm/backends.py).
"""

from __future__ import annotations

import logging
import os
import platform

from vllm_bitcpm.ops import reference

logger = logging.getLogger("vllm.bitcpm")

#: Caps the kernels' ISA paths (read once per process by the C++ side, kernels/cpu/cpu_features.h).
ISA_ENV = "VLLM_BITCPM_ISA"
#: The SIMD paths per architecture, best first (kernels/cpu/: x86 in rows_avx2.cpp, rows_avx512.cpp,
#: rows_avx512bf16.cpp, aarch64 in rows_neon.cpp); every CPU also has "scalar" (rows_scalar.cpp).
X86_ISAS = ("avx512bf16", "avx512", "avx2")
ARM64_ISAS = ("neon-dotprod", "neon")
ISA_CHOICES = ("auto", *X86_ISAS, *ARM64_ISAS, "scalar")


def machine_isas(machine: str | None = None) -> tuple[str, ...]:
    """The SIMD path names of ``machine`` (``platform.machine()`` by default); () where there are none."""
    machine = (machine or platform.machine()).lower()
    if machine in ("x86_64", "amd64", "i386", "i686"):
        return X86_ISAS
    if machine in ("aarch64", "arm64"):
        return ARM64_ISAS
    return ()


def isa_cap() -> str:
    """The value of ``VLLM_BITCPM_ISA`` (``auto`` when unset); a clear error for anything else,
    including the paths of another architecture (a cap the kernels would otherwise ignore)."""
    value = os.environ.get(ISA_ENV) or "auto"
    if value not in ISA_CHOICES:
        raise ValueError(f"bitcpm: {ISA_ENV}={value!r}; expected one of {', '.join(ISA_CHOICES)}")
    here = ("auto", *machine_isas(), "scalar")
    if value not in here:
        raise ValueError(f"bitcpm: {ISA_ENV}={value!r} names a path of another architecture; on this "
                         f"{platform.machine()} CPU it takes one of {', '.join(here)}")
    return value


isa_cap()  # before the kernels read it

AVAILABLE = False
ISA: str | None = None
CPU_ISA: str | None = None  # what the CPU supports, before the cap
_logged = False

try:
    from vllm_bitcpm import _cpu_kernels  # noqa: F401  (import registers the kernels)

    import torch

    ISA = str(torch.ops.bitcpm_cpu.current_isa())
    CPU_ISA = str(torch.ops.bitcpm_cpu.cpu_isa())
    AVAILABLE = True
except Exception as exc:  # noqa: BLE001 - a missing or broken build must not break the import
    _load_error: Exception | None = exc
else:
    _load_error = None


def isa_available() -> list[str]:
    """ISA paths the running CPU can execute (always includes "scalar" when the kernel is built)."""
    if not AVAILABLE:
        return []
    import torch

    return list(torch.ops.bitcpm_cpu.isa_available())


def _log_once() -> None:
    global _logged
    if _logged:
        return
    _logged = True
    if AVAILABLE:
        # The CPU kernel takes precedence over the composite reference for CPU tensors, so the
        # reference's "no native kernel" warning must not fire for CPU.
        reference._warned_devices.add("cpu")
        if ISA != CPU_ISA:
            logger.info("bitcpm: CPU ternary kernel loaded (ISA path: %s, capped by %s=%s; this CPU: %s)",
                        ISA, ISA_ENV, isa_cap(), CPU_ISA)
        else:
            logger.info("bitcpm: CPU ternary kernel loaded (ISA path: %s)", ISA)
        if ISA == "scalar":
            logger.info("bitcpm: the CPU kernel has only scalar loops here, so VLLM_BITCPM_BACKEND=auto leaves "
                        "ternary layers to vLLM's int4 kernel or stock's dense layers (=native runs the loops)")
    else:
        logger.info(
            "bitcpm: CPU ternary kernel not built (%s); CPU uses the PyTorch reference "
            "(`pip install -v` shows why the build was skipped or failed)",
            _load_error,
        )


_log_once()
