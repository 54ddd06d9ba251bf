"""Time bitcpm::ternary_linear from one checkout, for A/B runs of two builds of the kernel.

    .venv/bin/python benchmarks/op_ab.py --root /path/to/old/checkout --activations int8 --tokens 1
    .venv/bin/python benchmarks/op_ab.py --root . --activations int8 --tokens 1

Imports vllm_bitcpm (and its built kernel) from --root, builds the four BitCPM4-0.5B layer shapes
of one transformer layer (qkv, o, gate_up, down; ternary weights, one bf16 scale per row), and
prints the minimum over --rounds of the time for one call of each shape, in ms, one thread. Run
it alternately against two checkouts (each built with `setup.py build_ext --inplace`), pinned to
one core, several times each, and compare medians: this is how kernels/README.md's before/after
figures were taken (benchmarks/results/avx2-only/*-ab.txt).
"""

from __future__ import annotations

import argparse
import sys
import time

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="checkout whose vllm_bitcpm (and built kernel) to time")
    parser.add_argument("--activations", default="exact", choices=["exact", "int8", "int16"])
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=100)
    args = parser.parse_args()
    sys.path.insert(0, args.root)
    import torch
    from prefill_gemm import SHAPES  # the four layer shapes, (N, K)

    import vllm_bitcpm
    from vllm_bitcpm import ops, ternary

    torch.set_num_threads(1)
    calls = []
    for n, k in SHAPES.values():
        gen = torch.Generator().manual_seed(n)
        packed, _ = ternary.quantize_exact((torch.randint(-1, 2, (n, k), generator=gen) * 0.02).to(torch.bfloat16))
        calls.append((torch.randn(args.tokens, k, generator=gen).to(torch.bfloat16), packed))
    best = float("inf")
    for _ in range(args.rounds + 1):
        start = time.perf_counter()
        for x, p in calls:
            ops.ternary_linear(x, p.codes, p.scales, p.group_size, activations=args.activations)
        best = min(best, time.perf_counter() - start)
    print(f"{best * 1e3:.4f} ms  ({vllm_bitcpm.__file__}, {args.activations}, M={args.tokens})")


if __name__ == "__main__":
    main()
