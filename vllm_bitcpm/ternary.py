"""Ternary weights: detect how a fake-quantized matrix was scaled, pack it at 2 bits, unpack it.

Pure PyTorch, no vLLM: everything here is reusable by the vLLM glue, the converter and the tests.

A BitCPM checkpoint stores each linear weight as ``W = T * S`` in bf16, with ``T`` in {-1, 0, 1}
and ``S`` one scale per tensor, per output row, or per group of ``g`` consecutive input columns.
Because ``t * s`` is exact in floating point for ``t`` in {-1, 0, 1}, ``(T, S)`` reproduces ``W``
exactly, so packing is lossless (``-0.0`` is stored as ``0``: equal as a number, which is all a
matmul can observe).

Packed layout, version 1 (one layout for storage and kernels, so nothing is repacked):

* ``codes``: uint8 ``(N, ceil(K / 128) * 32)``. Each row is cut into blocks of 128 weights
  stored in 32 bytes; byte ``j`` of a block holds the block's elements ``j``, ``j + 32``,
  ``j + 64`` and ``j + 96`` at bits 0, 2, 4 and 6, as the code ``t + 1`` in {0, 1, 2}.
  One 32-byte load, shifted by 0/2/4/6 and masked with 3, gives 32 consecutive codes per
  SIMD lane set (the bitnet.cpp I2_S arrangement). Padding past ``K`` holds code 1 (zero).
* ``scales``: ``(N, G)``, ``G = ceil(K / group_size)``, in bf16/fp16 when that holds them
  exactly (it does for bf16 checkpoints, even when vLLM runs them in float32), else in the
  weight's dtype; column ``k`` uses ``scales[:, k // group_size]``. Per-tensor and per-row
  scales are stored with ``G = 1`` (``group_size = K``), so a kernel handles one layout.
"""

from __future__ import annotations

import dataclasses
import enum
import math

import torch

PACK_LAYOUT_VERSION = 1
WEIGHTS_PER_BYTE = 4
BLOCK_WEIGHTS = 128  # weights per packed block
BLOCK_BYTES = BLOCK_WEIGHTS // WEIGHTS_PER_BYTE

#: Smallest group of input columns accepted as a scale group. Finer groups cost
#: >= 2.5 bits per weight with bf16 scales, no better than keeping a layer dense
#: in spirit, and would let almost any matrix pass as "ternary" (g = 1 always does).
MIN_GROUP_SIZE = 32


class Granularity(str, enum.Enum):
    """How many weights share one scale, coarsest first."""

    PER_TENSOR = "per_tensor"
    PER_ROW = "per_row"
    PER_GROUP = "per_group"


@dataclasses.dataclass(frozen=True)
class ScaleLayout:
    """The coarsest scale layout that reproduces a matrix exactly."""

    granularity: Granularity
    group_size: int  # input columns per scale; equals K for per-tensor and per-row

    def describe(self) -> str:
        if self.granularity is Granularity.PER_GROUP:
            return f"per_group(g={self.group_size})"
        return self.granularity.value


class NotTernaryError(ValueError):
    """A matrix is not ternary times a scale at any accepted granularity."""


@dataclasses.dataclass
class TernaryMatrix:
    """One matrix (or several stacked matrices) packed at 2 bits per weight plus scales."""

    codes: torch.Tensor  # uint8 (N, ceil(K/128) * 32), layout version 1
    scales: torch.Tensor  # (N, ceil(K/group_size)); 16-bit when exact, else the weight's dtype
    group_size: int
    in_features: int

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.scales.dtype

    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + (
            self.scales.numel() * self.scales.element_size()
        )

    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes() / (self.out_features * self.in_features)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense ``(N, K)`` matrix, equal to the fake-quantized original."""
        return dequantize(self.codes, self.scales, self.group_size, self.in_features, dtype)


# --------------------------------------------------------------------------------------------
# Detection


def _grouped(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, K) -> (N, G, group_size), the last group padded with zeros."""
    n, k = t.shape
    groups = math.ceil(k / group_size)
    pad = groups * group_size - k
    if pad:
        t = torch.nn.functional.pad(t, (0, pad))
    return t.contiguous().view(n, groups, group_size)


def _group_absmax(absw: torch.Tensor, group_size: int) -> torch.Tensor:
    """Max of ``absw`` (N, K) over each group of ``group_size`` columns -> (N, G)."""
    return _grouped(absw, group_size).amax(dim=2)


def _expand_groups(per_group: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """(N, G) -> (N, K): repeat each group's value over its columns."""
    return per_group.repeat_interleave(group_size, dim=1)[:, :k]


def _first_mismatch(absw: torch.Tensor, group_max: torch.Tensor, group_size: int) -> tuple[int, int] | None:
    """First element (row, col) that is neither 0 nor its group's max (broadcast, not expanded)."""
    grouped = _grouped(absw, group_size)
    bad = (grouped != 0) & (grouped != group_max.unsqueeze(-1))
    if not bool(bad.any()):
        return None
    row, col = (int(i) for i in bad.view(bad.shape[0], -1).nonzero()[0])
    return row, col  # zero padding is never bad, so padded and real columns coincide


def _candidate_group_sizes(k: int) -> list[int]:
    """Power-of-two group sizes below K, coarsest first (each nests inside the next)."""
    sizes = []
    g = MIN_GROUP_SIZE
    while g < k:
        sizes.append(g)
        g *= 2
    return sizes[::-1]


def detect_scale_layout(weight: torch.Tensor, name: str = "weight") -> ScaleLayout:
    """Find the coarsest granularity at which ``weight`` is exactly ternary times a scale.

    Raises :class:`NotTernaryError` naming ``name`` and the first offending element.
    The finest candidate is checked first: a matrix that fails it fails every coarser
    one too (power-of-two groups nest inside rows, rows inside the tensor), so a dense
    layer is rejected after a single pass.
    """
    if weight.dim() != 2:
        raise NotTernaryError(f"{name}: expected a 2-D weight, got shape {tuple(weight.shape)}")
    # Comparisons and maxima are exact in the weight's own dtype: no float32 copy is needed.
    w = weight.detach()
    if not w.is_floating_point():
        w = w.to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        row, col = (int(i) for i in (~torch.isfinite(w)).nonzero()[0])
        raise NotTernaryError(
            f"{name}: element [{row}, {col}] = {w[row, col].item()} is not finite, "
            "so the matrix is not ternary"
        )
    absw = w.abs()
    k = absw.shape[1]
    groups = _candidate_group_sizes(k)
    finest = groups[-1] if groups else k
    finest_scale = _group_absmax(absw, finest)
    mismatch = _first_mismatch(absw, finest_scale, finest)
    if mismatch is not None:
        row, col = mismatch
        what = f"group of {finest} columns" if finest < k else "row"
        raise NotTernaryError(
            f"{name}: not ternary - element [{row}, {col}] = {w[row, col].item():.8g} while "
            f"the largest magnitude in its {what} is "
            f"{finest_scale[row, col // finest].item():.8g}; a ternary weight takes only the "
            "values {-s, 0, +s} per scale group"
        )

    # Every nonzero element equals its finest group's max, so a coarser layout fits exactly
    # when, within each of its scale groups, the nonzero finest-group maxima are all equal:
    # checked on the (N, K / finest) maxima instead of the whole matrix (32x less work).
    if _uniform_blocks(finest_scale.reshape(1, -1), finest_scale.numel()):
        return ScaleLayout(Granularity.PER_TENSOR, k)
    if _uniform_blocks(finest_scale, finest_scale.shape[1]):
        return ScaleLayout(Granularity.PER_ROW, k)
    for g in groups:  # coarsest first; the finest is known to pass
        if _uniform_blocks(finest_scale, g // finest):
            return ScaleLayout(Granularity.PER_GROUP, g)
    raise AssertionError("unreachable: the finest group size passed above")


def _uniform_blocks(group_max: torch.Tensor, blocks_per_group: int) -> bool:
    """Whether the nonzero values of ``group_max`` (N, G) agree within each run of
    ``blocks_per_group`` consecutive columns (the last run may be partial)."""
    if group_max.numel() == 0:
        return True
    grouped = _grouped(group_max, blocks_per_group)
    coarse = grouped.amax(dim=2, keepdim=True)
    return not bool(((grouped != 0) & (grouped != coarse)).any())


def is_ternary(weight: torch.Tensor) -> bool:
    try:
        detect_scale_layout(weight)
    except NotTernaryError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Packing


def packed_row_bytes(in_features: int) -> int:
    """Bytes per packed row: whole 128-weight blocks of 32 bytes."""
    return math.ceil(in_features / BLOCK_WEIGHTS) * BLOCK_BYTES


def pack_codes(trits: torch.Tensor) -> torch.Tensor:
    """int (N, K) with values in {-1, 0, 1} -> uint8 (N, ceil(K/128) * 32), layout version 1."""
    n, k = trits.shape
    blocks = math.ceil(k / BLOCK_WEIGHTS)
    codes = torch.ones((n, blocks * BLOCK_WEIGHTS), dtype=torch.uint8, device=trits.device)
    codes[:, :k] = (trits + 1).to(torch.uint8)
    # (N, blocks, 4 quarters, 32): quarter i of a block goes to bits 2*i of its 32 bytes.
    quarters = codes.view(n, blocks, WEIGHTS_PER_BYTE, BLOCK_BYTES)
    packed = quarters[:, :, 0] | (quarters[:, :, 1] << 2) | (quarters[:, :, 2] << 4) | (quarters[:, :, 3] << 6)
    return packed.reshape(n, blocks * BLOCK_BYTES).contiguous()


def unpack_codes(codes: torch.Tensor, in_features: int) -> torch.Tensor:
    """uint8 (N, ceil(K/128) * 32) -> int8 (N, K) with values in {-1, 0, 1}."""
    n = codes.shape[0]
    blocks = codes.view(n, -1, 1, BLOCK_BYTES)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=codes.device).view(1, 1, 4, 1)
    fields = (blocks >> shifts) & 3  # (N, blocks, 4, 32): element order within the block
    return fields.reshape(n, -1)[:, :in_features].to(torch.int8) - 1


def dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    in_features: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Packed codes and scales -> dense (N, K) weight (exact in the scales' dtype)."""
    dtype = dtype or scales.dtype
    trits = unpack_codes(codes, in_features).to(scales.dtype)
    full_scales = _expand_groups(scales, group_size, in_features)
    return (trits * full_scales).to(dtype)


def _scales_for(absw: torch.Tensor, layout: ScaleLayout) -> torch.Tensor:
    """Scale values (N, G) for ``layout``; per-tensor is broadcast to one scale per row."""
    n, k = absw.shape
    if layout.granularity is Granularity.PER_TENSOR:
        return absw.max().expand(n, 1).clone() if absw.numel() else absw.new_zeros((n, 1))
    return _group_absmax(absw, layout.group_size)


def exact_in(values: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether every value survives a round trip through ``dtype`` unchanged."""
    return torch.equal(values.to(dtype).to(values.dtype), values)


def narrowest_exact(scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Store scales in 16 bits when that is exact (a bf16 checkpoint run in float32 still has
    bf16 scales), else in the weight's dtype. Dequantizing casts up, which is exact."""
    for narrow in (torch.bfloat16, torch.float16):
        if torch.finfo(narrow).bits >= torch.finfo(dtype).bits:
            continue
        if exact_in(scales, narrow):
            return scales.to(narrow).contiguous()
    return scales.to(dtype).contiguous()


def quantize_exact(
    weight: torch.Tensor, name: str = "weight", partition_sizes: list[int] | None = None
) -> tuple[TernaryMatrix, list[ScaleLayout]]:
    """Pack a fake-quantized weight losslessly.

    ``partition_sizes`` lists the row counts of the logical matrices stacked in ``weight``
    (vLLM fuses q/k/v and gate/up); each is detected on its own, since each came from its own
    checkpoint tensor with its own scales. The packed result uses one group size for all rows
    (the finest among the partitions), which is exact because power-of-two groups nest.
    Raises :class:`NotTernaryError` naming the partition that failed.
    """
    partition_sizes = partition_sizes or [weight.shape[0]]
    if sum(partition_sizes) != weight.shape[0]:
        raise ValueError(
            f"{name}: partition sizes {partition_sizes} do not add up to {weight.shape[0]} rows"
        )
    k = weight.shape[1]
    parts = weight.detach().split(partition_sizes, dim=0)
    layouts = [
        detect_scale_layout(part, name if len(parts) == 1 else f"{name}[partition {i}]")
        for i, part in enumerate(parts)
    ]
    group_size = min(layout.group_size for layout in layouts)
    scale_blocks = []
    for part, layout in zip(parts, layouts):
        scale = _scales_for(part.abs(), layout)
        if layout.group_size != group_size:
            scale = _expand_groups(scale, layout.group_size, k)[:, ::group_size]
        scale_blocks.append(scale)
    scales = narrowest_exact(torch.cat(scale_blocks, dim=0), weight.dtype)

    # Detection proved every nonzero weight equals its group's scale, so the trit is its sign.
    trits = torch.sign(weight.detach()).to(torch.int8)
    codes = pack_codes(trits)
    packed = TernaryMatrix(codes=codes, scales=scales, group_size=group_size, in_features=k)
    return packed, layouts
