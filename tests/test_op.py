"""The op bitcpm::ternary_linear against an independent float64 matmul."""

import math
import os

import pytest
import torch

from vllm_bitcpm import ops, ternary
from vllm_bitcpm.ops import reference


def random_packed(n, k, group_size, dtype, seed=0, scale_range=(0.5, 1.5)):
    gen = torch.Generator().manual_seed(seed)
    trits = torch.randint(-1, 2, (n, k), generator=gen)
    groups = math.ceil(k / group_size)
    lo, hi = scale_range
    scales = (torch.rand(n, groups, generator=gen) * (hi - lo) + lo).to(dtype)
    return ternary.pack_codes(trits), scales, trits


def float64_oracle(x, trits, scales, group_size, bias=None):
    k = trits.shape[1]
    full = scales.to(torch.float64).repeat_interleave(group_size, dim=1)[:, :k]
    y = x.to(torch.float64) @ (trits.to(torch.float64) * full).T
    return y if bias is None else y + bias.to(torch.float64)


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("m", [1, 2, 7, 64])
@pytest.mark.parametrize("n,k,group_size", [(5, 3, 3), (64, 130, 130), (33, 200, 64), (128, 256, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_op_matches_float64(m, n, k, group_size, dtype):
    codes, scales, trits = random_packed(n, k, group_size, dtype)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = ops.ternary_linear(x, codes, scales, group_size)
    assert y.dtype == dtype and y.shape == (m, n)
    expected = float64_oracle(x, trits, scales, group_size)
    scale = expected.abs().max().clamp_min(1)
    assert ((y.to(torch.float64) - expected).abs().max() / scale) < TOLERANCE[dtype]


def test_bias_and_leading_dims():
    codes, scales, trits = random_packed(12, 40, 40, torch.float32)
    x = torch.randn(2, 3, 40)
    bias = torch.randn(12)
    y = ops.ternary_linear(x, codes, scales, 40, bias)
    expected = float64_oracle(x.reshape(6, 40), trits, scales, 40, bias).reshape(2, 3, 12)
    torch.testing.assert_close(y.to(torch.float64), expected, rtol=1e-5, atol=1e-5)


def test_huge_and_tiny_scales():
    for scale_range in [(1e30, 2e30), (1e-30, 2e-30)]:
        codes, scales, trits = random_packed(8, 64, 64, torch.float32, scale_range=scale_range)
        x = torch.randn(3, 64)
        expected = float64_oracle(x, trits, scales, 64)
        y = ops.ternary_linear(x, codes, scales, 64).to(torch.float64)
        assert ((y - expected).abs() <= 1e-5 * expected.abs().max()).all()


def test_nan_and_inf_propagate_like_dense_matmul():
    codes, scales, trits = random_packed(6, 16, 16, torch.float32)
    x = torch.randn(2, 16)
    x[0, 3] = float("nan")
    x[1, 5] = float("inf")
    dense = x @ (trits.float() * scales).T
    y = ops.ternary_linear(x, codes, scales, 16)
    assert torch.equal(torch.isnan(y), torch.isnan(dense))
    assert torch.equal(torch.isinf(y), torch.isinf(dense))


def test_wrong_operand_shapes_give_clear_errors():
    codes, scales, _ = random_packed(8, 64, 32, torch.float32)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match=r"scales have shape \(8, 1\), expected \(8, 2\)"):
        ops.ternary_linear(x, codes, scales[:, :1], 32)
    with pytest.raises(ValueError, match="K=200"):
        ops.ternary_linear(torch.randn(2, 200), codes, scales, 32)


COMPILED_OP_CHECK = """
import json, torch
from tests.test_op import float64_oracle, random_packed
from vllm_bitcpm import ops
codes, scales, trits = random_packed(10, 48, 48, torch.float32)
compiled = torch.compile(lambda x: ops.ternary_linear(x, codes, scales, 48) * 2, fullgraph=True)
errors = []
for seed in range(3):  # the first call compiles, the others run the cached graph
    x = torch.randn(4, 48, generator=torch.Generator().manual_seed(seed))
    got = compiled(x).to(torch.float64)
    errors.append((got - 2 * float64_oracle(x, trits, scales, 48)).abs().max().item())
print(json.dumps({"max_abs_error": errors}))
"""


def test_fake_impl_traces_under_torch_compile():
    """The compiled graph calls the op (fake impl for tracing, CPU kernel at run time) and gives
    the float64 oracle's answer. Compiled in a child with its own inductor cache, so what
    inductor builds and loads stays out of this process, and a failure shows its whole log."""
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "PYTHONPATH": str(root)}
        proc = subprocess.run([sys.executable, "-c", COMPILED_OP_CHECK], cwd=root, env=env, capture_output=True,
                              text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    errors = json.loads(proc.stdout.strip().splitlines()[-1])["max_abs_error"]
    assert max(errors) < 1e-4, errors  # |y| ~ 10: fp32 summation-order differences only
    codes = torch.empty(10, 32, dtype=torch.uint8, device="meta")
    out = torch.ops.bitcpm.ternary_linear(torch.empty(3, 48, device="meta"), codes, torch.empty(10, 1, device="meta"),
                                          48, None)
    assert out.shape == (3, 10) and out.device.type == "meta"


def test_int8_activation_mode_matches_an_integer_oracle():
    """W1.58A8: integer dot products of absmax-quantized activations, scaled back."""
    codes, scales, trits = random_packed(24, 200, 64, torch.float32)
    x = torch.randn(5, 200, generator=torch.Generator().manual_seed(3))
    x[2] = 0  # an all-zero token gives zeros
    y = ops.ternary_linear(x, codes, scales, 64, None, "int8")
    x64 = x.to(torch.float64)
    absmax = x64.abs().amax(dim=1, keepdim=True)
    inv = torch.where(absmax > 0, 127 / absmax, torch.ones_like(absmax))
    q = torch.round(x64 * inv).clamp(-127, 127)
    expected = float64_oracle(q, trits, scales, 64) / inv
    torch.testing.assert_close(y.to(torch.float64), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[2], torch.zeros(24))
    # and it is an approximation of the exact mode, within int8 rounding
    exact = ops.ternary_linear(x, codes, scales, 64)
    assert (y - exact).abs().max() < 0.05 * exact.abs().max()
