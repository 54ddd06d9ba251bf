"""What bounds the exact-mode decode kernel at one token: weight decode or bf16 dot products?

    .venv/bin/python benchmarks/inner_loop_ceiling.py

Builds benchmarks/native/inner_loop_ceiling.cpp with g++ and runs the AVX512-BF16 inner loop of
kernels/cpu/ternary_linear.cpp on L2-resident data, one thread: in full, with the dot products
alone, and with the decode alone; beside it, two lookup-table loops (bitnet.cpp's TL idea for
float activations: a table of column-pair or column-triple sums, looked up for 16 rows per
instruction) that would need a repacked layout. Prints weights per second and what that means for the 357M
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
    if isinstance(rows, dict):
        raise SystemExit(rows["error"])
    kernels = HERE / "results" / "kernel_speed.json"
    measured = None
    if kernels.exists():
        run = next((r for r in json.loads(kernels.read_text())["runs"] if r["threads"] == 1), None)
        measured = run and run["whole_model_ms_per_token"].get("ternary exact")
    print("| inner loop, 1 thread, data in L2 | G weights/s | ms per 0.5B token (357M weights) |")
    print("|---|---:|---:|")
    for r in rows:
        r["model_ms_per_token"] = MODEL_WEIGHTS / (r["gweights_per_s"] * 1e9) * 1e3
        print(f"| {r['variant']} | {r['gweights_per_s']:.1f} | {r['model_ms_per_token']:.2f} |")
    if measured:
        print(f"| the kernel, whole model (benchmarks/kernel_speed.py, 1 thread) | {MODEL_WEIGHTS / measured / 1e6:.1f} "
              f"| {measured:.2f} |")
    args.out.write_text(json.dumps({"machine": machine(), "rows": rows, "kernel_whole_model_ms": measured,
                                  "model_weights": MODEL_WEIGHTS}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
