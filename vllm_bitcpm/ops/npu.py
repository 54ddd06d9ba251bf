"""Ascend NPU implementation of ``bitcpm::ternary_linear``: AscendC kernel or torch_npu composition.

Two kernels, picked once per process and logged once:

* ``ascendc`` — the native 2-bit kernel from ``kernels/ascend/`` (``vllm_bitcpm._ascend_kernels``,
  built only where CANN is installed). It reads packed layout v1 directly and registers itself
  for PrivateUse1 with ``TORCH_LIBRARY_IMPL``, so layers keep their codes and call the op.
* ``torch_npu`` — CANN's weight-only quantized matmul, ``torch_npu.npu_weight_quant_batchmatmul``.
  Its weight formats are not ours, so each ternary layer is converted ONCE at load
  (:func:`prepare_layer`) to what it takes: ternary values are exact int4/int8 integers, and
  ``(w + 0) * scale`` is exactly the checkpoint's weight.

  ========================  ==============================  =====================================
  SoC                       weight                          antiquant_scale (activation dtype)
  ========================  ==============================  =====================================
  A2/A3 (910B/910C), N%8=0  int32 (K, N/8) from             (N,) per tensor/row, or
                            ``npu_convert_weight_to_int4pack``  (ceil(K/g), N) per group of g
  A2/A3, N%8 != 0           int8 (K, N)                     as above
  310P                      int8 (K, N)                     (N,) only: 310P has no per-group
                                                            dequant, so per-group layers fall
                                                            back to a dense (K, N) weight (logged)
  ========================  ==============================  =====================================

  float32 models also use the dense fallback (the op takes fp16/bf16 activations only). The
  same composition is registered for PrivateUse1 so direct op calls on NPU tensors work; it
  converts on every call, which is why layers convert once instead.

Nothing here runs at import on a machine without ``torch_npu``: the import always succeeds.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import torch

from vllm_bitcpm import ternary
from vllm_bitcpm.ops import reference

logger = logging.getLogger("vllm.bitcpm")

try:  # torch_npu needs CANN to import; anything else means "not an Ascend host"
    import torch_npu
except Exception:  # noqa: BLE001
    torch_npu = None

#: Force a weight format ("int4", "int8", "dense") instead of choosing from the SoC.
WEIGHT_FORMAT_ENV = "VLLM_BITCPM_NPU_WEIGHT"
WEIGHT_FORMATS = ("int4", "int8", "dense")
INT4_PER_INT32 = 8
NPU_ACTIVATION_DTYPES = (torch.float16, torch.bfloat16)

#: SoC version ranges reported by ``torch_npu.npu.get_soc_version()`` (as vLLM-Ascend reads them).
_SOC_FAMILIES = (((200, 205), "310p"), ((220, 225), "a2"), ((250, 255), "a3"), ((260, 260), "a5"))

KERNEL: str | None = None  # "ascendc" | "torch_npu" | None (no torch_npu)
_load_error: Exception | None = None
_logged: set[str] = set()
_LIBRARIES: list[torch.library.Library] = []


@dataclasses.dataclass
class NpuTernaryWeights:
    """One layer's weight in the form ``npu_weight_quant_batchmatmul`` takes, made once at load."""

    weight: torch.Tensor  # int32 (K, N/8) int4-pack | int8 (K, N) | dense (K, N) in `dtype`
    scale: torch.Tensor | None  # (N,) or (ceil(K/g), N) in the activation dtype; None for dense
    group_size: int  # antiquant_group_size: 0 = per channel
    fmt: str  # "int4" | "int8" | "dense"
    in_features: int
    out_features: int

    def nbytes(self) -> int:
        total = self.weight.numel() * self.weight.element_size()
        if self.scale is not None:
            total += self.scale.numel() * self.scale.element_size()
        return total


def _log_once(key: str, level: int, msg: str, *args) -> None:
    if key not in _logged:
        _logged.add(key)
        logger.log(level, msg, *args)


def soc_family() -> str:
    """"a2", "a3", "a5", "310p" or "unknown" for the current NPU."""
    if torch_npu is None:
        return "unknown"
    try:
        version = int(torch_npu.npu.get_soc_version())
    except Exception:  # noqa: BLE001 - an unreadable SoC must not stop the load
        return "unknown"
    for (lo, hi), family in _SOC_FAMILIES:
        if lo <= version <= hi:
            return family
    return "unknown"


def choose_format(n: int, k: int, group_size: int, dtype: torch.dtype, family: str) -> str:
    """The weight format for one layer (see the module table); the environment can force one."""
    forced = os.environ.get(WEIGHT_FORMAT_ENV)
    if forced:
        if forced not in WEIGHT_FORMATS:
            raise ValueError(f"bitcpm: {WEIGHT_FORMAT_ENV}={forced!r}; expected one of {WEIGHT_FORMATS}")
        return forced
    if dtype not in NPU_ACTIVATION_DTYPES:
        return "dense"
    per_group = group_size < k
    if family == "310p":
        return "dense" if per_group else "int8"
    return "int4" if n % INT4_PER_INT32 == 0 else "int8"


def to_npu_weights(
    codes: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    in_features: int,
    dtype: torch.dtype,
    fmt: str,
    name: str = "weight",
) -> NpuTernaryWeights:
    """Convert packed layout v1 to ``fmt`` on ``codes``' device (unpacking happens on the host)."""
    device = codes.device
    n, k = codes.shape[0], in_features
    if fmt == "dense":
        dense = ternary.dequantize(codes.cpu(), scales.cpu(), group_size, k, dtype=dtype)
        return NpuTernaryWeights(dense.T.contiguous().to(device), None, 0, fmt, k, n)
    if fmt not in ("int4", "int8"):
        raise ValueError(f"bitcpm: {name}: unknown NPU weight format {fmt!r}")
    trits_kn = ternary.unpack_codes(codes.cpu(), k).T.contiguous()  # int8 (K, N) in {-1, 0, 1}
    per_group = group_size < k
    if per_group:
        scale = scales.T.contiguous()  # (N, G) -> (G, N): group-major, as the op reads it
    else:
        scale = scales[:, 0].contiguous()  # (N,)
    scale = scale.to(dtype).to(device)
    if fmt == "int4":
        if n % INT4_PER_INT32:
            raise ValueError(
                f"bitcpm: {name}: int4 weights need N % {INT4_PER_INT32} == 0, got N={n}"
            )
        weight = torch_npu.npu_convert_weight_to_int4pack(trits_kn.to(torch.int32).to(device))
    else:
        weight = trits_kn.to(device)
    return NpuTernaryWeights(weight, scale, group_size if per_group else 0, fmt, k, n)


def _matmul(w: NpuTernaryWeights, x2d: torch.Tensor) -> torch.Tensor:
    if w.fmt == "dense":
        return x2d @ w.weight.to(x2d.dtype)
    scale = w.scale if w.scale.dtype == x2d.dtype else w.scale.to(x2d.dtype)
    return torch_npu.npu_weight_quant_batchmatmul(
        x2d, w.weight, scale, antiquant_group_size=w.group_size
    )


def weight_quant_linear(
    w: NpuTernaryWeights,
    x: torch.Tensor,
    bias: torch.Tensor | None = None,
    int8_activations: bool = False,
) -> torch.Tensor:
    """y = x @ W.T + bias with a prepared weight; int8 mode follows the reference's math."""
    if x.shape[-1] != w.in_features:
        raise ValueError(f"ternary_linear (npu): x has K={x.shape[-1]}, the weight K={w.in_features}")
    x2d = x.reshape(-1, w.in_features)
    if int8_activations:
        q, inv_scale = reference.quantize_activations_int8(x2d)
        # q holds integers in [-127, 127]: exact in fp16/bf16, so the op sees them unrounded.
        y = _matmul(w, q.to(x.dtype)).to(torch.float32) / inv_scale
        if bias is not None:
            y = y + bias.to(torch.float32)
        y = y.to(x.dtype)
    else:
        y = _matmul(w, x2d)
        if bias is not None:  # added here: the op's bias dtype rules differ between fp16 and bf16
            y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], w.out_features)


# --------------------------------------------------------------------------------------------
# vLLM layer hooks (called from TernaryLinearMethod on the NPU platform)


def prepare_layer(layer: torch.nn.Module, prefix: str, in_features: int) -> None:
    """After packing: keep codes for the AscendC kernel, else convert once for torch_npu."""
    if KERNEL is None:
        raise RuntimeError(
            f"bitcpm: layer '{prefix}' is on the NPU platform but torch_npu did not import "
            f"({_load_error}); install the torch_npu that matches your CANN and torch"
        )
    family = soc_family()
    _log_once("kernel", logging.INFO, "bitcpm: NPU ternary kernel: %s (SoC family %s)", KERNEL, family)
    if KERNEL == "ascendc":
        layer.bitcpm_npu = None
        return
    codes, scales = layer.weight_codes.data, layer.weight_scales.data
    dtype = getattr(layer, "params_dtype", None) or scales.dtype
    fmt = choose_format(codes.shape[0], in_features, layer.bitcpm_group_size, dtype, family)
    if fmt == "dense":
        why = ("forced by " + WEIGHT_FORMAT_ENV if os.environ.get(WEIGHT_FORMAT_ENV)
               else "float32 activations" if dtype not in NPU_ACTIVATION_DTYPES
               else f"per-group scales on SoC family {family}")
        _log_once(f"dense:{why}", logging.WARNING,
                  "bitcpm: ternary layers (first: %s) run as dense (K, N) weights on NPU (%s): "
                  "results are exact, memory is not reduced", prefix, why)
    prepared = to_npu_weights(codes, scales, layer.bitcpm_group_size, in_features, dtype, fmt,
                              name=prefix)
    del layer.weight_codes, layer.weight_scales  # the NPU form replaces the packed one
    # Registered as parameters so vLLM's memory accounting sees them; the dataclass shares them.
    layer.register_parameter("weight_npu", torch.nn.Parameter(prepared.weight, requires_grad=False))
    prepared.weight = layer.weight_npu
    if prepared.scale is not None:
        layer.register_parameter(
            "weight_npu_scale", torch.nn.Parameter(prepared.scale, requires_grad=False)
        )
        prepared.scale = layer.weight_npu_scale
    layer.bitcpm_npu = prepared


# --------------------------------------------------------------------------------------------
# Op registration for PrivateUse1


def ternary_linear_npu(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    activations: str = "exact",
) -> torch.Tensor:
    """The op on NPU tensors through torch_npu: converts per call (layers convert once instead)."""
    reference.check_operands(x, codes, scales, group_size)
    reference.check_activations(activations)
    if activations == "int16":
        raise ValueError("ternary_linear (npu): int16 activations are a CPU-kernel mode (16-bit integers are "
                         "not exact in the NPU's fp16/bf16 matmul); use exact or int8")
    k = x.shape[-1]
    fmt = choose_format(codes.shape[0], k, group_size, x.dtype, soc_family())
    w = to_npu_weights(codes, scales, group_size, k, x.dtype, fmt)
    return weight_quant_linear(w, x, bias, activations == "int8")


def _register() -> None:
    """Pick the kernel: the compiled AscendC op if it loads, else the torch_npu composition."""
    global KERNEL, _load_error
    if torch_npu is None:
        return
    try:
        from vllm_bitcpm import _ascend_kernels  # noqa: F401  (TORCH_LIBRARY_IMPL(bitcpm, PrivateUse1))
    except Exception as exc:  # noqa: BLE001 - not built (no CANN at build time) or broken
        _load_error = exc
    else:
        KERNEL = "ascendc"
        return
    KERNEL = "torch_npu"
    qualname = "bitcpm::ternary_linear"
    if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "PrivateUse1"):
        return  # registered by an earlier import of this module (reloads in tests)
    lib = torch.library.Library("bitcpm", "IMPL")
    lib.impl("ternary_linear", ternary_linear_npu, "PrivateUse1")
    _LIBRARIES.append(lib)


_register()
