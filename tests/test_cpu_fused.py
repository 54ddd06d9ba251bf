"""vllm_bitcpm.cpu_fused: LongRoPE and RMSNorm through vLLM's fused CPU kernels, against float64
formulas (vllm_bitcpm.testing.reference_model), and only while the model has ternary layers."""

from __future__ import annotations

import math
import types

import pytest
import torch
from torch import nn

from vllm_bitcpm import cpu_fused
from vllm_bitcpm.testing import reference_model

pytestmark = pytest.mark.skipif(not cpu_fused.fused_kernels_available(),
                                reason="vLLM's CPU kernels (_C.rotary_embedding, _C.rms_norm) are not available")

HEAD, HEADS, KV_HEADS, ORIGINAL, MAX_POS = 64, 4, 2, 64, 512
SHORT = [1.0 + 0.05 * i for i in range(HEAD // 2)]
LONG = [1.5 + 0.3 * i for i in range(HEAD // 2)]


@pytest.fixture(autouse=True)
def vllm_config():
    """vLLM modules read the current engine config when built; an engine of max_model_len 256."""
    from vllm.config import VllmConfig, set_current_vllm_config

    config = VllmConfig()
    object.__setattr__(config, "model_config", types.SimpleNamespace(max_model_len=256))
    with set_current_vllm_config(config):
        yield config


def longrope(max_model_len: int, dtype: torch.dtype) -> nn.Module:
    from vllm.config import get_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding.phi3_long_rope_scaled_rope import (
        Phi3LongRoPEScaledRotaryEmbedding,
    )

    get_current_vllm_config().model_config.max_model_len = max_model_len
    return Phi3LongRoPEScaledRotaryEmbedding(HEAD, HEAD, MAX_POS, ORIGINAL, 10000.0, True, dtype, SHORT, LONG)


def rope64(x: torch.Tensor, positions: torch.Tensor, factors) -> torch.Tensor:
    scale = MAX_POS / ORIGINAL
    attention = math.sqrt(1 + math.log(scale) / math.log(ORIGINAL))
    cos, sin = reference_model.rope_cos_sin(positions, HEAD, 10000.0, factors, attention)
    x = x.to(torch.float64).view(x.shape[0], -1, HEAD)
    out = x * cos[:, None, :] + reference_model.rotate_half(x) * sin[:, None, :]
    return out.flatten(1)


class Holder(nn.Module):
    def __init__(self, child: nn.Module) -> None:
        super().__init__()
        self.child = child


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_model_len", [ORIGINAL, 256], ids=["short-factors", "long-factors"])
def test_fused_longrope_matches_float64_and_switches_off(dtype, max_model_len):
    model = Holder(longrope(max_model_len, dtype))
    active = [True]
    assert cpu_fused.install(model, lambda: active[0]) == 1
    positions = torch.tensor([0, 1, 5, 63] + ([64, 100, 255] if max_model_len > ORIGINAL else []))
    q = torch.randn(len(positions), HEADS * HEAD).to(dtype)
    k = torch.randn(len(positions), KV_HEADS * HEAD).to(dtype)
    factors = LONG if max_model_len > ORIGINAL else SHORT
    q_out, k_out = model.child(positions, q.clone(), k.clone())
    # float32: vLLM's cos/sin cache comes from float32 angles (error ~ position * 2^-24)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for got, x in ((q_out, q), (k_out, k)):
        torch.testing.assert_close(got.to(torch.float64), rope64(x, positions, factors), rtol=tol, atol=tol)
    active[0] = False  # a dense checkpoint: stock vLLM's composite runs, same numbers within rounding
    q_stock, k_stock = model.child(positions, q.clone(), k.clone())
    torch.testing.assert_close(q_stock.to(torch.float64), rope64(q, positions, factors), rtol=tol, atol=tol)
    torch.testing.assert_close(k_stock.to(torch.float64), rope64(k, positions, factors), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_matches_float64(dtype):
    from vllm.model_executor.layers.layernorm import RMSNorm

    norm = RMSNorm(1024, eps=1e-5, dtype=dtype)
    norm.weight.data = torch.rand(1024).add(0.5).to(dtype)
    model = Holder(norm)
    calls = []
    assert cpu_fused.install(model, lambda: calls.append(1) or True) == 1
    x = (torch.randn(3, 1024) * torch.tensor([[1.0], [1e-3], [1e3]])).to(dtype)
    got = model.child(x)
    assert calls, "the fused path was not consulted"
    expected = reference_model.rms_norm(x.to(torch.float64), norm.weight.to(torch.float64), 1e-5)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.to(torch.float64), expected, rtol=tol, atol=tol)
    assert got.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_silu_and_mul_matches_float64(dtype):
    from vllm.model_executor.layers.activation import SiluAndMul

    model = Holder(SiluAndMul())
    active, calls = [True], []
    assert cpu_fused.install(model, lambda: calls.append(1) or active[0]) == 1
    x = (torch.randn(5, 2 * 96) * 4).to(dtype)
    x64 = x.to(torch.float64)
    expected = torch.nn.functional.silu(x64[:, :96]) * x64[:, 96:]
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    got = model.child(x)
    assert calls and got.dtype == dtype and got.shape == (5, 96), "the fused path was not consulted"
    torch.testing.assert_close(got.to(torch.float64), expected, rtol=tol, atol=tol)
    active[0] = False  # dense checkpoint: stock's native composite
    torch.testing.assert_close(model.child(x).to(torch.float64), expected, rtol=tol, atol=tol)


def test_install_keeps_parameter_names_and_shares_one_rope():
    from vllm.model_executor.layers.layernorm import RMSNorm

    rope = longrope(ORIGINAL, torch.float32)
    model = nn.ModuleDict({"a": Holder(rope), "b": Holder(rope), "norm": RMSNorm(16)})
    names = [n for n, _ in model.named_parameters()]
    assert cpu_fused.install(model, lambda: True) == 2  # one shared rotary module, one norm
    assert [n for n, _ in model.named_parameters()] == names
    assert model["a"].child is model["b"].child


def test_env_switch_keeps_stock_composites(monkeypatch):
    monkeypatch.setenv(cpu_fused.FUSED_ENV, "0")
    model = Holder(longrope(ORIGINAL, torch.float32))
    assert cpu_fused.install(model, lambda: True) == 0
    assert type(model.child).__name__ == "Phi3LongRoPEScaledRotaryEmbedding"


def test_compiled_models_keep_inductors_own_fusion_unless_asked(monkeypatch):
    """Under torch.compile inductor fuses the composites itself (the opaque _C calls measured
    slower there), so by default only eager models take the fused modules; ``1`` forces them."""
    monkeypatch.delenv(cpu_fused.FUSED_ENV, raising=False)
    assert cpu_fused.install(Holder(longrope(ORIGINAL, torch.float32)), lambda: True, compiled=True) == 0
    assert cpu_fused.install(Holder(longrope(ORIGINAL, torch.float32)), lambda: True, compiled=False) == 1
    monkeypatch.setenv(cpu_fused.FUSED_ENV, "1")
    assert cpu_fused.install(Holder(longrope(ORIGINAL, torch.float32)), lambda: True, compiled=True) == 1
    monkeypatch.setenv(cpu_fused.FUSED_ENV, "yes")
    with pytest.raises(ValueError, match="VLLM_BITCPM_FUSED_CPU_OPS='yes'"):
        cpu_fused.install(Holder(longrope(ORIGINAL, torch.float32)), lambda: True)
    with pytest.raises(ValueError, match="expected auto, 0 or 1"):  # the lm_head's switch reads the same
        cpu_fused.switched_on()


@pytest.mark.parametrize("eager", [True, False])
def test_runs_compiled_reads_the_engines_compilation_mode(eager):
    from vllm.config import CompilationConfig, CompilationMode

    from vllm_bitcpm.model import runs_compiled

    model = nn.Module()
    model.vllm_config = types.SimpleNamespace(compilation_config=CompilationConfig(
        mode=CompilationMode.NONE if eager else CompilationMode.VLLM_COMPILE))
    assert runs_compiled(model) is not eager
    assert runs_compiled(nn.Module()) is False  # no engine config: built outside vLLM, eager
