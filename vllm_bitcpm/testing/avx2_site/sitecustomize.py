"""AVX2 mode (vllm_bitcpm/testing/isa_mode.py): torch reports no AVX512 to the libraries that ask it.

vLLM picks its ``_C`` build (``_C_AVX2`` vs ``_C``/``_C_AVX512``) and its CPU attention ISA from
``torch.cpu._is_avx512_supported()`` / ``_is_avx512_bf16_supported()``; on an AVX512 machine
these answer False here, as on an AVX2-only CPU. Only on PYTHONPATH in benchmark and test
processes that asked for AVX2 mode (VLLM_BITCPM_EMULATE_CPU=avx2).
"""

import os

if os.environ.get("VLLM_BITCPM_EMULATE_CPU") == "avx2":
    import torch.cpu

    torch.cpu._is_avx512_supported = lambda: False
    torch.cpu._is_avx512_bf16_supported = lambda: False
    torch.cpu._is_avx512_vnni_supported = lambda: False
    torch.cpu._is_amx_tile_supported = lambda: False
    torch.cpu._is_amx_fp16_supported = lambda: False
