"""LongRoPE, RMSNorm and SiluAndMul of a ternary MiniCPM through vLLM's fused CPU kernels.

Once the linear layers are ternary, a CPU decode step spends as long in the small ops around
them as in the matmuls: on vLLM 0.32's CPU platform, MiniCPM's LongRoPE
(``Phi3LongRoPEScaledRotaryEmbedding``) runs ~25 PyTorch ops per layer (gather, chunk, repeat,
rotate, cat), RMSNorm runs its native composite (~8 ops) and the MLP's SiluAndMul its native
slice + silu + multiply, because vLLM wires CPU kernels only for plain RoPE, GPU RMSNorm and
POWER's SiluAndMul. vLLM's x86 CPU build does ship all three kernels (``_C.rotary_embedding``,
``_C.rms_norm``, ``_C.silu_and_mul``); these modules call them with the same cos/sin cache and
epsilon, computing in float32 inside the kernel where the composites round to the model dtype
between ops (so results differ from stock by rounding only).

On the synthetic BitCPM4-0.5B shape this cuts the op calls of an eager decode step from 6950 to
2677 (``VLLM_BITCPM_FUSED_CPU_OPS=0`` vs ``1``, benchmarks/profile_decode.py). Under torch.compile
(vLLM's default) inductor fuses the composites itself, with the residual adds and scalings around
them, and the opaque ``_C`` calls only break its fusion: an int8 batch-1 step was ~0.5 ms (~4%)
shorter without them on the AVX512-BF16 paths and ~0.9 ms (~6%) on the AVX2 paths (Zen 4,
``profile_decode.py [--isa avx2] --sides plugin-int8 --compile``), so by default they are
installed for eager engines only.

They take effect only while ``active()`` is true (the model has ternary layers), so a dense
MiniCPM checkpoint loaded through the plugin still runs exactly stock vLLM's ops.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn


#: ``auto`` (default): the fused kernels in eager engines; ``1``: in compiled engines too; ``0``:
#: stock vLLM's composites for ternary models too (and stock's lm_head call, vllm_bitcpm.lm_head).
FUSED_ENV = "VLLM_BITCPM_FUSED_CPU_OPS"


def fused_kernels_available() -> bool:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    import vllm._custom_ops  # noqa: F401  (loads torch.ops._C)

    return all(hasattr(torch.ops._C, op) for op in ("rotary_embedding", "rms_norm", "silu_and_mul"))


def setting() -> str:
    """``VLLM_BITCPM_FUSED_CPU_OPS``: ``auto`` (unset), ``0`` or ``1``; anything else is refused."""
    value = os.environ.get(FUSED_ENV, "auto")
    if value not in ("auto", "0", "1"):
        raise ValueError(f"bitcpm: {FUSED_ENV}={value!r}: expected auto, 0 or 1")
    return value


def switched_on() -> bool:
    """``VLLM_BITCPM_FUSED_CPU_OPS`` is not ``0`` (also read by vllm_bitcpm.lm_head)."""
    return setting() != "0"


def wanted(compiled: bool) -> bool:
    """Whether a model that runs ``compiled`` (torch.compile) or eager takes the fused modules."""
    value = setting()
    return value == "1" or (value == "auto" and not compiled)


def subclass_overriding(stock_class: type, prefix: str, name: str, method) -> type:
    """A subclass of ``stock_class`` with only ``name`` replaced by ``method``: modules switched
    to it in place keep their parameters, names and every other behaviour."""
    return type(f"{prefix}{stock_class.__name__}", (stock_class,), {name: method, "__doc__": method.__doc__})


def _fused_class(stock_class: type, forward) -> type:
    return subclass_overriding(stock_class, "Fused", "forward", forward)


def _longrope_forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None = None,
                      offsets: torch.Tensor | None = None):
    """vLLM's LongRoPE with the factor set fixed per engine, applied by one in-place kernel.

    vLLM picks the long factors for the whole engine when max_model_len exceeds
    original_max_position_embeddings (``use_long_rope``); ``bitcpm_cos_sin_cache`` is the
    matching half of its cos/sin cache.
    """
    if key is None or offsets is not None or not self.bitcpm_active():
        return super(type(self), self).forward(positions, query, key, offsets)
    torch.ops._C.rotary_embedding(positions, query, key, self.head_size, self.bitcpm_cos_sin_cache, True)
    return query, key


def _rms_norm_forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
    """vLLM's RMSNorm (weighted, no residual) through ``_C.rms_norm``."""
    if residual is not None or not self.bitcpm_active():
        return super(type(self), self).forward(x) if residual is None else super(type(self), self).forward(x, residual)
    x = x.contiguous()
    out = torch.empty_like(x)
    torch.ops._C.rms_norm(out, x, self.weight.data, self.variance_epsilon)
    return out


def _silu_and_mul_forward(self, x: torch.Tensor) -> torch.Tensor:
    """vLLM's SiluAndMul (silu(x[..., :d]) * x[..., d:]) through ``_C.silu_and_mul``."""
    if not self.bitcpm_active():
        return super(type(self), self).forward(x)
    x = x.contiguous()
    out = torch.empty(*x.shape[:-1], x.shape[-1] // 2, dtype=x.dtype, device=x.device)
    torch.ops._C.silu_and_mul(out, x)
    return out


def install(model: nn.Module, active: Callable[[], bool], compiled: bool = False) -> int:
    """Give every LongRoPE, plain RMSNorm and SiluAndMul module of ``model`` the fused forward
    (by default only where the model runs eager: ``wanted``); returns how many.

    The modules change class in place (to a subclass with only ``forward`` overridden), so their
    loaded parameters and names stay as vLLM's weight loader tracks them.
    """
    if not wanted(compiled) or not fused_kernels_available():
        return 0
    from vllm.model_executor.layers.activation import SiluAndMul
    from vllm.model_executor.layers.layernorm import RMSNorm
    from vllm.model_executor.layers.rotary_embedding.phi3_long_rope_scaled_rope import (
        Phi3LongRoPEScaledRotaryEmbedding,
    )

    rope_class = _fused_class(Phi3LongRoPEScaledRotaryEmbedding, _longrope_forward)
    norm_class = _fused_class(RMSNorm, _rms_norm_forward)
    silu_class = _fused_class(SiluAndMul, _silu_and_mul_forward)
    changed = 0
    for module in model.modules():  # unique modules (vLLM's get_rope shares one across layers)
        if type(module) is Phi3LongRoPEScaledRotaryEmbedding:
            k = module.original_max_position_embeddings
            cache = module.long_short_cos_sin_cache
            module.bitcpm_cos_sin_cache = cache[k:] if module.use_long_rope else cache[:k]
            module.__class__ = rope_class
        elif type(module) is RMSNorm and module.has_weight and module.variance_size_override is None:
            module.__class__ = norm_class
        elif type(module) is SiluAndMul:
            module.__class__ = silu_class
        else:
            continue
        module.bitcpm_active = active
        changed += 1
    return changed
