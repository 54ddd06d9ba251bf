"""What bounds the exact-mode decode kernel at one token: weight decode or the dot products?

    .venv/bin/python benchmarks/inner_loop_ceiling.py

Builds benchmarks/native/inner_loop_ceiling.cpp with g++ and runs the exact decode inner loops of
kernels/cpu/rows_avx2.cpp and rows_avx512bf16.cpp on L2-resident data, one thread. AVX2 (every x86 CPU since 2013;
fp32 activations): the kernel's loop (and its earlier cross-lane permute), its FMA-only ceiling, and a lookup-table loop (column
triples in bit planes, 8 rows per `vpermps`), and the integer-activation loops of the int8 and int16
options (`vpmaddubsw`) at 1 and 8 tokens, with and without the decode. AVX512-BF16 (where the CPU has it): in full, with
the dot products alone, and with the decode alone; beside it, two lookup-table loops
(bitnet.cpp's TL idea for float activations: a table of column-pair or column-triple sums,
looked up for 16 rows per instruction). Lookup tables would need a repacked layout. Prints weights
(times tokens, for the integer loops) per second and what that means for the 357M
ternary weights of BitCPM4-0.5B per decode token, beside the kernel's measured whole-model time
(benchmarks/results/kernel_speed.json). JSON in benchmarks/results/inner_loop_ceiling.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
SOURCE = HERE / "native" / "inner_loop_ceiling.cpp"
RESULT = HERE / "results" / "inner_loop_ceiling.json"
MODEL_WEIGHTS = 24 * 1024 * (1280 + 1024 + 8192) + 24 * 4096 * 1024  # BitCPM4-0.5B linears


def kernel_whole_model_ms(results_name: str, this_machine: dict) -> float | None:
    """The kernel's exact-mode whole-model ms per token at one thread, from a kernel_speed.py run
    on a CPU with this machine's ISA flags (another CPU's figure would not compare)."""
    path = HERE / "results" / results_name
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    if result.get("machine", {}).get("isa") != this_machine.get("isa"):
        return None
    run = next((r for r in result["runs"] if r["threads"] == 1), None)
    return run and run["whole_model_ms_per_token"].get("ternary exact")


def main() -> None:
    import argparse

    from engine_sides import machine

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        binary = Path(tmp) / "inner_loop_ceiling"
        subprocess.run(["g++", "-O3", "-o", str(binary), str(SOURCE)], check=True)
        cpu = str(min(os.sched_getaffinity(0)))
        out = subprocess.run(["taskset", "-c", cpu, str(binary), "1024", "1024"], check=True, capture_output=True,
                             text=True).stdout
    rows = json.loads(out)
    this_machine = machine()
    measured = {isa: kernel_whole_model_ms(name, this_machine) for isa, name in
                (("avx2", "kernel_speed-avx2.json"), ("avx512bf16", "kernel_speed.json"))}
    print("| ISA | inner loop, 1 thread, data in L2 | G weights/s | ms per 0.5B token (357M weights) |")
    print("|---|---|---:|---:|")
    for isa in ("avx2", "avx512bf16"):
        for r in (r for r in rows if r["isa"] == isa):
            r["model_ms_per_token"] = MODEL_WEIGHTS / (r["gweights_per_s"] * 1e9) * 1e3
            print(f"| {isa} | {r['variant']} | {r['gweights_per_s']:.1f} | {r['model_ms_per_token']:.2f} |")
        if measured[isa] and any(r["isa"] == isa for r in rows):
            print(f"| {isa} | the kernel, whole model (benchmarks/kernel_speed.py, 1 thread) | "
                  f"{MODEL_WEIGHTS / measured[isa] / 1e6:.1f} | {measured[isa]:.2f} |")
    args.out.write_text(json.dumps({"machine": this_machine, "rows": rows, "kernel_whole_model_ms": measured,
                                  "model_weights": MODEL_WEIGHTS}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
