"""Property sweeps of the ternary kernel over hostile inputs, on every ISA path this CPU runs.

Random shapes (M, K, N from 1, odd, off every block grid), every granularity, scale magnitudes
from subnormal to 1e30, activations with zeros, all-zero and tiny tokens, +-inf and NaN; exact, int8 and
int16 modes. Oracles are independent: float64 matmul on the dense weight for exact mode
(non-finite outputs must sit where the dense fp32 layer puts them, with its sign), integer dot
products of the reference's quantization for the integer modes. A few dozen cases per test and path in the default
run; `pytest --hypothesis-profile=long` runs 1000. Failing cases found by these sweeps are kept
below as explicit regression tests.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from tests.test_cpu_kernel import integer_oracle, isa  # noqa: F401  (isa: fixture over every path)
from vllm_bitcpm import ternary
from vllm_bitcpm.ops import cpu as cpu_kernel
from vllm_bitcpm.ops import reference

pytestmark = pytest.mark.skipif(not cpu_kernel.AVAILABLE, reason="CPU kernel extension is not built")

GRANULARITIES = ["tensor", "row", 32, 64, 128, 256]
SCALE_MAGNITUDES = {"subnormal": 1e-40, "tiny": 1e-30, "unit": 1.0, "huge": 1e30}
SPECIALS = ["none", "zeros", "zero_token", "tiny_token", "inf", "nan", "mixed_inf"]


@st.composite
def cases(draw):
    m, k, n = draw(st.integers(1, 40)), draw(st.integers(1, 600)), draw(st.integers(1, 70))
    granularity = draw(st.sampled_from(GRANULARITIES))
    magnitude = draw(st.sampled_from(list(SCALE_MAGNITUDES)))
    special = draw(st.sampled_from(SPECIALS))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    return m, k, n, granularity, magnitude, special, dtype, draw(st.integers(0, 2**31 - 1))


def make(case):
    """x, packed codes, float32 scales, group size and the dense float32 weight of a case."""
    m, k, n, granularity, magnitude, special, dtype, seed = case
    gen = torch.Generator().manual_seed(seed)
    trits = torch.randint(-1, 2, (n, k), generator=gen)
    group_size = k if granularity in ("tensor", "row") else granularity
    groups = math.ceil(k / group_size)
    base = SCALE_MAGNITUDES[magnitude]
    if granularity == "tensor":
        scales = torch.full((n, 1), base)
    else:
        scales = (torch.rand(n, groups, generator=gen) + 0.5) * base
    scales = scales.to(torch.float32)
    x = torch.randn(m, k, generator=gen)
    pick = lambda hi: int(torch.randint(0, hi, (1,), generator=gen))  # noqa: E731
    if special == "zeros":
        x[torch.rand(m, k, generator=gen) < 0.5] = 0
    elif special == "tiny_token":  # finite, but qmax / max|x| overflows float32; with zeros in it
        row = pick(m)
        x[row] *= 1e-36
        x[row, ::2] = 0
    elif special == "zero_token":
        x[pick(m)] = 0
    elif special == "inf":
        x[pick(m), pick(k)] = float("inf")
    elif special == "nan":
        x[pick(m), pick(k)] = float("nan")
    elif special == "mixed_inf":
        row = pick(m)
        x[row, pick(k)] = float("inf")
        x[row, pick(k)] = float("-inf")
    x = x.to(dtype)
    dense = trits.to(torch.float32) * scales.repeat_interleave(group_size, dim=1)[:, :k]
    return x, ternary.pack_codes(trits), scales, group_size, dense, trits


def run(x, codes, scales, group_size, acts, isa_name):  # noqa: F811
    return torch.ops.bitcpm_cpu.ternary_linear_isa(x, codes, scales, group_size, None, acts, isa_name)


def check_exact_case(case, isa_name):
    x, codes, scales, gs, dense, _ = make(case)
    y = run(x, codes, scales, gs, "exact", isa_name).float()
    ref32 = x.float() @ dense.T  # the dense fp32 layer: where its non-finite outputs are
    if x.dtype != torch.float32:
        ref32 = ref32.to(x.dtype).float()
    assert torch.equal(torch.isnan(y), torch.isnan(ref32)), f"NaN positions differ from the dense layer ({case})"
    assert torch.equal(torch.isinf(y), torch.isinf(ref32)), f"inf positions differ from the dense layer ({case})"
    assert torch.equal(torch.signbit(y[torch.isinf(y)]), torch.signbit(ref32[torch.isinf(ref32)]))
    finite = torch.isfinite(ref32)
    x64 = x.to(torch.float64)
    w64 = dense.to(torch.float64)
    expected, abs_dot = x64 @ w64.T, x64.abs() @ w64.abs().T
    k = x.shape[1]
    # fp32 sums in any order, one rounding per product, subnormal products off by at most the
    # smallest subnormal each, and the output's own rounding for bf16 (relative 2^-8, and half the
    # smallest bf16 subnormal, 2^-134, below its normal range).
    bf16 = x.dtype == torch.bfloat16
    bound = ((k + 1) * 2.0**-24 * abs_dot + (2.0**-8 if bf16 else 0.0) * expected.abs() + (k + 1) * 2.0**-149
             + (2.0**-134 if bf16 else 0.0))
    if bf16 and isa_name == "avx512bf16":
        # vdpbf16ps reads subnormal bf16 inputs as zero and flushes subnormal results to zero
        # (the instruction's DAZ and FTZ, whatever MXCSR says), as stock's oneDNN bf16 matmul on
        # the same CPU does: those input terms may be missing, and each of the at most K
        # accumulations may lose a partial sum below 2^-126.
        subnormal = (x64 != 0) & (x64.abs() < torch.finfo(torch.float32).tiny)
        bound = bound + (x64 * subnormal).abs() @ w64.abs().T + (k + 1) * 2.0**-126
    err = (y.to(torch.float64) - expected).abs()
    assert bool((err[finite] <= bound[finite]).all()), f"error over the fp32 bound ({case})"


def check_integer_case(case, isa_name, acts):
    x, codes, scales, gs, dense, trits = make(case)
    x = x.float()  # the integer modes quantize from float32 either way; the reference's rounding is fp32
    y = run(x, codes, scales, gs, acts, isa_name).to(torch.float64)
    expected = integer_oracle(x, trits, scales, gs, None, acts)
    nan_rows = ~torch.isfinite(x).all(dim=1)
    assert bool(torch.isnan(y[nan_rows]).all()), f"a non-finite token must give NaN outputs ({case})"
    ok = ~nan_rows
    q, inv = reference.quantize_activations(x, reference.QMAX[acts])
    w64 = dense.to(torch.float64)
    abs_sum = (q.abs().to(torch.float64) @ w64.abs().T) / inv.to(torch.float64)
    groups = math.ceil(x.shape[1] / gs)
    err = (y[ok] - expected[ok]).abs()
    # Integer dot products per group are exact; each group's product with its scale, the sum over
    # groups and the division by the token's scale round in fp32: (groups + 4) roundings of at most
    # sum |terms|, plus subnormal steps.
    bound = (groups + 4) * 2.0**-24 * abs_sum[ok] + (groups + 4) * 2.0**-149
    assert bool((err <= bound).all()), f"{acts} result off the integer oracle ({case})"


PROPERTY = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@PROPERTY
@given(case=cases())
# Found on an AVX512-BF16 CPU: a subnormal bf16 activation, which vdpbf16ps reads as zero, and
# a subnormal partial sum, which it flushes.
@example(case=(1, 4, 18, "tensor", "unit", "tiny_token", torch.bfloat16, 18))
@example(case=(4, 65, 7, "tensor", "unit", "tiny_token", torch.bfloat16, 1))  # a flushed partial sum
def test_exact_mode_hostile_inputs(isa, case):  # noqa: F811
    assume(not (isa == "scalar" and case[0] * case[1] * case[2] > 400_000))
    check_exact_case(case, isa)


@PROPERTY
@given(case=cases())
def test_int8_mode_hostile_inputs(isa, case):  # noqa: F811
    check_integer_case(case, isa, "int8")


@PROPERTY
@given(case=cases())
def test_int16_mode_hostile_inputs(isa, case):  # noqa: F811
    check_integer_case(case, isa, "int16")
