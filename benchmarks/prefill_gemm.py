"""The ternary op against stock's own GEMM at every batch size: M sweep per BitCPM4-0.5B layer shape.

    .venv/bin/python benchmarks/prefill_gemm.py                # this CPU's paths
    .venv/bin/python benchmarks/prefill_gemm.py --isa avx2     # AVX2 mode on an AVX512 machine
    .venv/bin/python benchmarks/prefill_gemm.py --tokens 16 252 --threads 1   # a subset

For M in {1, 2, 4, 8, 10, 16, ..., 512} tokens (10: a batch-10 decode step), each of the 4 layer shapes (qkv, o, gate_up, down) and 1 and 2
threads, the milliseconds of:
  * plugin:      bitcpm::ternary_linear, exact mode, x in the engine dtype (bf16) on the packed layer;
  * plugin-int8: the same op with int8 activations;
  * stock-bf16:  what stock vLLM runs for a bf16 layer: vLLM's oneDNN matmul on weights prepacked
                 once where oneDNN has a bf16 matmul (AVX512-BF16, AMX); elsewhere vLLM falls back
                 to torch's F.linear, which is what runs here then;
  * stock-fp32:  vLLM's oneDNN matmul on fp32 weights prepacked once (a float32 engine; the fast
                 stock on CPUs without bf16 dot products).
Sides are interleaved per repetition and each figure is the minimum of the repetitions (this
machine's timings are noisy; the minimum is the least disturbed run). Writes JSON (with the ISA
paths that ran) to benchmarks/results/prefill_gemm-<ISA class>[-avx2mode].json and a plot of stock's
time over the plugin's against M (higher is better for the plugin) beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from engine_sides import RESULTS_DIR, isa_class, machine  # noqa: E402

SHAPES = {"qkv": (1280, 1024), "o": (1024, 1024), "gate_up": (8192, 1024), "down": (1024, 4096)}
TOKENS = (1, 2, 4, 8, 10, 16, 32, 64, 128, 256, 512)
SIDES = ("plugin", "plugin-int16", "plugin-int8", "stock-bf16", "stock-fp32")


def min_ms_interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Minimum wall time in ms of each callable, the callables run in turn each repetition."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: 1000 * t for name, t in best.items()}


def layer_operands(n: int, k: int):
    """A BitCPM4-like layer: ternary weights times a bf16 per-row scale, packed and dense."""
    import torch

    from vllm_bitcpm import ternary

    gen = torch.Generator().manual_seed(n * 7 + k)
    scales = (torch.rand(n, 1, generator=gen) * 0.05 + 0.01).to(torch.bfloat16).float()
    weight = (torch.randint(-1, 2, (n, k), generator=gen) * scales).to(torch.bfloat16)
    packed, _ = ternary.quantize_exact(weight)
    return packed, weight


def measure(tokens, threads_list, repeats: int) -> list[dict]:
    import torch
    import torch.nn.functional as F
    import vllm._custom_ops as vllm_ops
    from tqdm import tqdm

    from vllm_bitcpm import ops

    # vLLM's own test for a bf16 oneDNN matmul (vllm/model_executor/layers/utils.py uses the same
    # question): without bf16 dot products it falls back to F.linear.
    onednn_bf16 = bool(torch.cpu._is_avx512_bf16_supported()) or bool(getattr(torch.cpu, "_is_amx_tile_supported",
                                                                               lambda: False)())
    rows = []
    layers = {name: layer_operands(n, k) for name, (n, k) in SHAPES.items()}
    handles = {}
    work = [(t, m, name) for t in threads_list for m in tokens for name in SHAPES]
    for threads, m, name in tqdm(work, desc="prefill_gemm", unit="case"):
        torch.set_num_threads(threads)
        packed, weight = layers[name]
        if (threads, name, "fp32") not in handles:
            # A oneDNN handle keeps the thread count of its first call (a handle made and first run
            # at one thread stays at one thread after set_num_threads(2)), as in an engine, whose
            # thread count never changes: one handle per thread count.
            handles[threads, name, "fp32"] = vllm_ops.create_onednn_mm(weight.float().t(), 32)
            if onednn_bf16:
                handles[threads, name, "bf16"] = vllm_ops.create_onednn_mm(weight.t(), 32)
        gen = torch.Generator().manual_seed(m)
        x = torch.randn(m, weight.shape[1], generator=gen).to(torch.bfloat16)
        x32 = x.float()
        h32 = handles[threads, name, "fp32"]
        fns = {
            "plugin": lambda: ops.ternary_linear(x, packed.codes, packed.scales, packed.group_size),
            "plugin-int8": lambda: ops.ternary_linear(x, packed.codes, packed.scales, packed.group_size,
                                                      activations="int8"),
            "plugin-int16": lambda: ops.ternary_linear(x, packed.codes, packed.scales, packed.group_size,
                                                       activations="int16"),
            "stock-fp32": lambda: vllm_ops.onednn_mm(h32, x32, None),
        }
        if onednn_bf16:
            h16 = handles[threads, name, "bf16"]
            fns["stock-bf16"] = lambda: vllm_ops.onednn_mm(h16, x, None)
        else:
            fns["stock-bf16"] = lambda: F.linear(x, weight)
        ms = min_ms_interleaved(fns, repeats if m <= 64 else max(3, repeats // 2))
        rows.append({"threads": threads, "tokens": m, "layer": name, "N": weight.shape[0], "K": weight.shape[1],
                     "stock_bf16_call": "onednn_mm (prepacked)" if onednn_bf16 else "F.linear (no oneDNN bf16 here)",
                     **{f"{side}_ms": ms[side] for side in SIDES}})
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per threads and M: the 4 layers' times summed (one transformer layer's linears)."""
    out = []
    for threads in sorted({r["threads"] for r in rows}):
        for m in sorted({r["tokens"] for r in rows}):
            sel = [r for r in rows if r["threads"] == threads and r["tokens"] == m]
            tot = {side: sum(r[f"{side}_ms"] for r in sel) for side in SIDES}
            out.append({"threads": threads, "tokens": m, **{f"{s}_ms": v for s, v in tot.items()},
                        "plugin_over_stock_bf16": tot["plugin"] / tot["stock-bf16"],
                        "plugin_over_stock_fp32": tot["plugin"] / tot["stock-fp32"],
                        "int8_over_plugin": tot["plugin-int8"] / tot["plugin"],
                        "int16_over_plugin": tot["plugin-int16"] / tot["plugin"]})
    return out


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads_list = sorted({r["threads"] for r in rows})
    fig, axes = plt.subplots(1, len(threads_list), figsize=(6 * len(threads_list), 4.5), squeeze=False)
    for ax, threads in zip(axes[0], threads_list):
        for name in SHAPES:
            sel = sorted((r for r in rows if r["threads"] == threads and r["layer"] == name), key=lambda r: r["tokens"])
            ms = [r["tokens"] for r in sel]
            ax.plot(ms, [r["stock-fp32_ms"] / r["plugin_ms"] for r in sel], marker="o", label=f"{name} vs stock fp32")
            ax.plot(ms, [r["stock-bf16_ms"] / r["plugin_ms"] for r in sel], marker="x", linestyle="--",
                    label=f"{name} vs stock bf16")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(2.0, color="grey", linewidth=0.8, linestyle=":")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("tokens (M)")
        ax.set_ylabel("stock time / plugin time (exact)")
        ax.set_title(f"{threads} thread(s)")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--isa", choices=["native", "avx2"], default="native")
    parser.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, help="JSON path (default under benchmarks/results/)")
    parser.add_argument("--rows-only", type=Path, help=argparse.SUPPRESS)  # a child's measurements
    args = parser.parse_args()
    from vllm_bitcpm.testing import isa_mode

    isa_mode.ensure_mode(args.isa)
    if args.rows_only:
        args.rows_only.write_text(json.dumps(measure(args.tokens, args.threads, args.repeats)))
        return
    from vllm_bitcpm import ops  # noqa: F401  (loads the kernel, so isa_paths names its path)

    info = machine()
    rows = []
    for threads in args.threads:
        # One child per thread count: oneDNN keeps the thread count a primitive for a shape was
        # first made with (stock fp32 at "2 threads" ran at one thread's speed in one process).
        part = Path(tempfile.mkstemp(suffix=".json")[1])
        subprocess.run([sys.executable, __file__, "--isa", args.isa, "--tokens", *map(str, args.tokens),
                        "--threads", str(threads), "--repeats", str(args.repeats), "--rows-only", str(part)],
                       check=True)
        rows += json.loads(part.read_text())
        part.unlink()
    summary = summarize(rows)
    print("| threads | M | plugin ms | int16 ms | int8 ms | stock bf16 ms | stock fp32 ms | plugin/bf16 | plugin/fp32 "
          "| int16/plugin | int8/plugin |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s in summary:
        print(f"| {s['threads']} | {s['tokens']} | {s['plugin_ms']:.2f} | {s['plugin-int16_ms']:.2f} | "
              f"{s['plugin-int8_ms']:.2f} | {s['stock-bf16_ms']:.2f} | {s['stock-fp32_ms']:.2f} | "
              f"{s['plugin_over_stock_bf16']:.2f} | {s['plugin_over_stock_fp32']:.2f} | {s['int16_over_plugin']:.2f} | "
              f"{s['int8_over_plugin']:.2f} |")
    cls = (isa_class(info) or info.get("arch") or "cpu").replace(" ", "-")
    name = f"prefill_gemm-{cls}" + ("-avx2mode" if args.isa == "avx2" else "")
    out = args.out or RESULTS_DIR / f"{name}.json"
    payload = {"machine": info, "isa_paths": isa_mode.isa_paths(), "repeats": args.repeats,
               "date": time.strftime("%Y-%m-%d"), "summary": summary, "rows": rows}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    plot(rows, f"ternary op vs stock's GEMM, BitCPM4-0.5B layers, {cls}" + (" (AVX2 mode)" if args.isa == "avx2" else ""),
         out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
