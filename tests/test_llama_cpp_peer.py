"""The llama.cpp peer's GGUF (benchmarks/llama_cpp_peer.py) is the same model as the checkpoint.

Checked against the source safetensors and config directly (not through the writer's helpers):
lossless TQ2_0 weights, q/k rows in llama.cpp's interleaved rotary order, muP scales, LongRoPE
factors, vocabulary. Where llama-cpp-python is installed (scripts/setup-llama-cpp.sh), llama.cpp's
own next-token logits are compared with the float64 reference forward.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import FIGURES
from vllm_bitcpm.testing import synthetic

gguf = pytest.importorskip("gguf", reason="the gguf package comes with the [bench] extra")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import llama_cpp_peer  # noqa: E402


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path]:
    """The ``small`` synthetic shape (every size a multiple of 256, as TQ2_0 blocks need) and its GGUF."""
    root = tmp_path_factory.mktemp("peer")
    model = synthetic.write_checkpoint(root / "small", shape="small", granularity="per_row", overwrite=True)
    out = root / "small.gguf"
    summary = llama_cpp_peer.write_gguf(model, out, "f16", progress=False)
    assert summary["tq2_0_weights"] > 0
    return Path(model), out


def _gguf_tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        out[t.name] = (t.tensor_type.name, data.reshape([int(x) for x in reversed(t.shape)]))
    return out


def _field(reader, key):
    field = reader.fields[key]
    value = field.parts[field.data[0]]
    return bytes(value).decode() if value.dtype == np.uint8 else value.item()


def test_linear_weights_are_tq2_0_and_lossless(small):
    model, path = small
    source = load_file(str(model / "model.safetensors"))
    tensors = _gguf_tensors(path)
    config = json.loads((model / "config.json").read_text())
    for i in range(config["num_hidden_layers"]):
        for hf, name in (("self_attn.v_proj", "attn_v"), ("self_attn.o_proj", "attn_output"),
                         ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"), ("mlp.down_proj", "ffn_down")):
            kind, data = tensors[f"blk.{i}.{name}.weight"]
            assert kind == "TQ2_0"
            np.testing.assert_array_equal(data, source[f"model.layers.{i}.{hf}.weight"].float().numpy())
    kind, embedding = tensors["token_embd.weight"]
    assert kind == "F16" and "output.weight" not in tensors  # tied head: llama.cpp reuses token_embd
    # bf16 -> f16 is exact in f16's normal range; below 2^-14 f16 is subnormal, in steps of 2^-24
    np.testing.assert_allclose(embedding, source["model.embed_tokens.weight"].float().numpy(), rtol=0, atol=2**-25)


def test_q_and_k_rows_follow_llama_cpp_rotary_pairs(small):
    """HF rotates (i, i + d/2) within a head; llama.cpp's normal rope rotates rows (2i, 2i + 1)."""
    model, path = small
    source = load_file(str(model / "model.safetensors"))
    tensors = _gguf_tensors(path)
    config = json.loads((model / "config.json").read_text())
    d = config["hidden_size"] // config["num_attention_heads"]
    for hf, name, heads in (("q_proj", "attn_q", config["num_attention_heads"]),
                            ("k_proj", "attn_k", config["num_key_value_heads"])):
        hf_rows = source[f"model.layers.0.self_attn.{hf}.weight"].float().numpy()
        kind, rows = tensors[f"blk.0.{name}.weight"]
        assert kind == "TQ2_0"
        for h in range(heads):
            for i in range(d // 2):
                np.testing.assert_array_equal(rows[h * d + 2 * i], hf_rows[h * d + i])
                np.testing.assert_array_equal(rows[h * d + 2 * i + 1], hf_rows[h * d + d // 2 + i])


def test_metadata_carries_minicpm_scales_rope_and_vocabulary(small):
    model, path = small
    config = json.loads((model / "config.json").read_text())
    reader = gguf.GGUFReader(path)
    assert _field(reader, "general.architecture") == "minicpm"
    assert math.isclose(_field(reader, "minicpm.embedding_scale"), config["scale_emb"], rel_tol=1e-6)
    assert math.isclose(_field(reader, "minicpm.residual_scale"),
                        config["scale_depth"] / math.sqrt(config["num_hidden_layers"]), rel_tol=1e-6)
    assert math.isclose(_field(reader, "minicpm.logit_scale"), config["hidden_size"] / config["dim_model_base"],
                        rel_tol=1e-6)
    assert _field(reader, "minicpm.rope.scaling.type") == "longrope"
    tensors = _gguf_tensors(path)
    for kind in ("long", "short"):
        np.testing.assert_allclose(tensors[f"rope_factors_{kind}.weight"][1],
                                   config["rope_scaling"][f"{kind}_factor"], rtol=1e-6)
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == config["vocab_size"]
    assert _field(reader, "tokenizer.ggml.bos_token_id") == config["bos_token_id"]
    assert _field(reader, "tokenizer.ggml.eos_token_id") == config["eos_token_id"]


def test_q8_0_head_variant(small, tmp_path):
    model, _ = small
    out = tmp_path / "q8.gguf"
    llama_cpp_peer.write_gguf(model, out, "q8_0", progress=False)
    kind, embedding = _gguf_tensors(out)["token_embd.weight"]
    source = load_file(str(model / "model.safetensors"))["model.embed_tokens.weight"].float().numpy()
    assert kind == "Q8_0"
    # Q8_0: one f16 scale d = absmax/127 per 32 weights: error <= d/2 + 127 * d * 2^-11 (the scale's rounding)
    step = np.abs(source.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
    error = np.abs(embedding.reshape(-1, 32) - source.reshape(-1, 32))
    assert np.all(error <= step * (0.5 + 127 * 2**-11) + 2**-24)
    assert error.max() > 0  # it did quantize


def test_non_ternary_weight_is_refused_naming_file_and_tensor(small, tmp_path):
    model, _ = small
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in model.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(model / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    weights[name] = weights[name].clone()
    weights[name][3, 7] += 0.25 * weights[name].abs().max()
    save_file(weights, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(llama_cpp_peer.GGUFExportError, match=rf"model\.safetensors: tensor {name}.*row 3"):
        llama_cpp_peer.write_gguf(broken, tmp_path / "x.gguf", progress=False)
    assert not (tmp_path / "x.gguf").exists()


def test_rows_not_in_256_blocks_are_refused(tmp_path):
    model = synthetic.write_checkpoint(tmp_path / "tiny", shape="tiny", granularity="per_row", overwrite=True)
    with pytest.raises(llama_cpp_peer.GGUFExportError, match="256-weight blocks"):
        llama_cpp_peer.write_gguf(model, tmp_path / "tiny.gguf", progress=False)


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (bash scripts/setup-llama-cpp.sh)")
def test_llama_cpp_runs_the_same_model_as_the_float64_reference(small):
    """llama.cpp's logits (int8 activations in its TQ2_0 dot product) track the float64 forward."""
    import llama_cpp

    from vllm_bitcpm.testing.reference_model import ReferenceMiniCPM

    model, path = small
    prompt = [1, 17, 230, 5, 981, 44, 302, 12]
    reference = ReferenceMiniCPM.from_pretrained(model).next_token_logits(prompt).numpy()
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=1, logits_all=True, verbose=False)
    llm.eval(prompt)
    ours = np.asarray(llm.scores[len(prompt) - 1], dtype=np.float64)
    correlation = np.corrcoef(ours, reference)[0, 1]
    overlap = len(set(np.argsort(reference)[-10:]) & set(np.argsort(ours)[-10:]))
    FIGURES.append(f"llama.cpp TQ2_0 GGUF vs float64 reference (small shape): logit correlation {correlation:.5f}, "
                   f"top-10 overlap {overlap}/10, top-1 {'same' if ours.argmax() == reference.argmax() else 'differs'}")
    assert correlation > 0.99, correlation
    assert overlap >= 7


@pytest.mark.skipif(llama_cpp_peer.llama_bench_binary() is None,
                    reason="llama-bench is not built (bash scripts/setup-llama-cpp.sh --server-only)")
def test_llama_bench_times_the_gguf(small):
    """llama.cpp's own llama-bench times the peer: prefill and batch-1 decode of the same GGUF, on
    the given CPU, with the build's commit and CPU features recorded."""
    _, path = small
    spec = {"prefill_tokens": 64, "decode_tokens": 8, "prompt_tokens": 16, "repeats": 2}
    result = llama_cpp_peer.measure_llama_bench(path, 1, "0", spec)
    assert "error" not in result, result
    assert result["prefill_tok_per_s"] > 0 and result["decode_b1_tok_per_s"] > 0
    assert result["prefill_seconds"] * result["prefill_tok_per_s"] == pytest.approx(64)
    # llama-bench's model_size is the tensors' bytes: the file less its header and metadata
    assert 0.5 * path.stat().st_size < result["weight_gib"] * 2**30 <= path.stat().st_size
    assert result["model_threads_bind"] == "0" and result["llama_bench"]["build_commit"]
    assert "CPU" in result["isa_paths"]["llama.cpp"]
