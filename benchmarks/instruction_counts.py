"""Instructions per weight of bitcpm::ternary_linear's CPU kernel, per ISA path (valgrind callgrind).

    .venv/bin/python benchmarks/instruction_counts.py                 # AVX2 path, gate_up, M = 1 and 10
    .venv/bin/python benchmarks/instruction_counts.py --isa avx2 scalar --shapes o down --tokens 1

Why: wall-clock timings on this shared 2-core VM move by up to ~40% between runs, while
callgrind's instruction counts repeat to within ~0.2% for the same binary and inputs (allocator
paths vary a little), whatever else the machine is doing. So a kernel change is judged first by what it executes per weight. Each case is
one child process under ``valgrind --tool=callgrind --toggle-collect`` on ``ternary_linear_impl``
(only the op's C++ body and what it calls are counted: the Python dispatch is not; instrumentation
is switched on by ``callgrind_control`` after the imports, which makes a case ~2x faster), one thread,
the ISA path forced with VLLM_BITCPM_ISA, bf16 activations as vLLM runs BitCPM4, per-row scales.
Instructions are not time (a shuffle and an FMA count alike), so read these beside
benchmarks/kernel_speed.py. Valgrind 3.19's virtual CPU has no AVX512 (cpuid reports none, so the
kernel's run-time checks pick AVX2 at best): only the avx2 and scalar paths can be counted; a case
whose child ran another path than asked is an error. JSON in
benchmarks/results/instruction_counts.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results" / "instruction_counts.json"
# The op's C++ body, by its demangled name. Lambdas defined inside it carry its name too
# ("ternary_linear_impl(...)::{lambda...}", "run_rows<...ternary_linear_impl(...)...>"), and a
# nested match toggles collection off again, so the patterns stop at the signature's end.
TOGGLE_PATTERNS = ("*ternary_linear_impl(*Isa)", "*ternary_linear_impl(*Isa) [clone *")
SHAPES = {"qkv": (1024, 1280), "o": (1024, 1024), "gate_up": (1024, 8192), "down": (4096, 1024),
          # 16 rows of one block: what a call costs besides its rows (allocations, copies, checks)
          "fixed": (128, 16)}


def child(shape: str, tokens: int, calls: int, activations: str) -> None:
    """Run the op ``calls`` times on one layer shape (inside valgrind)."""
    import torch

    import vllm_bitcpm.ops  # noqa: F401  (registers the op and the CPU kernel)
    from vllm_bitcpm import ternary

    torch.set_num_threads(1)
    k, n = SHAPES[shape]
    gen = torch.Generator().manual_seed(0)
    codes = ternary.pack_codes(torch.randint(-1, 2, (n, k), generator=gen))
    scales = (torch.rand(n, 1, generator=gen) + 0.5).to(torch.bfloat16)
    x = torch.randn(tokens, k, generator=gen).to(torch.bfloat16)
    # valgrind starts without instrumentation (--instr-atstart=no: Python and torch import ~4x
    # faster); callgrind_control switches it on for the calls, vgdb reaching us while we wait.
    subprocess.run(["callgrind_control", "--instr=on", str(os.getpid())], check=True, capture_output=True)
    for _ in range(calls):
        torch.ops.bitcpm.ternary_linear(x, codes, scales, k, None, activations)
    from vllm_bitcpm.ops import cpu as cpu_kernel

    print(f"KERNEL_ISA {cpu_kernel.ISA}")


def count(isa: str, shape: str, tokens: int, calls: int, activations: str) -> int:
    """Instructions callgrind collected inside the op's C++ body for ``calls`` calls."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "VLLM_BITCPM_ISA": isa, "OMP_NUM_THREADS": "1"}
        argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={tmp}/out",
                *(f"--toggle-collect={pattern}" for pattern in TOGGLE_PATTERNS), sys.executable, str(Path(__file__).resolve()),
                "--child", shape, str(tokens), str(calls), activations]
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800)
    found = re.search(r"Collected : (\d+)", proc.stderr)
    ran = re.search(r"KERNEL_ISA (\S+)", proc.stdout)
    if proc.returncode != 0 or not found or not ran:
        raise SystemExit(f"callgrind failed for {isa} {shape} M={tokens}:\n{proc.stderr[-3000:]}")
    if ran.group(1).split("+")[0] != isa:
        raise SystemExit(f"asked for the {isa} path, the kernel ran {ran.group(1)} under valgrind "
                         "(its virtual CPU has no AVX512)")
    return int(found.group(1))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
        return
    from vllm_bitcpm.ops import cpu as cpu_kernel

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--isa", nargs="+", default=["avx2"], choices=["avx2", "scalar"],
                        help="ISA paths to count (valgrind runs no AVX512)")
    parser.add_argument("--shapes", nargs="+", default=["gate_up"], choices=list(SHAPES))
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 10])
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--activations", default="exact", choices=["exact", "int8", "int16"],
                        help="the op's activation mode (VLLM_BITCPM_ACTIVATIONS)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (Debian: apt-get install valgrind)")
    if not cpu_kernel.AVAILABLE:
        raise SystemExit("the CPU kernel is not built")
    isas = args.isa
    from engine_sides import machine
    from tqdm import tqdm

    cases = [(i, s, m) for i in isas for s in args.shapes for m in args.tokens]
    rows = []
    for isa, shape, tokens in tqdm(cases, unit="case"):
        k, n = SHAPES[shape]
        total = count(isa, shape, tokens, args.calls, args.activations)
        rows.append({"isa": isa, "layer": shape, "K": k, "N": n, "M": tokens, "calls": args.calls,
                     "activations": args.activations, "instructions": total,
                     "per_32_weight_token_products": total / args.calls / (tokens * k * n / 32)})
    print("| ISA | layer (K->N) | M | instructions per call | per 32 weights x tokens |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['isa']} | {r['layer']} ({r['K']}->{r['N']}) | {r['M']} | {r['instructions'] / r['calls']:,.0f} "
              f"| {r['per_32_weight_token_products']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": {**machine(), "kernel_isa": cpu_kernel.ISA,
                                                "cpu_isa": cpu_kernel.CPU_ISA}, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
