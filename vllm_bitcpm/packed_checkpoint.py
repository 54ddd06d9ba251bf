"""Packed BitCPM checkpoints: read fake-quantized sources, inspect them, write 2-bit files.

A packed checkpoint is an ordinary HF directory whose ternary linear weights ``P.weight`` are
replaced by ``P.weight_codes`` (uint8, packed layout version 1 of :mod:`vllm_bitcpm.ternary`)
and ``P.weight_scales`` ((N, G), 16-bit when exact). ``config.json`` gains::

    "quantization_config": {
        "quant_method": "bitcpm", "bits": 2, "layout_version": 1,
        "group_size": -1 | g,            # -1: one scale per row (per-tensor/per-row sources)
        "granularity": {"per_row": 168, ...},
        "modules_to_not_convert": [...]  # linear modules kept dense
    }

One group size serves the whole model (the finest found; coarser scales are repeated, which is
exact), because vLLM fuses q/k/v and gate/up into one layer with one scale layout.
Pure PyTorch + safetensors: no vLLM import, usable on machines without an engine.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch

from vllm_bitcpm import int4_repack, ternary
from vllm_bitcpm.checkpoint_files import CorruptCheckpointError, SafetensorsReader

CODES_SUFFIX = ".weight_codes"
SCALES_SUFFIX = ".weight_scales"
WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")
DEFAULT_SHARD_BYTES = 2 * 1024**3
#: Output formats of convert: the plugin's 2-bit layout, or standard 4-bit GPTQ for runtimes without it.
FORMATS = ("bitcpm", "gptq")
GPTQ_SUFFIXES = (".qweight", ".scales", ".qzeros", ".g_idx")


class ConversionError(ValueError):
    """The source cannot be converted as asked; the message says which file or tensor."""


# --------------------------------------------------------------------------------------------
# Reading sources


def resolve_source(src: str) -> Path:
    """A local checkpoint directory, or a hub id downloaded through huggingface_hub."""
    path = Path(src)
    if path.is_dir():
        return path
    if path.exists():
        raise ConversionError(f"{src}: not a directory (give the checkpoint directory)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(src))
    except Exception as err:  # noqa: BLE001 - any hub failure is reported with the id
        raise ConversionError(f"{src}: not a local directory, and downloading it from the hub failed: {err}") from None


def weight_files(directory: Path) -> list[Path]:
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    files = sorted(directory.glob("pytorch_model*.bin"))
    if files:
        return files
    raise ConversionError(f"{directory}: no *.safetensors or pytorch_model*.bin weight files")


def iter_tensors(directory: Path) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """(name, tensor, file) for every tensor, one tensor in memory at a time."""
    for path in weight_files(directory):
        if path.suffix == ".safetensors":
            reader = SafetensorsReader(path)  # validates; copies, no mmap: RSS stays what the converter holds
            for name in reader.keys():
                yield name, reader.get_tensor(name), path
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
                raise CorruptCheckpointError(f"{path}: cannot read ({type(err).__name__}: {err})") from None
            for name, tensor in state.items():
                yield name, tensor, path


def is_linear_weight(name: str, tensor: torch.Tensor) -> bool:
    """2-D ``*.weight`` inside the decoder layers: the projections BitCPM trains ternary.

    The embedding, the lm_head and norms stay high precision by design."""
    return (
        tensor.dim() == 2
        and name.endswith(".weight")
        and ".layers." in name
        and "norm" not in name.rsplit(".", 2)[-2]
    )


# --------------------------------------------------------------------------------------------
# Inspection


@dataclasses.dataclass
class LinearReport:
    name: str
    shape: tuple[int, int]
    dtype: str
    ternary: bool
    layout: str | None  # e.g. "per_row", "per_group(g=128)"
    group_size: int | None
    zero_fraction: float | None
    dense_bytes: int
    packed_bytes: int | None
    reason: str | None = None


def inspect_linear(name: str, weight: torch.Tensor) -> LinearReport:
    dense_bytes = weight.numel() * weight.element_size()
    try:
        packed, (layout,) = ternary.quantize_exact(weight, name=name)
    except ternary.NotTernaryError as err:
        return LinearReport(name, tuple(weight.shape), str(weight.dtype).removeprefix("torch."), False,
                            None, None, None, dense_bytes, None, str(err))
    zeros = float((weight == 0).float().mean())
    return LinearReport(name, tuple(weight.shape), str(weight.dtype).removeprefix("torch."), True,
                        layout.describe(), layout.group_size, zeros, dense_bytes, packed.nbytes())


def quantization_config(directory: Path) -> dict | None:
    """The checkpoint's ``quantization_config`` (None for a fake-quantized or dense one)."""
    path = directory / "config.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("quantization_config") or None


#: safetensors dtypes a packed layer's scales may have (the kernels read float32, bfloat16, float16).
SCALE_DTYPES = ("F32", "BF16", "F16")


def validate_packed_layout(directory: Path, config: dict, headers: dict[Path, dict] | None = None) -> None:
    """Raise :class:`CorruptCheckpointError` naming the file and tensor unless every packed layer of a
    ``bitcpm`` checkpoint is whole: codes and scales both present, codes uint8 (rows, 32 x blocks),
    scales float (rows, groups) with as many rows as the codes and the group count that
    ``group_size`` gives for the codes' width. Reads the safetensors headers only (each validated
    first), so a crafted file fails here, before inspect, convert or an engine reads a tensor, and
    a missing half of a layer cannot load as uninitialised memory. ``headers``: each file's header
    as ``checkpoint_files.validate_local_checkpoint`` returns them (read here when not given)."""
    from vllm_bitcpm.checkpoint_files import validate_local_checkpoint

    group_size = config.get("group_size", -1)
    if not (isinstance(group_size, int) and not isinstance(group_size, bool) and (group_size == -1 or group_size > 0)):
        raise CorruptCheckpointError(f"{directory / 'config.json'}: quantization_config.group_size {group_size!r} "
                                     "is not -1 (one scale per row) or a positive number of columns")
    entries: dict[str, tuple[Path, dict]] = {}
    for path, header in (validate_local_checkpoint(directory) if headers is None else headers).items():
        for name, info in header.items():
            if name.endswith((CODES_SUFFIX, SCALES_SUFFIX)):
                if name in entries:
                    raise CorruptCheckpointError(f"{path}: tensor '{name}' is also in {entries[name][0]}")
                entries[name] = (path, info)
    for name in sorted(entries):
        path, info = entries[name]
        is_codes = name.endswith(CODES_SUFFIX)
        module = name[: -len(CODES_SUFFIX if is_codes else SCALES_SUFFIX)]
        partner = module + (SCALES_SUFFIX if is_codes else CODES_SUFFIX)
        if partner not in entries:
            raise CorruptCheckpointError(f"{path}: tensor '{name}' has no '{partner}' in any weight file of "
                                         f"{directory}: the packed layer is incomplete")
        if not is_codes:
            continue
        shape, dtype = info["shape"], info["dtype"]
        if dtype != "U8" or len(shape) != 2 or shape[1] == 0 or shape[1] % ternary.BLOCK_BYTES:
            raise CorruptCheckpointError(f"{path}: tensor '{name}' is {dtype} {shape}; packed codes are U8 (rows, "
                                         f"a multiple of {ternary.BLOCK_BYTES} bytes)")
        scales_path, scales = entries[partner]
        if scales["dtype"] not in SCALE_DTYPES or len(scales["shape"]) != 2 or scales["shape"][0] != shape[0]:
            raise CorruptCheckpointError(f"{scales_path}: tensor '{partner}' is {scales['dtype']} {scales['shape']}; "
                                         f"expected float ({', '.join(SCALE_DTYPES)}) ({shape[0]}, groups) for the "
                                         f"{shape[0]} rows of '{name}'")
        width = shape[1] * ternary.WEIGHTS_PER_BYTE  # input columns, padded to whole 128-weight blocks
        if group_size == -1:
            allowed = range(1, 2)
        else:  # the true width lies within the last block: K in (width - 128, width]
            allowed = range(-(-(width - ternary.BLOCK_WEIGHTS + 1) // group_size), -(-width // group_size) + 1)
        if scales["shape"][1] not in allowed:
            raise CorruptCheckpointError(
                f"{scales_path}: tensor '{partner}' has {scales['shape'][1]} scale columns; group_size "
                f"{group_size} over the {width} columns of '{name}' gives {allowed.start}"
                + (f"..{allowed.stop - 1}" if len(allowed) > 1 else ""))


def _zero_fraction(values: torch.Tensor, zero: int) -> float:
    return float((values == zero).float().mean())


def inspect_quantized(directory: Path, config: dict) -> list[LinearReport]:
    """Per layer of a converted checkpoint (``bitcpm`` 2-bit or ``gptq`` 4-bit): shape, scales, zeros, bytes.

    For ``bitcpm`` the input width is counted in whole 128-weight code blocks (every BitCPM
    shape is a multiple of 128), and zeros among them (padding would count as zeros).
    """
    method = config.get("quant_method")
    if method == "bitcpm":
        validate_packed_layout(directory, config)
    tensors = {name: tensor for name, tensor, _ in iter_tensors(directory)}
    # Layers stored dense (`convert --keep-dense`) are inspected like a fake-quantized source's.
    reports = [inspect_linear(name, t) for name, t in sorted(tensors.items()) if is_linear_weight(name, t)]
    if method == "bitcpm":
        for name in sorted(n for n in tensors if n.endswith(CODES_SUFFIX)):
            module = name[: -len(CODES_SUFFIX)]
            codes, scales = tensors[name], tensors[module + SCALES_SUFFIX]
            n, k = codes.shape[0], codes.shape[1] * ternary.WEIGHTS_PER_BYTE
            layout = "per_row" if scales.shape[1] == 1 else f"per_group(g={config.get('group_size')})"
            trits = ternary.unpack_codes(codes, k)
            reports.append(LinearReport(module + ".weight", (n, k), f"bitcpm 2-bit codes + {scales.dtype}".replace(
                "torch.", ""), True, layout, None, _zero_fraction(trits, 0), n * k * 2,
                codes.numel() + scales.numel() * scales.element_size()))
    elif method == "gptq":
        for name in sorted(n for n in tensors if n.endswith(".qweight")):
            module = name[: -len(".qweight")]
            qweight, scales = tensors[name], tensors[module + ".scales"]
            k, n = qweight.shape[0] * int4_repack.PACK_FACTOR, qweight.shape[1]
            layout = "per_row" if scales.shape[0] == 1 else f"per_group(g={config.get('group_size')})"
            nibbles = int4_repack.unpack_int32_along_rows(qweight)
            is_ternary = bool(((nibbles - int4_repack.BIAS).abs() <= 1).all())
            extra = sum(tensors[module + s].numel() * tensors[module + s].element_size()
                        for s in (".qzeros", ".g_idx") if module + s in tensors)
            reports.append(LinearReport(
                module + ".weight", (n, k), f"gptq {config.get('bits')}-bit + {str(scales.dtype).removeprefix('torch.')}",
                is_ternary, layout, None, _zero_fraction(nibbles, int4_repack.BIAS), n * k * 2,
                qweight.numel() * 4 + scales.numel() * scales.element_size() + extra,
                None if is_ternary else f"{module}: 4-bit values outside 7..9, not a ternary weight"))
    else:
        raise ConversionError(f"{directory}: quantization_config.quant_method {method!r}; inspect reads fake-quantized "
                              "checkpoints and the bitcpm / gptq checkpoints `vllm-bitcpm convert` writes")
    if not any(r.dtype.startswith(("bitcpm", "gptq")) for r in reports):
        raise ConversionError(f"{directory}: quant_method {method!r} but no quantized linear tensors found")
    return sorted(reports, key=lambda r: r.name)


def is_converted(config: dict | None) -> bool:
    """A checkpoint `convert` wrote (packed bitcpm or gptq), as opposed to a fake-quantized one that
    merely names ``quant_method: bitcpm`` (the same test ``BitCPMConfig.from_config`` uses)."""
    return bool(config) and ("layout_version" in config or config.get("quant_method") == "gptq")


def inspect_checkpoint(directory: Path, progress: bool = True) -> list[LinearReport]:
    config = quantization_config(directory)
    if is_converted(config):
        return inspect_quantized(directory, config)
    reports = []
    tensors = iter_tensors(directory)
    if progress:
        from tqdm import tqdm

        tensors = tqdm(tensors, desc="inspecting", unit="tensor")
    for name, tensor, _ in tensors:
        if is_linear_weight(name, tensor):
            reports.append(inspect_linear(name, tensor))
    if not reports:
        raise ConversionError(f"{directory}: no linear layer weights found (expected model.layers.*.*_proj.weight)")
    return reports


# --------------------------------------------------------------------------------------------
# Conversion


def _module_of(weight_name: str) -> str:
    return weight_name[: -len(".weight")]


def _kept_dense(name: str, patterns: list[str]) -> bool:
    module = _module_of(name)
    return any(fnmatch.fnmatch(module, p) or fnmatch.fnmatch(name, p) for p in patterns)


def _regroup(scales: torch.Tensor, group_size: int, k: int, target: int) -> torch.Tensor:
    """Repeat scales of groups of ``group_size`` into groups of ``target`` (target divides it)."""
    if group_size == target:
        return scales
    per_column = scales.repeat_interleave(group_size, dim=1)[:, :k]
    return per_column[:, ::target].contiguous()


def _read_umask() -> int:
    umask = os.umask(0)  # the only way to read it; done once, at import, before any threads write files
    os.umask(umask)
    return umask


_UMASK = _read_umask()


def _usual_file_mode(path: Path) -> None:
    """safetensors writes through a private temporary file (mode 0600): give the weights the mode
    every other file of the checkpoint gets (0666 less the umask), so other users can serve it."""
    path.chmod(0o666 & ~_UMASK)


def _gptq_qweight(matrix: ternary.TernaryMatrix, name: str) -> torch.Tensor:
    """GPTQ's packed nibbles (``t + 8``) of one ternary weight; they do not depend on its scales."""
    if matrix.out_features % int4_repack.PACK_FACTOR:
        raise ConversionError(f"{name}: {matrix.out_features} output rows; GPTQ's qzeros pack whole words of "
                              f"{int4_repack.PACK_FACTOR} rows")
    try:
        return int4_repack.from_ternary(matrix, name=name).qweight
    except int4_repack.Int4RepackError as err:
        raise ConversionError(str(err)) from None


def _gptq_scale_tensors(module: str, matrix: ternary.TernaryMatrix, scales: torch.Tensor, group_size: int,
                        name: str) -> dict[str, torch.Tensor]:
    """The rest of one weight's GPTQ tensors (fp16 scales, qzeros, g_idx) at the model's group size."""
    k = matrix.in_features
    if not ternary.exact_in(scales, torch.float16):
        raise ConversionError(f"{name}: its ternary scales are not exact in fp16, which GPTQ stores; "
                              "use the bitcpm format for this checkpoint")
    g = k if group_size < 0 else group_size
    gptq = int4_repack.GPTQWeights(torch.empty(0, dtype=torch.int32), scales.to(torch.float16).t().contiguous(),
                                   int4_repack.gptq_group_size(g, k), k)
    return {module + ".scales": gptq.scales, module + ".qzeros": gptq.qzeros(),
            module + ".g_idx": torch.arange(k, dtype=torch.int32) // g}


class _ShardWriter:
    """Safetensors shards written as they fill: at most one shard's tensors are held in memory.

    Files are named ``model-0000i.safetensors`` while open and renamed to HF's
    ``model-0000i-of-0000n.safetensors`` (or ``model.safetensors`` when there is one) at ``close``.
    """

    def __init__(self, out: Path, shard_bytes: int) -> None:
        self.out, self.shard_bytes = out, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.shard_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        file = f"model-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(self.out / file), metadata={"format": "pt"})
        self.files.append((file, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> dict[str, str]:
        """Flush, rename, write the index where there are several shards; returns the weight map."""
        if self.pending:
            self._flush()
        weight_map = {}
        for i, (file, names) in enumerate(self.files):
            final = ("model.safetensors" if len(self.files) == 1 else
                     f"model-{i + 1:05d}-of-{len(self.files):05d}.safetensors")
            (self.out / file).rename(self.out / final)
            _usual_file_mode(self.out / final)
            weight_map.update({name: final for name in names})
        if len(self.files) > 1:
            (self.out / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))},
                indent=2) + "\n")
        return weight_map


def _gptq_config(group_size: int, granularity: dict[str, int]) -> dict:
    """A standard GPTQ quantization_config (what AutoGPTQ/GPTQModel write), plus where it came from."""
    return {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": group_size,
        "sym": True,
        "desc_act": False,
        "static_groups": False,
        "true_sequential": True,
        "damp_percent": 0.0,
        "checkpoint_format": "gptq",
        "lm_head": False,
        "meta": {"quantizer": ["vllm-bitcpm convert --format gptq"],
                 "note": "lossless repack of ternary weights: value = (q - 8) * scale",
                 "ternary_granularity": granularity},
    }


def convert(
    src: str,
    dst: str | os.PathLike,
    keep_dense: list[str] | None = None,
    overwrite: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
    format: str = "bitcpm",
) -> dict:
    """Write a packed copy of ``src`` to ``dst``; returns a summary (sizes, layouts, dense modules).

    A linear weight that is not ternary stops the conversion with its name and file, unless a
    ``keep_dense`` glob (module or weight name, e.g. ``"*.mlp.down_proj"``) matches it. The
    result is verified by unpacking every packed tensor and comparing it with the source.

    ``format="gptq"`` writes a standard 4-bit GPTQ checkpoint instead (symmetric, ``desc_act``
    false, trits stored as ``t + 8`` with the ternary scales in fp16: lossless, see
    :mod:`vllm_bitcpm.int4_repack`), which stock vLLM, SGLang or transformers' GPTQ backends
    serve without this plugin.
    """
    if format not in FORMATS:
        raise ConversionError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    keep_dense = list(keep_dense or [])
    if format == "gptq" and keep_dense:
        raise ConversionError("--keep-dense is not supported with --format gptq (GPTQ configs have no portable way "
                              "to list dense layers); convert a fully ternary checkpoint")
    source = resolve_source(src)
    out = Path(dst)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ConversionError(f"{out}: destination exists and is not empty (pass --overwrite to replace it)")
        shutil.rmtree(out)
    config_path = source / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{source}: no config.json")
    config = json.loads(config_path.read_text())
    if (config.get("quantization_config") or {}).get("quant_method"):
        raise ConversionError(f"{source}: already quantized (quantization_config.quant_method "
                              f"{config['quantization_config']['quant_method']!r}); convert the fake-quantized checkpoint")
    tokenizer_files = [p for p in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json") if (source / p).exists()]
    if not tokenizer_files:
        raise ConversionError(f"{source}: no tokenizer (tokenizer.json / tokenizer.model / tokenizer_config.json)")

    # One pass, streaming: each source tensor is read, packed and handed to the shard writer, which
    # holds at most one shard; only the packed layers' scales (1/64 of the source or less) wait for
    # the end, because one group size serves the whole model (the finest found).
    out.mkdir(parents=True, exist_ok=True)
    try:  # a failed conversion leaves no partial destination behind
        writer = _ShardWriter(out, shard_bytes)
        packed: dict[str, tuple[ternary.TernaryMatrix, ternary.ScaleLayout]] = {}
        dense_modules: list[str] = []
        source_bytes = 0
        tensors = iter_tensors(source)
        if progress:
            from tqdm import tqdm

            tensors = tqdm(tensors, desc="packing", unit="tensor")
        for name, tensor, path in tensors:
            source_bytes += tensor.numel() * tensor.element_size()
            if is_linear_weight(name, tensor) and not _kept_dense(name, keep_dense):
                try:
                    matrix, (layout,) = ternary.quantize_exact(tensor, name=name)
                except ternary.NotTernaryError as err:
                    raise ConversionError(
                        f"{path.name}: {err}. Keep such layers dense with --keep-dense "
                        f"'{_module_of(name)}' (a glob), or check that {src} is a ternary BitCPM checkpoint"
                    ) from None
                module = _module_of(name)
                if format == "gptq":  # the nibbles do not depend on the scales' grouping
                    writer.add(module + ".qweight", _gptq_qweight(matrix, name))
                else:
                    writer.add(module + CODES_SUFFIX, matrix.codes)
                packed[name] = (dataclasses.replace(matrix, codes=matrix.codes[:, :0]), layout)  # keep the scales only
            else:
                if is_linear_weight(name, tensor):
                    dense_modules.append(_module_of(name))
                writer.add(name, tensor)
            del tensor
        if not packed:
            raise ConversionError(f"{source}: no ternary linear weights to pack")

        group_size = min(
            (layout.group_size for _, layout in packed.values() if layout.granularity is ternary.Granularity.PER_GROUP),
            default=-1,
        )
        granularity: dict[str, int] = {}
        for name, (matrix, layout) in packed.items():
            granularity[layout.describe()] = granularity.get(layout.describe(), 0) + 1
            scales = matrix.scales
            if group_size > 0:
                scales = _regroup(scales, matrix.group_size, matrix.in_features, group_size)
            module = _module_of(name)
            if format == "gptq":
                for key, value in _gptq_scale_tensors(module, matrix, scales, group_size, name).items():
                    writer.add(key, value)
            else:
                writer.add(module + SCALES_SUFFIX, scales.contiguous())
        weight_map = writer.close()
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise

    # Everything that is not a weight file is copied unchanged (tokenizer, generation config, code).
    for item in source.iterdir():
        if item.is_file() and item.name != "config.json" and not any(fnmatch.fnmatch(item.name, p) for p in WEIGHT_FILES):
            shutil.copy2(item, out / item.name)
    config["quantization_config"] = _gptq_config(group_size, granularity) if format == "gptq" else {
        "quant_method": "bitcpm",
        "bits": 2,
        "layout_version": ternary.PACK_LAYOUT_VERSION,
        "group_size": group_size,
        "granularity": granularity,
        "modules_to_not_convert": sorted(dense_modules),
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    # Verify: every packed tensor unpacks to its source, bit for bit (one tensor at a time).
    readers = {file: SafetensorsReader(out / file) for file in sorted(set(weight_map.values()))}

    def written(key: str) -> torch.Tensor:
        return readers[weight_map[key]].get_tensor(key)

    for name, tensor, _ in iter_tensors(source):
        module = _module_of(name)
        if name in packed:
            k = tensor.shape[1]
            g = k if group_size < 0 else group_size
            if format == "gptq":  # nibbles - 8, times the fp16 scales
                restored = int4_repack.GPTQWeights(written(module + ".qweight"), written(module + ".scales"),
                                                   group_size, k).dequantize(tensor.dtype)
            else:
                restored = ternary.dequantize(written(module + CODES_SUFFIX), written(module + SCALES_SUFFIX), g,
                                              k, tensor.dtype)
            if not torch.equal(restored, tensor):
                raise ConversionError(f"verification failed: {name} does not unpack to the source tensor")
        elif not torch.equal(written(name), tensor):
            raise ConversionError(f"verification failed: {name} differs from the source")

    packed_bytes = sum((out / f).stat().st_size for f in set(weight_map.values()))
    return {
        "format": format,
        "source": str(source),
        "destination": str(out),
        "source_weight_bytes": source_bytes,
        "packed_file_bytes": packed_bytes,
        "packed_linear_layers": len(packed),
        "dense_linear_layers": dense_modules,
        "group_size": group_size,
        "granularity": granularity,
        "shards": len(set(weight_map.values())),
    }

