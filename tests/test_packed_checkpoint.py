"""`vllm-bitcpm inspect/convert` and loading packed checkpoints directly in vLLM."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_bitcpm import packed_checkpoint as pc
from vllm_bitcpm import ternary
from vllm_bitcpm.testing import synthetic
from vllm_bitcpm.testing.sidebyside import EngineJob, run_engine_jobs
from tests.conftest import FIGURES, LOGPROBS, MAX_TOKENS, TERNARY_GRANULARITIES
from tests.test_engine import _outputs


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vllm_bitcpm.cli", *args, "--quiet"],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def packed_dir(checkpoint_dir, tmp_path_factory) -> Path:
    """Packed copies of the shared synthetic checkpoints, plus deliberately broken ones."""
    root = tmp_path_factory.mktemp("packed")
    for name in TERNARY_GRANULARITIES:
        result = cli("convert", str(checkpoint_dir / name), str(root / name))
        assert result.returncode == 0, result.stderr
    result = cli("convert", str(checkpoint_dir / "mixed"), str(root / "mixed"),
                 "--keep-dense", "model.layers.1.mlp.down_proj")
    assert result.returncode == 0, result.stderr
    # A checkpoint from a future layout, and one whose scale tensor has the wrong shape.
    shutil.copytree(root / "per_row", root / "future")
    config = json.loads((root / "future" / "config.json").read_text())
    config["quantization_config"]["layout_version"] = ternary.PACK_LAYOUT_VERSION + 1
    (root / "future" / "config.json").write_text(json.dumps(config))
    copy_with_doubled_scales(root / "per_row", root / "bad_scales", "model.layers.0.mlp.up_proj.weight_scales")
    # The per_group checkpoint again, written in shards and converted in shards (the big shapes' path).
    synthetic.write_checkpoint(root / "sharded_source", shape="tiny", seed=0, granularity="per_group", group_size=64,
                               shard_bytes=SHARD_BYTES)
    pc.convert(str(root / "sharded_source"), root / "sharded", shard_bytes=SHARD_BYTES // 4, progress=False)
    return root


SHARD_BYTES = 400_000  # the tiny bf16 checkpoint is ~1.4 MB: four shards, and more once packed


def copy_with_doubled_scales(src: Path, dst: Path, name: str) -> None:
    """A copy of packed checkpoint ``src`` whose scale tensor ``name`` has twice its columns."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    tensors[name] = torch.cat([tensors[name], tensors[name]], dim=1)
    save_file(tensors, str(dst / "model.safetensors"))


PACKED_JOBS = [*TERNARY_GRANULARITIES, "mixed", "future", "bad_scales", "sharded"]


@pytest.fixture(scope="module")
def packed_runs(packed_dir, prompt_ids) -> dict[str, dict]:
    jobs = [EngineJob(model=str(packed_dir / name), prompts=prompt_ids, max_tokens=MAX_TOKENS,
                      logprobs=LOGPROBS) for name in PACKED_JOBS]
    return dict(zip(PACKED_JOBS, run_engine_jobs(jobs, plugin=True)))


@pytest.mark.parametrize("name", [*TERNARY_GRANULARITIES, "mixed", "sharded"])
def test_packed_checkpoint_loads_and_decodes_like_its_source(name, packed_runs, plugin_runs):
    source = "per_group" if name == "sharded" else name
    assert _outputs(packed_runs[name]) == _outputs(plugin_runs[source])  # tokens and logprobs
    (layers,) = packed_runs[name]["layers"]
    assert layers["packed_layers"] > 0
    assert layers["dense_layers"] == (1 if name == "mixed" else 0)
    assert "scales of" in packed_runs[name]["log"] and "from checkpoint" in packed_runs[name]["log"]


def test_packed_files_are_about_a_quarter_of_bf16(checkpoint_dir, packed_dir):
    source = (checkpoint_dir / "per_row" / "model.safetensors").stat().st_size
    packed = (packed_dir / "per_row" / "model.safetensors").stat().st_size
    FIGURES.append(f"tiny per_row checkpoint: {source / 2**20:.2f} MiB bf16 -> {packed / 2**20:.2f} MiB packed")
    assert packed < 0.45 * source  # the bf16 embedding stays; linears shrink 8x


def test_future_layout_version_is_refused_clearly(packed_runs):
    error = packed_runs["future"].get("error", "")
    assert f"layout is version {ternary.PACK_LAYOUT_VERSION + 1}" in error and "upgrade vllm-bitcpm" in error


def test_mis_shaped_scale_tensor_is_named(packed_runs):
    # Refused before vLLM reads a tensor (packed_checkpoint.validate_packed_layout): the file, the
    # checkpoint's own tensor name (up_proj, not vLLM's fused gate_up_proj) and what was expected.
    error = packed_runs["bad_scales"].get("error", "")
    assert "bad_scales/model.safetensors" in error and "model.layers.0.mlp.up_proj.weight_scales" in error, error
    assert "has 2 scale columns; group_size -1" in error and "gives 1" in error, error


def test_inspect_reports_each_layer_and_a_summary(checkpoint_dir):
    result = cli("inspect", str(checkpoint_dir / "mixed"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    down = next(line for line in lines if line.startswith("model.layers.1.mlp.down_proj.weight"))
    assert " NO " in down
    up = next(line for line in lines if line.startswith("model.layers.1.mlp.up_proj.weight"))
    assert " yes " in up and "per_row" in up
    assert any(line.startswith("summary: 27/28 linear layers ternary") for line in lines)
    assert any("not ternary: model.layers.1.mlp.down_proj.weight" in line for line in lines)


def test_convert_refuses_a_non_ternary_layer_by_name(checkpoint_dir, tmp_path):
    result = cli("convert", str(checkpoint_dir / "mixed"), str(tmp_path / "out"))
    assert result.returncode == 2
    assert "model.safetensors: model.layers.1.mlp.down_proj.weight: not ternary" in result.stderr
    assert "--keep-dense" in result.stderr
    assert not (tmp_path / "out").exists()  # streaming wrote shards before the failure: all removed


def test_sharded_checkpoints_hold_the_same_tensors(checkpoint_dir, packed_dir):
    """The synthetic writer's shards equal its single file; convert's shards equal its single file."""
    def tensors(directory: Path) -> dict[str, torch.Tensor]:
        index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
        files = sorted(directory.glob("model-*-of-*.safetensors"))
        assert len(files) > 2 and sorted(set(index.values())) == [f.name for f in files]
        out = {}
        for file in files:
            out.update(load_file(str(file)))
        assert set(out) == set(index) and all(index[n] == f.name for f in files for n in load_file(str(f)))
        return out

    for sharded, single in ((packed_dir / "sharded_source", checkpoint_dir / "per_group"),
                            (packed_dir / "sharded", packed_dir / "per_group")):
        got, want = tensors(sharded), load_file(str(single / "model.safetensors"))
        assert set(got) == set(want)
        assert all(torch.equal(got[name], want[name]) for name in want), sharded.name


def test_convert_refuses_an_existing_destination(checkpoint_dir, packed_dir):
    result = cli("convert", str(checkpoint_dir / "per_row"), str(packed_dir / "per_row"))
    assert result.returncode == 2 and "destination exists" in result.stderr


def test_convert_refuses_a_missing_tokenizer_and_a_corrupt_file(checkpoint_dir, tmp_path):
    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(checkpoint_dir / "per_row", no_tokenizer)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / file).unlink()
    result = cli("convert", str(no_tokenizer), str(tmp_path / "out1"))
    assert result.returncode == 2 and "no tokenizer" in result.stderr
    result = cli("convert", str(checkpoint_dir / "truncated"), str(tmp_path / "out2"))
    assert result.returncode == 2 and "model.safetensors" in result.stderr and "truncated" in result.stderr


def test_convert_reads_pytorch_model_bin(checkpoint_dir, tmp_path):
    """The BitCPM-CANN releases ship .bin files."""
    source = tmp_path / "bin_source"
    shutil.copytree(checkpoint_dir / "per_group", source)
    tensors = load_file(str(source / "model.safetensors"))
    (source / "model.safetensors").unlink()
    torch.save(tensors, source / "pytorch_model.bin")
    result = cli("convert", str(source), str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "out" / "pytorch_model.bin").exists()
    packed = load_file(str(tmp_path / "out" / "model.safetensors"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert config["group_size"] == 64 and config["layout_version"] == ternary.PACK_LAYOUT_VERSION
    name = "model.layers.2.self_attn.o_proj"
    restored = ternary.dequantize(packed[name + ".weight_codes"], packed[name + ".weight_scales"], 64,
                                  tensors[name + ".weight"].shape[1], torch.bfloat16)
    assert torch.equal(restored, tensors[name + ".weight"])


def test_synthetic_demo_shape_checkpoint_roundtrips_through_the_console_script(tmp_path):
    """The installed `vllm-bitcpm` command itself (setup.py console_scripts)."""
    source = synthetic.write_checkpoint(tmp_path / "src", shape="tiny", granularity="per_tensor")
    exe = Path(sys.executable).with_name("vllm-bitcpm")
    result = subprocess.run([str(exe), "convert", str(source), str(tmp_path / "dst"), "--quiet"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "verified bit for bit" in result.stdout


@pytest.mark.parametrize("fmt", ["bitcpm", "gptq"])
def test_inspect_describes_converted_checkpoints(tmp_path, fmt):
    """`inspect` on what `convert` wrote: its quantization_config and every layer, zeros counted from the codes."""
    source = synthetic.write_checkpoint(tmp_path / "src", shape="tiny", granularity="per_group", group_size=64)
    pc.convert(str(source), tmp_path / "out", format=fmt, progress=False)
    from_source = {r.name: r for r in pc.inspect_checkpoint(source, progress=False)}
    converted = pc.inspect_checkpoint(tmp_path / "out", progress=False)
    assert {r.name for r in converted} == set(from_source)
    for r in converted:
        assert r.ternary and r.layout == "per_group(g=64)"
        assert r.shape == from_source[r.name].shape
        assert r.zero_fraction == pytest.approx(from_source[r.name].zero_fraction)
        assert r.packed_bytes < r.dense_bytes / 2
    result = subprocess.run([sys.executable, "-m", "vllm_bitcpm.cli", "inspect", str(tmp_path / "out"), "--quiet"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert (first.startswith("packed bitcpm checkpoint: layout version 1") if fmt == "bitcpm"
            else first.startswith("gptq checkpoint: 4 bits, group_size 64"))
    assert "28/28 linear layers ternary" in result.stdout


def test_converted_weights_get_the_usual_file_mode(tmp_path):
    source = synthetic.write_checkpoint(tmp_path / "src", shape="tiny", granularity="per_row")
    pc.convert(str(source), tmp_path / "out", progress=False)
    mode = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert mode["model.safetensors"] == mode["config.json"], mode


def test_demo_leaves_no_temporary_checkpoint_behind(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "vllm_bitcpm.demo", "--synthetic", "--shape", "tiny",
                             "--max-tokens", "4"],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "linear layers packed ternary" in result.stdout and "demo: generation:" in result.stdout
    assert not list(tmp_path.glob("bitcpm-demo-*")), list(tmp_path.iterdir())


def test_inspect_reads_a_fake_quantized_checkpoint_that_names_bitcpm(tmp_path):
    """`quant_method: bitcpm` without a packed layout is still a fake-quantized checkpoint (served as such)."""
    source = synthetic.write_checkpoint(tmp_path / "src", shape="tiny", granularity="per_row")
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitcpm"}
    (source / "config.json").write_text(json.dumps(config))
    reports = pc.inspect_checkpoint(source, progress=False)
    assert len(reports) == 28 and all(r.ternary and r.layout == "per_row" for r in reports)


def test_inspect_lists_layers_a_conversion_kept_dense(checkpoint_dir, tmp_path):
    pc.convert(str(checkpoint_dir / "mixed"), tmp_path / "out", keep_dense=["*.layers.1.mlp.down_proj"], progress=False)
    reports = {r.name: r for r in pc.inspect_checkpoint(tmp_path / "out", progress=False)}
    kept = reports["model.layers.1.mlp.down_proj.weight"]
    assert len(reports) == 28 and not kept.ternary and kept.dtype == "bfloat16"
    assert sum(not r.ternary for r in reports.values()) == 1


def test_safetensors_reader_matches_safe_open_without_mapping_the_file(checkpoint_dir, tmp_path):
    """convert reads through SafetensorsReader (pread copies) so its RSS is what it holds."""
    from safetensors import safe_open

    from vllm_bitcpm.checkpoint_files import CorruptCheckpointError, SafetensorsReader

    path = checkpoint_dir / "per_row" / "model.safetensors"
    reader = SafetensorsReader(path)
    with safe_open(str(path), framework="pt") as f:
        assert sorted(reader.keys()) == sorted(f.keys())
        for name in f.keys():
            assert torch.equal(reader.get_tensor(name), f.get_tensor(name)), name
    assert str(path) not in Path("/proc/self/maps").read_text()  # safe_open is closed; the reader maps nothing
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CorruptCheckpointError, match=f"{cut}: tensor '.*'.*truncated") as error:
        SafetensorsReader(cut)  # validated on opening, as convert opens every source shard
    named = str(error.value).split("tensor '")[1].split("'")[0]
    data_left = cut.stat().st_size - reader.data_start
    assert reader.header[named]["data_offsets"][1] > data_left  # the tensor it names is the one cut short
