"""An AMD Zen CPU with AVX512, as vLLM's platform check sees it (tests only).

vLLM 0.32 takes ZenCpuPlatform when zentorch imports and ``vllm.platforms._is_amd_zen_cpu()``
finds ``AuthenticAMD`` and ``avx512`` in /proc/cpuinfo. On a machine without such a CPU this
answers True, so the real zentorch and the real ZenCpuPlatform run. Only on PYTHONPATH in test
processes that ask for it (VLLM_BITCPM_EMULATE_CPU=amd-zen-avx512, vllm_bitcpm/testing/zentorch_site.py).
"""

import os

if os.environ.get("VLLM_BITCPM_EMULATE_CPU") == "amd-zen-avx512":
    import vllm.platforms

    vllm.platforms._is_amd_zen_cpu = lambda: True
