"""Opt-in int8 lm_head: the logits matmul reads 1 byte per weight instead of 2.

BitCPM keeps the tied embedding / lm_head in high precision. Once the linear layers are
ternary (~86 MiB for BitCPM4-0.5B), the bf16 head (73448 x 1024, 144 MiB) is the biggest read
of every decode step. ``VLLM_BITCPM_LM_HEAD=int8`` quantizes the head's rows to int8 with one
absmax scale per row (vocabulary entry) and computes logits with ATen's weight-only int8 matmul.
The embedding lookup keeps the bf16 table (it is shared with the head when tied), so memory
grows by the int8 copy while per-token reads shrink. The accuracy cost is measured by the test
suite and benchmarks, not assumed.
"""

from __future__ import annotations

import os

import torch
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

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


class Int8LMHeadMethod(UnquantizedEmbeddingMethod):
    """Embedding lookups as stock vLLM; logits through an int8 copy of the head."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        q, scale = quantize_rows_int8(layer.weight.data)
        layer.register_buffer("int8_weight", q, persistent=False)
        layer.register_buffer("int8_scales", scale, persistent=False)
        layer.int8_scales_by_dtype = {}

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        scales = layer.int8_scales_by_dtype.get(x.dtype)
        if scales is None:  # the ATen kernel wants scales in the activation dtype
            scales = layer.int8_scales_by_dtype[x.dtype] = layer.int8_scales.to(x.dtype)
        logits = torch.ops.aten._weight_int8pack_mm(x.contiguous(), layer.int8_weight, scales)
        return logits if bias is None else logits + bias
