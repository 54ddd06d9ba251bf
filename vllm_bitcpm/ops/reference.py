"""Plain PyTorch implementation of ``bitcpm::ternary_linear``: the reference every kernel is tested against.

It unpacks the 2-bit codes to a dense matrix in the activation dtype and calls ``F.linear``.
For a fake-quantized checkpoint the dense matrix equals the original weight bit for bit, so
this reproduces stock vLLM's dense layer up to the GEMM's summation order. It is correct and
vectorized, not fast: it materializes the weight on every call.
"""

from __future__ import annotations

import logging
import math

import torch

from vllm_bitcpm import ternary

logger = logging.getLogger("vllm.bitcpm")  # under vLLM's logger so its handlers apply
_warned_devices: set[str] = set()


def check_operands(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> None:
    """Reject operands that do not follow packed layout version 1, with a message that says why."""
    if x.dim() < 1:
        raise ValueError("ternary_linear: x must have at least one dimension (..., K)")
    k = x.shape[-1]
    if codes.dtype != torch.uint8 or codes.dim() != 2:
        raise ValueError(
            f"ternary_linear: codes must be a 2-D uint8 tensor, got {codes.dtype} {tuple(codes.shape)}"
        )
    n = codes.shape[0]
    if codes.shape[1] != math.ceil(k / ternary.WEIGHTS_PER_BYTE):
        raise ValueError(
            f"ternary_linear: codes have {codes.shape[1]} bytes per row, but x has K={k} "
            f"features, which needs ceil(K/4)={math.ceil(k / ternary.WEIGHTS_PER_BYTE)}"
        )
    if group_size <= 0:
        raise ValueError(f"ternary_linear: group_size must be positive, got {group_size}")
    expected = (n, math.ceil(k / group_size))
    if tuple(scales.shape) != expected:
        raise ValueError(
            f"ternary_linear: scales have shape {tuple(scales.shape)}, expected {expected} "
            f"(N={n} rows, one scale per group of {group_size} of K={k} columns)"
        )


def ternary_linear_reference(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    check_operands(x, codes, scales, group_size)
    weight = ternary.dequantize(codes, scales, group_size, x.shape[-1], dtype=x.dtype)
    return torch.nn.functional.linear(x, weight, bias)


def ternary_linear_fallback(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The composite kernel: runs on devices that registered no kernel of their own."""
    device = x.device.type
    if device not in _warned_devices:
        _warned_devices.add(device)
        logger.warning(
            "bitcpm: no native ternary kernel is registered for device '%s'; "
            "ternary layers use the PyTorch reference (unpack + dense matmul)",
            device,
        )
    return ternary_linear_reference(x, codes, scales, group_size, bias)


def ternary_linear_fake(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Shape-only implementation for tracing (torch.compile, meta tensors)."""
    return x.new_empty((*x.shape[:-1], codes.shape[0]))
