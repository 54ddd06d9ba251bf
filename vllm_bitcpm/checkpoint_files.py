"""Cheap integrity checks of safetensors files (header and sizes only, no tensor data read).

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


def validate_safetensors(path: str | os.PathLike) -> None:
    """Raise :class:`CorruptCheckpointError` naming ``path`` (and the tensor) if it is damaged."""
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


def validate_local_checkpoint(model: str | os.PathLike) -> None:
    """Validate every ``*.safetensors`` file of a local checkpoint directory (hub ids are skipped)."""
    directory = Path(model)
    if not directory.is_dir():
        return
    for path in sorted(directory.glob("*.safetensors")):
        validate_safetensors(path)
