"""The package installs when its CPU kernel cannot be built (setup.py, issue 21).

The kernel is an optimisation; without it the backend choice runs ternary layers through vLLM's
int4 kernel or as stock's dense layers. So a compiler error (a CPU or compiler the sources do not
support, a broken toolchain) must leave ``pip install`` working and say why. Each test builds a
copy of the package in tmp_path with a deliberately broken build, so the real build and the
installed kernel are never touched; no network (``--no-index``, no build isolation).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WARNING = "vllm-bitcpm: WARNING: building the CPU kernel (kernels/cpu/, vllm_bitcpm._cpu_kernels) failed"

pytest.importorskip("torch", reason="setup.py builds the CPU kernel only where torch is importable")


def _package_copy(tmp_path: Path) -> Path:
    """What a source install reads: setup.py, README.md, kernels/ and the package, minus built files."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "build")
    for name in ("kernels", "vllm_bitcpm"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    return src


def _build_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_BITCPM_NO_CPU_KERNEL"}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env.update(overrides)
    return env


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{log[-4000:]}"
    return log


def test_editable_install_goes_on_when_a_kernel_source_does_not_compile(tmp_path):
    """What ``pip install -e .`` runs (setuptools' editable_wheel, in-place build_ext) on a source
    the compiler rejects, as an x86-only header did on aarch64: the wheel is made, without the kernel."""
    src = _package_copy(tmp_path)
    kernel = src / "kernels/cpu/lm_head_gemv.cpp"
    kernel.write_text("#include <bitcpm_test_no_such_header.h>\n" + kernel.read_text())
    log = _run([sys.executable, "setup.py", "editable_wheel", "--dist-dir", str(tmp_path / "dist")], src, _build_env())
    assert WARNING in log, log[-4000:]
    assert "bitcpm_test_no_such_header.h" in log  # the compiler's own message is shown above the warning
    assert "installing without it" in log and "VLLM_BITCPM_NO_CPU_KERNEL" in log
    assert list((tmp_path / "dist").glob("*.editable-*.whl"))
    assert not list((src / "vllm_bitcpm").glob("_cpu_kernels*.so"))


def test_wheel_builds_without_a_working_compiler(tmp_path):
    """``pip wheel`` with CC/CXX pointing at ``false``: torch's compiler check fails before any
    source is compiled; the wheel still holds the package, without the kernel."""
    src = _package_copy(tmp_path)
    dist = tmp_path / "dist"
    log = _run([sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps", "--no-index",
                "-w", str(dist), str(src)], tmp_path, _build_env(CC="false", CXX="false"))
    assert WARNING in log, log[-4000:]
    (wheel,) = dist.glob("vllm_bitcpm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("vllm_bitcpm/__init__.py", "vllm_bitcpm/ops/cpu.py"):  # at the root or under .data/purelib
        assert any(n.endswith(module) for n in names), names
    assert not [n for n in names if n.endswith(".so")], names


def test_a_built_kernel_library_loads():
    """A kernel library that exists but does not load (an undefined symbol: a source missing from
    setup.py's list) would silently leave every layer off the kernel; the optional build cannot see
    that at link time, so it is checked here."""
    import glob

    import vllm_bitcpm
    from vllm_bitcpm.ops import cpu as cpu_kernel

    libraries = glob.glob(str(Path(vllm_bitcpm.__file__).parent / "_cpu_kernels*.so"))
    if not libraries:
        pytest.skip("the CPU kernel was not built in this install")
    assert cpu_kernel.AVAILABLE, f"{libraries[0]} exists but does not load: {cpu_kernel._load_error}"
