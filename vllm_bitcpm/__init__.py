"""vllm-bitcpm: run OpenBMB's ternary BitCPM models in vLLM as real ternary models.

:func:`register` is the ``vllm.general_plugins`` entry point. vLLM calls it in every process
(API server, engine core, workers), so it is idempotent, cheap and touches no device: it
registers the MiniCPM config class, the ``bitcpm`` quantization method (lazily imported by
vLLM only when used) and the model classes, by their import paths: MiniCPM (1/2/4) and
MiniCPM3 (multi-head latent attention; its config is built into transformers).
"""

from __future__ import annotations

__version__ = "0.1.0"

#: Our architecture name, and the stock ones whose checkpoints we take over (lazily, by path).
ARCHITECTURE = "BitCPMForCausalLM"
TAKEN_OVER_ARCHITECTURES = ("MiniCPMForCausalLM",)
MINICPM3_ARCHITECTURE = "BitCPM3ForCausalLM"
MINICPM3_TAKEN_OVER_ARCHITECTURES = ("MiniCPM3ForCausalLM",)

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry

    from vllm_bitcpm.config import register_config

    register_config()
    # Importing the module runs @register_quantization_config("bitcpm").
    import vllm_bitcpm.quantization  # noqa: F401
    from vllm_bitcpm.environment import declare_to_vllm

    declare_to_vllm()  # before EngineArgs validates the environment and keys the compile cache

    for architecture in (ARCHITECTURE, *TAKEN_OVER_ARCHITECTURES):
        ModelRegistry.register_model(architecture, "vllm_bitcpm.model:BitCPMForCausalLM")
    for architecture in (MINICPM3_ARCHITECTURE, *MINICPM3_TAKEN_OVER_ARCHITECTURES):
        ModelRegistry.register_model(architecture, "vllm_bitcpm.model_minicpm3:BitCPM3ForCausalLM")
    _registered = True
