"""The lm_head of a ternary model: a streaming bf16 kernel for decode, and an opt-in int8 copy.

Decode-sized logits (bf16, model with ternary layers, up to a token count measured per ISA path:
``BF16_GEMV_MAX_TOKENS``) go through ``bitcpm_cpu.bf16_gemv``: the same dense bf16 matmul as
vLLM's call (exact products, fp32 sums, one rounding to bf16) but read as one sequential stream.
On AVX512-BF16 CPUs it beats vLLM's oneDNN call at 1-2 tokens (a single core streams faster);
on AVX2 CPUs oneDNN has no bf16 matmul and vLLM falls back to ATen's slow bf16 ``F.linear``,
which the kernel's AVX2 path (bf16 widened to fp32, FMA) beats at every count up to 16
(benchmarks/kernel_speed.py, "lm_head" rows, native and ``--isa avx2``). Larger batches, ISA
paths not measured (AVX512 without BF16, scalar), dense checkpoints and
``VLLM_BITCPM_FUSED_CPU_OPS=0`` keep vLLM's own call.

Opt-in int8 lm_head: the logits matmul reads 1 byte per weight instead of 2.

BitCPM keeps the tied embedding / lm_head in high precision. Once the linear layers are
ternary (~86 MiB for BitCPM4-0.5B), the bf16 head (73448 x 1024, 144 MiB) is the biggest read
of every decode step. ``VLLM_BITCPM_LM_HEAD=int8`` quantizes the head's rows to int8 with one
absmax scale per row (vocabulary entry). Decode-sized logits (up to ``INT8_GEMV_MAX_TOKENS``
tokens) go through ``bitcpm_cpu.int8_gemv``, which streams the int8 rows at memory speed (each
token rounded once to int16, integer dot products); larger batches, and CPUs without the
kernel, use ATen's weight-only int8 matmul, which on one core runs slower than the bf16 head
(benchmarks/kernel_speed.py, "lm_head" rows). The embedding lookup keeps the bf16 table (it is
shared with the head when tied), so memory grows by the int8 copy while per-token reads shrink.
The accuracy cost is measured by the test suite and benchmarks, not assumed.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

import torch
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

logger = logging.getLogger("vllm.bitcpm")

LM_HEAD_ENV = "VLLM_BITCPM_LM_HEAD"
LM_HEAD_MODES = ("dense", "int8")


def lm_head_mode() -> str:
    mode = os.environ.get(LM_HEAD_ENV) or "dense"
    if mode not in LM_HEAD_MODES:
        raise ValueError(f"bitcpm: {LM_HEAD_ENV}={mode!r}; expected one of {', '.join(LM_HEAD_MODES)}")
    return mode


def quantize_rows_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax int8: weight ~= q * scale[:, None]; all-zero rows get scale 0."""
    w = weight.detach().to(torch.float32)
    absmax = w.abs().amax(dim=1)
    scale = absmax / 127
    q = torch.round(w / torch.where(scale > 0, scale, 1)[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


_int8_kernel_logged = False  # the first call through int8_gemv says so in the engine log


def _int8_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return torch.ops.bitcpm_cpu.int8_gemv(x, qweight, scales)


def in_calls_of(limit: int, kernel: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """kernel(x) for a kernel that takes up to ``limit`` tokens: x in slices of ``limit`` tokens.

    Each slice streams the head again, so this pays where the alternative costs more per token
    than a full slice does: on AVX2 CPUs, where stock's bf16 call is ATen's fallback and the int8
    one ATen's weight-only matmul (32 tokens, AVX2 Zen 3, one thread: bf16 482 ms vs 86 in two
    slices of bf16_gemv, int8 143 vs 44 with int8_gemv; kernels/README.md, lm_head).
    """
    if x.shape[0] <= limit:
        return kernel(x)
    return torch.cat([kernel(part) for part in x.split(limit)])


class Int8LMHeadMethod(UnquantizedEmbeddingMethod):
    """Embedding lookups as stock vLLM; logits through an int8 copy of the head."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        q, scale = quantize_rows_int8(layer.weight.data)
        layer.register_buffer("int8_weight", q, persistent=False)
        layer.register_buffer("int8_scales", scale, persistent=False)
        layer.int8_scales_by_dtype = {}

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if (x.dim() == 2 and x.device.type == "cpu" and int8_gemv_available()
                and (x.shape[0] <= INT8_GEMV_MAX_TOKENS or int8_gemv_slices_beyond())):
            global _int8_kernel_logged
            if not _int8_kernel_logged:
                _int8_kernel_logged = True
                logger.info("bitcpm: int8 lm_head logits through int8_gemv (%s) for %s",
                            torch.ops.bitcpm_cpu.int8_gemv_isa(),
                            _routing(INT8_GEMV_MAX_TOKENS, int8_gemv_slices_beyond()))
            logits = in_calls_of(INT8_GEMV_MAX_TOKENS, lambda part: _int8_gemv(part, layer.int8_weight,
                                                                               layer.int8_scales), x)
            return logits if bias is None else logits + bias
        scales = layer.int8_scales_by_dtype.get(x.dtype)
        if scales is None:  # the ATen kernel wants scales in the activation dtype
            scales = layer.int8_scales_by_dtype[x.dtype] = layer.int8_scales.to(x.dtype)
        logits = torch.ops.aten._weight_int8pack_mm(x.contiguous(), layer.int8_weight, scales)
        return logits if bias is None else logits + bias


#: Largest token count sent to ``int8_gemv`` (the kernel's limit; it beats ATen's int8 matmul at
#: every count up to it: benchmarks/kernel_speed.py "lm_head" rows).
INT8_GEMV_MAX_TOKENS = 16
#: Kernel ISA paths on which larger batches go to the kernel in calls of its limit rather than to
#: ATen / vLLM's call (measured there: in_calls_of). AVX512-BF16 CPUs keep oneDNN's bf16 matmul
#: past 2 tokens (it won there); AVX512 int8 past 16 tokens was not measured against ATen.
SLICED_PATHS = ("avx2",)


def _routing(limit: int, sliced: bool) -> str:
    """What the head's kernel takes, for the engine log."""
    return f"any token count, in calls of {limit}" if sliced else f"<= {limit} tokens"


@functools.cache
def int8_gemv_slices_beyond() -> bool:
    return int8_gemv_available() and str(torch.ops.bitcpm_cpu.int8_gemv_isa()) in SLICED_PATHS


@functools.cache
def int8_gemv_available() -> bool:
    from vllm_bitcpm.ops import cpu as cpu_kernel

    return cpu_kernel.AVAILABLE and hasattr(torch.ops.bitcpm_cpu, "int8_gemv")


#: Largest token count sent to ``bf16_gemv``, per the kernel's ISA path, where it was measured
#: to beat stock vLLM's call (benchmarks/kernel_speed.py "lm_head" rows): on AVX512-BF16 it beats
#: oneDNN at 1 and 2 tokens and loses from 4 on, where the matmul stops being a pure memory
#: stream; on AVX2 (AVX2 mode: ATen's bf16 F.linear, as oneDNN has no bf16 matmul there) it wins
#: at 1, 2, 4, 10 and 16 tokens in three runs (1.1-1.2x at one token, 1.4-1.6x from two on), so
#: it takes every count, larger batches in calls of 16 (the kernel's limit; in_calls_of).
BF16_GEMV_MAX_TOKENS = {"avx512bf16": 2, "avx2": 16}


def bf16_gemv_available() -> bool:
    from vllm_bitcpm.ops import cpu as cpu_kernel

    return cpu_kernel.AVAILABLE and hasattr(torch.ops.bitcpm_cpu, "bf16_gemv")


@functools.cache
def bf16_gemv_max_tokens() -> int:
    """Token count up to which the head takes ``bf16_gemv`` on this CPU (0: never; its other
    paths are correct and tested but were not measured faster than stock's call)."""
    if not bf16_gemv_available():
        return 0
    return BF16_GEMV_MAX_TOKENS.get(str(torch.ops.bitcpm_cpu.bf16_gemv_isa()), 0)


_kernel_logged = False  # the first call through the kernel says so in the engine log


def _gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.bitcpm_cpu.bf16_gemv(x, weight)


@functools.cache
def bf16_gemv_slices_beyond() -> bool:
    return bool(bf16_gemv_max_tokens()) and str(torch.ops.bitcpm_cpu.bf16_gemv_isa()) in SLICED_PATHS


def _streaming_apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of up to bf16_gemv_max_tokens() bf16 tokens from the bf16 head, streamed once (on
    AVX2 CPUs any number, in calls of that many)."""
    weight = layer.weight
    limit = bf16_gemv_max_tokens()
    if (x.dim() == 2 and (x.shape[0] <= limit or bf16_gemv_slices_beyond()) and x.dtype == torch.bfloat16
            and weight.dtype == torch.bfloat16 and x.device.type == "cpu" and weight.is_contiguous()
            and self.bitcpm_active()):
        global _kernel_logged
        if not _kernel_logged:
            _kernel_logged = True
            logger.info("bitcpm: lm_head logits through bf16_gemv (%s) for %s", torch.ops.bitcpm_cpu.bf16_gemv_isa(),
                        _routing(limit, bf16_gemv_slices_beyond()))
        logits = in_calls_of(limit, lambda part: _gemv(part, weight), x)
        return logits if bias is None else logits + bias
    return super(type(self), self).apply(layer, x, bias)


def install_cpu_decode_kernel(model: torch.nn.Module, active: Callable[[], bool]) -> bool:
    """Route the dense head's decode-sized logits through ``bf16_gemv``; whether it was installed.

    The head's quant method (vLLM's ``UnquantizedEmbeddingMethod``) changes class in place to a
    subclass that overrides ``apply`` only, as vllm_bitcpm.cpu_fused does for its modules; the
    weight and vLLM's own oneDNN handle stay for every call the kernel does not take.
    """
    from vllm_bitcpm import cpu_fused

    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if not cpu_fused.switched_on() or type(method) is not UnquantizedEmbeddingMethod or not bf16_gemv_max_tokens():
        return False
    method.__class__ = cpu_fused.subclass_overriding(UnquantizedEmbeddingMethod, "StreamingBf16", "apply",
                                                     _streaming_apply)
    method.bitcpm_active = active
    return True
