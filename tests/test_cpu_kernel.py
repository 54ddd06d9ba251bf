"""The C++ CPU kernel of bitcpm::ternary_linear (kernels/cpu/) against float64 oracles and the
PyTorch reference, on every ISA path the running CPU can execute (scalar; avx2, avx512,
avx512bf16 on x86; neon, neon-dotprod on aarch64, which scripts/test-aarch64.sh runs under qemu)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest
import torch

from vllm_bitcpm import ternary
from vllm_bitcpm.ops import cpu as cpu_kernel
from vllm_bitcpm.ops import reference

pytestmark = pytest.mark.skipif(
    not cpu_kernel.AVAILABLE,
    reason="CPU kernel extension vllm_bitcpm._cpu_kernels is not built "
    "(pip install --no-build-isolation -e . with torch installed)",
)

ALL_ISAS = ["scalar", *reversed(cpu_kernel.X86_ISAS), *reversed(cpu_kernel.ARM64_ISAS)]


@pytest.fixture(params=ALL_ISAS)
def isa(request):
    if request.param != "scalar" and request.param not in cpu_kernel.machine_isas():
        pytest.skip(f"{request.param} is a path of another architecture than this {platform.machine()} CPU "
                    "(aarch64 paths: scripts/test-aarch64.sh runs them under qemu)")
    if request.param not in cpu_kernel.isa_available():
        pytest.skip(f"this CPU cannot run the {request.param} path (has {cpu_kernel.isa_available()})")
    return request.param


from tests.test_op import random_packed  # noqa: E402  (same operands as the op tests)


def kernel(x, codes, scales, group_size, bias=None, acts="exact", isa="auto"):
    return torch.ops.bitcpm_cpu.ternary_linear_isa(x, codes, scales, group_size, bias, acts, isa)


def dense64(trits, scales, group_size):
    k = trits.shape[1]
    full = scales.to(torch.float64).repeat_interleave(group_size, dim=1)[:, :k]
    return trits.to(torch.float64) * full


def exact_oracle(x, trits, scales, group_size, bias=None):
    y = x.to(torch.float64) @ dense64(trits, scales, group_size).T
    return y if bias is None else y + bias.to(torch.float64)


def integer_oracle(x, trits, scales, group_size, bias=None, acts="int8"):
    """Integer dot products of absmax-quantized activations (float32 quantization, as specified)."""
    q, inv = reference.quantize_activations(x, reference.QMAX[acts])
    y = (q.to(torch.float64) @ dense64(trits, scales, group_size).T) / inv.to(torch.float64)
    return y if bias is None else y + bias.to(torch.float64)


def int8_oracle(x, trits, scales, group_size, bias=None):
    return integer_oracle(x, trits, scales, group_size, bias, "int8")


def oracle_of(acts):
    """The float64 oracle of an activation mode."""
    if acts == "exact":
        return exact_oracle
    return lambda x, trits, scales, gs, bias=None: integer_oracle(x, trits, scales, gs, bias, acts)


ACTIVATIONS = ["exact", "int8", "int16"]


TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def rel_err(y, expected):
    scale = expected.abs().max().clamp_min(1e-30)
    return float((y.to(torch.float64) - expected).abs().max() / scale)


# (M, K, N, group_size): K and N off the 4/32/128/256 grid, every granularity (per-row G=1,
# per-group 32/64/128 incl. a partial last group), decode (M < 32) and prefill (M >= 32) sizes.
CASES = [
    (1, 1, 1, 1),
    (1, 3, 5, 3),
    (2, 100, 33, 100),
    (7, 129, 5, 32),
    (1, 129, 33, 64),
    (2, 1000, 33, 128),
    (7, 1000, 5, 1000),
    (1, 4096, 1280, 4096),
    (2, 1024, 1280, 32),
    (7, 4096, 33, 64),
    (16, 1024, 100, 128),
    (64, 1000, 33, 32),
    (64, 4096, 96, 4096),
    (300, 1000, 33, 1000),
    (300, 129, 40, 64),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("acts", ACTIVATIONS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_kernel_matches_oracles(isa, case, acts):
    m, k, n, gs = CASES[case]
    if isa == "scalar" and m * k * n > 50_000_000:
        pytest.skip("too slow for the scalar path; a smaller case covers it")
    x_dtype = DTYPES[case % 3]
    scale_dtype = DTYPES[(case // 3) % 3]
    codes, scales, trits = random_packed(n, k, gs, scale_dtype, seed=case)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(100 + case)).to(x_dtype)
    bias = torch.randn(n).to(x_dtype) if case % 2 else None
    y = kernel(x, codes, scales, gs, bias, acts, isa)
    assert y.dtype == x_dtype and y.shape == (m, n)
    assert rel_err(y, oracle_of(acts)(x, trits, scales, gs, bias)) < TOL[x_dtype]
    ref = reference.ternary_linear_reference(x, codes, scales, gs, bias, acts)
    assert rel_err(y, ref.to(torch.float64)) < TOL[x_dtype]


@pytest.mark.parametrize("acts", ACTIVATIONS)
@pytest.mark.parametrize("m", [3, 40])
def test_every_dtype_pair(isa, m, acts):
    for x_dtype in DTYPES:
        for scale_dtype in DTYPES:
            codes, scales, trits = random_packed(20, 300, 64, scale_dtype)
            x = torch.randn(m, 300).to(x_dtype)
            y = kernel(x, codes, scales, 64, None, acts, isa)
            assert y.dtype == x_dtype
            assert rel_err(y, oracle_of(acts)(x, trits, scales, 64)) < TOL[x_dtype], (x_dtype, scale_dtype)


@pytest.mark.parametrize("acts", ACTIVATIONS)
def test_auto_dispatch_is_the_registered_cpu_kernel(acts):
    codes, scales, trits = random_packed(33, 1000, 128, torch.bfloat16)
    x = torch.randn(5, 1000)
    y_op = torch.ops.bitcpm.ternary_linear(x, codes, scales, 128, None, acts)
    y_auto = kernel(x, codes, scales, 128, None, acts, "auto")
    assert torch.equal(y_op, y_auto)


@pytest.mark.parametrize("acts", ACTIVATIONS)
@pytest.mark.parametrize("m", [5, 40])
def test_zero_rows_and_extreme_scales(isa, m, acts):
    k, n, gs = 300, 24, 64
    for scale_range in [(1e30, 2e30), (1e-30, 2e-30), (0.5, 1.5)]:
        codes, scales, trits = random_packed(n, k, gs, torch.float32, scale_range=scale_range)
        trits[3] = 0  # an all-zero weight row
        codes = ternary.pack_codes(trits)
        x = torch.randn(m, k)
        x[1] = 0  # an all-zero token
        y = kernel(x, codes, scales, gs, None, acts, isa)
        oracle = oracle_of(acts)(x, trits, scales, gs)
        assert torch.isfinite(y).all()
        assert rel_err(y, oracle) < 1e-5, scale_range
        assert torch.equal(y[1], torch.zeros(n)) and torch.equal(y[:, 3], torch.zeros(m))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [2, 40])
def test_nan_and_inf_propagate_like_dense_matmul(isa, m, dtype):
    k, n, gs = 200, 16, 64 if dtype == torch.float32 else 128  # bf16, 128: the AVX512-BF16 path
    codes, scales, trits = random_packed(n, k, gs, torch.float32)
    x = torch.randn(m, k)
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    x[1, 150] = float("-inf")  # second half of the row: +inf and -inf meet in one sum
    x[m - 1, 199] = float("-inf")
    x = x.to(dtype)
    dense = x.float() @ (trits.float() * scales.repeat_interleave(gs, dim=1)[:, :k]).T
    y = kernel(x, codes, scales, gs, None, "exact", isa).float()
    if dtype != torch.float32:
        dense = dense.to(dtype).float()
    assert torch.equal(torch.isnan(y), torch.isnan(dense))
    assert torch.equal(torch.isinf(y), torch.isinf(dense))
    assert torch.equal(torch.signbit(y[torch.isinf(y)]), torch.signbit(dense[torch.isinf(dense)]))
    finite = torch.isfinite(dense)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y[finite], dense[finite], rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("m", [1, 5, 40])
@pytest.mark.parametrize("group_size", [32, 64, 128, 1000])
def test_neon_int8_equals_the_scalar_twin_bit_for_bit(m, group_size):
    """The NEON int8 paths compute each group's integer dot product exactly and scale and add the
    groups in the scalar twin's order (kernels/cpu/rows_neon.cpp), so they must agree
    with it exactly, not just within a bound."""
    paths = [p for p in cpu_kernel.ARM64_ISAS if p in cpu_kernel.isa_available()]
    if not paths:
        pytest.skip(f"no NEON path on this {platform.machine()} CPU (scripts/test-aarch64.sh runs them under qemu)")
    codes, scales, _ = random_packed(37, 1000, group_size, torch.bfloat16, seed=group_size)
    x = torch.randn(m, 1000, generator=torch.Generator().manual_seed(m))
    scalar = kernel(x, codes, scales, group_size, None, "int8", "scalar")
    for path in paths:
        assert torch.equal(kernel(x, codes, scales, group_size, None, "int8", path), scalar), path


@pytest.mark.parametrize("acts", ["int8", "int16"])
@pytest.mark.parametrize("m", [3, 40])
def test_integer_modes_non_finite_token_gives_nan_outputs_like_the_reference(isa, m, acts):
    codes, scales, trits = random_packed(16, 200, 200, torch.float32)
    x = torch.randn(m, 200)
    x[0, 7] = float("inf")
    x[2, 9] = float("nan")
    x[1] = 0
    y = kernel(x, codes, scales, 200, None, acts, isa)
    ref = reference.ternary_linear_reference(x, codes, scales, 200, None, acts)
    assert torch.isnan(y[0]).all() and torch.isnan(y[2]).all()
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(y[1], torch.zeros(16))
    ok = ~torch.isnan(ref)
    torch.testing.assert_close(y[ok], ref[ok], rtol=1e-5, atol=1e-5)


def test_int8_rounding_ties_and_clamp_match_the_reference(isa):
    # Values whose scaled products land on .5 ties and on the clamp boundary.
    k = 256
    x = torch.tensor([127.0, -127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5] * (k // 8)).view(1, k)
    codes, scales, trits = random_packed(9, k, 64, torch.float32)
    y = kernel(x, codes, scales, 64, None, "int8", isa)
    torch.testing.assert_close(y.to(torch.float64), int8_oracle(x, trits, scales, 64), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("acts", ["int8", "int16"])
def test_integer_modes_quantize_exactly_as_the_reference(isa, acts):
    """Identity weights (row k has t = +1 at column k, scale 1) make each output q_k / inv, so the
    kernel's integers can be read back and must equal the reference's bit for bit: int16's split
    into 256 * hi + lo at every edge (lo = -128 / 127, hi = -128 / 127, +-qmax), .5 ties, zero and
    tiny tokens (a finite token whose qmax / max|x| overflows float32 keeps finite outputs)."""
    k = 256
    qmax = reference.QMAX[acts]
    edges = torch.tensor([qmax, -qmax, 127.0, -128.0, 128.0, -129.0, 255.0, -256.0, 32512.0, -32639.0, 0.5, 2.5,
                          -2.5, 32638.5, -32638.5, 1.0]) * (qmax / 32639)
    x = torch.stack([
        edges.repeat(k // 16),
        torch.linspace(-qmax, qmax, k),
        torch.randn(k) * 1e3,
        torch.zeros(k),
        torch.randn(k) * 5e-35,  # qmax / max|x| past float32's range
        torch.randn(k) * 1e-40,  # subnormal
    ])
    x[4, ::3] = 0  # zeros in a tiny token: 0 * inf would be NaN
    x[5, ::3] = 0
    trits = torch.eye(k, dtype=torch.int8)
    codes = ternary.pack_codes(trits)
    scales = torch.ones(k, 1)
    y = kernel(x, codes, scales, k, None, acts, isa)
    q, inv = reference.quantize_activations(x, qmax)
    assert torch.isfinite(y).all() and torch.isfinite(inv).all()
    back = torch.round(y.to(torch.float64) * inv.to(torch.float64))
    assert torch.equal(back, q.to(torch.float64))
    # A tiny token is still quantized (inv capped at float32's max); a subnormal one rounds to 0.
    assert (q[4].abs() > 0).any() and torch.equal(y[5], torch.zeros(k))


@pytest.mark.parametrize("acts", ["int8", "int16"])
@pytest.mark.parametrize("m", [1, 5, 9, 40])
def test_integer_modes_with_whole_row_scales_equal_the_scalar_twin_bit_for_bit(isa, acts, m):
    """With one scale per row every path computes s * float(exact integer dot) / inv, the scalar
    twin's arithmetic, so they must agree exactly (int16 runs the AVX2 routine on every x86 path;
    AVX512's int8 routine has its own epilogue and NEON its own test below)."""
    if isa == "scalar" or (acts == "int8" and isa != "avx2") or isa not in cpu_kernel.X86_ISAS:
        pytest.skip("the scalar twin itself, or a path with its own epilogue")
    for k in (1, 127, 1000, 3000):
        codes, scales, _ = random_packed(33, k, k, torch.bfloat16, seed=k + m)
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(k))
        assert torch.equal(kernel(x, codes, scales, k, None, acts, isa), kernel(x, codes, scales, k, None, acts, "scalar"))


@pytest.mark.parametrize("m", [31, 32, 33, 64, 200])  # 31: the row kernels beside the boundary
def test_int8_gemm_equals_the_scalar_twin_bit_for_bit(isa, m):
    """From 32 tokens with whole-row scales, int8 mode on AVX512-VNNI CPUs runs the int8 ternary
    GEMM (kernels/cpu/ternary_gemm.cpp: u8 x s8 brgemm on 32-row tiles in the VNNI layout, 32
    tokens per call, the +128 offset removed with each row's sum of t); its epilogue is the scalar
    twin's arithmetic, so the results must be the same bits. K off the 64/128 grids and 2 K blocks,
    N = 2 whole tiles and a partial one; negative, zero and huge scales, an all-zero row, a zero token."""
    if isa not in ("avx512", "avx512bf16"):
        pytest.skip("the int8 GEMM runs on the AVX512 paths (with VNNI)")
    for k in (300, 1500):
        gen = torch.Generator().manual_seed(k + m)
        trits = torch.randint(-1, 2, (77, k), generator=gen)
        trits[5] = 0
        scales = torch.rand(77, 1, generator=gen) + 0.5
        scales[::3] *= -1
        scales[1] = 0.0
        scales[2] = 1e30
        codes = ternary.pack_codes(trits)
        x = torch.randn(m, k, generator=gen)
        x[m // 2] = 0
        for dtype in (torch.bfloat16, torch.float32):
            got = kernel(x.to(dtype), codes, scales.to(dtype), k, None, "int8", isa)
            want = kernel(x.to(dtype), codes, scales.to(dtype), k, None, "int8", "scalar")
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"K={k} M={m} {dtype}")


@pytest.mark.parametrize("acts", ["int8", "int16"])
def test_whole_row_integer_modes_every_row_group_and_token_tile_equal_the_scalar_twin(isa, acts):
    """The AVX2 integer routine reduces whole-row rows four at a time (int8_whole_rows_avx2_t):
    every count of rows in the last group (N = 1, 2, 3, 6, 7, 35), every token tile it runs
    (M = 2, 3, 6, 7), fp32 / fp16 / bf16 scales including negative, zero and huge ones, and an
    all-zero row, against the scalar twin value for value (the twin writes a zero result as +0,
    the SIMD paths as the sign of scale * 0 gives)."""
    if isa == "scalar" or (acts == "int8" and isa != "avx2") or isa not in cpu_kernel.X86_ISAS:
        pytest.skip("the scalar twin itself, or a path with its own epilogue")
    k = 300
    for n in (1, 2, 3, 6, 7, 35):
        for m in (2, 3, 6, 7):
            for dtype, huge in ((torch.float32, 1e30), (torch.float16, 6e4), (torch.bfloat16, 1e30)):
                gen = torch.Generator().manual_seed(n * 100 + m)
                trits = torch.randint(-1, 2, (n, k), generator=gen)
                trits[n // 2] = 0  # an all-zero row
                scales = torch.rand(n, 1, generator=gen) + 0.5
                scales[::2] *= -1
                scales[0] = 0.0
                if n > 3:
                    scales[3] = huge
                codes = ternary.pack_codes(trits)
                x = torch.randn(m, k, generator=gen)
                got = kernel(x, codes, scales.to(dtype), k, None, acts, isa)
                torch.testing.assert_close(got, kernel(x, codes, scales.to(dtype), k, None, acts, "scalar"),
                                           rtol=0, atol=0, msg=f"N={n} M={m} {dtype}")
                # and the independent float64 oracle: exact integer dots, one fp32 scale and divide
                expected = integer_oracle(x, trits, scales.to(dtype), k, acts=acts)
                assert (got.double() - expected).abs().le(1e-6 * expected.abs() + 1e-30).all(), f"N={n} M={m} {dtype}"
                assert torch.equal(got[:, n // 2], torch.zeros(m))  # an all-zero row is exactly 0


def test_int16_whole_rows_at_the_largest_k_in_full_row_groups(isa):
    """K = 65536, |v| = 32639 everywhere: a full group of four rows (and three more) whose dots
    reach +-32639 * 65536, just under 2^31, with six tokens, against the scalar twin exactly."""
    if isa == "scalar" or isa not in cpu_kernel.X86_ISAS:
        pytest.skip("the scalar twin itself")
    k = 65536
    gen = torch.Generator().manual_seed(7)
    sign = torch.where(torch.arange(k) % 3 == 0, -1.0, 1.0)
    x = torch.stack([sign, -sign, *(torch.randint(0, 2, (4, k), generator=gen) * 2.0 - 1.0)])
    trits = torch.cat([torch.stack([sign, -sign]), torch.randint(-1, 2, (5, k), generator=gen).float()]).to(torch.int8)
    codes = ternary.pack_codes(trits)
    scales = torch.ones(7, 1)
    y = kernel(x, codes, scales, k, None, "int16", isa)
    assert y[0, :2].tolist() == [65536.0, -65536.0] and y[1, :2].tolist() == [-65536.0, 65536.0]
    torch.testing.assert_close(y, kernel(x, codes, scales, k, None, "int16", "scalar"), rtol=0, atol=0)
    expected = integer_oracle(x, trits, scales, k, acts="int16")  # float64, independent of both
    assert (y.double() - expected).abs().le(1e-6 * expected.abs()).all()


@pytest.mark.parametrize("group_size", [65536, 4096, 128, 32])
def test_int16_at_its_largest_k_and_values_stays_exact(isa, group_size):
    """K = 65536 with every |v| = 32639 and t = sign(x): the dot product is 32639 * 65536, just under
    2^31, so int32 sums hold it and y = 65536 (the row's K) for whole-row scales."""
    k = 65536
    sign = torch.where(torch.arange(k) % 3 == 0, -1.0, 1.0)
    x = sign.view(1, k)
    trits = torch.stack([sign, -sign]).to(torch.int8)
    codes = ternary.pack_codes(trits)
    scales = torch.ones(2, k // group_size)
    y = kernel(x, codes, scales, group_size, None, "int16", isa)
    if group_size == k:
        assert y.tolist() == [[65536.0, -65536.0]]
    else:  # the groups' fp32 sum rounds
        torch.testing.assert_close(y, torch.tensor([[65536.0, -65536.0]]), rtol=1e-4, atol=0)


def test_int16_is_closer_to_exact_than_int8(isa):
    """The point of int16 mode: integer kernels at about the precision of the float activations."""
    codes, scales, trits = random_packed(64, 1024, 1024, torch.bfloat16)
    x = torch.randn(6, 1024)
    x[:, 7] *= 50  # an outlier feature, as real activations have
    exact = exact_oracle(x, trits, scales, 1024)
    err = {acts: rel_err(kernel(x, codes, scales, 1024, None, acts, isa), exact) for acts in ("int8", "int16")}
    # Steps of max|x| / 32639 against max|x| / 127: about 257x less error (measured 232x).
    assert err["int16"] * 100 < err["int8"], err


def test_int16_refuses_k_past_its_exact_range():
    k = 65536 + 128
    codes = torch.full((1, k // 128 * 32), 0x55, dtype=torch.uint8)
    with pytest.raises(ValueError, match="int16 activations take K <= 65536"):
        kernel(torch.randn(1, k), codes, torch.ones(1, 1), k, None, "int16")
    with pytest.raises(ValueError, match="int16 activations take K <= 65536"):
        reference.ternary_linear_reference(torch.randn(1, k), codes, torch.ones(1, 1), k, None, "int16")
    assert kernel(torch.randn(1, k), codes, torch.ones(1, 1), k, None, "exact").shape == (1, 1)


def test_unknown_activation_mode_is_refused_by_name():
    codes, scales, _ = random_packed(4, 128, 128, torch.float32)
    with pytest.raises(ValueError, match="activations must be one of exact, int8, int16, got 'int4'"):
        kernel(torch.randn(1, 128), codes, scales, 128, None, "int4")
    with pytest.raises(ValueError, match="activations must be one of exact, int8, int16, got 'int4'"):
        reference.ternary_linear_reference(torch.randn(1, 128), codes, scales, 128, None, "int4")


def test_leading_dims_one_d_input_and_bias(isa):
    codes, scales, trits = random_packed(12, 40, 40, torch.float32)
    x = torch.randn(2, 3, 40)
    bias = torch.randn(12)
    y = kernel(x, codes, scales, 40, bias, "exact", isa)
    expected = exact_oracle(x.reshape(6, 40), trits, scales, 40, bias).reshape(2, 3, 12)
    torch.testing.assert_close(y.to(torch.float64), expected, rtol=1e-5, atol=1e-5)
    y1 = kernel(x[0, 0], codes, scales, 40, bias, "int8", isa)
    assert y1.shape == (12,)
    # non-contiguous x
    xt = torch.randn(40, 5).t()
    torch.testing.assert_close(
        kernel(xt, codes, scales, 40, None, "exact", isa).to(torch.float64),
        exact_oracle(xt, trits, scales, 40),
        rtol=1e-5,
        atol=1e-5,
    )


def test_errors_match_the_reference_messages():
    codes, scales, _ = random_packed(8, 64, 32, torch.float32)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match=r"scales have shape \(8, 1\), expected \(8, 2\)"):
        kernel(x, codes, scales[:, :1], 32)
    with pytest.raises(ValueError, match="K=200"):
        kernel(torch.randn(2, 200), codes, scales, 32)
    with pytest.raises(ValueError, match="unknown isa"):
        kernel(x, codes, scales, 32, None, "exact", "sve2")
    other = "avx2" if platform.machine() in ("aarch64", "arm64") else "neon"
    with pytest.raises(ValueError, match=f"isa '{other}' is not supported by this CPU"):
        kernel(x, codes, scales, 32, None, "exact", other)


def test_isa_helpers():
    isas = cpu_kernel.isa_available()
    assert isas[0] == "scalar"
    assert str(torch.ops.bitcpm_cpu.current_isa()).split("+")[0] == isas[-1]
    assert cpu_kernel.ISA is not None


# bf16 activations in exact mode (the engine's dtype for BitCPM4) on every ISA path. AVX512-BF16:
# decode (M < 32, whole-row or >= 128-wide groups) by vdpbf16ps, prefill (bf16 scales) by rows
# dequantized to bf16 for at::mm. Other paths compute in fp32 inside the op (bf16 widened
# exactly; prefill through an fp32 at::mm, never ATen's slow bf16 fallback) and meet the same bound.
# K with an odd number of 128-weight blocks (a half chunk), groups spanning chunks and halves.
BF16_CASES = [
    (1, 1024, 1280, 1024),  # one token, whole-row scales: the batch-1 decode routine
    (1, 1029, 17, 1029),  # the same with an odd block count (a half chunk at the end)
    (1, 129, 33, 129),
    (3, 300, 17, 128),
    (7, 1000, 65, 256),
    (31, 4096, 100, 512),
    (1, 4096, 1024, 128),
    (5, 384, 40, 128),
    (2, 1000, 33, 1000),
    (9, 640, 24, 256),
    (10, 1024, 33, 1024),  # whole-row scales, several tokens: two rows per pass, odd row count
    (8, 129, 20, 129),
    (3, 4096, 7, 4096),
    (40, 129, 33, 32),  # prefill (M >= 32): rows dequantized to bf16 for at::mm, any group >= 32
    (64, 1000, 33, 64),
    (300, 1024, 40, 128),
    (33, 640, 17, 640),
]


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", BF16_CASES, ids=[f"m{m}-k{k}-n{n}-g{g}" for m, k, n, g in BF16_CASES])
def test_bf16_activations_are_exact_up_to_the_output_rounding(isa, case, scale_dtype):
    """Products of bf16 activations and ternary weights are exact in fp32, so the only errors are
    fp32 summation (bounded by K * 2^-24 * sum|x*w|) and the final rounding to bf16 (2^-8)."""
    m, k, n, gs = case
    if isa == "scalar" and m * k * n > 5_000_000:
        pytest.skip("too slow for the scalar path; smaller cases cover it")
    codes, scales, trits = random_packed(n, k, gs, scale_dtype, seed=k + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k)).to(torch.bfloat16)
    y = kernel(x, codes, scales, gs, None, "exact", isa)
    assert y.dtype == torch.bfloat16
    expected = exact_oracle(x, trits, scales, gs)
    abs_dot = x.abs().to(torch.float64) @ dense64(trits, scales, gs).abs().T
    bound = 2.0**-8 * expected.abs() + k * 2.0**-24 * abs_dot
    assert bool(((y.to(torch.float64) - expected).abs() <= bound).all())


def _kernel_report(env_isa: str) -> dict:
    """What a fresh process with VLLM_BITCPM_ISA=env_isa loads (the cap is read once per process)."""
    code = ("import json, torch; from vllm_bitcpm.ops import cpu; "
            "print(json.dumps({'isa': cpu.ISA, 'cpu_isa': cpu.CPU_ISA, 'available': cpu.isa_available(), "
            "'bf16_gemv': torch.ops.bitcpm_cpu.bf16_gemv_isa(), 'int8_gemv': torch.ops.bitcpm_cpu.int8_gemv_isa()}))")
    env = {**os.environ, "VLLM_BITCPM_ISA": env_isa}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("cap", ["avx2", "neon", "scalar"])
def test_isa_cap_limits_every_kernel(cap):
    """VLLM_BITCPM_ISA (AVX2 mode on an AVX512 machine, NEON without sdot on an Arm one) caps the
    ternary and lm_head kernels alike."""
    if cap not in cpu_kernel.isa_available():
        pytest.skip(f"this CPU cannot run the {cap} path")
    got = _kernel_report(cap)
    assert got["isa"] == cap and got["cpu_isa"] == cpu_kernel.CPU_ISA
    assert got["available"] == cpu_kernel.isa_available()[: cpu_kernel.isa_available().index(cap) + 1]
    head = "scalar" if cap in cpu_kernel.ARM64_ISAS else cap  # the lm_head kernels have no NEON path
    assert got["bf16_gemv"] == head and got["int8_gemv"] == head


def test_isa_cap_rejects_unknown_values():
    env = {**os.environ, "VLLM_BITCPM_ISA": "avx1024"}
    proc = subprocess.run([sys.executable, "-c", "import vllm_bitcpm.ops"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert ("VLLM_BITCPM_ISA='avx1024'; expected one of auto, avx512bf16, avx512, avx2, neon-dotprod, neon, scalar"
            in proc.stderr)


def test_isa_cap_rejects_another_architectures_paths():
    """A cap the kernels of this CPU would ignore (an x86 path on Arm, a NEON path on x86) is an error."""
    other = {"x86_64": "neon", "aarch64": "avx2"}.get(platform.machine())
    if other is None:
        pytest.skip(f"no SIMD paths on {platform.machine()}")
    env = {**os.environ, "VLLM_BITCPM_ISA": other}
    proc = subprocess.run([sys.executable, "-c", "import vllm_bitcpm.ops"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    assert f"VLLM_BITCPM_ISA='{other}' names a path of another architecture" in proc.stderr
