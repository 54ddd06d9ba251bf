"""zentorch in a folder of the venv that is not on its path: engines with and without AMD's ZenDNN plugin in one run.

vLLM 0.32 runs on ``ZenCpuPlatform`` (dense layers through ``zentorch_linear_unary``, weights
prepacked for ZenDNN) whenever ``import zentorch`` works on a CPU whose /proc/cpuinfo says
``AuthenticAMD`` and ``avx512`` (``vllm.platforms._is_amd_zen_cpu``: Zen 4 and later). Installed
into the venv it would switch every engine there, stock ones included, so
``scripts/setup-cpu.sh`` installs it into ``<venv>/zentorch-site``, and the benchmark sides and
tests that want it put that folder on ``PYTHONPATH`` (:func:`env`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

#: Where scripts/setup-cpu.sh installs zentorch (``pip install --target``), inside the venv.
SITE_DIR = Path(sys.prefix) / "zentorch-site"


def installed() -> bool:
    return (SITE_DIR / "zentorch").is_dir()


def env() -> dict[str, str]:
    """Extra environment of a process that can import zentorch (PYTHONPATH entries are prepended
    by vllm_bitcpm.testing.sidebyside.child_env)."""
    return {"PYTHONPATH": str(SITE_DIR)}


#: Test processes only: vLLM's Zen check answers True on any CPU (zen_site/sitecustomize.py).
EMULATED_ZEN_SITE_DIR = Path(__file__).resolve().parent / "zen_site"
EMULATE_ZEN_ENV = {"VLLM_BITCPM_EMULATE_CPU": "amd-zen-avx512"}


def emulated_zen_env() -> dict[str, str]:
    """:func:`env` plus the check's answer of an AMD CPU with AVX512, so that ZenCpuPlatform runs
    on machines without one (the real zentorch and vLLM platform; only the CPU is stood in for)."""
    return {"PYTHONPATH": os.pathsep.join([str(EMULATED_ZEN_SITE_DIR), str(SITE_DIR)]), **EMULATE_ZEN_ENV}


def vllm_selects_zen_platform() -> bool:
    """Whether vLLM's own check takes ZenCpuPlatform on this CPU once zentorch imports."""
    from vllm.platforms import _is_amd_zen_cpu

    return _is_amd_zen_cpu()
