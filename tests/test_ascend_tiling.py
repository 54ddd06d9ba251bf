"""The AscendC kernel's tiling / index arithmetic, modelled in Python, against the reference op."""

import math

import pytest
import torch

from vllm_bitcpm import ternary
from vllm_bitcpm.ops import ascend_tiling, reference


def packed(n, k, group_size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    trits = torch.randint(-1, 2, (n, k), generator=gen)
    scales = torch.rand(n, math.ceil(k / group_size), generator=gen) + 0.5
    return ternary.pack_codes(trits), scales


def test_unpack_block_matches_layout_v1():
    trits = torch.randint(-1, 2, (1, 128))
    block = ternary.pack_codes(trits)[0].tolist()
    assert ascend_tiling.unpack_block(block) == trits[0].tolist()


@pytest.mark.parametrize("m,n,k,g,cores,tile_n,chunk_blocks", [
    (1, 40, 320, 64, 8, 16, 1),     # partial last group, partial last block, short last tile
    (3, 64, 256, 256, 20, 16, 8),   # per-row (g = K), more cores than tiles
    (17, 33, 200, 32, 3, 8, 2),     # tokens over two m-tiles, K % 32 != 0, uneven core split
    (2, 96, 1024, 128, 7, 16, 3),   # chunks that do not divide the row
])
def test_model_matches_reference(m, n, k, g, cores, tile_n, chunk_blocks):
    codes, scales = packed(n, k, g)
    x = torch.randn(m, k)
    trace = []
    y = ascend_tiling.run(x, codes, scales, g, core_num=cores, trace=trace, tile_n=tile_n,
                          chunk_blocks=chunk_blocks)
    torch.testing.assert_close(y, reference.ternary_linear_reference(x, codes, scales, g),
                               rtol=1e-5, atol=1e-4)
    # every code byte of every row is read exactly once, by exactly one core
    seen = {}
    for core, row, byte0, nbytes in trace:
        for b in range(byte0, byte0 + nbytes):
            assert (row, b) not in seen
            seen[(row, b)] = core
    assert len(seen) == n * codes.shape[1]
    assert len({(row, c) for (row, _), c in seen.items()}) == n  # a row stays on one core


@pytest.mark.parametrize("tiles,cores", [(1, 1), (5, 8), (37, 8), (64, 20)])
def test_core_split_is_contiguous_and_balanced(tiles, cores):
    t = ascend_tiling.make_tiling(1, tiles * 16, 128, 128, cores)
    runs = [ascend_tiling.core_tiles(t, c) for c in range(t.block_dim)]
    assert runs[0].first_tile == 0
    for a, b in zip(runs, runs[1:]):
        assert b.first_tile == a.first_tile + a.num_tiles
    assert sum(r.num_tiles for r in runs) == tiles
    assert max(r.num_tiles for r in runs) - min(r.num_tiles for r in runs) <= 1


def test_quarters_never_straddle_groups_and_bad_groups_are_rejected():
    t = ascend_tiling.make_tiling(1, 8, 512, 32, 4)
    for block_k0 in range(0, 512, 128):
        for q in range(4):
            first = block_k0 + 32 * q
            assert ascend_tiling.quarter_scale_index(t, block_k0, q) == (first + 31) // 32
    with pytest.raises(ValueError, match="multiple of 32"):
        ascend_tiling.make_tiling(1, 8, 512, 48, 4)
