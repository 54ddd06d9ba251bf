"""bitcpm_cpu.int8_gemv (kernels/cpu/lm_head_gemv.cpp), the opt-in int8 lm_head's decode kernel,
against a float64 matmul of the same int8 rows and scales on every ISA path this CPU runs, and its
use by Int8LMHeadMethod."""

from __future__ import annotations

import pytest
import torch

from vllm_bitcpm import lm_head
from vllm_bitcpm.ops import cpu as cpu_kernel

pytestmark = pytest.mark.skipif(not lm_head.int8_gemv_available(), reason="CPU kernel extension not built")

ISAS = ["scalar", "avx2", "avx512vnni"]
OUT_EPS = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}


def runnable(isa: str) -> bool:
    if not lm_head.int8_gemv_available():
        return False
    if isa == "avx512vnni":
        return torch.ops.bitcpm_cpu.int8_gemv_isa() == "avx512vnni"
    return isa == "scalar" or isa in cpu_kernel.isa_available()


@pytest.fixture(params=ISAS)
def isa(request):
    if not runnable(request.param):
        pytest.skip(f"this CPU cannot run {request.param}")
    return request.param


def oracle(x, q, s):
    return (x.double() @ q.double().T) * s.double()


def bound(x, q, s):
    """What the kernel may lose against float64: x rounded once to int16 (half a step of
    max|x| / 32767 per entry), fp32 sums of the exact int32 block sums (one rounding per
    256-column block, plus the scale products), and one rounding to x's dtype."""
    xd, qd, sd = x.double(), q.double().abs(), s.double().abs()
    step = xd.abs().amax(dim=1, keepdim=True) / 32767
    blocks = x.shape[1] // 256 + 4
    return (OUT_EPS[x.dtype] * oracle(x, q, s).abs()
            + 0.51 * step * (qd.sum(dim=1) * sd)[None, :]
            + blocks * 2.0**-22 * (xd.abs() @ qd.T) * sd)


def operands(m, k, n=37, seed=0, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype)
    q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    s = torch.rand(n, generator=gen) * 0.01
    return x, q, s


def check(y, x, q, s):
    err = (y.double() - oracle(x, q, s)).abs()
    excess = err - bound(x, q, s)
    assert (excess <= 1e-30).all(), f"max excess {excess.max().item()}"


@pytest.mark.parametrize("m", [1, 2, 3, 7, 8, 16])
@pytest.mark.parametrize("k", [1, 31, 32, 100, 256, 257, 1024, 1029])
def test_matches_float64(isa, m, k):
    x, q, s = operands(m, k, seed=m * 7919 + k)
    y = torch.ops.bitcpm_cpu.int8_gemv(x, q, s, isa)
    assert y.dtype == x.dtype and y.shape == (m, q.shape[0])
    check(y, x, q, s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_other_activation_dtypes(isa, dtype):
    x, q, s = operands(3, 300, seed=11, dtype=dtype)
    y = torch.ops.bitcpm_cpu.int8_gemv(x, q, s, isa)
    assert y.dtype == dtype
    check(y, x, q, s)


def test_extreme_codes_do_not_overflow(isa):
    """Every product at its largest (|x16| = 32767, q = -128) over many blocks: the int32 block
    sums must not wrap."""
    k = 2048
    x = torch.full((2, k), 3.0, dtype=torch.bfloat16)
    x[1] = -3.0
    q = torch.full((5, k), -128, dtype=torch.int8)
    s = torch.ones(5)
    y = torch.ops.bitcpm_cpu.int8_gemv(x, q, s, isa).double()
    assert torch.equal(y, oracle(x, q, s).to(torch.bfloat16).double())


def test_huge_tiny_and_zero_values(isa):
    x, q, s = operands(3, 96, seed=3)
    x = (x.float() * 1e30).to(torch.bfloat16)
    s = s * 1e-30
    x[2] = 0  # an all-zero token
    s[4] = 0  # an all-zero row scale
    y = torch.ops.bitcpm_cpu.int8_gemv(x, q, s, isa)
    check(y, x, q, s)
    assert (y[2] == 0).all() and (y[:, 4] == 0).all()


def test_nan_and_inf_propagate_as_dense(isa):
    x, q, s = operands(3, 64, n=4, seed=4)
    x[0, 5] = float("nan")
    x[1, 40] = float("inf")
    q[2, 40] = 0  # inf * 0 = nan, as in the dense matmul
    y = torch.ops.bitcpm_cpu.int8_gemv(x, q, s, isa).float()
    expected = x.float() @ (q.float() * s[:, None]).T
    assert torch.equal(y.isnan(), expected.isnan()) and torch.equal(y.isinf(), expected.isinf())
    check(y[2:], x[2:], q, s)  # the finite token beside them is computed as usual


@pytest.mark.parametrize("threads", [1, 2])
def test_rows_split_across_threads(threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, q, s = operands(2, 256, n=3000, seed=5)  # several row tasks
        check(torch.ops.bitcpm_cpu.int8_gemv(x, q, s), x, q, s)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize(
    "x, q, s, message",
    [
        (torch.zeros(17, 8), torch.zeros(4, 8, dtype=torch.int8), torch.ones(4), "at most 16 tokens"),
        (torch.zeros(1, 8), torch.zeros(4, 8), torch.ones(4), "qweight must be int8"),
        (torch.zeros(1, 8, dtype=torch.int32), torch.zeros(4, 8, dtype=torch.int8), torch.ones(4), "floating point"),
        (torch.zeros(1, 8), torch.zeros(4, 9, dtype=torch.int8), torch.ones(4), "x has 8 columns, qweight has 9"),
        (torch.zeros(1, 8), torch.zeros(4, 8, dtype=torch.int8), torch.ones(3), r"scales must be \[4\]"),
        (torch.zeros(1, 8), torch.zeros(8, 4, dtype=torch.int8).T, torch.ones(4), "contiguous"),
    ],
)
def test_bad_operands_are_named(x, q, s, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.bitcpm_cpu.int8_gemv(x, q, s)


@pytest.mark.parametrize("isa_name", ["avx9", *[i for i in ISAS if not runnable(i)]])
def test_unavailable_isa_is_refused(isa_name):
    with pytest.raises(RuntimeError, match=f"'{isa_name}' is not available on this CPU"):
        torch.ops.bitcpm_cpu.int8_gemv(torch.zeros(1, 8), torch.zeros(2, 8, dtype=torch.int8), torch.ones(2), isa_name)


# --- its use by the int8 lm_head --------------------------------------------------------------

def test_int8_head_uses_the_kernel_for_decode_sizes(monkeypatch):
    head = torch.nn.Module()
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(300, 128, generator=gen).to(torch.bfloat16)
    head.weight = torch.nn.Parameter(w, requires_grad=False)
    method = lm_head.Int8LMHeadMethod()
    method.process_weights_after_loading(head)
    q, s = lm_head.quantize_rows_int8(w)
    calls = []
    real = torch.ops.bitcpm_cpu.int8_gemv
    monkeypatch.setattr(lm_head, "_int8_gemv", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    for m in (1, lm_head.INT8_GEMV_MAX_TOKENS, lm_head.INT8_GEMV_MAX_TOKENS + 1):
        x = torch.randn(m, 128, generator=gen).to(torch.bfloat16)
        y = method.apply(head, x)
        # ATen's int8 matmul (the larger batch) rounds the scales to bf16 too: 2^-8 more per row
        check_bound = bound(x, q, s) + 2.0**-8 * (x.double().abs() @ q.double().abs().T) * s.double()
        assert ((y.double() - oracle(x, q, s)).abs() <= check_bound).all()
    limit = lm_head.INT8_GEMV_MAX_TOKENS
    # AVX2 paths: a larger batch goes to the kernel in slices of `limit` tokens; elsewhere to ATen.
    expected = [1, limit] + ([limit, 1] if lm_head.int8_gemv_slices_beyond() else [])
    assert calls == expected, "up to INT8_GEMV_MAX_TOKENS tokens take the kernel, more in slices or ATen's matmul"
