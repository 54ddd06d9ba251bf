"""``BitCPMForCausalLM``: vLLM's MiniCPM with the ternary linear method wired in.

Registered under its own architecture name and in place of ``MiniCPMForCausalLM``, so an
unmodified fake-quantized BitCPM4 checkpoint (which says ``MiniCPMForCausalLM`` and carries no
``quantization_config``) is packed with no flags. Without a quantization config the model uses
:meth:`BitCPMConfig.for_unflagged_checkpoint`: each linear layer is packed when it is ternary
and left exactly as stock vLLM runs it otherwise, so regular MiniCPM models keep working.
An explicit quantization config (``--quantization bitcpm``, a ``bitcpm`` checkpoint, or any
other method such as GPTQ) is used as given.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from vllm.config import VllmConfig
from vllm.model_executor.models.minicpm import MiniCPMForCausalLM

from vllm_bitcpm import checkpoint_files, cpu_fused, lm_head, packed_checkpoint
from vllm_bitcpm.quantization import BitCPMConfig

logger = logging.getLogger("vllm.bitcpm")


@contextlib.contextmanager
def _layers_built_with(vllm_config: VllmConfig, quant_config: BitCPMConfig) -> Iterator[None]:
    """Let MiniCPM's constructors (which read ``vllm_config.quant_config``) see our config.

    The swap is scoped to layer construction: the engine's own config stays as the user made it.
    """
    original = vllm_config.quant_config
    vllm_config.quant_config = quant_config
    try:
        yield
    finally:
        vllm_config.quant_config = original


def build_with_bitcpm_config(model: torch.nn.Module, base_init: Callable[..., None], vllm_config: VllmConfig,
                             prefix: str) -> None:
    """Run the vLLM model's constructor ``base_init`` under the quantization config the model
    uses: the user's own when given, else the bitcpm config of an unflagged checkpoint (kept as
    ``model.bitcpm_quant_config``)."""
    if vllm_config.quant_config is not None:
        base_init(vllm_config=vllm_config, prefix=prefix)
        model.bitcpm_quant_config = vllm_config.quant_config
        return
    quant_config = BitCPMConfig.for_unflagged_checkpoint()
    quant_config.packed_modules_mapping = dict(model.packed_modules_mapping)
    with _layers_built_with(vllm_config, quant_config):
        base_init(vllm_config=vllm_config, prefix=prefix)
    model.bitcpm_quant_config = quant_config


class BitCPMForCausalLM(MiniCPMForCausalLM):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        build_with_bitcpm_config(self, super().__init__, vllm_config, prefix)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        check_before_loading(self.vllm_config.model_config.model)
        loaded = super().load_weights(weights)
        check_every_parameter_loaded(self, loaded, self.vllm_config.model_config.model)
        install_cpu_fast_paths(self)
        return loaded


def check_before_loading(model: str) -> None:
    """Check a local checkpoint before vLLM reads it, so that damage fails with the file's name and
    the tensor instead of a parser error or a half-loaded model: every safetensors file intact
    (headers, offsets), and for a packed ``bitcpm`` checkpoint every layer's codes and scales
    present and consistently shaped (packed_checkpoint.validate_packed_layout)."""
    headers = checkpoint_files.validate_local_checkpoint(model)  # each header read once, checked twice
    directory = Path(model)
    config = packed_checkpoint.quantization_config(directory) if directory.is_dir() else None
    if packed_checkpoint.is_converted(config) and config.get("quant_method") == "bitcpm":
        packed_checkpoint.validate_packed_layout(directory, config, headers)


def check_every_parameter_loaded(model: torch.nn.Module, loaded: set[str], source: str) -> None:
    """vLLM checks that a checkpoint filled every parameter only for models without a quantization
    method; with ours, a checkpoint missing a layer's tensors would load and serve uninitialised
    memory. Same check, for every parameter of the model."""
    missing = sorted({name for name, _ in model.named_parameters()} - set(loaded))
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"bitcpm: the checkpoint {source} has no tensor for {len(missing)} parameter(s) of the "
                         f"model: {shown} (the files are incomplete, or were written for another model)")


def runs_compiled(model: torch.nn.Module) -> bool:
    """Whether vLLM will run ``model`` through torch.compile (not ``--enforce-eager``)."""
    from vllm.config import CompilationMode

    config = getattr(model, "vllm_config", None)
    return config is not None and config.compilation_config.mode != CompilationMode.NONE


def install_cpu_fast_paths(model: torch.nn.Module) -> None:
    """After the weights are loaded: vLLM's fused CPU kernels and the lm_head's decode kernel,
    taken at run time only while the model has ternary layers (``model.bitcpm_quant_config``)."""

    def has_ternary_layers() -> bool:
        config = model.bitcpm_quant_config
        return isinstance(config, BitCPMConfig) and config.report.packed_layers > 0

    fused = cpu_fused.install(model, has_ternary_layers, compiled=runs_compiled(model))
    if fused:
        logger.info("bitcpm: %d modules (LongRoPE, RMSNorm, SiluAndMul) take vLLM's fused CPU kernels "
                    "whenever the model has ternary layers", fused)
    lm_head.install_cpu_decode_kernel(model, has_ternary_layers)
