"""Ternary weights as GPTQ ``uint4b8``: the form vLLM's own low-bit kernels and GPTQ runtimes read.

Pure PyTorch, no vLLM (the serving path hands the result to vLLM's mixed-precision kernels,
``vllm_bitcpm.backends``; ``vllm-bitcpm convert --format gptq`` writes it to disk).

A ternary trit ``t`` in {-1, 0, 1} is stored as the 4-bit value ``q = t + 8`` (vLLM's
``scalar_types.uint4b8``: value = q - 8), with the ternary scale as the GPTQ scale, so
``(q - 8) * scale`` reproduces the fake-quantized weight bit for bit. Layout (GPTQ, ``desc_act``
false, symmetric):

* ``qweight``: int32 ``(K / 8, N)``; bits ``4j .. 4j+3`` of ``qweight[i, n]`` hold ``q`` of input
  column ``8i + j`` of output row ``n``.
* ``scales``: ``(G, N)``, one row per group of ``group_size`` input columns (G = 1 for per-row or
  per-tensor scales: GPTQ ``group_size`` -1).
* ``qzeros``: int32 ``(G, N / 8)`` of nibbles 7: symmetric GPTQ's stored zero point (8) minus one,
  as AutoGPTQ writes it; vLLM ignores it for ``sym`` checkpoints.
"""

from __future__ import annotations

import dataclasses

import torch

from vllm_bitcpm import ternary

BITS = 4
PACK_FACTOR = 32 // BITS  # 4-bit values per int32
BIAS = 8  # uint4b8: stored value = trit + 8
STORED_ZERO = BIAS - 1  # classic GPTQ stores zero - 1


class Int4RepackError(ValueError):
    """A ternary matrix whose shape GPTQ's packing cannot hold; the message names the layer."""


@dataclasses.dataclass
class GPTQWeights:
    qweight: torch.Tensor  # int32 (K / 8, N)
    scales: torch.Tensor  # (G, N)
    group_size: int  # GPTQ convention: -1 = one group spanning all input columns
    in_features: int

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    def qzeros(self) -> torch.Tensor:
        """int32 (G, N / 8) of stored zeros (nibbles 7), as symmetric GPTQ checkpoints carry them."""
        groups, n = self.scales.shape
        word = sum(STORED_ZERO << (BITS * j) for j in range(PACK_FACTOR))
        return torch.full((groups, n // PACK_FACTOR), _as_int32(word), dtype=torch.int32)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(N, K) dense weight: (q - 8) * scale, computed in the scales' dtype (exact for trits)."""
        q = unpack_int32_along_rows(self.qweight) - BIAS  # (K, N)
        k = self.in_features
        group = k if self.group_size == -1 else self.group_size
        scales = self.scales.repeat_interleave(group, dim=0)[:k]
        return (q.to(self.scales.dtype) * scales).t().contiguous().to(dtype or self.scales.dtype)


def _as_int32(word: int) -> int:
    """A 32-bit pattern as the signed value torch's int32 stores."""
    return word - (1 << 32) if word >= 1 << 31 else word


def pack_int32_along_rows(values: torch.Tensor) -> torch.Tensor:
    """int (K, N) of 4-bit values -> int32 (K / 8, N): eight consecutive rows per word, low bits first."""
    k, n = values.shape
    nibbles = values.to(torch.int64).view(k // PACK_FACTOR, PACK_FACTOR, n)
    shifts = torch.arange(0, 32, BITS, dtype=torch.int64).view(1, PACK_FACTOR, 1)
    words = (nibbles << shifts).sum(dim=1)  # < 2^32: no overlap between nibbles
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def unpack_int32_along_rows(qweight: torch.Tensor) -> torch.Tensor:
    """int32 (K / 8, N) -> int32 (K, N) of 4-bit values (inverse of :func:`pack_int32_along_rows`)."""
    words = qweight.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(0, 32, BITS, dtype=torch.int64).view(1, PACK_FACTOR, 1)
    nibbles = (words.unsqueeze(1) >> shifts) & 0xF
    return nibbles.reshape(-1, qweight.shape[1]).to(torch.int32)


def gptq_group_size(group_size: int, in_features: int) -> int:
    """The packed layout's group size in GPTQ's convention (-1: per-row / per-tensor)."""
    return -1 if group_size >= in_features else group_size


def from_ternary(matrix: ternary.TernaryMatrix, name: str = "weight") -> GPTQWeights:
    """Repack a :class:`ternary.TernaryMatrix` losslessly as GPTQ ``uint4b8``."""
    k = matrix.in_features
    if k % PACK_FACTOR:
        raise Int4RepackError(f"{name}: {k} input columns; GPTQ packs whole words of {PACK_FACTOR}")
    group = gptq_group_size(matrix.group_size, k)
    if group != -1 and k % group:
        raise Int4RepackError(f"{name}: {k} input columns are not whole scale groups of {group}")
    trits = ternary.unpack_codes(matrix.codes, k)  # (N, K) int8
    qweight = pack_int32_along_rows((trits.to(torch.int32) + BIAS).t())
    return GPTQWeights(qweight=qweight.contiguous(), scales=matrix.scales.t().contiguous(), group_size=group,
                       in_features=k)
