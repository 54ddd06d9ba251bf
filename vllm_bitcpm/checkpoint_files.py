"""Cheap integrity checks of safetensors files (header and sizes only, no tensor data read),
and a reader that copies one tensor at a time without memory-mapping the file.

A truncated download or a corrupt header otherwise surfaces as a parser error from deep inside
the loader that names neither the file nor the tensor.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}


class CorruptCheckpointError(ValueError):
    """A checkpoint file is truncated or unreadable."""


#: The largest header accepted (safetensors' own limit): a crafted length cannot make a reader
#: allocate and parse hundreds of MB of JSON.
MAX_HEADER_BYTES = 100_000_000


def validate_safetensors(path: str | os.PathLike) -> tuple[dict, int]:
    """Raise :class:`CorruptCheckpointError` naming ``path`` (and the tensor) if it is damaged;
    else return (header without ``__metadata__``, offset of the data section).

    Checked before any tensor byte is read, so that a crafted file (a checkpoint is a stranger's
    file) fails here with its name instead of crashing or reading out of bounds later: the header
    length (at most MAX_HEADER_BYTES, inside the file), a JSON object of entries, each with a known
    dtype, a shape of non-negative integers and data offsets 0 <= begin <= end inside the data
    section whose size matches shape x dtype, and no two tensors sharing bytes."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CorruptCheckpointError(f"{path}: file is {size} bytes, too short for a safetensors header")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise CorruptCheckpointError(
                f"{path}: header claims {header_len} bytes but the file has {size}; "
                "the file is truncated or not a safetensors file"
            )
        if header_len > MAX_HEADER_BYTES:
            raise CorruptCheckpointError(f"{path}: header of {header_len} bytes is over the {MAX_HEADER_BYTES}-byte "
                                         "limit of safetensors; not a checkpoint this reader accepts")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise CorruptCheckpointError(f"{path}: corrupt safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, "
                                     "not an object of tensors)")
    data_size = size - 8 - header_len
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        spans.append((*_check_entry(path, name, info, data_size), name))
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise CorruptCheckpointError(f"{path}: tensors '{a}' and '{b}' overlap in the data section")
    header.pop("__metadata__", None)
    return header, 8 + header_len


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_entry(path: Path, name: str, info, data_size: int) -> tuple[int, int]:
    """(begin, end) of one header entry, or CorruptCheckpointError naming the file and tensor."""
    def bad(why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{path}: corrupt header entry for tensor '{name}' ({why})")

    if not isinstance(info, dict):
        raise bad("not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _DTYPE_BYTES:
        raise bad(f"dtype {dtype!r} is not a safetensors dtype")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise bad(f"data_offsets {offsets!r} are not two integers 0 <= begin <= end")
    begin, end = offsets
    if end > data_size:
        raise CorruptCheckpointError(
            f"{path}: tensor '{name}' needs bytes up to {end} of the data section but the file "
            f"holds only {data_size}: the file is truncated (re-download or re-convert it)"
        )
    expected = math.prod(shape) * _DTYPE_BYTES[dtype]
    if end - begin != expected:
        raise CorruptCheckpointError(
            f"{path}: tensor '{name}' has shape {shape} ({dtype}) = {expected} bytes but occupies {end - begin}"
        )
    return begin, end


class SafetensorsReader:
    """``keys()`` / ``get_tensor(name)`` like ``safetensors.safe_open``, but each tensor is read
    into its own buffer (seek + readinto): nothing of the file is mapped into the process, so a
    converter's RSS is what it holds, not every page of a multi-GB shard it has touched. The file
    is validated on opening (:func:`validate_safetensors`), so damage names the file and tensor."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.header, self.data_start = validate_safetensors(self.path)

    def keys(self) -> list[str]:
        return sorted(self.header, key=lambda name: self.header[name]["data_offsets"][0])

    def get_tensor(self, name: str):
        import torch

        info = self.header[name]
        dtype = getattr(torch, _TORCH_DTYPE_NAMES.get(info["dtype"], "?"), None)
        if dtype is None:
            raise CorruptCheckpointError(f"{self.path}: tensor '{name}' has dtype {info['dtype']}, "
                                         "which this reader does not handle")
        begin, end = info["data_offsets"]
        buffer = torch.empty(end - begin, dtype=torch.uint8)
        with self.path.open("rb", buffering=0) as f:
            f.seek(self.data_start + begin)
            view = memoryview(buffer.numpy())
            got = 0
            while got < len(view):
                n = f.readinto(view[got:])
                if not n:
                    raise CorruptCheckpointError(f"{self.path}: tensor '{name}' is cut short (truncated file)")
                got += n
        return buffer.view(dtype).reshape(info["shape"])


_TORCH_DTYPE_NAMES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "F16": "float16",
                      "BF16": "bfloat16", "I32": "int32", "F32": "float32", "I64": "int64", "F64": "float64"}


def validate_local_checkpoint(model: str | os.PathLike) -> dict[Path, dict]:
    """Validate every ``*.safetensors`` file of a local checkpoint directory (hub ids are skipped);
    returns each file's header, for checks that read them next."""
    directory = Path(model)
    if not directory.is_dir():
        return {}
    return {path: validate_safetensors(path)[0] for path in sorted(directory.glob("*.safetensors"))}
