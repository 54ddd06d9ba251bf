"""Why exact prefill trails stock: the GEMM each side runs, per BitCPM4-0.5B layer shape, one thread.

    .venv/bin/python benchmarks/prefill_gemm.py                # this CPU's paths (bf16 on AVX512-BF16)
    .venv/bin/python benchmarks/prefill_gemm.py --isa avx2     # AVX2 mode: float32, as stock float32 runs there

For 128 and 252 tokens, milliseconds (median of 7) of: the plugin's op on the packed layer (exact
prefill: row tiles dequantized, then at::mm); at::mm on the dense weight; vLLM's oneDNN matmul on
weights prepacked once (what stock runs); the same with the oneDNN handle built per call (what
reusing it on dequantized tiles would cost). dtype bf16 natively, float32 in AVX2 mode (oneDNN has
no bf16 matmul on AVX2; stock float32 is the fast stock there). Writes
benchmarks/results/prefill_gemm[-avx2].json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from engine_sides import RESULTS_DIR  # noqa: E402

SHAPES = {"qkv": (1280, 1024), "o": (1024, 1024), "gate_up": (8192, 1024), "down": (1024, 4096)}
TOKENS = (128, 252)


def median_ms(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--isa", choices=["native", "avx2"], default="native")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from vllm_bitcpm.testing import isa_mode

    isa_mode.ensure_mode(args.isa)

    import torch
    import vllm._custom_ops as vllm_ops

    from vllm_bitcpm import ops, ternary

    torch.set_num_threads(1)
    dtype = torch.float32 if args.isa == "avx2" else torch.bfloat16
    rows = []
    for m in TOKENS:
        for name, (n, k) in SHAPES.items():
            gen = torch.Generator().manual_seed(0)
            scales = (torch.rand(n, 1, generator=gen) * 0.05 + 0.01).to(torch.bfloat16).float()
            weight = (torch.randint(-1, 2, (n, k), generator=gen) * scales).to(torch.bfloat16)
            packed, _ = ternary.quantize_exact(weight)
            dense = weight.to(dtype)
            x = torch.randn(m, k, generator=gen).to(dtype)
            handle = vllm_ops.create_onednn_mm(dense.t(), 32)
            rows.append({
                "tokens": m, "layer": name, "N": n, "K": k, "dtype": str(dtype).removeprefix("torch."),
                "ternary_op_ms": median_ms(lambda: ops.ternary_linear(x, packed.codes, packed.scales,
                                                                      packed.group_size)),
                "dense_at_mm_ms": median_ms(lambda: torch.mm(x, dense.t())),
                "onednn_prepacked_ms": median_ms(lambda: vllm_ops.onednn_mm(handle, x, None)),
                "onednn_handle_per_call_ms": median_ms(
                    lambda: vllm_ops.onednn_mm(vllm_ops.create_onednn_mm(dense.t(), 32), x, None)),
            })
    keys = ("ternary_op_ms", "dense_at_mm_ms", "onednn_prepacked_ms", "onednn_handle_per_call_ms")
    print("| tokens | layer | " + " | ".join(keys) + " | prepacked / ternary |")
    print("|" + "---|" * (len(keys) + 3))
    for r in rows:
        print(f"| {r['tokens']} | {r['layer']} | " + " | ".join(f"{r[k]:.2f}" for k in keys)
              + f" | {r['onednn_prepacked_ms'] / r['ternary_op_ms']:.2f} |")
    for m in TOKENS:
        total = {k: sum(r[k] for r in rows if r["tokens"] == m) for k in keys}
        print(f"{m} tokens, 4 layers: " + ", ".join(f"{k} {v:.2f}" for k, v in total.items())
              + f"; prepacked / ternary {total['onednn_prepacked_ms'] / total['ternary_op_ms']:.2f}")
    out = args.out or RESULTS_DIR / ("prefill_gemm.json" if args.isa == "native" else f"prefill_gemm-{args.isa}.json")
    out.write_text(json.dumps({"isa_paths": isa_mode.isa_paths(), "threads": 1, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
