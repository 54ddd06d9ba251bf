"""The Ascend NPU path (ops/npu.py and the NPU branch of TernaryLinearMethod) against the CPU path.

There is no NPU here: an emulated ``torch_npu`` (tests/npu_emulation.py) implements the documented
math and checks of the ops we call, and ``compat.on_npu`` is patched to say "NPU platform". The
emulation is tested first to reject the layouts the real op rejects, so a wrong layout in the
plugin (an untransposed weight, scales in (N, G) order, raw int4 words) fails these tests.
"""

from __future__ import annotations

import importlib
import math
import sys
from unittest import mock

import pytest
import torch

from tests import npu_emulation
from tests.npu_emulation import EmulatedNpuError
from vllm_bitcpm import compat, ternary
from vllm_bitcpm.ops import reference

# vLLM (and transformers under it) probe for torch_npu at import: import them before any test
# installs the emulated module, so they see the real machine.
import vllm.distributed.parallel_state as parallel_state  # noqa: E402
from vllm.model_executor.layers import linear  # noqa: E402

from vllm_bitcpm.quantization import BitCPMConfig, QUANT_METHOD  # noqa: E402

TOL = {torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}


@pytest.fixture
def emulated_npu(monkeypatch):
    """Emulated torch_npu (A2 by default) + NPU platform; yields (fake torch_npu, ops.npu module)."""
    fake = npu_emulation.make_torch_npu(npu_emulation.SOC_A2)
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    monkeypatch.delenv("VLLM_BITCPM_NPU_WEIGHT", raising=False)
    from vllm_bitcpm.ops import npu

    importlib.reload(npu)  # re-runs the torch_npu import and kernel choice under the fake
    monkeypatch.setattr(compat, "on_npu", lambda: True)
    yield fake, npu
    monkeypatch.undo()
    importlib.reload(npu)  # back to "no torch_npu"


def ternary_weight(n, k, granularity, group_size=64, dtype=torch.bfloat16, seed=0):
    """A fake-quantized (N, K) weight: trits times per-tensor / per-row / per-group scales."""
    gen = torch.Generator().manual_seed(seed)
    trits = torch.randint(-1, 2, (n, k), generator=gen).float()
    if granularity == "per_tensor":
        scale = torch.full((n, 1), 0.02)
    elif granularity == "per_row":
        scale = torch.rand(n, 1, generator=gen) * 0.05 + 0.01
    else:
        groups = math.ceil(k / group_size)
        scale = (torch.rand(n, groups, generator=gen) * 0.05 + 0.01).repeat_interleave(group_size, 1)[:, :k]
    return (trits * scale).to(dtype)


# --------------------------------------------------------------------------------------------
# The emulation itself: round trip, math, and the rejections the plugin's tests rely on


def test_int4pack_round_trips_and_is_interleaved():
    w = torch.randint(-8, 8, (5, 24), dtype=torch.int32)
    packed = npu_emulation.npu_convert_weight_to_int4pack(w)
    assert packed.dtype == torch.int32 and packed.shape == (5, 3)
    assert torch.equal(npu_emulation._unpack_int4(packed), w)
    naive = (packed.to(torch.int64).unsqueeze(-1) >> (4 * torch.arange(8))) & 0xF
    naive = torch.where(naive >= 8, naive - 16, naive).reshape(5, 24)
    assert not torch.equal(naive.to(torch.int32), w)  # reading words in column order is wrong


@pytest.mark.parametrize("bad", ["dtype", "range", "n"])
def test_int4pack_rejects_bad_input(bad):
    w = torch.randint(-8, 8, (4, 16), dtype=torch.int32)
    if bad == "dtype":
        w = w.to(torch.int8)
    elif bad == "range":
        w[0, 0] = 8
    else:
        w = w[:, :12]
    with pytest.raises(EmulatedNpuError):
        npu_emulation.npu_convert_weight_to_int4pack(w)


def test_emulated_matmul_math_per_group_with_offset():
    fake = npu_emulation.make_torch_npu()
    k, n, g = 96, 16, 32
    x = torch.randn(3, k).to(torch.float16)
    w = torch.randint(-8, 8, (k, n), dtype=torch.int32)
    scale = torch.rand(3, n).to(torch.float16)
    offset = torch.randint(-2, 3, (3, n)).to(torch.float16)
    y = fake.npu_weight_quant_batchmatmul(
        x, fake.npu_convert_weight_to_int4pack(w), scale, offset, antiquant_group_size=g
    )
    deq = (w.double() + offset.double().repeat_interleave(g, 0)) * scale.double().repeat_interleave(g, 0)
    torch.testing.assert_close(y.double(), x.double() @ deq, rtol=2e-3, atol=2e-2)


@pytest.mark.parametrize(
    "case",
    ["untransposed_weight", "scale_n_by_g", "scale_dtype", "group_not_32", "group_ge_k", "x_fp32",
     "weight_fp16"],
)
def test_emulated_matmul_rejects_wrong_layouts(case):
    fake = npu_emulation.make_torch_npu()
    k, n, g = 128, 48, 32
    x = torch.randn(2, k).to(torch.bfloat16)
    weight = torch.randint(-1, 2, (k, n), dtype=torch.int8)
    scale = torch.rand(k // g, n).to(torch.bfloat16)
    kwargs = dict(antiquant_group_size=g)
    if case == "untransposed_weight":
        weight = weight.T.contiguous()
    elif case == "scale_n_by_g":
        scale = scale.T.contiguous()
    elif case == "scale_dtype":
        scale = scale.to(torch.float16)
    elif case == "group_not_32":
        kwargs["antiquant_group_size"] = 48
    elif case == "group_ge_k":
        kwargs["antiquant_group_size"] = k
        scale = scale[:1]
    elif case == "x_fp32":
        x = x.float()
        scale = scale.float()
    elif case == "weight_fp16":
        weight = weight.to(torch.float16)
    with pytest.raises(EmulatedNpuError):
        fake.npu_weight_quant_batchmatmul(x, weight, scale, **kwargs)


def test_emulated_310p_rejects_int4_per_group_and_bf16():
    fake = npu_emulation.make_torch_npu(npu_emulation.SOC_310P)
    k, n = 128, 16
    x = torch.randn(2, k).to(torch.float16)
    w8 = torch.randint(-1, 2, (k, n), dtype=torch.int8)
    s = torch.rand(n).to(torch.float16)
    fake.npu_weight_quant_batchmatmul(x, w8, s)  # int8 per channel: accepted
    with pytest.raises(EmulatedNpuError, match="310P"):
        fake.npu_weight_quant_batchmatmul(x, fake.npu_convert_weight_to_int4pack(w8.int()), s)
    with pytest.raises(EmulatedNpuError, match="310P"):
        fake.npu_weight_quant_batchmatmul(x, w8, torch.rand(4, n).half(), antiquant_group_size=32)
    with pytest.raises(EmulatedNpuError):
        fake.npu_weight_quant_batchmatmul(x.bfloat16(), w8, s.bfloat16())


# --------------------------------------------------------------------------------------------
# ops/npu.py: import, kernel choice, conversion, op registration


def test_import_without_torch_npu_succeeds_and_registers_nothing(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # "import torch_npu" raises ImportError
    from vllm_bitcpm.ops import npu

    importlib.reload(npu)
    assert npu.torch_npu is None and npu.KERNEL is None
    with pytest.raises(RuntimeError, match="torch_npu did not import"):
        npu.prepare_layer(torch.nn.Module(), "model.layers.0.o_proj", 64)


def test_kernel_choice_and_privateuse1_registration(emulated_npu):
    _, npu = emulated_npu
    assert npu.KERNEL == "torch_npu"  # no compiled AscendC op here
    assert torch._C._dispatch_has_kernel_for_dispatch_key("bitcpm::ternary_linear", "PrivateUse1")


@pytest.mark.parametrize("soc,granularity,expected", [
    (npu_emulation.SOC_A2, "per_row", "int4"), (npu_emulation.SOC_A3, "per_group", "int4"),
    (npu_emulation.SOC_310P, "per_row", "int8"), (npu_emulation.SOC_310P, "per_group", "dense"),
])
def test_format_choice(emulated_npu, soc, granularity, expected):
    fake, npu = emulated_npu
    fake.state["soc_version"] = soc
    g = 64 if granularity == "per_group" else 256
    assert npu.choose_format(64, 256, g, torch.float16, npu.soc_family()) == expected
    assert npu.choose_format(60, 256, g, torch.float16, "a2") == "int8"  # N % 8 != 0
    assert npu.choose_format(64, 256, g, torch.float32, "a2") == "dense"


@pytest.mark.parametrize("fmt", ["int4", "int8", "dense"])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_row", "per_group"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("int8_activations", [False, True])
def test_prepared_weights_match_reference_op(emulated_npu, fmt, granularity, dtype, int8_activations):
    _, npu = emulated_npu
    n, k = 40, 320  # K not a multiple of the group: last group partial
    w = ternary_weight(n, k, granularity, dtype=dtype)
    packed, _ = ternary.quantize_exact(w)
    prepared = npu.to_npu_weights(packed.codes, packed.scales, packed.group_size, k, dtype, fmt)
    if fmt == "int4":
        assert prepared.weight.dtype == torch.int32 and prepared.weight.shape == (k, n // 8)
    elif fmt == "int8":
        assert prepared.weight.dtype == torch.int8 and prepared.weight.shape == (k, n)
    if fmt != "dense":
        per_group = granularity == "per_group"
        assert prepared.scale.dtype == dtype
        assert prepared.scale.shape == ((math.ceil(k / 64), n) if per_group else (n,))
    x = torch.randn(3, 2, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    y = npu.weight_quant_linear(prepared, x, bias, int8_activations)
    expected = reference.ternary_linear_reference(
        x, packed.codes, packed.scales, packed.group_size, bias, "int8" if int8_activations else "exact"
    )
    assert y.shape == (3, 2, n) and y.dtype == dtype
    torch.testing.assert_close(y, expected, **TOL[dtype])


def test_registered_privateuse1_impl_matches_reference(emulated_npu):
    _, npu = emulated_npu
    w = ternary_weight(64, 256, "per_group")
    packed, _ = ternary.quantize_exact(w)
    x = torch.randn(5, 256).to(torch.bfloat16)
    y = npu.ternary_linear_npu(x, packed.codes, packed.scales, packed.group_size)
    torch.testing.assert_close(
        y, reference.ternary_linear_reference(x, packed.codes, packed.scales, packed.group_size),
        **TOL[torch.bfloat16],
    )


# --------------------------------------------------------------------------------------------
# Layer level: TernaryLinearMethod on real vLLM linear layers, NPU branch vs CPU path


@pytest.fixture
def vllm_layers():
    """Build vLLM linear layers without a distributed setup (tensor parallel size 1)."""
    with mock.patch.object(parallel_state, "_TP", mock.Mock(rank_in_group=0, world_size=1)):
        yield linear


def _loaded_qkv(linear, weights, dtype):
    cfg = BitCPMConfig(require_ternary=True)
    hidden, head_dim = 256, 32
    layer = linear.QKVParallelLinear(hidden, head_dim, 4, 1, bias=False, quant_config=cfg,
                                     prefix="model.layers.0.self_attn.qkv_proj", params_dtype=dtype)
    for shard, w in zip(("q", "k", "v"), weights):
        layer.weight_loader(layer.weight, w, shard)
    return layer


def _qkv_weights(granularity, dtype):
    return [ternary_weight(rows, 256, granularity, dtype=dtype, seed=i)
            for i, rows in enumerate((128, 32, 32))]  # N=192 != K=256


@pytest.mark.parametrize("granularity", ["per_tensor", "per_row", "per_group"])
@pytest.mark.parametrize("soc", [npu_emulation.SOC_A2, npu_emulation.SOC_310P])
def test_layer_npu_branch_matches_cpu_path(emulated_npu, vllm_layers, monkeypatch, granularity, soc):
    fake, npu = emulated_npu
    fake.state["soc_version"] = soc
    dtype = torch.float16  # both SoC families take fp16
    weights = _qkv_weights(granularity, dtype)
    x = torch.randn(7, 256).to(dtype)

    with monkeypatch.context() as m:  # the CPU path: same weights, platform check says CPU
        m.setattr(compat, "on_npu", lambda: False)
        cpu_layer = _loaded_qkv(vllm_layers, weights, dtype)
        cpu_layer.quant_method.process_weights_after_loading(cpu_layer)
        y_cpu = cpu_layer.quant_method.apply(cpu_layer, x)
    assert getattr(cpu_layer, "bitcpm_npu", None) is None

    npu_layer = _loaded_qkv(vllm_layers, weights, dtype)
    npu_layer.quant_method.process_weights_after_loading(npu_layer)
    prepared = npu_layer.bitcpm_npu
    assert not hasattr(npu_layer, "weight_codes")  # converted once, packed copy freed
    assert npu_layer.weight_npu is prepared.weight
    expected_fmt = {npu_emulation.SOC_A2: "int4",
                    npu_emulation.SOC_310P: "dense" if granularity == "per_group" else "int8"}[soc]
    assert prepared.fmt == expected_fmt
    fake.state["calls"].clear()
    y_npu = npu_layer(x)[0]  # the layer's own forward: vLLM -> TernaryLinearMethod.apply -> NPU
    assert len(fake.state["calls"]) == (0 if expected_fmt == "dense" else 1)
    torch.testing.assert_close(y_npu, y_cpu, **TOL[dtype])
    dense = torch.cat(weights).to(torch.float64)
    torch.testing.assert_close(y_npu.double(), x.double() @ dense.T, rtol=2e-3, atol=1e-2)


@pytest.mark.parametrize("breakage", ["untransposed_weight", "scale_n_by_g", "raw_int4_words"])
def test_wrong_layouts_fail_at_layer_level(emulated_npu, vllm_layers, monkeypatch, breakage):
    """If the conversion produced a wrong layout, the layer's output would be rejected or wrong."""
    _, npu = emulated_npu
    real_convert = npu.to_npu_weights

    def broken(codes, scales, group_size, in_features, dtype, fmt, name="weight"):
        w = real_convert(codes, scales, group_size, in_features, dtype, fmt, name)
        if breakage == "untransposed_weight":
            w.weight = ternary.unpack_codes(codes, in_features).contiguous()  # (N, K) int8
            w.fmt = "int8"
        elif breakage == "scale_n_by_g":
            w.scale = w.scale.T.contiguous()
        else:  # int4 words built without torch_npu's converter (plain column order)
            trits = ternary.unpack_codes(codes, in_features).T.to(torch.int64) & 0xF
            words = sum(trits[:, i::8] << (4 * i) for i in range(8))
            w.weight = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
        return w

    monkeypatch.setattr(npu, "to_npu_weights", broken)
    dtype = torch.bfloat16
    weights = _qkv_weights("per_group", dtype)
    layer = _loaded_qkv(vllm_layers, weights, dtype)
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(3, 256).to(dtype)
    expected = x.float() @ torch.cat(weights).float().T
    if breakage == "raw_int4_words":  # accepted by the op, but the numbers are wrong
        y = layer.quant_method.apply(layer, x)
        assert not torch.allclose(y.float(), expected, rtol=2e-2, atol=2e-2)
    else:
        with pytest.raises(EmulatedNpuError):
            layer.quant_method.apply(layer, x)


def test_int8_activation_mode_on_npu_matches_cpu(emulated_npu, vllm_layers, monkeypatch):
    monkeypatch.setenv("VLLM_BITCPM_ACTIVATIONS", "int8")
    dtype = torch.bfloat16
    weights = _qkv_weights("per_row", dtype)
    x = torch.randn(4, 256).to(dtype)
    with monkeypatch.context() as m:
        m.setattr(compat, "on_npu", lambda: False)
        cpu_layer = _loaded_qkv(vllm_layers, weights, dtype)
        cpu_layer.quant_method.process_weights_after_loading(cpu_layer)
        y_cpu = cpu_layer.quant_method.apply(cpu_layer, x)
    npu_layer = _loaded_qkv(vllm_layers, weights, dtype)
    npu_layer.quant_method.process_weights_after_loading(npu_layer)
    torch.testing.assert_close(npu_layer.quant_method.apply(npu_layer, x), y_cpu, **TOL[dtype])


# --------------------------------------------------------------------------------------------
# vLLM-Ascend integration: our method name in the platform's supported list


def test_platform_list_gets_our_method(monkeypatch):
    class FakeNPUPlatform:  # vLLM-Ascend's NPUPlatform lists its own methods (non-empty)
        device_type = "npu"
        supported_quantization = ["ascend", "compressed-tensors"]

    monkeypatch.setattr(compat, "_current_platform", lambda: FakeNPUPlatform)
    compat.ensure_platform_supports(QUANT_METHOD)
    compat.ensure_platform_supports(QUANT_METHOD)  # idempotent
    assert FakeNPUPlatform.supported_quantization.count(QUANT_METHOD) == 1
    compat.on_npu.cache_clear()
    assert compat.on_npu()
    compat.on_npu.cache_clear()

    class CpuLike:
        device_type = "cpu"
        supported_quantization: list[str] = []  # empty = everything allowed: left alone

    monkeypatch.setattr(compat, "_current_platform", lambda: CpuLike)
    compat.ensure_platform_supports(QUANT_METHOD)
    assert CpuLike.supported_quantization == [] and not compat.on_npu()
    compat.on_npu.cache_clear()
