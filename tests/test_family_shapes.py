"""The published BitCPM / MiniCPM family at true widths, one decoder layer each, no engine.

For every family shape and scale group size g in (64, 128): `vllm-bitcpm inspect` reports each
linear layer ternary with group-wise scales, `vllm-bitcpm convert` packs them losslessly, and
the packed tensors load through vLLM's own linear layers (the weight loaders the engine uses)
at tensor-parallel size 1 and 2, each rank's shard unpacking to its slice of the source.
"""

from __future__ import annotations

import dataclasses
import json
import math
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file
from vllm.distributed import parallel_state
from vllm.model_executor.layers import linear

from vllm_bitcpm import cli, ternary
from vllm_bitcpm.quantization import BitCPMConfig
from vllm_bitcpm.testing.synthetic import (
    FAMILY_SHAPES,
    SHAPES,
    UNVERIFIED_SHAPES,
    ModelShape,
    write_checkpoint,
)

PACKED_MODULES = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def _one_layer(name: str) -> ModelShape:
    """True widths, one decoder layer, the synthetic tokenizer's vocabulary (the embedding is
    never packed, so its size does not matter here)."""
    return dataclasses.replace(SHAPES[name], num_hidden_layers=1, vocab_size=None)


def _vllm_layers(shape: ModelShape, cfg: BitCPMConfig, dtype: torch.dtype):
    """The linear layers vLLM builds for one decoder layer: (prefix, layer, [(checkpoint
    module, shard id)], how it is split across ranks)."""
    hidden, inter, p = shape.hidden_size, shape.intermediate_size, "model.layers.0"
    kw = dict(bias=False, quant_config=cfg, params_dtype=dtype)
    mlp = [
        (f"{p}.mlp.gate_up_proj", linear.MergedColumnParallelLinear(hidden, [inter] * 2, prefix=f"{p}.mlp.gate_up_proj", **kw),
         [(f"{p}.mlp.gate_proj", 0), (f"{p}.mlp.up_proj", 1)], "rows"),
        (f"{p}.mlp.down_proj", linear.RowParallelLinear(inter, hidden, prefix=f"{p}.mlp.down_proj", **kw),
         [(f"{p}.mlp.down_proj", None)], "columns"),
    ]
    a = f"{p}.self_attn"
    if shape.architecture != "minicpm3":
        qkv = linear.QKVParallelLinear(hidden, shape.head_dim, shape.num_attention_heads,
                                       shape.num_key_value_heads, prefix=f"{a}.qkv_proj", **kw)
        o = linear.RowParallelLinear(shape.num_attention_heads * shape.head_dim, hidden, prefix=f"{a}.o_proj", **kw)
        return [(f"{a}.qkv_proj", qkv, [(f"{a}.{n}_proj", n) for n in "qkv"], "rows"),
                (f"{a}.o_proj", o, [(f"{a}.o_proj", None)], "columns"), *mlp]
    # vLLM's MiniCPM3Attention (minicpm3.py), layer for layer.
    heads = shape.num_attention_heads
    layers = {
        "q_a_proj": (linear.ReplicatedLinear(hidden, shape.q_lora_rank, prefix=f"{a}.q_a_proj", **kw), "none"),
        "q_b_proj": (linear.ColumnParallelLinear(shape.q_lora_rank, heads * shape.head_dim, prefix=f"{a}.q_b_proj", **kw), "rows"),
        "kv_a_proj_with_mqa": (linear.ReplicatedLinear(hidden, shape.kv_lora_rank + shape.qk_rope_head_dim,
                                                       prefix=f"{a}.kv_a_proj_with_mqa", **kw), "none"),
        "kv_b_proj": (linear.ColumnParallelLinear(shape.kv_lora_rank, heads * (shape.qk_nope_head_dim + shape.v_head_dim),
                                                  prefix=f"{a}.kv_b_proj", **kw), "rows"),
        "o_proj": (linear.RowParallelLinear(heads * shape.v_head_dim, hidden, prefix=f"{a}.o_proj", **kw), "columns"),
    }
    return [(f"{a}.{n}", layer, [(f"{a}.{n}", None)], split) for n, (layer, split) in layers.items()] + mlp


def _load_rank(shape, packed_config, packed, source, rank, world_size):
    """Build one rank's layers, load the packed tensors through vLLM's loaders, and check each
    shard unpacks to its slice of the source weights."""
    cfg = BitCPMConfig.from_config(packed_config)
    cfg.packed_modules_mapping = PACKED_MODULES
    with mock.patch.object(parallel_state, "_TP", mock.Mock(rank_in_group=rank, world_size=world_size)):
        layers = _vllm_layers(shape, cfg, torch.bfloat16)
        for prefix, layer, modules, split in layers:
            assert layer.bitcpm_loaded_packed, prefix
            for module, shard in modules:
                for suffix in ("weight_codes", "weight_scales"):
                    param = getattr(layer, suffix)
                    args = () if shard is None else (shard,)
                    param.weight_loader(param, packed[f"{module}.{suffix}"], *args)
            layer.quant_method.process_weights_after_loading(layer)
            k = layer.bitcpm_in_features
            restored = ternary.dequantize(layer.weight_codes, layer.weight_scales, layer.bitcpm_group_size, k,
                                          torch.bfloat16)
            parts = [source[f"{module}.weight"] for module, _ in modules]
            if split == "rows":
                parts = [part.chunk(world_size, dim=0)[rank] for part in parts]
            elif split == "columns":
                parts = [part.chunk(world_size, dim=1)[rank] for part in parts]
            expected = torch.cat(parts, dim=0)
            assert restored.shape == expected.shape, (prefix, rank, world_size)
            assert torch.equal(restored, expected), (prefix, rank, world_size)
    return cfg.report


@pytest.mark.parametrize("group_size", [64, 128])
@pytest.mark.parametrize("name", FAMILY_SHAPES)
def test_family_shape_packs_losslessly_and_loads_at_tp1_and_tp2(name, group_size, tmp_path, capsys):
    shape = _one_layer(name)
    src = write_checkpoint(tmp_path / "src", shape=shape, granularity="per_group", group_size=group_size,
                           progress=False)
    linears = shape.linear_shapes(0)

    assert cli.main(["inspect", str(src), "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for weight in linears:
        (line,) = [line for line in lines if line.startswith(weight + " ")]
        assert f" yes      per_group(g={group_size}) " in line, line
    assert any(line.startswith(f"summary: {len(linears)}/{len(linears)} linear layers ternary") for line in lines)

    dst = tmp_path / "packed"
    assert cli.main(["convert", str(src), str(dst), "--quiet"]) == 0
    assert "verified bit for bit" in capsys.readouterr().out
    config = json.loads((dst / "config.json").read_text())
    assert config["architectures"] == json.loads((src / "config.json").read_text())["architectures"]
    quant = config["quantization_config"]
    assert quant["group_size"] == group_size and quant["granularity"] == {f"per_group(g={group_size})": len(linears)}
    assert quant["modules_to_not_convert"] == []

    source, packed = load_file(str(src / "model.safetensors")), load_file(str(dst / "model.safetensors"))
    assert not any(n.endswith("_proj.weight") for n in packed)
    for weight, (rows, cols) in linears.items():
        module = weight.removesuffix(".weight")
        codes, scales = packed[module + ".weight_codes"], packed[module + ".weight_scales"]
        assert codes.dtype == torch.uint8 and codes.shape == (rows, math.ceil(cols / 128) * 32)
        assert scales.dtype == torch.bfloat16 and scales.shape == (rows, math.ceil(cols / group_size))
    if not shape.tie_word_embeddings:
        assert torch.equal(packed["lm_head.weight"], source["lm_head.weight"])  # the head stays dense

    for world_size in (1, 2):
        for rank in range(world_size):
            report = _load_rank(shape, quant, packed, source, rank, world_size)
            assert report.packed_layers == report.expected_layers == (7 if shape.architecture == "minicpm3" else 4)


def test_tp2_shard_off_a_128_weight_block_is_refused_naming_the_layer():
    """No family shape has one (checked above); tiny-odd's down_proj (200 inputs) splits into 100."""
    shape = SHAPES["tiny-odd"]
    cfg = BitCPMConfig.from_config({"quant_method": "bitcpm", "layout_version": ternary.PACK_LAYOUT_VERSION,
                                    "group_size": -1})
    with mock.patch.object(parallel_state, "_TP", mock.Mock(rank_in_group=0, world_size=2)):
        with pytest.raises(ValueError, match=r"layer 'model.layers.0.mlp.down_proj': a tensor-parallel "
                                             r"shard of 100 input columns does not align with 128-weight"):
            _vllm_layers(shape, cfg, torch.bfloat16)


def test_family_shapes_are_named_and_unverified_ones_marked():
    assert set(UNVERIFIED_SHAPES) <= set(FAMILY_SHAPES)
    llama = [n for n in FAMILY_SHAPES if SHAPES[n].architecture == "llama"]
    assert llama == ["bitcpm-cann-1b", "bitcpm-cann-3b"]
    assert all(not SHAPES[n].tie_word_embeddings for n in llama)
    assert SHAPES["bitcpm-cann-3b"].head_dim == 128 != 2560 // 32  # explicit head_dim


def test_bitcpm4_1b_shape_matches_the_published_file_size():
    """2.72 GB of bf16 (the published model.safetensors) = 1.36B parameters."""
    shape = SHAPES["bitcpm4-1b"]
    per_layer = sum(rows * cols for rows, cols in shape.linear_shapes(0).values()) + 2 * shape.hidden_size
    params = shape.vocab_size * shape.hidden_size + shape.num_hidden_layers * per_layer + shape.hidden_size
    assert abs(2 * params / 2.72e9 - 1) < 0.005
