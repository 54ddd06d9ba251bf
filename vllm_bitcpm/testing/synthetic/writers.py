"""Write a synthetic checkpoint directory: safetensors shards, config, remote code and tokenizer files.

Its own module because this is the file-format side (streamed safetensors, sharding, the HF
side files), independent of how the tensors' values are made (``weights``) or sized
(``shapes``). ``write_model_files`` is shared with ``vllm_bitcpm.testing.qat_training``, whose
trained checkpoints must look exactly like synthetic ones.
"""

from __future__ import annotations

import json
import math
import pathlib
import struct
from collections.abc import Iterable, Mapping, Sequence

import torch

from vllm_bitcpm.testing.synthetic.shapes import ModelShape, hf_config, resolve_shape
from vllm_bitcpm.testing.synthetic.tokenizer import BOS_TOKEN_ID, CHAT_TEMPLATE, EOS_TOKEN_ID, default_tokenizer
from vllm_bitcpm.testing.synthetic.weights import GRANULARITIES, TensorSpec, tensor_specs

_SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}
#: Largest safetensors shard write_checkpoint writes (the 3B and 8B shapes come in several).
DEFAULT_SHARD_BYTES = 4 * 1024**3


def _write_safetensors(
    path: pathlib.Path, specs: list[TensorSpec], dtype: torch.dtype, seed: int,
    progress: bool,
) -> None:
    """Stream tensors to one safetensors file, holding only one in memory.

    ``safetensors.torch.save_file`` needs the whole state dict in memory
    (~3.5 GB for the 1B shape in float32); the format is simple enough to
    write incrementally: little-endian u64 header size, JSON header, raw data.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        nbytes = math.prod(spec.shape) * itemsize
        header[spec.name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)

    iterator: Iterable[TensorSpec] = specs
    if progress:
        from tqdm import tqdm

        iterator = tqdm(specs, desc=f"writing {path.name}", unit="tensor")
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for spec in iterator:
            tensor = spec.generate(seed)
            assert tuple(tensor.shape) == spec.shape and tensor.dtype == dtype, spec.name
            f.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())


def _write_shards(out: pathlib.Path, specs: list[TensorSpec], dtype: torch.dtype, seed: int, progress: bool,
                  shard_bytes: int) -> None:
    """``model.safetensors``, or shards of at most ``shard_bytes`` and their index."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec.shape) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    if len(shards) == 1:
        _write_safetensors(out / "model.safetensors", specs, dtype, seed, progress)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(out / name, shard, dtype, seed, progress)
        weight_map.update({spec.name: name for spec in shard})
    total = sum(math.prod(spec.shape) for spec in specs) * itemsize
    _write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_remote_config_code(out: pathlib.Path, config: dict) -> None:
    """Ship the config class as remote code, as hub BitCPM4 checkpoints do (``auto_map``).

    Stock vLLM (plugin disabled) can then load the checkpoint with ``trust_remote_code``,
    which is how tests run it beside the plugin; with the plugin, the registered class is used.
    """
    from vllm_bitcpm import config as config_module

    (out / "configuration_minicpm.py").write_text(pathlib.Path(config_module.__file__).read_text())
    config["auto_map"] = {"AutoConfig": "configuration_minicpm.MiniCPMConfig"}


def _write_json(path: pathlib.Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")



def _write_tokenizer_files(out_dir: pathlib.Path, tokenizer) -> None:
    tokenizer.save(str(out_dir / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    _write_json(
        out_dir / "special_tokens_map.json",
        {**special, "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]},
    )


def write_checkpoint(
    out_dir: str | pathlib.Path,
    shape: str | ModelShape | Mapping[str, int] = "tiny",
    granularity: str = "per_row",
    group_size: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    non_ternary_layers: Sequence[str] = (),
    original_max_position_embeddings: int = 32768,
    overwrite: bool = False,
    progress: bool | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> pathlib.Path:
    """Write a synthetic BitCPM4 checkpoint directory and return its path.

    Weights are generated and written one tensor at a time, in safetensors shards of at most
    ``shard_bytes`` (HF's ``model-0000i-of-0000n.safetensors`` plus index, as big releases ship),
    so an 8B checkpoint never has to fit in memory.

    The shape's ``architecture`` picks MiniCPM (default), MiniCPM3 (MLA) or Llama tensors
    and config.
    ``granularity`` is how ternary scales are shared: ``per_tensor``,
    ``per_row`` (per output row), ``per_group`` (per ``group_size``
    consecutive input columns of a row; the last group may be partial) or
    ``dense`` (ordinary non-ternary weights, i.e. a regular MiniCPM); the embedding, the
    norms and an untied ``lm_head`` are never ternary.
    ``non_ternary_layers`` lists HF weight names to write dense regardless.
    Lowering ``original_max_position_embeddings`` below
    ``max_position_embeddings`` (32768) makes long contexts use the LongRoPE
    long factors and an attention factor > 1. Deterministic for a given seed.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if group_size < 1:
        raise ValueError("group_size must be positive")
    if dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"unsupported dtype {dtype}")
    model_shape = resolve_shape(shape)
    out = pathlib.Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True)")
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = default_tokenizer()
    tokenizer_size = tokenizer.get_vocab_size()
    vocab_size = model_shape.vocab_size or 64 * math.ceil(tokenizer_size / 64)
    if vocab_size < tokenizer_size:
        raise ValueError(f"vocab_size {vocab_size} < tokenizer size {tokenizer_size}")

    specs = tensor_specs(
        model_shape, vocab_size, tokenizer_size, granularity, group_size, dtype,
        non_ternary_layers,
    )
    if progress is None:
        progress = model_shape.hidden_size >= 1024
    _write_shards(out, specs, dtype, seed, progress, shard_bytes)
    write_model_files(out, model_shape, vocab_size, dtype, tokenizer, original_max_position_embeddings)
    return out


def write_model_files(
    out: pathlib.Path, shape: ModelShape, vocab_size: int, dtype: torch.dtype, tokenizer,
    original_max_position_embeddings: int = 32768,
) -> dict:
    """Everything of a checkpoint directory but its weights: config, remote config code, tokenizer.

    Shared with ``vllm_bitcpm.testing.qat_training``, whose trained checkpoints must look
    exactly like these. Returns the config written.
    """
    config = hf_config(shape, vocab_size, dtype, original_max_position_embeddings)
    if shape.architecture == "minicpm":  # minicpm3 and llama configs are built into transformers
        _write_remote_config_code(out, config)
    _write_json(out / "config.json", config)
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": BOS_TOKEN_ID, "eos_token_id": EOS_TOKEN_ID},
    )
    _write_tokenizer_files(out, tokenizer)
    return config
