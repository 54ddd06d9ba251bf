"""Plain-Python model of the AscendC kernel's tiling and index arithmetic (kernels/ascend/).

The AscendC kernel cannot be compiled or run without CANN and an NPU, so the part most likely to
be wrong — which rows, code bytes and scale groups each core and tile reads, and how a 32-byte
block unpacks — is written here once more, in the same integer arithmetic as
``kernels/ascend/ternary_linear_kernel.cpp``, and tested on CPU against the reference op.
Names match the kernel's (``TilingData`` fields, ``RowRange``, ``quarter_scale_index``).

The kernel's shape of work:

* Output rows N are cut into tiles of ``tile_n`` rows; tiles are split over ``block_dim`` vector
  cores in contiguous, balanced runs (the first ``tiles % cores`` cores take one extra).
* Each tile walks K in chunks of ``chunk_blocks`` 128-weight blocks (``32 * chunk_blocks`` code
  bytes per row, one DMA per row), and tokens in tiles of ``tile_m``.
* A 32-byte block holds 128 weights: byte ``j`` carries elements ``j, j+32, j+64, j+96`` at bits
  0/2/4/6 (packed layout v1). The kernel unpacks a block as four 32-element *quarters*
  (``(byte >> 2q) & 3``, minus 1). Scale groups are multiples of 32 columns, so a quarter never
  straddles two groups: one scale per quarter, index ``(k0 + 32 q) // group_size``.
* Quarters that start at or past K are skipped (their codes are padding; their scale index
  could be past the last group); x is zero-padded past K inside a quarter.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from vllm_bitcpm import ternary

QUARTER = 32  # weights per 2-bit field plane of a block
BLOCK_WEIGHTS = ternary.BLOCK_WEIGHTS
BLOCK_BYTES = ternary.BLOCK_BYTES


@dataclasses.dataclass(frozen=True)
class TilingData:
    """What the host launcher computes and passes to every core (kernel: ``TernaryTilingData``)."""

    m: int
    n: int
    k: int
    group_size: int
    num_groups: int
    row_bytes: int  # ceil(K/128) * 32
    tile_n: int
    tile_m: int
    chunk_blocks: int
    total_tiles: int
    block_dim: int  # cores launched


def make_tiling(m: int, n: int, k: int, group_size: int, core_num: int, tile_n: int = 16,
                tile_m: int = 8, chunk_blocks: int = 8) -> TilingData:
    """Host-side tiling (kernel: ``ComputeTiling`` in ``ternary_linear_host.cpp``)."""
    if group_size <= 0 or (group_size < k and group_size % QUARTER):
        raise ValueError(f"group_size={group_size}: per-group scales need a multiple of {QUARTER}")
    total_tiles = math.ceil(n / tile_n)
    return TilingData(
        m=m, n=n, k=k, group_size=min(group_size, k), num_groups=math.ceil(k / group_size),
        row_bytes=ternary.packed_row_bytes(k), tile_n=tile_n, tile_m=tile_m,
        chunk_blocks=chunk_blocks, total_tiles=total_tiles,
        block_dim=max(1, min(core_num, total_tiles)),
    )


@dataclasses.dataclass(frozen=True)
class RowRange:
    first_tile: int
    num_tiles: int


def core_tiles(t: TilingData, core: int) -> RowRange:
    """The contiguous run of row tiles core ``core`` owns (kernel: ``CoreTiles``)."""
    base, extra = divmod(t.total_tiles, t.block_dim)
    first = core * base + min(core, extra)
    return RowRange(first, base + (1 if core < extra else 0))


def tile_rows(t: TilingData, tile: int) -> tuple[int, int]:
    """(first row, row count) of a tile; the last tile may be short."""
    start = tile * t.tile_n
    return start, min(t.tile_n, t.n - start)


def chunks(t: TilingData):
    """(first byte, byte count, first column) of each K chunk of a row."""
    chunk_bytes = t.chunk_blocks * BLOCK_BYTES
    for byte0 in range(0, t.row_bytes, chunk_bytes):
        yield byte0, min(chunk_bytes, t.row_bytes - byte0), (byte0 // BLOCK_BYTES) * BLOCK_WEIGHTS


def quarter_scale_index(t: TilingData, block_k0: int, quarter: int) -> int:
    """Scale column of one quarter: one group holds whole quarters (kernel: same name)."""
    return (block_k0 + QUARTER * quarter) // t.group_size


def unpack_block(block: list[int] | bytes) -> list[int]:
    """32 code bytes -> 128 ternary values in element order (kernel: ``UnpackBlock``)."""
    if len(block) != BLOCK_BYTES:
        raise ValueError(f"a block is {BLOCK_BYTES} bytes, got {len(block)}")
    return [((block[j] >> (2 * q)) & 3) - 1 for q in range(4) for j in range(BLOCK_BYTES)]


def run(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group_size: int,
        core_num: int = 8, trace: list | None = None, **tile_kwargs) -> torch.Tensor:
    """Execute the kernel's loops on CPU tensors: y = x @ dequant(codes, scales).T.

    Accumulates in float32 per (token, row) like the kernel; ``trace`` (if given) collects
    ``(core, row, byte0, nbytes)`` for every code read, so tests can check coverage.
    """
    m, k = x.shape
    n = codes.shape[0]
    t = make_tiling(m, n, k, group_size, core_num, **tile_kwargs)
    xf = x.to(torch.float32)
    sf = scales.to(torch.float32)
    code_bytes = codes.tolist()
    y = torch.zeros(m, n, dtype=torch.float32)
    for core in range(t.block_dim):
        run_range = core_tiles(t, core)
        for tile in range(run_range.first_tile, run_range.first_tile + run_range.num_tiles):
            row0, rows = tile_rows(t, tile)
            for m0 in range(0, m, t.tile_m):
                mt = min(t.tile_m, m - m0)
                acc = torch.zeros(mt, rows, dtype=torch.float32)
                for byte0, nbytes, k0 in chunks(t):
                    for r in range(rows):
                        row = row0 + r
                        if trace is not None and m0 == 0:
                            trace.append((core, row, byte0, nbytes))
                        for b in range(nbytes // BLOCK_BYTES):
                            block_k0 = k0 + b * BLOCK_WEIGHTS
                            vals = unpack_block(code_bytes[row][byte0 + b * BLOCK_BYTES:
                                                                byte0 + (b + 1) * BLOCK_BYTES])
                            for q in range(4):
                                qk0 = block_k0 + QUARTER * q
                                if qk0 >= k:
                                    continue  # padding quarter
                                width = min(QUARTER, k - qk0)
                                s = sf[row, quarter_scale_index(t, block_k0, q)]
                                w = torch.tensor(vals[q * QUARTER:q * QUARTER + width],
                                                 dtype=torch.float32) * s
                                acc[:, r] += xf[m0:m0 + mt, qk0:qk0 + width] @ w
                y[m0:m0 + mt, row0:row0 + rows] = acc
    return y.to(x.dtype)
