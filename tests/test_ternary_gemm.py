"""The exact-mode kernel at every batch size, against a float64 oracle, on every ISA path this CPU has.

Several tokens run different code than one (the per-row decode loops below kFusedGemmMinM
tokens, the ternary GEMM of kernels/cpu/ternary_gemm.cpp above it, with token tiles of 8/16/24
and zero-padded tails, and the bf16 GEMM on AVX512-BF16 from 64 tokens (from 32 with groups under
128): 32-row tiles in the VNNI layout, 32 tokens per call), so the batch sizes around every
boundary are checked: 1..16, 31..33, 64, 200 and 513 tokens, each granularity BitCPM uses (one
scale per tensor, per row, per group of 32..256) and K, N off every block grid. A hypothesis
sweep adds random shapes per path (`pytest --hypothesis-profile=long` for 1000 per path).

The bound is rigorous, not a tolerance picked to pass: weights t*s and bf16/fp16 activations
are exact in fp32, an fp32 activation times t*s rounds once, and fp32 sums of K terms err by at
most K * 2^-24 * sum|x*w| in any order; a 16-bit output adds its own rounding (2^-8 for bf16).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_cpu_kernel import isa  # noqa: F401  (fixture: every ISA path this CPU runs)
from vllm_bitcpm import ternary
from vllm_bitcpm.ops import cpu as cpu_kernel

pytestmark = pytest.mark.skipif(not cpu_kernel.AVAILABLE, reason="CPU kernel extension is not built")

TOKENS = [*range(1, 17), 31, 32, 33, 64, 200, 513]
GRANULARITIES = ["tensor", "row", 32, 64, 128, 256]
OUTPUT_ROUNDING = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def layer(n: int, k: int, granularity, scale_dtype=torch.bfloat16, seed: int = 0):
    """Packed codes, scales and group size of a random ternary layer, plus the float64 weight."""
    gen = torch.Generator().manual_seed(seed)
    trits = torch.randint(-1, 2, (n, k), generator=gen)
    if granularity == "tensor":
        group_size, scales = k, torch.full((n, 1), 0.0173)
    elif granularity == "row":
        group_size, scales = k, torch.rand(n, 1, generator=gen) + 0.5
    else:
        group_size = granularity
        scales = torch.rand(n, math.ceil(k / group_size), generator=gen) + 0.5
    scales = scales.to(scale_dtype)
    full = scales.to(torch.float64).repeat_interleave(group_size, dim=1)[:, :k]
    return ternary.pack_codes(trits), scales, group_size, trits.to(torch.float64) * full


def check_exact(x: torch.Tensor, codes, scales, group_size, w64: torch.Tensor, isa_name: str) -> None:
    y = torch.ops.bitcpm_cpu.ternary_linear_isa(x, codes, scales, group_size, None, "exact", isa_name)
    assert y.dtype == x.dtype and y.shape == (x.shape[0], w64.shape[0])
    x64 = x.to(torch.float64)
    expected = x64 @ w64.T
    abs_dot = x64.abs() @ w64.abs().T
    k = x.shape[1]
    bound = (k + 1) * 2.0**-24 * abs_dot + OUTPUT_ROUNDING[x.dtype] * expected.abs() + 1e-30
    err = (y.to(torch.float64) - expected).abs()
    worst = int(torch.argmax(err - bound))
    assert bool((err <= bound).all()), (
        f"{isa_name}: M={x.shape[0]} K={k} N={w64.shape[0]} group={group_size}: error "
        f"{err.flatten()[worst]:.3e} over the bound {bound.flatten()[worst]:.3e} at flat index {worst}")


@pytest.mark.parametrize("granularity", GRANULARITIES, ids=str)
@pytest.mark.parametrize("m", TOKENS)
def test_every_batch_size_matches_float64(isa, m, granularity):  # noqa: F811
    k, n = 333, 77  # neither on the 32/128/256 grids nor a multiple of a token tile
    if isa == "scalar" and m > 64:
        k, n = 133, 19
    codes, scales, gs, w64 = layer(n, k, granularity, seed=m)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1000 + m))
    check_exact(x, codes, scales, gs, w64, isa)
    check_exact(x.to(torch.bfloat16), codes, scales, gs, w64, isa)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [8, 10, 24, 40, 252])
def test_model_layer_shape(isa, m, scale_dtype):  # noqa: F811
    """A BitCPM4-0.5B-sized K (4096, the down projection: several K blocks of the GEMM), 80 rows
    (two whole 32-row tiles of the bf16 GEMM and a partial one), float32 scales (no bf16 GEMM)
    and bf16 ones (the bf16 GEMM from 32 tokens on AVX512-BF16), bf16 and fp32 activations."""
    if isa == "scalar":
        pytest.skip("the scalar path is covered at small shapes")
    codes, scales, gs, w64 = layer(80, 4096, "row", scale_dtype=scale_dtype, seed=m)
    x = torch.randn(m, 4096, generator=torch.Generator().manual_seed(m))
    check_exact(x, codes, scales, gs, w64, isa)
    check_exact(x.to(torch.bfloat16), codes, scales, gs, w64, isa)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(m=st.integers(1, 80), k=st.integers(1, 700), n=st.integers(1, 90),
       granularity=st.sampled_from(GRANULARITIES), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**31 - 1))
def test_random_shapes_match_float64(isa, m, k, n, granularity, dtype, seed):  # noqa: F811
    codes, scales, gs, w64 = layer(n, k, granularity, seed=seed)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
    check_exact(x, codes, scales, gs, w64, isa)


@pytest.mark.parametrize("m", [67, 70])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gemm_paths_add_the_bias_before_the_one_rounding(isa, dtype, m):  # noqa: F811
    """The GEMMs round their fp32 blocks straight into a 16-bit output, the bias added first
    (67 and 70 tokens: the GEMM paths of every x86 ISA; at 67 the fp32 GEMM leaves its last 3
    tokens to the decode loops, whose rows take the same store). int8: the scalar twin
    computes the same fp32 values, adds the bias and rounds once, so the bits must agree. Exact:
    the float64 oracle plus the bias, within the fp32-sum bound and one output rounding."""
    codes, scales, gs, w64 = layer(77, 333, "row", seed=7)
    x = torch.randn(m, 333, generator=torch.Generator().manual_seed(8)).to(dtype)
    bias = torch.randn(77, generator=torch.Generator().manual_seed(9)).to(dtype)
    run = torch.ops.bitcpm_cpu.ternary_linear_isa
    got = run(x, codes, scales, gs, bias, "int8", isa)
    assert torch.equal(got, run(x, codes, scales, gs, bias, "int8", "scalar"))
    y = run(x, codes, scales, gs, bias, "exact", isa).to(torch.float64)
    x64 = x.to(torch.float64)
    expected = x64 @ w64.T + bias.to(torch.float64)
    bound = (334 * 2.0**-24 * (x64.abs() @ w64.abs().T + bias.abs().to(torch.float64))
             + OUTPUT_ROUNDING[dtype] * expected.abs() + 1e-30)
    assert bool(((y - expected).abs() <= bound).all())
