"""The CPU kernel sources compile for aarch64 (Ascend hosts, Graviton) as well as for x86 (issue 21).

``pip install`` builds kernels/cpu/ wherever torch imports. x86 SIMD code outside the BITCPM_X86
guards (cpu_features.h) stopped that build on every Arm machine ("immintrin.h: No such file").
A syntax check with Debian's cross compiler (``g++-aarch64-linux-gnu``; scripts/setup-cpu.sh
installs it) catches such code here, on x86, without an Arm machine; the x86 twin checks the
same command line against the host compiler. Neither says anything about speed on Arm.
"""

from __future__ import annotations

import concurrent.futures
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

torch_cpp_extension = pytest.importorskip("torch.utils.cpp_extension")

ROOT = Path(__file__).resolve().parents[1]
KERNEL_DIR = ROOT / "kernels" / "cpu"
SOURCES = sorted(KERNEL_DIR.glob("*.cpp"))

#: The standard torch's BuildExtension passes (torch/utils/cpp_extension.py: -std=c++20; setup.py's
#: build gets it from there). torch's own headers are C++20 now, and only warn under C++17.
STD = "-std=c++20"
#: setup.py's extra_compile_args that change what is parsed (-fopenmp: at::parallel_for's pragmas).
FLAGS = ["-fopenmp"]

#: target -> compilers that emit code for it (a host compiler counts when the host is that target)
COMPILERS = {
    "aarch64": ["aarch64-linux-gnu-g++"] + (["g++"] if platform.machine() == "aarch64" else []),
    "x86_64": ["x86_64-linux-gnu-g++"] + (["g++"] if platform.machine() == "x86_64" else []),
}
#: what BITCPM_X86 (kernels/cpu/cpu_features.h) must be on each target
BITCPM_X86 = {"aarch64": "0", "x86_64": "1"}


def _compiler(target: str) -> str:
    for name in COMPILERS[target]:
        if shutil.which(name):
            return name
    hint = " (Debian: apt-get install g++-aarch64-linux-gnu; scripts/setup-cpu.sh does this as root)"
    pytest.skip(f"no C++ compiler for {target} on PATH: looked for {', '.join(COMPILERS[target])}"
                f"{hint if target == 'aarch64' else ''}")


@pytest.fixture(scope="module")
def python_include(tmp_path_factory) -> Path:
    """Python's headers with a pyconfig.h that a compiler for another architecture can read.

    ternary_linear.cpp includes <Python.h>, which includes "pyconfig.h" in quotes: the file beside
    Python.h wins over any -I directory, so the headers are copied and that file replaced.
    pyconfig.h is the build configuration of one Python: pyenv's or conda's is the x86-64 build's;
    Debian's only redirects to <x86_64-linux-gnu/python3.X/pyconfig.h> by architecture, and the
    aarch64 file it names is absent without python3-dev:arm64. The replacement holds the macros the
    host compiler sees after including the host's pyconfig.h (redirects resolved). x86-64 and
    aarch64 Linux are both LP64 and little-endian, which is what these macros describe that the
    kernels' one use of Python (the module's init function) depends on.
    """
    include = Path(sysconfig.get_paths()["include"])
    host_cc = shutil.which("g++") or shutil.which("c++")
    if host_cc is None:
        pytest.skip("no host C++ compiler to read this Python's pyconfig.h with")

    def macros(source: str) -> set[str]:
        proc = subprocess.run([host_cc, "-dM", "-E", "-x", "c++", f"-I{include}", "-"], input=source,
                              capture_output=True, text=True, check=True)
        return set(proc.stdout.splitlines())

    pyconfig = sorted(macros("#include <pyconfig.h>\n") - macros(""))
    copy = tmp_path_factory.mktemp("python-include") / include.name
    shutil.copytree(include, copy)
    (copy / "pyconfig.h").write_text(
        f"/* {include / 'pyconfig.h'} as the host compiler reads it: see tests/test_cross_compile.py */\n"
        + "\n".join(pyconfig) + "\n")
    return copy


def _command(compiler: str, python_include: Path) -> list[str]:
    includes = [*torch_cpp_extension.include_paths(), str(python_include)]
    return [compiler, "-fsyntax-only", STD, *FLAGS, *(f"-I{d}" for d in includes)]


@pytest.mark.parametrize("target", sorted(COMPILERS))
def test_kernel_sources_compile(target, python_include):
    """Every kernels/cpu/*.cpp, as many compilers at once as there are cores (each parses torch's
    headers for ~10 s, so one at a time the two targets took ~5 minutes of the suite)."""
    compiler = _compiler(target)

    def compile_one(source: Path) -> str | None:
        proc = subprocess.run([*_command(compiler, python_include), str(source)], capture_output=True, text=True,
                              timeout=600)
        if proc.returncode == 0:
            return None
        return f"kernels/cpu/{source.name} does not compile for {target} ({compiler}):\n{proc.stderr[-6000:]}"

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        failures = [f for f in pool.map(compile_one, SOURCES) if f]
    assert SOURCES and not failures, "\n\n".join(failures)


@pytest.mark.parametrize("target", sorted(COMPILERS))
def test_simd_guard_follows_the_target(target, python_include):
    """The guard itself: the aarch64 check above must not have parsed the x86 code, nor the x86
    check have left it out."""
    compiler = _compiler(target)
    proc = subprocess.run([*_command(compiler, python_include), "-dM", "-E", str(KERNEL_DIR / "cpu_features.h")],
                          capture_output=True, text=True, timeout=300, check=True)
    assert f"#define BITCPM_X86 {BITCPM_X86[target]}" in proc.stdout.splitlines()
