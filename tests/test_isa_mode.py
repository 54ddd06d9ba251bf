"""AVX2 mode (vllm_bitcpm/testing/isa_mode.py): an AVX512 machine running what an AVX2-only CPU runs.

The benchmarks' --isa avx2 figures are only as good as this switch: a fresh process in AVX2 mode
must see no AVX512 anywhere it is asked (ATen, torch.cpu, the plugin's kernels) and vLLM must load
its AVX2 ``_C`` build."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from vllm_bitcpm.ops import cpu as cpu_kernel
from vllm_bitcpm.testing import isa_mode

PROBE = (
    "import json; from vllm.platforms import current_platform; current_platform.import_kernels(); "
    "import vllm_bitcpm.ops; from vllm_bitcpm.testing.isa_mode import isa_paths; print(json.dumps(isa_paths()))"
)


def _paths_in(mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE], env=isa_mode.isa_mode_env(mode), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_avx2_mode_reaches_every_library():
    if not cpu_kernel.AVAILABLE or "avx2" not in cpu_kernel.isa_available():
        pytest.skip("needs the CPU kernel and an AVX2 CPU")
    paths = _paths_in("avx2")
    assert paths["isa_mode"] == "avx2"
    assert paths["aten_cpu_capability"] == "AVX2"
    assert not paths["torch_sees_avx512"] and not paths["torch_sees_avx512_bf16"]
    assert paths["bitcpm_kernel_isa"] == "avx2"
    assert paths["bitcpm_bf16_gemv_isa"] == "avx2" and paths["bitcpm_int8_gemv_isa"] == "avx2"
    assert paths["bitcpm_cpu_isa_uncapped"] == cpu_kernel.CPU_ISA
    assert paths["vllm_c_library"] == "_C_AVX2"


def test_native_mode_is_the_machine_as_it_is():
    if not cpu_kernel.AVAILABLE:
        pytest.skip("needs the CPU kernel")
    paths = _paths_in("native")
    assert paths["isa_mode"] == "native" and paths["bitcpm_kernel_isa"] == cpu_kernel.ISA


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="unknown ISA mode 'avx1024'"):
        isa_mode.isa_mode_env("avx1024")


def test_engine_child_env_prepends_a_sides_pythonpath(monkeypatch):
    """A side's PYTHONPATH (zentorch's folder) goes in front of the inherited one (AVX2 mode's
    sitecustomize folder), so neither is lost; every other variable of the side wins as given."""
    from vllm_bitcpm.testing.sidebyside import child_env

    monkeypatch.setenv("PYTHONPATH", "/inherited/a:/inherited/b")
    env = child_env(plugin=False, extra_env={"PYTHONPATH": "/side", "VLLM_BITCPM_ISA": "avx2"})
    assert env["PYTHONPATH"].split(os.pathsep) == ["/side", "/inherited/a", "/inherited/b"]
    assert env["VLLM_BITCPM_ISA"] == "avx2" and env["VLLM_PLUGINS"] == ""
    monkeypatch.delenv("PYTHONPATH")
    assert child_env(plugin=True, extra_env={"PYTHONPATH": "/side"})["PYTHONPATH"] == "/side"
