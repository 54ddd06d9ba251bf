"""vLLM glue: the ``bitcpm`` quantization config and its ternary linear method.

Two modes, one method:

* ``require_ternary=True`` — ``--quantization bitcpm``, or a checkpoint whose
  ``quantization_config.quant_method`` is ``bitcpm``. Every linear layer must be ternary; the
  first one that is not stops the load with an error naming it.
* ``require_ternary=False`` — what :class:`vllm_bitcpm.model.BitCPMForCausalLM` uses for an
  unmodified checkpoint with no quantization config. Each layer is checked after loading:
  ternary layers are packed, the others stay exactly as stock vLLM runs them
  (:class:`UnquantizedLinearMethod` does their loading, post-processing and matmul).

Fake-quantized checkpoints load into the ordinary dense weight parameter (so vLLM's sharded
weight loaders handle q/k/v, gate/up and tensor parallelism as usual); packing happens in
``process_weights_after_loading``, per logical matrix of a fused layer, and frees the dense copy.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

from vllm_bitcpm import lm_head, ops, ternary

logger = init_logger("vllm.bitcpm")

QUANT_METHOD = "bitcpm"
_MIB = 1024 * 1024

#: How ternary layers treat activations: "exact" (float activations, results equal to the
#: dense layer up to summation order) or "int8" (per-token absmax int8, bitnet.cpp's I2_S
#: math: faster kernels, small accuracy cost). Read once per engine, in every worker.
ACTIVATIONS_ENV = "VLLM_BITCPM_ACTIVATIONS"
ACTIVATION_MODES = ("exact", "int8")
DEFAULT_ACTIVATIONS = "exact"


def activation_mode(configured: str | None = None) -> str:
    """The activation mode: the environment wins over the checkpoint's config, then the default."""
    mode = os.environ.get(ACTIVATIONS_ENV) or configured or DEFAULT_ACTIVATIONS
    if mode not in ACTIVATION_MODES:
        source = ACTIVATIONS_ENV if os.environ.get(ACTIVATIONS_ENV) else "quantization_config.activations"
        raise ValueError(f"bitcpm: {source}={mode!r}; expected one of {', '.join(ACTIVATION_MODES)}")
    return mode


@dataclasses.dataclass
class PackingReport:
    """What happened to the linear layers of one model (one tensor-parallel rank)."""

    expected_layers: int = 0
    processed_layers: int = 0
    packed_layers: int = 0
    dense_bytes_before: int = 0
    bytes_after: int = 0
    packed_weights: int = 0
    packed_bytes: int = 0
    dense_layer_names: list[str] = dataclasses.field(default_factory=list)
    granularities: dict[str, int] = dataclasses.field(default_factory=dict)

    def packed_bits_per_weight(self) -> float:
        return 8.0 * self.packed_bytes / self.packed_weights if self.packed_weights else 0.0

    def summary(self) -> str:
        kinds = ", ".join(f"{n} {g}" for g, n in sorted(self.granularities.items()))
        line = (
            f"bitcpm: packed {self.packed_layers}/{self.processed_layers} linear layers as ternary "
            f"({self.packed_bits_per_weight():.3f} bits/weight incl. scales"
            f"{'; scales of ' + kinds + ' matrices' if kinds else ''}); linear weights "
            f"{self.dense_bytes_before / _MIB:.1f} MiB -> {self.bytes_after / _MIB:.1f} MiB"
        )
        if self.dense_layer_names:
            shown = ", ".join(self.dense_layer_names[:3])
            more = len(self.dense_layer_names) - 3
            line += f"; kept dense: {shown}{f' and {more} more' if more > 0 else ''}"
        return line


@register_quantization_config(QUANT_METHOD)
class BitCPMConfig(QuantizationConfig):
    """Ternary (1.58-bit) weights stored at 2 bits with per-tensor/row/group scales."""

    def __init__(self, require_ternary: bool = True, activations: str | None = None) -> None:
        super().__init__()
        self.require_ternary = require_ternary
        self.activations = activation_mode(activations)
        self.lm_head = lm_head.lm_head_mode()
        self.report = PackingReport()

    def __repr__(self) -> str:
        return (
            f"BitCPMConfig(require_ternary={self.require_ternary}, "
            f"activations={self.activations!r}, lm_head={self.lm_head!r})"
        )

    @classmethod
    def for_unflagged_checkpoint(cls) -> "BitCPMConfig":
        """The mode used when a MiniCPM checkpoint carries no quantization config."""
        return cls(require_ternary=False)

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0  # pure PyTorch fallback runs anywhere

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the config lives in config.json's quantization_config, or nowhere

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "BitCPMConfig":
        if config.get("quant_method", QUANT_METHOD) != QUANT_METHOD:
            raise ValueError(f"bitcpm: quantization_config has quant_method {config['quant_method']!r}")
        return cls(require_ternary=True, activations=config.get("activations"))

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, LinearBase):
            return TernaryLinearMethod(self, prefix)
        if isinstance(layer, ParallelLMHead) and self.lm_head == "int8":
            return lm_head.Int8LMHeadMethod()
        return None  # embeddings / attention (and the head by default) stay as vLLM builds them

    def logical_names(self, prefix: str, num_partitions: int) -> list[str]:
        """Checkpoint names of the matrices fused into the layer at ``prefix`` (q/k/v, gate/up)."""
        fused = prefix.rsplit(".", 1)[-1]
        originals = getattr(self, "packed_modules_mapping", {}).get(fused, [])
        if len(originals) == num_partitions:
            return [prefix[: len(prefix) - len(fused)] + name for name in originals]
        if num_partitions == 1:
            return [prefix]
        return [f"{prefix}[{i}]" for i in range(num_partitions)]


class TernaryLinearMethod(LinearMethodBase):
    """Loads dense like stock vLLM, then packs each ternary layer to 2-bit codes + scales."""

    def __init__(self, quant_config: BitCPMConfig, prefix: str) -> None:
        self.quant_config = quant_config
        self.prefix = prefix
        self.dense = UnquantizedLinearMethod()

    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        self.dense.create_weights(
            layer,
            input_size_per_partition,
            output_partition_sizes,
            input_size,
            output_size,
            params_dtype,
            **extra_weight_attrs,
        )
        layer.bitcpm_partition_sizes = list(output_partition_sizes)
        layer.bitcpm_packed = False
        self.quant_config.report.expected_layers += 1

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        report = self.quant_config.report
        weight = layer.weight.data
        dense_bytes = weight.numel() * weight.element_size()
        names = self.quant_config.logical_names(self.prefix, len(layer.bitcpm_partition_sizes))
        try:
            packed, layouts = ternary.quantize_exact(
                weight, name=self.prefix, partition_sizes=layer.bitcpm_partition_sizes
            )
        except ternary.NotTernaryError as err:
            if self.quant_config.require_ternary:
                raise ternary.NotTernaryError(
                    f"bitcpm quantization requires ternary weights, but layer '{self.prefix}' "
                    f"(checkpoint tensors {', '.join(names)}) is not ternary: {err}. "
                    "Load without --quantization bitcpm to keep non-ternary layers dense."
                ) from None
            self.dense.process_weights_after_loading(layer)
            report.dense_layer_names.append(self.prefix)
            report.bytes_after += dense_bytes
            packed = None
        else:
            self._install_packed(layer, packed)
            report.packed_layers += 1
            report.packed_weights += weight.numel()
            report.packed_bytes += packed.nbytes()
            report.bytes_after += packed.nbytes()
            for layout in layouts:
                kind = layout.describe()
                report.granularities[kind] = report.granularities.get(kind, 0) + 1
        report.dense_bytes_before += dense_bytes
        report.processed_layers += 1
        if report.processed_layers == report.expected_layers:
            logger.info(report.summary())

    @staticmethod
    def _install_packed(layer: torch.nn.Module, packed: ternary.TernaryMatrix) -> None:
        """Swap the dense weight for the packed tensors; the bf16 copy is freed here."""
        del layer.weight
        layer.register_parameter(
            "weight_codes", torch.nn.Parameter(packed.codes, requires_grad=False)
        )
        layer.register_parameter(
            "weight_scales", torch.nn.Parameter(packed.scales, requires_grad=False)
        )
        layer.bitcpm_group_size = packed.group_size
        layer.bitcpm_packed = True

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not layer.bitcpm_packed:
            return self.dense.apply(layer, x, bias)
        return ops.ternary_linear(
            x,
            layer.weight_codes,
            layer.weight_scales,
            layer.bitcpm_group_size,
            bias,
            self.quant_config.activations == "int8",
        )
