"""Damaged packed (``bitcpm``) checkpoints: `inspect` and engine load refuse them with the file and
the tensor or layer named, instead of a traceback, a silently wrong layer, or a layer that loads as
uninitialised memory.

Before packed_checkpoint.validate_packed_layout, `inspect` died with IndexError / KeyError on a 1-D or
missing scales tensor, and accepted int8 codes, int32 scales, too few rows or scale columns; engine
load served a layer whose codes or scales were missing (vLLM checks that a checkpoint fills every
parameter only for models without a quantization method). Mutations of the shipped tiny model
(vllm_bitcpm/data), one structured hypothesis sweep, the libFuzzer target tests/fuzz/fuzz_checkpoint.py
for a bounded run, and one engine child that loads each damaged copy.
"""

from __future__ import annotations

import resource
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from vllm_bitcpm import packed_checkpoint as pc
from vllm_bitcpm.checkpoint_files import CorruptCheckpointError
from vllm_bitcpm.data import TINY_MODEL

FUZZ_DIR = Path(__file__).resolve().parent / "fuzz"
LAYER = "model.layers.0.self_attn.q_proj"
CODES, SCALES = LAYER + pc.CODES_SUFFIX, LAYER + pc.SCALES_SUFFIX


def damaged_copy(root: Path, name: str, mutate) -> Path:
    """The shipped tiny model with ``mutate(tensors)`` applied to its weights."""
    out = root / name
    shutil.copytree(TINY_MODEL, out)
    tensors = load_file(str(out / "model.safetensors"))
    mutate(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    return out


def _set(name: str, change):
    return lambda t: t.__setitem__(name, change(t[name]))


#: name -> (mutation, the tensor the error must name)
DAMAGE = {
    "missing scales": (lambda t: t.pop(SCALES), CODES),
    "missing codes": (lambda t: t.pop(CODES), SCALES),
    "1-D scales": (_set(SCALES, lambda s: s.flatten()), SCALES),
    "1-D codes": (_set(CODES, lambda c: c.flatten()), CODES),
    "int8 codes": (_set(CODES, lambda c: c.view(torch.int8)), CODES),
    "int32 scales": (_set(SCALES, lambda s: s.to(torch.int32)), SCALES),
    "codes short of rows": (_set(CODES, lambda c: c[:-16]), SCALES),
    "codes not whole blocks": (_set(CODES, lambda c: c[:, :-8]), CODES),
    "one scale per row instead of groups": (_set(SCALES, lambda s: s[:, :1]), SCALES),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_inspect_refuses_a_damaged_packed_layer_naming_file_and_tensor(tmp_path, case):
    mutate, named = DAMAGE[case]
    model = damaged_copy(tmp_path, "model", mutate)
    with pytest.raises(CorruptCheckpointError) as error:
        pc.inspect_checkpoint(model, progress=False)
    assert str(model / "model.safetensors") in str(error.value) and named in str(error.value), error.value


def test_inspect_reads_the_intact_model():
    reports = pc.inspect_checkpoint(TINY_MODEL, progress=False)
    assert len(reports) == 28 and all(r.ternary for r in reports)


def test_a_tensor_in_two_files_and_a_bad_group_size_are_refused(tmp_path):
    model = damaged_copy(tmp_path, "model", lambda t: None)
    save_file({SCALES: load_file(str(model / "model.safetensors"))[SCALES]}, str(model / "model-extra.safetensors"))
    with pytest.raises(CorruptCheckpointError, match="is also in"):
        pc.validate_packed_layout(model, pc.quantization_config(model))
    for group_size in (0, -5, "64", 1.5, True):
        with pytest.raises(CorruptCheckpointError, match="group_size"):
            pc.validate_packed_layout(TINY_MODEL, {**pc.quantization_config(TINY_MODEL), "group_size": group_size})


PACKED_LAYERS = sorted(name[: -len(pc.CODES_SUFFIX)] for name in load_file(str(TINY_MODEL / "model.safetensors"))
                       if name.endswith(pc.CODES_SUFFIX))


@st.composite
def layer_damage(draw):
    """A random packed layer, damaged in a random way that leaves the file itself well-formed."""
    module = draw(st.sampled_from(PACKED_LAYERS))
    codes, scales = module + pc.CODES_SUFFIX, module + pc.SCALES_SUFFIX
    target = draw(st.sampled_from([codes, scales]))
    kind = draw(st.sampled_from(["drop", "flatten", "dtype", "rows", "columns", "transpose", "add_dim"]))
    if kind == "drop":
        return lambda t: t.pop(target)
    if kind == "flatten":
        return _set(target, lambda x: x.flatten())
    if kind == "add_dim":
        return _set(target, lambda x: x[None])
    if kind == "dtype":
        dtypes = [torch.int8, torch.int32, torch.float16] if target == codes else [torch.int32, torch.float64, torch.uint8]
        dtype = draw(st.sampled_from(dtypes))
        return _set(target, lambda x: x.to(dtype))
    if kind == "rows":
        cut = draw(st.integers(1, 8))
        return _set(target, lambda x: x[:-cut])
    if kind == "transpose":
        return _set(target, lambda x: x.t() if x.shape[0] != x.shape[1] else x[:, :-1])
    # columns: a code row loses part of a block; scales gain a group (one group fewer can be a
    # narrower layer's count: the files alone do not say the true width inside the last block)
    if target == codes:
        cut = draw(st.integers(1, 31))
        return _set(target, lambda x: x[:, :-cut])
    return _set(target, lambda x: torch.cat([x, x[:, :1]], dim=1))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # profile: 40 / 1000
@given(mutate=layer_damage())
def test_any_damaged_layer_is_refused_with_its_file_named(tmp_path_factory, mutate):
    model = damaged_copy(tmp_path_factory.mktemp("damaged"), "model", mutate)
    with pytest.raises(CorruptCheckpointError) as error:
        pc.inspect_checkpoint(model, progress=False)
    assert str(model) in str(error.value), error.value


def test_libfuzzer_target_finds_nothing_in_a_bounded_run(tmp_path):
    """tests/fuzz/fuzz_checkpoint.py (atheris) for 3000 inputs from the seed corpus; a finding is a
    non-zero exit with the input saved in tmp_path (longer runs: the target's docstring)."""
    pytest.importorskip("atheris", reason="atheris (libFuzzer for Python) is not installed: pip install atheris")
    corpus = tmp_path / "corpus"
    runpy.run_path(str(FUZZ_DIR / "make_corpus.py"))["write_corpus"](corpus)  # the seeds, written now
    # libFuzzer's memory limit reads the peak RSS (getrusage), which Linux carries over from the
    # parent through fork and exec: a child of a long test session starts at the session's peak.
    # So the limit is libFuzzer's default 2 GB above that inherited peak.
    inherited_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    proc = subprocess.run([sys.executable, str(FUZZ_DIR / "fuzz_checkpoint.py"), "-runs=3000", "-max_len=4096",
                           f"-dict={FUZZ_DIR / 'checkpoint.dict'}", f"-artifact_prefix={tmp_path}/", "-seed=1",
                           f"-rss_limit_mb={inherited_mb + 2048}", str(corpus)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "Done 3000 runs" in proc.stderr, proc.stderr[-4000:]


ENGINE_DAMAGE = {
    "intact": (lambda t: None, None),
    "missing scales": (DAMAGE["missing scales"][0], CODES),
    "int32 scales": (DAMAGE["int32 scales"][0], SCALES),
    # both halves of q_proj gone: the fused qkv layer loads k and v only
    "missing q_proj": (lambda t: (t.pop(CODES), t.pop(SCALES)), "model.layers.0.self_attn.qkv_proj"),
    "missing norm": (lambda t: t.pop("model.layers.1.input_layernorm.weight"), "model.layers.1.input_layernorm.weight"),
}


def test_engine_refuses_each_damaged_copy_and_loads_the_intact_one(tmp_path):
    """LLM(...) with the plugin, one child process, one engine per copy (vllm_bitcpm.testing.sidebyside)."""
    from vllm_bitcpm.testing.sidebyside import EngineJob, run_engine_jobs

    models = {case: damaged_copy(tmp_path, case.replace(" ", "_"), mutate) for case, (mutate, _) in ENGINE_DAMAGE.items()}
    jobs = [EngineJob(model=str(path), prompts=[[1, 458, 307]], max_tokens=2, logprobs=1) for path in models.values()]
    results = dict(zip(models, run_engine_jobs(jobs, plugin=True)))
    assert "error" not in results["intact"] and len(results["intact"]["outputs"][0]["token_ids"]) == 2
    for case, (_, named) in ENGINE_DAMAGE.items():
        if named is None:
            continue
        error = results[case].get("error", "")
        assert named in error, (case, error or "loaded without an error")
        if case in ("missing scales", "int32 scales"):  # found before loading: the file is named
            assert str(models[case] / "model.safetensors") in error, error
