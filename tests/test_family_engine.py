"""The rest of the family in the real engine: MiniCPM3 (MLA), Llama-architecture BitCPM-CANN
checkpoints, and packed checkpoints under tensor parallelism.

Toy widths (the true widths are checked without an engine in test_family_shapes.py); float32
engines, bf16 checkpoints, one child process per side as in conftest.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.conftest import FIGURES, LOGPROBS, MAX_TOKENS
from tests.test_engine import _outputs, compare_greedy
from vllm_bitcpm import cli
from vllm_bitcpm.testing import synthetic
from vllm_bitcpm.testing.sidebyside import EngineJob, run_engine_jobs

#: name -> (shape, write_checkpoint keyword arguments)
SOURCES = {
    "minicpm3": ("tiny-minicpm3", dict(granularity="per_group", group_size=32)),
    "llama": ("tiny-llama", dict(granularity="per_row")),
    # hidden 256 / intermediate 512: every TP=2 shard of a row-parallel layer is whole 128-blocks.
    "small": ("small", dict(granularity="per_group", group_size=64)),
    # hidden 128: o_proj's TP=2 shard is 64 input columns, half a 128-weight block.
    "tiny": ("tiny", dict(granularity="per_row")),
}


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("family")
    for name, (shape, kwargs) in SOURCES.items():
        synthetic.write_checkpoint(root / name, shape=shape, seed=0, **kwargs)
        assert cli.main(["convert", str(root / name), str(root / f"{name}-packed"), "--quiet"]) == 0
    # A scale tensor of q_a_proj (which vLLM 0.32 builds without a module prefix) with half its
    # groups: a layout the files alone allow (a narrower layer), wrong for this model, so the
    # error comes from the layer's loader, which must name the layer.
    bad = root / "minicpm3-bad"
    shutil.copytree(root / "minicpm3-packed", bad)
    tensors = load_file(str(bad / "model.safetensors"))
    name = "model.layers.0.self_attn.q_a_proj.weight_scales"
    tensors[name] = tensors[name][:, : tensors[name].shape[1] // 2].contiguous()
    save_file(tensors, str(bad / "model.safetensors"))
    return root


def _job(family_dir, prompt_ids, name, **overrides) -> EngineJob:
    return EngineJob(model=str(family_dir / name), prompts=prompt_ids, max_tokens=MAX_TOKENS,
                     logprobs=LOGPROBS, **overrides)


@pytest.fixture(scope="module")
def stock(family_dir, prompt_ids) -> dict[str, dict]:
    names = ["minicpm3", "llama"]  # both configs are built into transformers: no remote code
    return dict(zip(names, run_engine_jobs([_job(family_dir, prompt_ids, n) for n in names], plugin=False)))


PLUGIN_JOBS = [
    ("minicpm3", "minicpm3", {}),
    ("minicpm3-packed", "minicpm3-packed", {}),
    ("llama", "llama", {}),
    ("llama-forced", "llama", {"quantization": "bitcpm"}),
    ("llama-packed", "llama-packed", {}),
    ("small-packed", "small-packed", {}),
    ("minicpm3-bad", "minicpm3-bad", {}),
]


@pytest.fixture(scope="module")
def plugin(family_dir, prompt_ids) -> dict[str, dict]:
    jobs = [_job(family_dir, prompt_ids, ckpt, **kw) for _, ckpt, kw in PLUGIN_JOBS]
    return {key: run for (key, _, _), run in zip(PLUGIN_JOBS, run_engine_jobs(jobs, plugin=True))}


@pytest.fixture(scope="module")
def tp2(family_dir, prompt_ids) -> dict[str, dict]:
    """Packed checkpoints at TP=2 (gloo on CPU; explicit cores, as in test_engine_modes)."""
    names = ["small-packed", "tiny-packed"]  # the failing one last
    jobs = [_job(family_dir, prompt_ids, n, tensor_parallel_size=2) for n in names]
    runs = run_engine_jobs(jobs, plugin=True, extra_env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"})
    return dict(zip(names, runs))


def _packed_summary(run: dict, layers: int) -> None:
    (counts,) = run["layers"]
    assert counts["packed_layers"] == layers and counts["dense_layers"] == 0
    assert f"bitcpm: packed {layers}/{layers} linear layers as ternary" in run["log"]


def test_minicpm3_unflagged_checkpoint_packs_every_linear_layer_and_matches_stock(stock, plugin, prompt_ids):
    """vLLM's MiniCPM3 builds 7 linear layers per decoder layer (q_a, q_b, kv_a, kv_b, o,
    gate_up, down); all 28 of the 4-layer model are packed with no flag."""
    identical, excused, failures = compare_greedy(stock["minicpm3"], plugin["minicpm3"])
    FIGURES.append(f"minicpm3 (MLA) plugin vs stock: {identical}/{len(prompt_ids)} identical, {excused} near-ties excused")
    assert not failures, failures
    _packed_summary(plugin["minicpm3"], 28)
    assert len({tuple(o["token_ids"]) for o in _outputs(stock["minicpm3"])}) > 1  # not one fixed answer
    assert "take vLLM's fused CPU kernels" in plugin["minicpm3"]["log"]  # as BitCPM4's MiniCPM


def test_minicpm3_packed_checkpoint_decodes_like_its_source(stock, plugin, prompt_ids):
    assert _outputs(plugin["minicpm3-packed"]) == _outputs(plugin["minicpm3"])  # tokens and logprobs
    _, _, failures = compare_greedy(stock["minicpm3"], plugin["minicpm3-packed"])
    assert not failures, failures
    _packed_summary(plugin["minicpm3-packed"], 28)
    assert "from checkpoint" in plugin["minicpm3-packed"]["log"]


def test_minicpm3_load_errors_name_the_unprefixed_q_a_proj(plugin):
    error = plugin["minicpm3-bad"].get("error", "")
    assert "bitcpm: checkpoint tensor for 'model.layers.0.self_attn.q_a_proj.weight_scales' has shape (64, 2)" in error


def test_llama_checkpoint_is_left_to_stock_vllm_without_a_flag(stock, plugin):
    """The plugin takes over MiniCPM architectures only: an unflagged Llama stays dense."""
    (counts,) = plugin["llama"]["layers"]
    assert counts["packed_layers"] == 0 and counts["dense_layers"] == 8
    assert _outputs(plugin["llama"]) == _outputs(stock["llama"])


def test_llama_with_quantization_bitcpm_packs_every_layer_and_matches_stock(stock, plugin, prompt_ids):
    """BitCPM-CANN-1B/3B are LlamaForCausalLM: `--quantization bitcpm` packs them as they are."""
    identical, excused, failures = compare_greedy(stock["llama"], plugin["llama-forced"])
    FIGURES.append(f"llama --quantization bitcpm vs stock: {identical}/{len(prompt_ids)} identical, {excused} near-ties excused")
    assert not failures, failures
    _packed_summary(plugin["llama-forced"], 8)


def test_llama_packed_checkpoint_loads_without_flags(plugin):
    """A converted checkpoint names its method in quantization_config: no flag, any architecture."""
    assert _outputs(plugin["llama-packed"]) == _outputs(plugin["llama-forced"])
    _packed_summary(plugin["llama-packed"], 8)


def test_tp2_packed_checkpoint_gives_the_same_greedy_tokens_as_tp1(plugin, tp2, prompt_ids):
    """Each rank reads its own shard of the 2-bit codes (whole 128-weight blocks) and scales."""
    identical, excused, failures = compare_greedy(plugin["small-packed"], tp2["small-packed"])
    FIGURES.append(f"packed TP=2 vs TP=1: {identical}/{len(prompt_ids)} identical, {excused} near-ties excused")
    assert not failures, failures
    assert len(tp2["small-packed"]["layers"]) == 2
    for rank in tp2["small-packed"]["layers"]:
        assert rank["dense_layers"] == 0 and rank["packed_layers"] == 16
    assert tp2["small-packed"]["layers"][0]["packed_bytes"] < plugin["small-packed"]["layers"][0]["packed_bytes"]


def test_tp2_packed_shard_off_a_code_block_fails_naming_the_layer(tp2):
    run = tp2["tiny-packed"]
    assert "error" in run
    assert ("bitcpm: layer 'model.layers.0.self_attn.o_proj': a tensor-parallel shard of 64 input "
            "columns does not align with 128-weight code blocks") in run["log"]
