"""Load the C++ CPU kernel of ``bitcpm::ternary_linear`` (built from ``kernels/cpu/``).

Importing the compiled module ``vllm_bitcpm._cpu_kernels`` runs its
``TORCH_LIBRARY_IMPL(bitcpm, CPU, m)`` registration, after which CPU tensors dispatch to it
instead of the composite PyTorch reference. It also defines ``torch.ops.bitcpm_cpu`` helpers
for tests and benchmarks: ``isa_available()``, ``current_isa()`` and
``ternary_linear_isa(..., isa)`` (force the "scalar", "avx2" or "avx512" path).

The instruction set is picked at run time from what the running CPU supports. When the
extension was not built (no torch at build time, or a build failure), import still succeeds
and the reference is used; either way the choice is logged once.
"""

from __future__ import annotations

import logging

from vllm_bitcpm.ops import reference

logger = logging.getLogger("vllm.bitcpm")

AVAILABLE = False
ISA: str | None = None
_logged = False

try:
    from vllm_bitcpm import _cpu_kernels  # noqa: F401  (import registers the kernels)

    import torch

    ISA = str(torch.ops.bitcpm_cpu.current_isa())
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
        logger.info("bitcpm: CPU ternary kernel loaded (ISA path: %s)", ISA)
    else:
        logger.info(
            "bitcpm: CPU ternary kernel not built (%s); CPU uses the PyTorch reference",
            _load_error,
        )


_log_once()
