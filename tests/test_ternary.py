"""Detection and packing (vllm_bitcpm.ternary) against independently built fake-quantized weights."""

import math

import pytest
import torch

from vllm_bitcpm import ternary
from vllm_bitcpm.ternary import Granularity


def fake_quantized(n, k, granularity, group_size=None, dtype=torch.bfloat16, seed=0, zero_rows=()):
    """W = T * S built the way a QAT export does, independently of the code under test."""
    gen = torch.Generator().manual_seed(seed)
    trits = torch.randint(-1, 2, (n, k), generator=gen)
    trits[:, 0] = 1  # every row and group nonzero, so the coarsest layout is unambiguous
    if granularity == "per_tensor":
        scales = torch.full((n, k), 0.0371)
    elif granularity == "per_row":
        scales = (torch.rand(n, 1, generator=gen) + 0.5).expand(n, k)
    else:
        groups = math.ceil(k / group_size)
        per_group = torch.rand(n, groups, generator=gen) + 0.5
        scales = per_group.repeat_interleave(group_size, dim=1)[:, :k]
        trits[:, ::group_size] = 1
    scales = scales.to(dtype).to(torch.float64)  # scales exactly representable in dtype
    weight = (trits.to(torch.float64) * scales).to(dtype)
    for row in zero_rows:
        weight[row] = 0
    return weight, trits


@pytest.mark.parametrize("k", [1, 3, 33, 130, 200, 1024])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_row"])
def test_tensor_and_row_scales_round_trip(k, granularity):
    weight, _ = fake_quantized(17, k, granularity)
    packed, (layout,) = ternary.quantize_exact(weight)
    assert layout.granularity.value == granularity
    assert torch.equal(packed.dequantize(), weight)
    assert packed.codes.shape == (17, math.ceil(k / 128) * 32)


@pytest.mark.parametrize("k,group_size", [(256, 32), (200, 64), (1000, 128), (4096, 128), (130, 64)])
def test_group_scales_detected_at_their_size(k, group_size):
    weight, _ = fake_quantized(9, k, "per_group", group_size)
    packed, (layout,) = ternary.quantize_exact(weight)
    assert layout == ternary.ScaleLayout(Granularity.PER_GROUP, group_size)
    assert packed.scales.shape == (9, math.ceil(k / group_size))
    assert torch.equal(packed.dequantize(), weight)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_trip_is_exact_in_every_dtype(dtype):
    weight, _ = fake_quantized(8, 96, "per_row", dtype=dtype)
    packed, _ = ternary.quantize_exact(weight)
    assert packed.scales.dtype == dtype  # random scales need the weight's own precision
    assert torch.equal(packed.dequantize(dtype), weight)


def test_bf16_checkpoint_loaded_as_float32_keeps_16_bit_scales():
    weight, _ = fake_quantized(8, 96, "per_row", dtype=torch.bfloat16)
    packed, _ = ternary.quantize_exact(weight.to(torch.float32))
    assert packed.scales.dtype == torch.bfloat16
    assert torch.equal(packed.dequantize(torch.float32), weight.to(torch.float32))


def test_float32_scales_that_need_32_bits_stay_float32():
    weight = torch.tensor([[1.0 + 2**-20, 0.0, -(1.0 + 2**-20)]])
    packed, _ = ternary.quantize_exact(weight)
    assert packed.scales.dtype == torch.float32
    assert torch.equal(packed.dequantize(), weight)


def test_all_zero_rows_and_all_zero_matrix():
    weight, _ = fake_quantized(6, 64, "per_row", zero_rows=(0, 3))
    packed, (layout,) = ternary.quantize_exact(weight)
    assert layout.granularity is Granularity.PER_ROW
    assert torch.equal(packed.dequantize(), weight)
    zeros = torch.zeros(4, 40, dtype=torch.bfloat16)
    packed, (layout,) = ternary.quantize_exact(zeros)
    assert layout.granularity is Granularity.PER_TENSOR
    assert torch.equal(packed.dequantize(), zeros)


def test_single_non_ternary_element_is_named():
    weight, _ = fake_quantized(5, 128, "per_row")
    weight[3, 77] = weight[3, 77] * 0.5 if weight[3, 77] != 0 else 0.01
    with pytest.raises(ternary.NotTernaryError, match=r"layers\.0\.mlp\.down_proj.*\[3, 77\]"):
        ternary.quantize_exact(weight, name="model.layers.0.mlp.down_proj")


def test_dense_random_matrix_and_non_finite_are_rejected():
    assert not ternary.is_ternary(torch.randn(16, 64))
    weight, _ = fake_quantized(4, 64, "per_tensor", dtype=torch.float32)
    weight[1, 2] = float("inf")
    with pytest.raises(ternary.NotTernaryError, match="not finite"):
        ternary.detect_scale_layout(weight)


def test_groups_smaller_than_minimum_are_not_accepted():
    weight, _ = fake_quantized(4, 256, "per_group", group_size=16)
    assert not ternary.is_ternary(weight)


def test_fused_partitions_keep_their_own_scales():
    q, _ = fake_quantized(8, 128, "per_tensor", seed=1)
    k, _ = fake_quantized(4, 128, "per_row", seed=2)
    v, _ = fake_quantized(4, 128, "per_group", group_size=64, seed=3)
    fused = torch.cat([q, k, v])
    packed, layouts = ternary.quantize_exact(fused, partition_sizes=[8, 4, 4])
    assert [layout.granularity for layout in layouts] == [
        Granularity.PER_TENSOR, Granularity.PER_ROW, Granularity.PER_GROUP]
    assert packed.group_size == 64
    assert torch.equal(packed.dequantize(), fused)
    # A per-tensor scale per partition is not one per-tensor scale for the fused matrix.
    assert not ternary.detect_scale_layout(fused).granularity is Granularity.PER_TENSOR


def test_fused_partition_error_names_the_partition():
    q, _ = fake_quantized(8, 64, "per_row")
    dense = torch.randn(4, 64).to(torch.bfloat16)
    with pytest.raises(ternary.NotTernaryError, match=r"qkv_proj\[partition 1\]"):
        ternary.quantize_exact(torch.cat([q, dense]), name="qkv_proj", partition_sizes=[8, 4])


def test_bit_layout_by_hand():
    """Block of 128: byte j holds elements j, j+32, j+64, j+96 at bits 0/2/4/6, code t+1."""
    trits = torch.zeros(1, 130, dtype=torch.int64)
    trits[0, 0], trits[0, 32], trits[0, 64], trits[0, 96] = -1, 1, 1, 0
    trits[0, 5] = 1
    trits[0, 129] = -1  # second block, byte 1, bits 0
    codes = ternary.pack_codes(trits)
    assert codes.shape == (1, 64)
    zero = 1 | 1 << 2 | 1 << 4 | 1 << 6  # all four fields hold code 1 (t = 0)
    expected = [zero] * 64
    expected[0] = 0 | 2 << 2 | 2 << 4 | 1 << 6
    expected[5] = 2 | 1 << 2 | 1 << 4 | 1 << 6
    expected[32 + 1] = 0 | 1 << 2 | 1 << 4 | 1 << 6
    assert codes[0].tolist() == expected
    assert torch.equal(ternary.unpack_codes(codes, 130), trits.to(torch.int8))


def test_bits_per_weight_including_scales():
    weight, _ = fake_quantized(1280, 1024, "per_row")
    packed, _ = ternary.quantize_exact(weight)
    assert packed.bits_per_weight() == pytest.approx(2 + 16 / 1024)
    assert packed.bits_per_weight() <= 2.1
