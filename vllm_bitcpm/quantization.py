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
import math
import os
from typing import Any

import torch
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
from vllm.model_executor.utils import set_weight_attrs

from vllm_bitcpm import backends, compat, int4_repack, lm_head, ops, ternary
from vllm_bitcpm.ops import reference as reference_op

logger = init_logger("vllm.bitcpm")

QUANT_METHOD = "bitcpm"
_MIB = 1024 * 1024

#: How ternary layers treat activations: "exact" (float activations, results equal to the
#: dense layer up to summation order), "int8" (per-token absmax int8, bitnet.cpp's I2_S math:
#: fastest kernels, a measured accuracy cost) or "int16" (per-token absmax int16: integer
#: kernels at about exact mode's accuracy; x86 CPU kernel only). Read once per engine, in every
#: worker.
ACTIVATIONS_ENV = "VLLM_BITCPM_ACTIVATIONS"
ACTIVATION_MODES = reference_op.ACTIVATIONS
DEFAULT_ACTIVATIONS = "exact"


def activations_scope(mode: str) -> str:
    """Where an activation mode runs, for the load log."""
    if mode == "int16":
        return (f"int16 runs in the plugin's x86 CPU kernel and its reference, for layers of up to "
                f"{reference_op.INT16_MAX_K} inputs")
    return f"{mode} runs in the plugin's kernels (native backend) and its reference"


def layer_activations(mode: str, choice: backends.Choice, in_features: int, machine: str | None = None) -> str:
    """The activation mode one layer runs: the configured one where its backend has it, else exact.

    int8 runs in every native kernel (CPU, NPU) and the reference; int16 in the x86 CPU kernel
    (its AVX2 routine, also on AVX512 CPUs; the scalar twin when capped to it) and the reference,
    for K <= INT16_MAX_K (exact int32 sums); not on other CPUs (no NEON int16 kernel yet) nor the
    NPU (16-bit integers are not exact in its fp16/bf16 matmul). vLLM's int4 kernels and dense
    layers take float activations only. ``machine``: platform.machine() unless given (tests).
    """
    if mode == "exact":
        return mode
    if mode == "int16" and in_features > reference_op.INT16_MAX_K:
        return "exact"
    if choice.backend == "reference":
        return mode
    if choice.backend != "native":
        return "exact"
    if mode == "int16":
        from vllm_bitcpm.ops import cpu

        on_x86 = cpu.machine_isas(machine) == cpu.X86_ISAS
        if not (on_x86 and choice.kernel.startswith("cpu ")):
            return "exact"
    return mode


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
    #: ternary layers per kernel that runs them ("native cpu avx512bf16", "int4 CPUWNA16LinearKernel",
    #: "dense stock dense"), and why that kernel (backends.choose)
    kernels: dict[str, int] = dataclasses.field(default_factory=dict)
    kernel_reasons: dict[str, str] = dataclasses.field(default_factory=dict)

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
        if self.kernels:
            line += "; run by " + ", ".join(f"{kernel} ({n} layers: {self.kernel_reasons[kernel]})"
                                            for kernel, n in sorted(self.kernels.items()))
        return line


@register_quantization_config(QUANT_METHOD)
class BitCPMConfig(QuantizationConfig):
    """Ternary (1.58-bit) weights stored at 2 bits with per-tensor/row/group scales."""

    def __init__(
        self,
        require_ternary: bool = True,
        activations: str | None = None,
        packed_checkpoint: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.require_ternary = require_ternary
        #: quantization_config of a checkpoint written by ``vllm-bitcpm convert`` (tensors are
        #: loaded packed as they are), or None for fake-quantized dense tensors packed at load.
        self.packed_checkpoint = packed_checkpoint
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
        packed = None
        if "layout_version" in config:
            version = int(config["layout_version"])
            if version != ternary.PACK_LAYOUT_VERSION:
                raise ValueError(
                    f"bitcpm: this checkpoint's packed layout is version {version}, but this "
                    f"vllm-bitcpm reads version {ternary.PACK_LAYOUT_VERSION}: "
                    + ("upgrade vllm-bitcpm" if version > ternary.PACK_LAYOUT_VERSION else "re-convert it")
                )
            packed = config
        return cls(require_ternary=True, activations=config.get("activations"), packed_checkpoint=packed)

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


# vLLM-Ascend's NPUPlatform lists the methods it accepts; the decorator above adds ours, and
# this covers the cases where it skips that (see compat.ensure_platform_supports).
compat.ensure_platform_supports(QUANT_METHOD)


def packed_checkpoint_group_size(packed_config: dict[str, Any], in_features: int) -> int:
    """Scale group size of a packed checkpoint's layer (-1 in the config: one scale per row)."""
    group_size = int(packed_config.get("group_size", -1))
    return in_features if group_size < 0 else group_size


def _checked_loader(weight_loader, method: "TernaryLinearMethod", suffix: str, expected_columns: int):
    """vLLM's loader for a packed tensor, with a message that names the tensor on a bad shape.

    The name is read when loading: a layer vLLM built without a prefix (MiniCPM3's q_a_proj)
    gets its module name from the model class after construction."""

    def load(param, loaded_weight: torch.Tensor, *args, **kwargs):
        name = f"{method.prefix}.{suffix}"
        if loaded_weight.dim() != 2 or loaded_weight.shape[1] != expected_columns:
            raise ValueError(
                f"bitcpm: checkpoint tensor for '{name}' has shape {tuple(loaded_weight.shape)}; "
                f"expected (rows, {expected_columns}) for this layer's input size and the "
                "checkpoint's group_size (the file is corrupt or was written for another model)"
            )
        if name.endswith("weight_codes") and loaded_weight.dtype != torch.uint8:
            raise ValueError(f"bitcpm: checkpoint tensor for '{name}' is {loaded_weight.dtype}, expected uint8")
        try:
            return weight_loader(param, loaded_weight, *args, **kwargs)
        except (AssertionError, RuntimeError) as err:
            raise ValueError(
                f"bitcpm: cannot load '{name}' (shard {args[0] if args else '-'}) of shape "
                f"{tuple(loaded_weight.shape)} into {tuple(param.shape)}: {err or 'shape mismatch'}"
            ) from None

    return load


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
        layer.bitcpm_partition_sizes = list(output_partition_sizes)
        # ReplicatedLinear (MiniCPM3's q_a_proj / kv_a_proj_with_mqa) has no
        # input_size_per_partition attribute: keep our own.
        layer.bitcpm_in_features = input_size_per_partition
        layer.bitcpm_full_shape = (input_size, output_size)
        layer.bitcpm_params_dtype = params_dtype
        layer.bitcpm_backend = "dense"  # until process_weights_after_loading places a ternary layer
        layer.bitcpm_packed = False
        layer.bitcpm_loaded_packed = False
        layer.bitcpm_kept_dense = False
        self.quant_config.report.expected_layers += 1
        if self.quant_config.packed_checkpoint is not None:
            layer.bitcpm_kept_dense = self._kept_dense(len(output_partition_sizes))
        if self.quant_config.packed_checkpoint is not None and not layer.bitcpm_kept_dense:
            self._create_packed_weights(
                layer, input_size_per_partition, output_partition_sizes, input_size, params_dtype,
                extra_weight_attrs.pop("weight_loader"), extra_weight_attrs,
            )
            return
        self.dense.create_weights(
            layer,
            input_size_per_partition,
            output_partition_sizes,
            input_size,
            output_size,
            params_dtype,
            **extra_weight_attrs,
        )

    def _kept_dense(self, num_partitions: int) -> bool:
        """Whether a packed checkpoint stores this layer dense (``modules_to_not_convert``)."""
        dense = set(self.quant_config.packed_checkpoint.get("modules_to_not_convert", []))
        names = self.quant_config.logical_names(self.prefix, num_partitions)
        kept = [name in dense for name in names]
        if any(kept) and not all(kept):
            raise ValueError(
                f"bitcpm: packed checkpoint keeps {[n for n, k in zip(names, kept) if k]} dense but packs "
                f"{[n for n, k in zip(names, kept) if not k]}; vLLM fuses them into '{self.prefix}', so they "
                "must be all dense or all packed (re-convert with --keep-dense for all of them)"
            )
        return all(kept)

    def _create_packed_weights(
        self, layer, input_size_per_partition, output_partition_sizes, input_size, params_dtype,
        weight_loader, extra_weight_attrs,
    ) -> None:
        """Parameters that receive ``*.weight_codes`` / ``*.weight_scales`` as stored on disk.

        vLLM's weight loaders shard them like a dense weight: rows by ``output_dim``; columns by
        ``input_dim`` for a row-parallel layer (whole 128-weight blocks of codes, whole scale
        groups), except per-row scales, which every rank keeps whole.
        """
        rows = sum(output_partition_sizes)
        group_size = packed_checkpoint_group_size(self.quant_config.packed_checkpoint, input_size)
        sharded = input_size_per_partition != input_size
        if sharded and (input_size_per_partition % ternary.BLOCK_WEIGHTS
                        or (group_size < input_size and input_size_per_partition % group_size)):
            groups = f" / scale groups of {group_size}" if group_size < input_size else ""
            raise ValueError(
                f"bitcpm: layer '{self.prefix}': a tensor-parallel shard of {input_size_per_partition} "
                f"input columns does not align with 128-weight code blocks{groups} of this packed "
                f"checkpoint ({input_size} columns split {input_size // input_size_per_partition} ways); "
                "use a tensor-parallel size that splits it into whole blocks, or load the "
                "fake-quantized checkpoint, which each rank packs after sharding"
            )
        groups = 1 if group_size >= input_size else math.ceil(input_size_per_partition / group_size)
        codes = torch.nn.Parameter(
            torch.empty(rows, ternary.packed_row_bytes(input_size_per_partition), dtype=torch.uint8),
            requires_grad=False,
        )
        # NaN until loaded: rows a checkpoint never fills (a fused layer's missing q_proj, say) stay
        # NaN and are refused after loading instead of serving uninitialised memory.
        scales = torch.nn.Parameter(torch.full((rows, groups), float("nan"), dtype=params_dtype), requires_grad=False)
        expected_columns = {
            "weight_codes": ternary.packed_row_bytes(input_size),
            "weight_scales": 1 if group_size >= input_size else math.ceil(input_size / group_size),
        }
        for name, param in (("weight_codes", codes), ("weight_scales", scales)):
            layer.register_parameter(name, param)
            attrs = {"output_dim": 0, **extra_weight_attrs}
            if name == "weight_codes" or groups > 1:
                attrs["input_dim"] = 1
            attrs["weight_loader"] = _checked_loader(weight_loader, self, name, expected_columns[name])
            set_weight_attrs(param, attrs)
        layer.bitcpm_group_size = input_size_per_partition if group_size >= input_size else group_size
        layer.bitcpm_loaded_packed = True

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        report = self.quant_config.report
        if layer.bitcpm_loaded_packed:
            unloaded = (~torch.isfinite(layer.weight_scales.data)).any(dim=1).nonzero().flatten()
            if unloaded.numel():
                raise ValueError(
                    f"bitcpm: layer '{self.prefix}': the scales of {unloaded.numel()} of its "
                    f"{layer.weight_scales.shape[0]} output rows (first {int(unloaded[0])}, last {int(unloaded[-1])}) "
                    "were not in the checkpoint or are not finite: a packed part of this fused layer "
                    "(one of q/k/v or gate/up) is missing from the files, or they are corrupt")
            # Scales arrive in the model dtype; keep them in 16 bits when that is exact.
            layer.weight_scales.data = ternary.narrowest_exact(layer.weight_scales.data, layer.weight_scales.dtype)
            rows, k = layer.weight_codes.shape[0], layer.bitcpm_in_features
            packed = ternary.TernaryMatrix(codes=layer.weight_codes.data, scales=layer.weight_scales.data,
                                           group_size=layer.bitcpm_group_size, in_features=k)
            report.granularities["from checkpoint"] = report.granularities.get("from checkpoint", 0) + 1
            report.dense_bytes_before += rows * k * torch.empty((), dtype=layer.params_dtype).element_size()
            self._place(layer, packed)
            self._count_processed(report)
            return
        weight = layer.weight.data
        dense_bytes = weight.numel() * weight.element_size()
        names = self.quant_config.logical_names(self.prefix, len(layer.bitcpm_partition_sizes))
        report.dense_bytes_before += dense_bytes
        if layer.bitcpm_kept_dense:  # stored dense on purpose by `vllm-bitcpm convert --keep-dense`
            self._keep_dense(layer, dense_bytes)
            self._count_processed(report)
            return
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
            self._keep_dense(layer, dense_bytes)
        else:
            for layout in layouts:
                kind = layout.describe()
                report.granularities[kind] = report.granularities.get(kind, 0) + 1
            self._place(layer, packed)
        self._count_processed(report)

    def _keep_dense(self, layer: torch.nn.Module, dense_bytes: int) -> None:
        """A layer that is not ternary (or stored dense): exactly as stock vLLM runs it."""
        self.dense.process_weights_after_loading(layer)
        self.quant_config.report.dense_layer_names.append(self.prefix)
        self.quant_config.report.bytes_after += dense_bytes

    def _place(self, layer: torch.nn.Module, packed: ternary.TernaryMatrix) -> None:
        """Hand a ternary layer to the kernel backends.choose picks for it (see vllm_bitcpm.backends)."""
        report = self.quant_config.report
        in_full, out_full = layer.bitcpm_full_shape
        shape = backends.LayerShape(
            in_features=packed.in_features, out_features=packed.out_features, full_in_features=in_full,
            full_out_features=out_full, act_dtype=layer.bitcpm_params_dtype,
            group_size=int4_repack.gptq_group_size(packed.group_size, packed.in_features))
        try:
            choice = backends.choose(shape)
        except backends.BackendUnavailableError as err:
            raise backends.BackendUnavailableError(f"bitcpm: layer '{self.prefix}': {err}") from None
        nbytes = None
        if choice.backend == "int4":
            try:
                nbytes = backends.install_int4(layer, packed, shape, choice.kernel_class, self.prefix)
            except int4_repack.Int4RepackError as err:
                if backends.configured_backend() == "int4":
                    raise backends.BackendUnavailableError(f"bitcpm: layer '{self.prefix}': "
                                                           f"{backends.BACKEND_ENV}=int4, but {err}") from None
                choice = backends.Choice("dense", "stock dense", f"the int4 repack cannot hold it ({err})")
        key = f"{choice.backend} {choice.kernel}" if choice.backend != "dense" else "dense (as stock vLLM)"
        report.kernels[key] = report.kernels.get(key, 0) + 1
        report.kernel_reasons[key] = choice.reason
        layer.bitcpm_activations = layer_activations(self.quant_config.activations, choice, packed.in_features)
        if layer.bitcpm_activations != self.quant_config.activations:
            report.kernel_reasons[key] += (f"; {ACTIVATIONS_ENV}={self.quant_config.activations} is not applied here "
                                           f"({activations_scope(self.quant_config.activations)})")
        layer.bitcpm_backend = choice.backend
        if choice.backend == "dense":
            self._install_dense(layer, packed)
            report.bytes_after += packed.out_features * packed.in_features * layer.bitcpm_params_dtype.itemsize
            return
        if choice.backend != "int4":
            self._install_packed(layer, packed)
            if choice.backend == "native":  # the reference reads weight_codes, which the NPU form replaces
                self._prepare_for_npu(layer, packed.in_features)
            nbytes = packed.nbytes()
        report.packed_layers += 1
        report.packed_weights += packed.out_features * packed.in_features
        report.packed_bytes += nbytes
        report.bytes_after += nbytes

    def _install_dense(self, layer: torch.nn.Module, packed: ternary.TernaryMatrix) -> None:
        """Backend dense: the dense weight stock vLLM would hold (unpacked once for packed checkpoints)."""
        for name in ("weight_codes", "weight_scales"):
            if hasattr(layer, name):
                delattr(layer, name)
        if not hasattr(layer, "weight"):
            weight = packed.dequantize(layer.bitcpm_params_dtype)
            layer.register_parameter("weight", torch.nn.Parameter(weight, requires_grad=False))
            set_weight_attrs(layer.weight, {"input_dim": 1, "output_dim": 0})
        self.dense.process_weights_after_loading(layer)

    def _prepare_for_npu(self, layer: torch.nn.Module, in_features: int) -> None:
        """On vLLM-Ascend, convert the packed tensors once to the NPU kernel's form (ops/npu.py)."""
        if compat.on_npu():
            from vllm_bitcpm.ops import npu

            npu.prepare_layer(layer, self.prefix, in_features)

    @staticmethod
    def _count_processed(report: PackingReport) -> None:
        report.processed_layers += 1
        if report.processed_layers == report.expected_layers:
            logger.info(report.summary())

    @staticmethod
    def _install_packed(layer: torch.nn.Module, packed: ternary.TernaryMatrix) -> None:
        """Swap the dense weight for the packed tensors; the bf16 copy is freed here."""
        if hasattr(layer, "weight"):
            del layer.weight
        if not hasattr(layer, "weight_codes"):
            layer.register_parameter("weight_codes", torch.nn.Parameter(packed.codes, requires_grad=False))
            layer.register_parameter("weight_scales", torch.nn.Parameter(packed.scales, requires_grad=False))
        layer.bitcpm_group_size = packed.group_size
        layer.bitcpm_packed = True

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        backend = layer.bitcpm_backend
        if backend == "dense":
            return self.dense.apply(layer, x, bias)
        if backend == "int4":
            return layer.bitcpm_int4_kernel.apply_weights(layer, x, bias)
        activations = layer.bitcpm_activations
        if backend == "reference":
            return reference_op.ternary_linear_reference(x, layer.weight_codes, layer.weight_scales,
                                                          layer.bitcpm_group_size, bias, activations)
        npu_weights = getattr(layer, "bitcpm_npu", None)  # set only on NPU, torch_npu kernel
        if npu_weights is not None:
            from vllm_bitcpm.ops import npu

            return npu.weight_quant_linear(npu_weights, x, bias, activations == "int8")
        return ops.ternary_linear(x, layer.weight_codes, layer.weight_scales, layer.bitcpm_group_size, bias,
                                  activations)
