"""The plugin's one op, ``torch.ops.bitcpm.ternary_linear``: y = x @ dequant(codes, scales).T + bias.

Every ternary linear layer on the native backend calls this op and nothing else, so each platform plugs in by
registering a kernel for its dispatch key; the layer code never changes.

Kernels, by dispatch key:

* ``CompositeExplicitAutograd`` (every device): :mod:`vllm_bitcpm.ops.reference`, plain
  vectorized PyTorch, the oracle's twin. Serving never lands here by accident: a layer on a
  device without a native kernel is given vLLM's int4 kernel or kept dense
  (:mod:`vllm_bitcpm.backends`); this runs only when asked for (``VLLM_BITCPM_BACKEND=reference``)
  or called directly, and says so once in the log.
* ``CPU``: the C++ kernel built from ``kernels/cpu/`` registers here with
  ``TORCH_LIBRARY_IMPL(bitcpm, CPU, m)`` when it is built (a backend kernel takes precedence
  over the composite one). :mod:`vllm_bitcpm.ops.cpu` loads it (imported at the end of this
  module, after the op is defined) and logs once which ISA path (scalar/avx2/avx512) runs.
* ``PrivateUse1`` (Ascend NPU, renamed "npu" by torch_npu): the slot for the NPU kernel — the
  AscendC op from ``kernels/ascend/`` or a torch_npu composition registered with
  ``torch.library.impl("bitcpm::ternary_linear", "PrivateUse1")`` when torch_npu imports.
* ``Meta``/fake: shape-only implementation so torch.compile (vLLM's default mode) traces it.

Schema::

    ternary_linear(Tensor x, Tensor codes, Tensor scales, int group_size, Tensor? bias=None,
                   str activations="exact") -> Tensor

``x`` is (..., K) in float32/float16/bfloat16; ``codes`` uint8 (N, ceil(K/128)*32) and
``scales`` (N, ceil(K/group_size)) follow :mod:`vllm_bitcpm.ternary`'s packed layout version 1.
``activations``: ``"exact"`` (float activations: the dense layer up to summation order),
``"int8"`` (W1.58A8: per-token absmax int8 activations, bitnet.cpp's I2_S math) or ``"int16"``
(per-token absmax int16: integer dot products at about the precision of bf16 activations), see
:func:`reference.quantize_activations`.
"""

from __future__ import annotations

import torch

from vllm_bitcpm.ops import reference

OP_NAMESPACE = "bitcpm"
OP_NAME = "ternary_linear"
SCHEMA = (
    "ternary_linear(Tensor x, Tensor codes, Tensor scales, int group_size, Tensor? bias=None, "
    'str activations="exact") -> Tensor'
)


def _define() -> None:
    """Define the op once per process (re-imports and reloads must not redefine it)."""
    if hasattr(torch.ops, OP_NAMESPACE) and hasattr(getattr(torch.ops, OP_NAMESPACE), OP_NAME):
        return
    lib = torch.library.Library(OP_NAMESPACE, "FRAGMENT")
    lib.define(SCHEMA)
    lib.impl(OP_NAME, reference.ternary_linear_fallback, "CompositeExplicitAutograd")
    torch.library.register_fake(f"{OP_NAMESPACE}::{OP_NAME}", reference.ternary_linear_fake, lib=lib)
    _LIBRARIES.append(lib)  # a Library deregisters its ops when garbage-collected


_LIBRARIES: list[torch.library.Library] = []
_define()


def ternary_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    activations: str = "exact",
) -> torch.Tensor:
    """Call the op through the dispatcher (picks the device's kernel)."""
    return torch.ops.bitcpm.ternary_linear(x, codes, scales, group_size, bias, activations)


from vllm_bitcpm.ops import cpu as _cpu  # noqa: E402,F401  (registers the CPU kernel if built)
