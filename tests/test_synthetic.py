"""The synthetic checkpoint is what it claims: MiniCPM layout, ternary weights, a tokenizer."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vllm_bitcpm import ternary
from vllm_bitcpm.testing import synthetic
from vllm_bitcpm.testing.synthetic import (
    REPORT_PROMPTS,
    SHAPES,
    TEST_PROMPTS,
    ModelShape,
    linear_weight_names,
    resolve_shape,
    write_checkpoint,
)

ODD_SHAPE = ModelShape(hidden_size=192, intermediate_size=200, num_hidden_layers=2,
                       num_attention_heads=6, num_key_value_heads=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", shape="tiny")


def _weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _config(path) -> dict:
    return json.loads((path / "config.json").read_text())


def _assert_ternary_blocks(weight: torch.Tensor, block_cols: int) -> list[float]:
    """Every nonzero |w| inside each (row, block of columns) is one value; return those values."""
    scales = []
    for start in range(0, weight.shape[1], block_cols):
        block = weight[:, start : start + block_cols].float()
        magnitude = block.abs().amax(dim=1, keepdim=True)
        assert (magnitude > 0).all(), "a scale group has no nonzero code"
        codes = block / magnitude
        assert torch.isin(codes, torch.tensor([-1.0, 0.0, 1.0])).all()
        scales += magnitude.flatten().tolist()
    return scales


# -- layout -----------------------------------------------------------------


def test_writes_a_huggingface_checkpoint_directory(tiny):
    names = {p.name for p in tiny.iterdir()}
    assert names == {
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
        "tokenizer.json", "tokenizer_config.json", "configuration_minicpm.py",
    }


def test_config_is_minicpm_with_longrope(tiny):
    config = _config(tiny)
    shape = SHAPES["tiny"]
    assert config["architectures"] == ["MiniCPMForCausalLM"]
    assert config["model_type"] == "minicpm"
    assert "quantization_config" not in config
    # Like hub BitCPM4 checkpoints, the config class ships as remote code.
    assert config["auto_map"] == {"AutoConfig": "configuration_minicpm.MiniCPMConfig"}
    assert config["hidden_size"] == shape.hidden_size
    assert config["num_key_value_heads"] == shape.num_key_value_heads
    assert (config["scale_emb"], config["scale_depth"], config["dim_model_base"]) == (12, 1.4, 256)
    assert config["tie_word_embeddings"] is True
    assert config["torch_dtype"] == "bfloat16"
    assert config["max_position_embeddings"] == 32768
    rope = config["rope_scaling"]
    assert rope["rope_type"] == "longrope"
    assert rope["original_max_position_embeddings"] == 32768
    half_head = shape.head_dim // 2
    assert len(rope["short_factor"]) == len(rope["long_factor"]) == half_head
    # Factors far from 1 (so ignoring them is visible) and different from each other.
    assert all(abs(f - 1.0) > 0.1 for f in rope["short_factor"])
    assert max(rope["short_factor"]) >= 2.5
    assert rope["long_factor"] != rope["short_factor"]
    generation = json.loads((tiny / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)


def test_tensor_names_and_shapes(tiny):
    config = _config(tiny)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    weights = _weights(tiny)
    expected = {
        "model.embed_tokens.weight": (config["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
    }
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        expected |= {
            f"{p}.input_layernorm.weight": (hidden,),
            f"{p}.post_attention_layernorm.weight": (hidden,),
            f"{p}.self_attn.q_proj.weight": (hidden, hidden),
            f"{p}.self_attn.k_proj.weight": (kv, hidden),
            f"{p}.self_attn.v_proj.weight": (kv, hidden),
            f"{p}.self_attn.o_proj.weight": (hidden, hidden),
            f"{p}.mlp.gate_proj.weight": (inter, hidden),
            f"{p}.mlp.up_proj.weight": (inter, hidden),
            f"{p}.mlp.down_proj.weight": (hidden, inter),
        }
    assert {k: tuple(v.shape) for k, v in weights.items()} == expected
    assert all(v.dtype == torch.bfloat16 for v in weights.values())


# -- ternary granularities ----------------------------------------------------


def test_per_row_weights_are_ternary_times_row_scale(tiny):
    weights = _weights(tiny)
    for name in linear_weight_names(_config(tiny)["num_hidden_layers"]):
        w = weights[name]
        scales = _assert_ternary_blocks(w, block_cols=w.shape[1])
        assert len(set(scales)) > 1, f"{name}: rows share one scale"
        zero_fraction = float((w == 0).float().mean())
        assert 0.2 < zero_fraction < 0.45, (name, zero_fraction)


def test_per_tensor_weights_share_one_scale(tmp_path):
    path = write_checkpoint(tmp_path / "ckpt", shape="tiny", granularity="per_tensor")
    weights = _weights(path)
    for name in linear_weight_names(_config(path)["num_hidden_layers"]):
        nonzero = weights[name][weights[name] != 0].abs()
        assert nonzero.unique().numel() == 1, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_per_group_weights_with_partial_last_group(tmp_path, dtype):
    path = write_checkpoint(tmp_path / "ckpt", shape=ODD_SHAPE, granularity="per_group",
                            group_size=64, dtype=dtype)
    weights = _weights(path)
    down = weights["model.layers.0.mlp.down_proj.weight"]
    assert down.shape[1] == 200 and down.dtype == dtype  # groups of 64, 64, 64 and 8
    for name in linear_weight_names(2):
        w = weights[name]
        scales = torch.tensor(_assert_ternary_blocks(w, block_cols=64))
        groups_per_row = -(-w.shape[1] // 64)
        per_row = scales.view(groups_per_row, w.shape[0]).T
        # The groups of one row have their own scales, so this is not per-row.
        assert (per_row != per_row[:, :1]).any(), name
    assert _config(path)["torch_dtype"] == ("float32" if dtype == torch.float32 else "bfloat16")


def test_dense_and_non_ternary_layers(tmp_path):
    dense_name = "model.layers.1.mlp.up_proj.weight"
    path = write_checkpoint(tmp_path / "mixed", shape="tiny", non_ternary_layers=[dense_name])
    weights = _weights(path)
    for name in linear_weight_names(_config(path)["num_hidden_layers"]):
        distinct_per_row = weights[name][0].abs().unique().numel()
        if name == dense_name:
            assert distinct_per_row > 20
        else:
            assert distinct_per_row <= 2  # zero and the row scale
    dense = _weights(write_checkpoint(tmp_path / "dense", shape="tiny", granularity="dense"))
    assert dense["model.layers.0.self_attn.q_proj.weight"][0].abs().unique().numel() > 20


def test_norms_and_embedding_stay_high_precision(tiny):
    weights = _weights(tiny)
    assert weights["model.embed_tokens.weight"][0].abs().unique().numel() > 50
    assert weights["model.norm.weight"].unique().numel() > 20


def test_unknown_non_ternary_layer_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="not linear weights"):
        write_checkpoint(tmp_path / "ckpt", non_ternary_layers=["model.norm.weight"])


# -- determinism and safety -----------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, tiny):
    again = write_checkpoint(tmp_path / "again", shape="tiny")
    for file in tiny.iterdir():
        assert file.read_bytes() == (again / file.name).read_bytes(), file.name
    other = write_checkpoint(tmp_path / "other", shape="tiny", seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny / "model.safetensors").read_bytes()


def test_refuses_non_empty_directory_unless_overwrite(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "something").write_text("x")
    with pytest.raises(FileExistsError):
        write_checkpoint(target)
    write_checkpoint(target, overwrite=True)
    assert (target / "model.safetensors").exists()


def test_streamed_safetensors_file_has_aligned_header(tiny):
    raw = (tiny / "model.safetensors").read_bytes()
    header_size = int.from_bytes(raw[:8], "little")
    assert header_size % 8 == 0
    assert json.loads(raw[8 : 8 + header_size])["__metadata__"] == {"format": "pt"}
    with safe_open(str(tiny / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()


# -- shapes ----------------------------------------------------------------------


def test_resolve_shape_accepts_names_dicts_and_dataclasses():
    assert resolve_shape("small") is SHAPES["small"]
    assert resolve_shape(ODD_SHAPE) is ODD_SHAPE
    custom = resolve_shape({"hidden_size": 64, "intermediate_size": 200, "num_hidden_layers": 1,
                            "num_attention_heads": 2, "num_key_value_heads": 1})
    assert custom.head_dim == 32 and custom.intermediate_size == 200
    with pytest.raises(ValueError):
        resolve_shape("huge")
    with pytest.raises(ValueError):
        ModelShape(100, 200, 1, 3, 1)


def test_published_shape_sizes():
    shape = SHAPES["bitcpm4-0.5b"]
    assert (shape.hidden_size, shape.num_hidden_layers, shape.head_dim) == (1024, 24, 64)
    kv = shape.num_key_value_heads * shape.head_dim
    attention = shape.hidden_size * (2 * shape.hidden_size + 2 * kv)
    per_layer = attention + 3 * shape.hidden_size * shape.intermediate_size
    params = shape.vocab_size * shape.hidden_size + shape.num_hidden_layers * per_layer
    assert 430e6 < params < 440e6


@pytest.mark.parametrize("shape", ["tiny-minicpm3", "tiny-llama"])
def test_other_architectures_load_with_transformers_builtin_configs(shape, tmp_path):
    """MiniCPM3 (MLA) and Llama (BitCPM-CANN-1B/3B) need no remote code, unlike MiniCPM."""
    from transformers import AutoConfig

    model_shape = SHAPES[shape]
    path = write_checkpoint(tmp_path / shape, shape=shape, granularity="per_group", group_size=32)
    assert not (path / "configuration_minicpm.py").exists()
    config = AutoConfig.from_pretrained(str(path))
    assert config.model_type == synthetic.ARCHITECTURES[model_shape.architecture][1]
    weights = _weights(path)
    linears = model_shape.linear_shapes(0) | model_shape.linear_shapes(model_shape.num_hidden_layers - 1)
    for name, shape_ in linears.items():
        assert tuple(weights[name].shape) == shape_
        assert ternary.detect_scale_layout(weights[name], name).granularity.value in ("per_group", "per_row")
    if model_shape.architecture == "minicpm3":
        assert (config.q_lora_rank, config.kv_lora_rank, config.qk_nope_head_dim, config.qk_rope_head_dim,
                config.v_head_dim) == (64, 32, 16, 16, 32)
        assert config.qk_head_dim == model_shape.head_dim == 32
        assert "model.layers.0.self_attn.kv_a_layernorm.weight" in weights
        assert len(config.rope_parameters["short_factor"]) == model_shape.qk_rope_head_dim // 2
    else:
        assert config.head_dim == 64 != config.hidden_size // config.num_attention_heads
        assert not config.tie_word_embeddings and "lm_head.weight" in weights
        assert not hasattr(config, "scale_emb")
    every_linear = {n for n in weights if n.endswith(".weight") and weights[n].dim() == 2 and ".layers." in n}
    assert every_linear == set(synthetic.linear_weight_names(model_shape.num_hidden_layers, model_shape))


def test_cli_writes_custom_intermediate_size(tmp_path):
    from vllm_bitcpm.testing.synthetic.__main__ import main

    main([str(tmp_path / "cli"), "--shape", "tiny", "--granularity", "per_group",
          "--group-size", "32", "--intermediate-size", "200", "--dtype", "float32"])
    config = _config(tmp_path / "cli")
    assert config["intermediate_size"] == 200 and config["torch_dtype"] == "float32"


# -- tokenizer --------------------------------------------------------------------


def test_tokenizer_is_fast_deterministic_and_sized():
    start = time.perf_counter()
    first = synthetic.build_tokenizer()
    assert time.perf_counter() - start < 5
    assert first.to_str() == synthetic.build_tokenizer().to_str()
    assert synthetic.default_tokenizer().to_str() == first.to_str()  # what write_checkpoint uses
    assert 1000 <= first.get_vocab_size() <= 2000
    assert [first.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    assert None not in (first.token_to_id("<|im_start|>"), first.token_to_id("<|im_end|>"))


def test_transformers_loads_tokenizer_and_round_trips_prompts(tiny):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tiny))
    assert len(tokenizer) <= _config(tiny)["vocab_size"]
    assert len(TEST_PROMPTS) >= 8
    for prompt in REPORT_PROMPTS + TEST_PROMPTS:
        ids = tokenizer(prompt).input_ids
        assert ids[0] == 1 and len(ids) >= 4, prompt  # BOS and several tokens
        assert tokenizer.decode(ids, skip_special_tokens=True) == prompt
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)


def test_chat_template_is_chatml(tiny):
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tiny))
    messages = [{"role": "user", "content": "Quantum computing is"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nQuantum computing is<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in ids


def test_auto_tokenizer_loads_once_minicpm_config_is_registered(tiny):
    # transformers has no built-in "minicpm"; AutoTokenizer reads config.json first.
    config_module = pytest.importorskip("vllm_bitcpm.config")
    config_module.register_config()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny))
    ids = tokenizer("The capital of France is").input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "The capital of France is"
