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
    if codes.shape[1] != ternary.packed_row_bytes(k):
        raise ValueError(
            f"ternary_linear: codes have {codes.shape[1]} bytes per row, but x has K={k} "
            f"features, which needs ceil(K/128)*32={ternary.packed_row_bytes(k)}"
        )
    if group_size <= 0:
        raise ValueError(f"ternary_linear: group_size must be positive, got {group_size}")
    expected = (n, math.ceil(k / group_size))
    if tuple(scales.shape) != expected:
        raise ValueError(
            f"ternary_linear: scales have shape {tuple(scales.shape)}, expected {expected} "
            f"(N={n} rows, one scale per group of {group_size} of K={k} columns)"
        )


#: Activation modes of the op: float activations, or per-token absmax integers of 8 or 16 bits.
ACTIVATIONS = ("exact", "int8", "int16")
INT8_MAX = 127
#: int16 mode's largest |q|: the biggest value whose split q = 256 * hi + lo (lo in [-128, 127])
#: keeps hi an int8, so x86 kernels multiply both bytes with int8 instructions (vpmaddubsw).
INT16_MAX = 32639
QMAX = {"int8": INT8_MAX, "int16": INT16_MAX}
#: int16 mode's largest K: |sum of v * t| <= INT16_MAX * K must stay an exact int32 in the kernels.
INT16_MAX_K = 65536


def check_activations(activations: str) -> None:
    """A clear error for an activation mode the op does not have."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"ternary_linear: activations must be one of {', '.join(ACTIVATIONS)}, got {activations!r}")


def quantize_activations(x: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax integers: x ~= q / inv_scale, |q| <= qmax.

    Returns ``q`` (float32 holding integers in [-qmax, qmax]) and ``inv_scale`` (..., 1) =
    qmax / max|x| per token (1 for an all-zero token; NaN when the token holds NaN/Inf, so
    the token's outputs are NaN rather than silently finite), capped at float32's largest value
    so that a tiny finite token (max|x| < qmax / 3.4e38) keeps finite outputs. Rounding is half
    to even.
    """
    xf = x.to(torch.float32)
    absmax = xf.abs().amax(dim=-1, keepdim=True)
    inv_scale = torch.where(absmax > 0, qmax / absmax, torch.ones_like(absmax))
    inv_scale = inv_scale.clamp(max=torch.finfo(torch.float32).max)
    inv_scale = torch.where(torch.isfinite(absmax), inv_scale, torch.full_like(absmax, float("nan")))
    q = torch.round(xf * inv_scale).clamp(-qmax, qmax)
    return q, inv_scale


def quantize_activations_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8 (bitnet.cpp's I2_S activations): :func:`quantize_activations` with 127."""
    return quantize_activations(x, INT8_MAX)


def ternary_linear_reference(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    activations: str = "exact",
) -> torch.Tensor:
    check_operands(x, codes, scales, group_size)
    check_activations(activations)
    if activations == "int16" and x.shape[-1] > INT16_MAX_K:
        raise ValueError(f"ternary_linear: int16 activations take K <= {INT16_MAX_K} (exact int32 sums), "
                         f"got K={x.shape[-1]}")
    if activations == "exact":
        weight = ternary.dequantize(codes, scales, group_size, x.shape[-1], dtype=x.dtype)
        return torch.nn.functional.linear(x, weight, bias)
    # q holds integers below 2**15 and t * s is exact in float32: each product is one float32
    # rounding, the sum float32 (the kernels sum exact integers per group instead).
    q, inv_scale = quantize_activations(x, QMAX[activations])
    weight = ternary.dequantize(codes, scales, group_size, x.shape[-1], dtype=torch.float32)
    y = (q @ weight.T) / inv_scale
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


def ternary_linear_fallback(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    activations: str = "exact",
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
    return ternary_linear_reference(x, codes, scales, group_size, bias, activations)


def ternary_linear_fake(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    activations: str = "exact",
) -> torch.Tensor:
    """Shape-only implementation for tracing (torch.compile, meta tensors)."""
    return x.new_empty((*x.shape[:-1], codes.shape[0]))
