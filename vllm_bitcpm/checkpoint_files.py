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


def validate_safetensors(path: str | os.PathLike) -> tuple[dict, int]:
    """Raise :class:`CorruptCheckpointError` naming ``path`` (and the tensor) if it is damaged;
    else return (header without ``__metadata__``, offset of the data section)."""
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
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CorruptCheckpointError(f"{path}: corrupt safetensors header ({err})") from None
    data_size = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            expected = math.prod(info["shape"]) * _DTYPE_BYTES.get(info["dtype"], 0)
        except (KeyError, TypeError, ValueError):
            raise CorruptCheckpointError(f"{path}: corrupt header entry for tensor '{name}'") from None
        if end > data_size:
            raise CorruptCheckpointError(
                f"{path}: tensor '{name}' needs bytes up to {end} of the data section but the file "
                f"holds only {data_size}: the file is truncated (re-download or re-convert it)"
            )
        if _DTYPE_BYTES.get(info["dtype"]) and end - begin != expected:
            raise CorruptCheckpointError(
                f"{path}: tensor '{name}' has shape {info['shape']} ({info['dtype']}) = {expected} "
                f"bytes but occupies {end - begin}"
            )
    header.pop("__metadata__", None)
    return header, 8 + header_len


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


def validate_local_checkpoint(model: str | os.PathLike) -> None:
    """Validate every ``*.safetensors`` file of a local checkpoint directory (hub ids are skipped)."""
    directory = Path(model)
    if not directory.is_dir():
        return
    for path in sorted(directory.glob("*.safetensors")):
        validate_safetensors(path)
