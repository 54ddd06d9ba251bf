"""``BitCPM3ForCausalLM``: vLLM's MiniCPM3 (multi-head latent attention) with the ternary method.

The MiniCPM3 counterpart of :class:`vllm_bitcpm.model.BitCPMForCausalLM`, registered in place
of ``MiniCPM3ForCausalLM``: an unflagged checkpoint packs each ternary linear layer (q_a/q_b,
kv_a_proj_with_mqa/kv_b, o, gate/up, down) and leaves every other one exactly as stock vLLM
runs it; an explicit quantization config is used as given. vLLM's MiniCPM3 expands the latent
KV to full heads and runs its ordinary attention backend (head size ``qk_nope_head_dim +
qk_rope_head_dim``), so it runs wherever that backend supports the head size.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.config import VllmConfig
from vllm.model_executor.layers.linear import LinearBase
from vllm.model_executor.models.minicpm3 import MiniCPM3ForCausalLM

from vllm_bitcpm.model import (
    build_with_bitcpm_config, check_before_loading, check_every_parameter_loaded, install_cpu_fast_paths,
)
from vllm_bitcpm.quantization import TernaryLinearMethod


class BitCPM3ForCausalLM(MiniCPM3ForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        build_with_bitcpm_config(self, super().__init__, vllm_config, prefix)
        _name_unprefixed_layers(self)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        check_before_loading(self.vllm_config.model_config.model)
        loaded = super().load_weights(weights)
        check_every_parameter_loaded(self, loaded, self.vllm_config.model_config.model)
        install_cpu_fast_paths(self)
        return loaded


def _name_unprefixed_layers(model: torch.nn.Module) -> None:
    """vLLM 0.32 builds MiniCPM3's ``q_a_proj`` without a prefix; give our method its module
    name so that load errors and the packing summary name the layer."""
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if isinstance(module, LinearBase) and isinstance(method, TernaryLinearMethod) and not method.prefix:
            method.prefix = name
