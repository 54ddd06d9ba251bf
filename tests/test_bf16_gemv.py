"""bitcpm_cpu.bf16_gemv (kernels/cpu/lm_head_gemv.cpp), the decode lm_head kernel, against a float64
matmul of the same bf16 values on every ISA path this CPU runs, and its use in the lm_head."""

from __future__ import annotations

import pytest
import torch

from vllm_bitcpm import lm_head
from vllm_bitcpm.ops import cpu as cpu_kernel

pytestmark = pytest.mark.skipif(not lm_head.bf16_gemv_available(), reason="CPU kernel extension not built")

ISAS = ["scalar", "avx2", "avx512bf16"]


def runnable(isa: str) -> bool:
    available = cpu_kernel.isa_available()
    return isa == "scalar" or isa in available


@pytest.fixture(params=ISAS)
def isa(request):
    if not runnable(request.param):
        pytest.skip(f"this CPU cannot run {request.param}")
    return request.param


def oracle(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float64) @ w.to(torch.float64).T


def bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fp32 sums of exact products, rounded once to bf16: 2^-8 |y| + K 2^-24 sum|x w|."""
    k = x.shape[1]
    return 2.0**-8 * oracle(x, w).abs() + k * 2.0**-24 * (x.to(torch.float64).abs() @ w.to(torch.float64).abs().T)


@pytest.mark.parametrize("m", [1, 2, 3, 7, 8, 16])
@pytest.mark.parametrize("k", [1, 31, 32, 100, 1024, 1029])
def test_matches_float64(isa, m, k):
    gen = torch.Generator().manual_seed(m * 7919 + k)
    n = 37
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    w = (torch.randn(n, k, generator=gen) * 0.05).to(torch.bfloat16)
    y = torch.ops.bitcpm_cpu.bf16_gemv(x, w, isa)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    err = (y.to(torch.float64) - oracle(x, w)).abs()
    assert (err <= bound(x, w) + 1e-30).all(), f"max excess {(err - bound(x, w)).max().item()}"


def test_huge_and_tiny_values(isa):
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 96, generator=gen) * 1e30).to(torch.bfloat16)
    w = (torch.randn(5, 96, generator=gen) * 1e-30).to(torch.bfloat16)
    err = (torch.ops.bitcpm_cpu.bf16_gemv(x, w, isa).to(torch.float64) - oracle(x, w)).abs()
    assert (err <= bound(x, w)).all()


def test_nan_and_inf_propagate_as_dense(isa):
    x = torch.ones(2, 64, dtype=torch.bfloat16)
    x[0, 5] = float("nan")
    x[1, 40] = float("inf")
    w = torch.ones(3, 64, dtype=torch.bfloat16)
    w[2, 40] = 0.0  # inf * 0 = nan, as in the dense matmul
    y = torch.ops.bitcpm_cpu.bf16_gemv(x, w, isa).float()
    expected = (x.float() @ w.float().T)
    assert torch.equal(y.isnan(), expected.isnan()) and torch.equal(y.isinf(), expected.isinf())


@pytest.mark.parametrize("threads", [1, 2])
def test_rows_split_across_threads(threads):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(5)
        x = torch.randn(2, 256, generator=gen).to(torch.bfloat16)
        w = torch.randn(3000, 256, generator=gen).to(torch.bfloat16)  # several row tasks
        err = (torch.ops.bitcpm_cpu.bf16_gemv(x, w).double() - oracle(x, w)).abs()
        assert (err <= bound(x, w)).all()
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize(
    "x, w, message",
    [
        (torch.zeros(17, 8, dtype=torch.bfloat16), torch.zeros(4, 8, dtype=torch.bfloat16), "at most 16 tokens"),
        (torch.zeros(1, 8), torch.zeros(4, 8, dtype=torch.bfloat16), "must be bfloat16"),
        (torch.zeros(1, 8, dtype=torch.bfloat16), torch.zeros(4, 9, dtype=torch.bfloat16), "x has 8 columns, weight has 9"),
        (torch.zeros(1, 8, dtype=torch.bfloat16), torch.zeros(8, 4, dtype=torch.bfloat16).T, "contiguous"),
    ],
)
def test_bad_operands_are_named(x, w, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.bitcpm_cpu.bf16_gemv(x, w)


def test_unavailable_isa_is_refused():
    missing = [isa for isa in ISAS if not runnable(isa)]
    if not missing:
        pytest.skip("this CPU runs every path")
    with pytest.raises(RuntimeError, match="not available on this CPU"):
        torch.ops.bitcpm_cpu.bf16_gemv(torch.zeros(1, 8, dtype=torch.bfloat16),
                                        torch.zeros(2, 8, dtype=torch.bfloat16), missing[0])


# --- its use as the lm_head ------------------------------------------------------------------

class _Head(torch.nn.Module):
    def __init__(self, weight):
        super().__init__()
        from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.quant_method = UnquantizedEmbeddingMethod()


class _Model(torch.nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.lm_head = _Head(weight)


def _model_and_operands():
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(300, 128, generator=gen).to(torch.bfloat16)
    model = _Model(w)
    model.lm_head.quant_method.process_weights_after_loading(model.lm_head)  # vLLM's CPU GEMM dispatch
    return model, torch.randn(4, 128, generator=gen).to(torch.bfloat16), w


@pytest.mark.skipif(not lm_head.bf16_gemv_max_tokens(),
                    reason="the head takes the kernel on AVX512-BF16 and AVX2 paths only (where it was measured faster)")
def test_head_routes_decode_sizes_only(monkeypatch):
    model, x, w = _model_and_operands()
    calls = []
    real = torch.ops.bitcpm_cpu.bf16_gemv
    monkeypatch.setattr(lm_head, "_gemv", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    active = [True]
    assert lm_head.install_cpu_decode_kernel(model, lambda: active[0])
    method = model.lm_head.quant_method
    limit = lm_head.bf16_gemv_max_tokens()
    sizes = (1, 2, limit, limit + 1, limit + 5)
    xs = torch.randn(max(sizes), x.shape[1], generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    for m in sizes:
        y = method.apply(model.lm_head, xs[:m])
        assert ((y.double() - oracle(xs[:m], w)).abs() <= bound(xs[:m], w) + 2.0**-8 * oracle(xs[:m], w).abs()).all()
    # AVX2 paths: larger batches go to the kernel in slices of `limit` tokens (vLLM's call there is
    # ATen's slow bf16 fallback); elsewhere to vLLM's call.
    expected = [1, 2, limit] + ([limit, 1, limit, 5] if lm_head.bf16_gemv_slices_beyond() else [])
    assert calls == expected, "tokens <= bf16_gemv_max_tokens() go to the kernel, more in slices or to vLLM's call"
    active[0] = False
    method.apply(model.lm_head, x[:1])
    assert calls == expected, "a model without ternary layers keeps vLLM's call"


def test_head_switch_off(monkeypatch):
    from vllm_bitcpm.cpu_fused import FUSED_ENV

    monkeypatch.setenv(FUSED_ENV, "0")
    model, _, _ = _model_and_operands()
    assert not lm_head.install_cpu_decode_kernel(model, lambda: True)
    assert type(model.lm_head.quant_method).__name__ == "UnquantizedEmbeddingMethod"
