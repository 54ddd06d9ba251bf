"""An emulated ``torch_npu`` for CPU tests: the documented math of the two ops we call, and their checks.

Installed in ``sys.modules`` only by the ``emulated_npu`` fixture, never at import. It computes on
CPU tensors what the real ops compute on NPU, and rejects what the real ops reject (torch_npu's
documented contract for ``npu_weight_quant_batchmatmul`` / ``npu_convert_weight_to_int4pack``):

* ``npu_convert_weight_to_int4pack(int32 (K, N))``: values in [-8, 7], N % 8 == 0 -> int32
  (K, N/8). The real layout is opaque; this one is deliberately interleaved (nibble ``i`` of a
  word holds column ``_NIBBLE_COLUMN[i]`` of its 8), so code that reads the packed words as
  plain column order gets wrong numbers. Only :func:`_unpack_int4` (used by the matmul) reads it.
* ``npu_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset=None, ...,
  bias=None, antiquant_group_size=0)``: ``x`` (M, K) fp16/bf16; ``weight`` int8 (K, N) or int32
  int4-pack (K, N/8); scale/offset (N,) or (1, N) per channel, (ceil(K/g), N) per group, in x's
  dtype; g a multiple of 32 in [32, K - 1]. y = x @ ((w + offset) * scale) (+ bias), dequantized
  in x's dtype, accumulated in float32, returned in x's dtype.
* 310P (Atlas inference, SoC 200-205): int8 weights, fp16 activations, per-channel only.
"""

from __future__ import annotations

import math
import types

import torch

#: Our emulation's interleave: nibble i of each int32 holds column _NIBBLE_COLUMN[i] of its 8.
_NIBBLE_COLUMN = (0, 4, 1, 5, 2, 6, 3, 7)
SOC_A2 = 223
SOC_A3 = 250
SOC_310P = 202


class EmulatedNpuError(RuntimeError):
    """What the real ops raise (RuntimeError from the op plugin's checks)."""


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise EmulatedNpuError(msg)


def npu_convert_weight_to_int4pack(weight: torch.Tensor, inner_k_tiles: int = 0) -> torch.Tensor:
    _check(weight.dtype == torch.int32, f"int4pack: weight must be int32, got {weight.dtype}")
    _check(weight.dim() == 2, f"int4pack: weight must be 2-D (K, N), got {tuple(weight.shape)}")
    k, n = weight.shape
    _check(n % 8 == 0, f"int4pack: N={n} must be a multiple of 8")
    _check(bool(((weight >= -8) & (weight <= 7)).all()), "int4pack: values must be in [-8, 7]")
    nibbles = (weight & 0xF).view(k, n // 8, 8)
    packed = torch.zeros(k, n // 8, dtype=torch.int64)
    for i, col in enumerate(_NIBBLE_COLUMN):
        packed |= nibbles[:, :, col].to(torch.int64) << (4 * i)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # reinterpret as int32
    return packed.to(torch.int32)


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of the emulated int4pack: int32 (K, N/8) -> int32 (K, N) in [-8, 7]."""
    k, words = packed.shape
    as_u32 = packed.to(torch.int64) & 0xFFFFFFFF
    out = torch.empty(k, words, 8, dtype=torch.int64)
    for i, col in enumerate(_NIBBLE_COLUMN):
        nib = (as_u32 >> (4 * i)) & 0xF
        out[:, :, col] = torch.where(nib >= 8, nib - 16, nib)
    return out.reshape(k, words * 8).to(torch.int32)


def _make_matmul(state: dict):
    def npu_weight_quant_batchmatmul(
        x, weight, antiquant_scale, antiquant_offset=None, quant_scale=None, quant_offset=None,
        bias=None, antiquant_group_size=0, inner_precise=0,
    ):
        is_310p = 200 <= state["soc_version"] <= 205
        _check(x.dim() == 2, f"x must be 2-D (M, K), got {tuple(x.shape)}")
        allowed_x = (torch.float16,) if is_310p else (torch.float16, torch.bfloat16)
        _check(x.dtype in allowed_x, f"x dtype {x.dtype} not supported (allowed {allowed_x})")
        m, k = x.shape
        _check(weight.dim() == 2, f"weight must be 2-D (K, N), got {tuple(weight.shape)}")
        _check(weight.shape[0] == k, f"weight must be (K, N) with K={k} (x's last dim), got "
                                      f"{tuple(weight.shape)}")
        if weight.dtype == torch.int8:
            w = weight.to(torch.int32)
        elif weight.dtype == torch.int32:
            _check(not is_310p, "int4 (int32-carried) weights are not supported on 310P")
            w = _unpack_int4(weight)
        else:
            raise EmulatedNpuError(f"weight dtype {weight.dtype} not supported (int8, int32)")
        n = w.shape[1]
        _check(quant_scale is None and quant_offset is None, "emulation: no output quantization")
        g = antiquant_group_size
        if g:
            _check(not is_310p, "per-group antiquant is not supported on 310P")
            _check(g % 32 == 0 and 32 <= g <= k - 1,
                   f"antiquant_group_size={g} must be a multiple of 32 in [32, K-1] (K={k})")
            expected = [(math.ceil(k / g), n)]
        else:
            expected = [(n,), (1, n)]
        for name, t in (("antiquant_scale", antiquant_scale), ("antiquant_offset", antiquant_offset)):
            if t is None:
                continue
            _check(t.dtype == x.dtype, f"{name} dtype {t.dtype} must equal x's {x.dtype}")
            _check(tuple(t.shape) in expected,
                   f"{name} shape {tuple(t.shape)}; expected one of {expected} for group size {g}")
        if bias is not None:
            ok = (torch.float16,) if x.dtype == torch.float16 else (torch.float32, torch.bfloat16)
            _check(bias.dtype in ok and bias.numel() == n, f"bias must be (N,)={n} in {ok}")
        rows = torch.arange(k) // g if g else torch.zeros(k, dtype=torch.long)
        scale = antiquant_scale.reshape(-1, n)[rows]  # (K, N)
        offset = 0 if antiquant_offset is None else antiquant_offset.reshape(-1, n)[rows]
        deq = (w.to(x.dtype) + offset) * scale  # dequantized in x's dtype, as the kernel does
        y = x.to(torch.float32) @ deq.to(torch.float32)
        if bias is not None:
            y = y + bias.to(torch.float32)
        state["calls"].append({"weight_dtype": weight.dtype, "group_size": g, "m": m})
        return y.to(x.dtype)

    return npu_weight_quant_batchmatmul


def make_torch_npu(soc_version: int = SOC_A2) -> types.ModuleType:
    """A fresh emulated ``torch_npu`` module; ``module.state`` records calls and the SoC."""
    state = {"soc_version": soc_version, "calls": []}
    module = types.ModuleType("torch_npu")
    module.__file__ = "<emulated torch_npu>"
    module.state = state
    module.npu_convert_weight_to_int4pack = npu_convert_weight_to_int4pack
    module.npu_weight_quant_batchmatmul = _make_matmul(state)
    module.npu = types.SimpleNamespace(get_soc_version=lambda: state["soc_version"])
    module.unpack_int4 = _unpack_int4  # for tests of the emulation itself
    return module
