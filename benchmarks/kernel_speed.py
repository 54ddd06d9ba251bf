"""Micro-benchmark of bitcpm::ternary_linear's CPU kernel on the BitCPM4-0.5B linear shapes.

For each layer shape (qkv 1024->1280, o 1024->1024, gate_up 1024->8192, down 4096->1024) and
M in {1, 10, 252} tokens it times: the ternary kernel (exact and int8 activations), dense
F.linear in bf16 and fp32 with an (N, K) weight, and the PyTorch reference op (unpack + dense).
It reports time per call (median), weight bytes streamed per second (packed 2-bit codes +
scales for ternary, the dense weight for F.linear), GMAC/s, and the measured memory-bandwidth
ceiling beside them; plus a "whole model" line (24 layers x one of each shape at M=1). The
bf16 lm_head (73448 x 1024, tied embedding) at M in {1, 2, 4, 10, 16}: vLLM's oneDNN call (what
stock vLLM runs), the plugin's streaming ``bitcpm_cpu.bf16_gemv`` and F.linear; and the opt-in
int8 head: ATen's ``_weight_int8pack_mm`` vs the plugin's ``bitcpm_cpu.int8_gemv``. Runs with 1
and 2 threads. Prints Markdown, writes benchmarks/results/kernel_speed.json.

    python benchmarks/kernel_speed.py [--quick] [--isa avx2]

``--isa avx2`` runs it in AVX2 mode (vllm_bitcpm/testing/isa_mode.py: the plugin, ATen, oneDNN,
MKL and vLLM's ``_C`` take their AVX2 paths) and writes kernel_speed-avx2.json; the JSON records
the ISA paths that ran.
"""

from __future__ import annotations

import argparse
import json
import sys
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vllm_bitcpm import ternary
from vllm_bitcpm.lm_head import quantize_rows_int8
from vllm_bitcpm.ops import cpu as cpu_kernel
from vllm_bitcpm.ops import reference

SHAPES = {"qkv": (1024, 1280), "o": (1024, 1024), "gate_up": (1024, 8192), "down": (4096, 1024)}
HEAD = (1024, 73448)  # lm_head K -> N (vocabulary)
HEAD_MS = (1, 2, 4, 10, 16)  # 16: the most tokens lm_head.py sends to the kernels
LAYERS = 24
MS = (1, 10, 252)
sys.path.insert(0, str(Path(__file__).resolve().parent))
RESULTS = Path(__file__).parent / "results" / "kernel_speed.json"


def machine_info() -> dict:
    """The shared machine description plus what only the kernel benchmark knows."""
    from engine_sides import machine

    from vllm_bitcpm.testing.isa_mode import isa_paths

    return {**machine(), "isa_paths": isa_paths()}

def timeit(fn, min_time=0.25, min_reps=5, max_reps=2000) -> float:
    """Median seconds per call over repeats lasting at least ``min_time``."""
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < min_time):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bandwidth_gbs() -> float:
    """Read bandwidth: sum over a 1 GiB float32 tensor (median of a few passes)."""
    buf = torch.ones(256 * 1024 * 1024, dtype=torch.float32)
    t = timeit(buf.sum, min_time=1.0, min_reps=3, max_reps=8)
    return 4 * 256 * 1024 * 1024 / t / 1e9


def make_layer(k: int, n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    trits = torch.randint(-1, 2, (n, k), generator=gen)
    scales = (torch.rand(n, 1, generator=gen) + 0.5).to(torch.bfloat16)  # per-row, as BitCPM
    codes = ternary.pack_codes(trits)
    dense = (trits.float() * scales.float())
    return codes, scales, dense


def bench_threads(threads: int, quick: bool, head_only: bool = False) -> dict:
    torch.set_num_threads(threads)
    out = {"threads": threads, "bandwidth_gbs": bandwidth_gbs(), "rows": []}
    min_time = 0.1 if quick else 0.25
    for name, (k, n) in ({} if head_only else SHAPES).items():
        codes, scales, dense32 = make_layer(k, n)
        dense16 = dense32.to(torch.bfloat16)
        packed_bytes = codes.numel() + scales.numel() * scales.element_size()
        for m in MS:
            x32 = torch.randn(m, k)
            x16 = x32.to(torch.bfloat16)
            cases = {
                # bf16 activations, as vLLM runs BitCPM4 (on AVX512-BF16 CPUs: the vdpbf16ps path)
                "ternary exact": (lambda: torch.ops.bitcpm.ternary_linear(x16, codes, scales, k, None, "exact"), packed_bytes),
                "ternary exact, fp32 x": (lambda: torch.ops.bitcpm.ternary_linear(x32, codes, scales, k, None, "exact"), packed_bytes),
                "ternary int8": (lambda: torch.ops.bitcpm.ternary_linear(x16, codes, scales, k, None, "int8"), packed_bytes),
                "dense bf16": (lambda: F.linear(x16, dense16), dense16.numel() * 2),
                "dense fp32": (lambda: F.linear(x32, dense32), dense32.numel() * 4),
                "reference op": (lambda: reference.ternary_linear_reference(x32, codes, scales, k, None, "exact"), packed_bytes),
            }
            for method, (fn, wbytes) in cases.items():
                if quick and method == "reference op" and m != 1:
                    continue
                t = timeit(fn, min_time=min_time)
                out["rows"].append(
                    {
                        "layer": name, "K": k, "N": n, "M": m, "method": method,
                        "us_per_call": t * 1e6,
                        "weight_gbs": wbytes / t / 1e9,
                        "gmacs": m * k * n / t / 1e9,
                    }
                )
    out["rows"] += bench_head(min_time)
    per_method = {}
    for r in out["rows"]:
        if r["layer"] == "lm_head":
            continue
        if r["M"] == 1:
            per_method.setdefault(r["method"], 0.0)
            per_method[r["method"]] += r["us_per_call"] * LAYERS / 1e3
    out["whole_model_ms_per_token"] = per_method
    return out


def bench_head(min_time: float) -> list[dict]:
    """The lm_head at decode sizes: bf16 through oneDNN (stock vLLM's CPU call), bf16_gemv and
    F.linear; the opt-in int8 copy through ATen's weight-only int8 matmul and int8_gemv."""
    from vllm import _custom_ops as vllm_ops

    k, n = HEAD
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    try:
        handle = vllm_ops.create_onednn_mm(weight.t(), 32) if vllm_ops._supports_onednn else None
    except RuntimeError as exc:  # no oneDNN bf16 matmul on this ISA: stock vLLM uses F.linear
        print(f"vLLM's oneDNN linear: {exc}".splitlines()[0])
        handle = None
    q, scales = quantize_rows_int8(weight)  # the opt-in int8 head (VLLM_BITCPM_LM_HEAD=int8)
    scales16 = scales.to(torch.bfloat16)  # ATen's kernel wants scales in the activation dtype
    rows = []
    for m in HEAD_MS:
        x = torch.randn(m, k).to(torch.bfloat16)
        cases = {"dense bf16 F.linear": lambda: F.linear(x, weight)}
        if handle is not None:
            cases["dense bf16 oneDNN (vLLM)"] = lambda: vllm_ops.onednn_mm(handle, x, None)
        if cpu_kernel.AVAILABLE:
            cases["dense bf16 bf16_gemv (plugin)"] = lambda: torch.ops.bitcpm_cpu.bf16_gemv(x, weight)
        cases["int8 ATen _weight_int8pack_mm"] = lambda: torch.ops.aten._weight_int8pack_mm(x, q, scales16)
        if cpu_kernel.AVAILABLE:
            cases["int8 int8_gemv (plugin)"] = lambda: torch.ops.bitcpm_cpu.int8_gemv(x, q, scales)
        for method, fn in cases.items():
            t = timeit(fn, min_time=min_time)
            nbytes = weight.numel() * (1 if method.startswith("int8") else 2)
            rows.append({"layer": "lm_head", "K": k, "N": n, "M": m, "method": method, "us_per_call": t * 1e6,
                         "weight_gbs": nbytes / t / 1e9, "gmacs": m * k * n / t / 1e9})
    return rows


def to_markdown(res: dict) -> str:
    lines = []
    for tr in res["runs"]:
        lines.append(f"\n### {tr['threads']} thread(s): read bandwidth ceiling {tr['bandwidth_gbs']:.1f} GB/s\n")
        lines.append("| layer (K->N) | M | method | us/call | weight GB/s | GMAC/s |")
        lines.append("|---|---:|---|---:|---:|---:|")
        for r in tr["rows"]:
            lines.append(
                f"| {r['layer']} ({r['K']}->{r['N']}) | {r['M']} | {r['method']} | {r['us_per_call']:.1f} | "
                f"{r['weight_gbs']:.2f} | {r['gmacs']:.2f} |"
            )
        lines.append("\nWhole model, linears only (24 x qkv+o+gate_up+down) at M=1:\n")
        lines.append("| method | ms/token | tok/s ceiling (linears only) |")
        lines.append("|---|---:|---:|")
        for method, ms in tr["whole_model_ms_per_token"].items():
            lines.append(f"| {method} | {ms:.2f} | {1e3 / ms:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter timing, skip slow reference cases")
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--head-only", action="store_true", help="only the lm_head rows (no layer shapes)")
    parser.add_argument("--out", type=Path, help="JSON path (default results/kernel_speed[-avx2].json)")
    parser.add_argument("--isa", choices=["native", "avx2"], default="native",
                        help="avx2: AVX2 mode on an AVX512 machine (vllm_bitcpm/testing/isa_mode.py)")
    args = parser.parse_args()
    from vllm_bitcpm.testing import isa_mode

    isa_mode.ensure_mode(args.isa)
    if args.out is None:
        args.out = RESULTS if args.isa == "native" else RESULTS.with_name(f"kernel_speed-{args.isa}.json")
    if not cpu_kernel.AVAILABLE:
        print("warning: the CPU kernel is not built; 'ternary' rows time the PyTorch reference")
    res = {"machine": machine_info(), "runs": []}
    for threads in args.threads:
        res["runs"].append(bench_threads(threads, args.quick, args.head_only))
    md = to_markdown(res)
    print(f"Machine: {res['machine']}")
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
