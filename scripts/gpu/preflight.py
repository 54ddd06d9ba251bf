"""Device preflight (seconds): what vLLM sees on this GPU and which kernels the plugin would get.

Run by install-and-check.sh with PYTHONPATH=/tmp/site:<repo>. Never fails the script: every
check prints OK/FAIL with the reason, so the log says what to fix before gpu_check's engines start.
"""

import importlib.metadata as md
import os
import sys
import time
import traceback

t0 = time.time()


def step(name, fn):
    try:
        print(f"[preflight] OK   {name}: {fn()}", flush=True)
    except Exception as err:  # noqa: BLE001
        print(f"[preflight] FAIL {name}: {type(err).__name__}: {err}", flush=True)
        traceback.print_exc(limit=4)


def versions():
    names = ["torch", "triton", "numpy", "transformers", "tokenizers", "safetensors", "huggingface-hub",
             "typing-extensions", "anyio", "idna", "protobuf", "setuptools", "numba", "pydantic", "vllm", "vllm-bitcpm"]
    out = {}
    for n in names:
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            out[n] = None
    return out


import torch  # noqa: E402

step("python", lambda: sys.version.split()[0])
step("torch", lambda: (torch.__version__, torch.version.cuda, torch.cuda.is_available(),
                       torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0)))
step("versions", versions)
step("plugin entry point", lambda: [(e.name, e.value) for e in md.entry_points(group="vllm.general_plugins")])


def platform():
    from vllm.platforms import current_platform

    return (type(current_platform).__name__, current_platform.device_type,
            current_platform.get_device_capability())


step("vllm platform", platform)


def kernels_so():
    import vllm._C_stable_libtorch  # noqa: F401
    import vllm._custom_ops  # noqa: F401

    return [op for op in ("machete_mm", "machete_prepack_B", "marlin_gemm", "gptq_marlin_repack")
            if hasattr(torch.ops._C, op)]


step("vllm._C ops", kernels_so)


def flash_attn():
    from vllm.vllm_flash_attn import flash_attn_interface as fa

    return {"FA2": fa.FA2_AVAILABLE, "FA3": fa.FA3_AVAILABLE, "FA3_reason": fa.FA3_UNAVAILABLE_REASON,
            "FA4": fa.FA4_AVAILABLE}


step("flash attention", flash_attn)


def fa_version():
    from vllm.v1.attention.backends.fa_utils import get_flash_attn_version

    return get_flash_attn_version(head_size=64)


step("FA version for head_size 64", fa_version)


def plugin_kernels():
    os.environ.setdefault("VLLM_PLUGINS", "bitcpm")
    from vllm.plugins import load_general_plugins

    load_general_plugins()
    from vllm_bitcpm import backends

    out = {}
    # BitCPM4-0.5B: hidden 1024, 16 heads x 64 (2 kv heads), intermediate 4096
    for name, k, n in [("qkv", 1024, 1280), ("o", 1024, 1024), ("gate_up", 1024, 8192), ("down", 4096, 1024)]:
        shape = backends.LayerShape(k, n, k, n, torch.bfloat16, -1)
        out[name] = backends.choose(shape, configured="auto").kernel
    return out


step("plugin backend per 0.5B layer (auto)", plugin_kernels)
print(f"[preflight] done in {time.time() - t0:.1f} s", flush=True)
