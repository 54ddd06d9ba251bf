"""The BitCPM4-0.5B lm_head (73448 x 1024) at batch sizes past the head kernels' 16-token limit.

    .venv/bin/python benchmarks/lm_head_batches.py [--tokens 16 17 32]

Stock vLLM's calls (the bf16 `F.linear`, which on AVX2 CPUs is ATen's bf16 fallback; ATen's
weight-only int8 matmul for the int8 head) against the plugin's `bf16_gemv` / `int8_gemv` called
on slices of 16 tokens (`vllm_bitcpm.lm_head.in_calls_of`), one thread, ms per call (min of 3, in turn).
Where vllm_bitcpm/lm_head.py slices larger batches (SLICED_PATHS) comes from this.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prefill_gemm import min_ms_interleaved  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16, 17, 32])
    args = parser.parse_args()
    import torch

    from vllm_bitcpm import lm_head
    from vllm_bitcpm.ops import cpu as cpu_kernel

    if not cpu_kernel.AVAILABLE:
        raise SystemExit("the plugin's CPU kernels are not built")
    torch.set_num_threads(1)
    w = (torch.randn(73448, 1024, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    q, s = lm_head.quantize_rows_int8(w)
    s16 = s.to(torch.bfloat16)
    print(f"bf16_gemv path {torch.ops.bitcpm_cpu.bf16_gemv_isa()}, int8_gemv path {torch.ops.bitcpm_cpu.int8_gemv_isa()}")
    for m in args.tokens:
        x = torch.randn(m, 1024).to(torch.bfloat16)
        row = min_ms_interleaved({
            "F.linear bf16": lambda: torch.nn.functional.linear(x, w),
            "bf16_gemv in calls of 16": lambda: lm_head.in_calls_of(16, lambda p: torch.ops.bitcpm_cpu.bf16_gemv(p, w), x),
            "ATen _weight_int8pack_mm": lambda: torch.ops.aten._weight_int8pack_mm(x, q, s16),
            "int8_gemv in calls of 16": lambda: lm_head.in_calls_of(16, lambda p: torch.ops.bitcpm_cpu.int8_gemv(p, q, s), x),
        }, repeats=3)
        print(m, {k: round(v, 1) for k, v in row.items()})


if __name__ == "__main__":
    main()
