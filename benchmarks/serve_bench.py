"""Serving under load, measured with vLLM's own tool: ``vllm bench serve`` against ``vllm serve``.

    .venv/bin/python benchmarks/serve_bench.py                      # synthetic BitCPM4-0.5B, concurrency 1 4 16 32
    .venv/bin/python benchmarks/serve_bench.py --mix prompt-heavy   # 1024 in / 32 out: prefill under load
    .venv/bin/python benchmarks/serve_bench.py --model PATH --concurrency 1 8
    .venv/bin/python benchmarks/serve_bench.py --smoke              # tiny model, few requests (CI)

For each side (stock vLLM with the plugin disabled, then vLLM + bitcpm) this starts ``vllm serve``
on 127.0.0.1 as a user does (the console script; vLLM's own process layout and thread binding),
and for each concurrency runs ``vllm bench serve --dataset-name random`` with fixed input and
output lengths (``--ignore-eos``), saving vLLM's result JSON. Collected per side and concurrency:
request throughput, output tok/s, TTFT / TPOT / ITL mean, p50 and p99. Writes
benchmarks/results/serve_bench.json (+ vLLM's raw result files beside it in serve_bench/), a plot
and a Markdown table. Sides run one after the other: one server at a time on this machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from engine_sides import (  # noqa: E402
    RESULTS_DIR, SIDE_LABELS, add_source_arguments, machine, machine_name, resolve_model,
)

SIDES = {"stock": False, "plugin": True}
METRICS = ("ttft", "tpot", "itl")
PERCENTILES = (50, 99)
#: Request shapes (input tokens, output tokens): a chat-like default and a prompt-heavy mix, where
#: prefill (the ternary GEMM) dominates the server's time.
MIXES = {"chat": (128, 64), "prompt-heavy": (1024, 32)}
SMOKE = {"synthetic": "tiny", "concurrency": [1, 4], "num_prompts": 8, "input_len": 32, "output_len": 8,
         "eager": True}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_arguments(parser)
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=list(SIDES))
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--mix", choices=list(MIXES), default="chat",
                        help="request shape: " + ", ".join(f"{k} {i} in / {o} out" for k, (i, o) in MIXES.items())
                        + " (--input-len / --output-len override it)")
    parser.add_argument("--num-prompts", type=int, default=None,
                        help="requests per concurrency level (default: 4 x concurrency, at least 8)")
    parser.add_argument("--input-len", type=int, default=None)
    parser.add_argument("--output-len", type=int, default=None)
    parser.add_argument("--eager", action="store_true", help="serve with --enforce-eager (default: vLLM's compile)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="default: 1024, or input + output length rounded up to 1024s if longer")
    parser.add_argument("--smoke", action="store_true", help="CI mode: " + json.dumps(SMOKE))
    parser.add_argument("--out", help="result JSON (default benchmarks/results[/smoke]/serve_bench.json)")
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            if key != "synthetic" or not args.model:
                setattr(args, key, value)
    mix_in, mix_out = MIXES[args.mix]
    args.input_len = args.input_len or mix_in
    args.output_len = args.output_len or mix_out
    args.max_model_len = args.max_model_len or max(1024, -(-(args.input_len + args.output_len) // 1024) * 1024)
    name = "serve_bench.json" if args.mix == "chat" else f"serve_bench-{args.mix}.json"
    args.out = Path(args.out or (RESULTS_DIR / ("smoke" if args.smoke else "") / name))
    return args


def server_args(args) -> list[str]:
    out = ["--dtype", args.dtype, "--kv-cache-memory-bytes", str(int(args.kv_cache_gib * 2**30)),
           "--gpu-memory-utilization", "0.05", "--max-model-len", str(args.max_model_len), "--trust-remote-code"]
    return out + (["--enforce-eager"] if args.eager else [])


def bench_command(server, model: str, args, concurrency: int, result_dir: Path, name: str) -> list[str]:
    prompts = args.num_prompts or max(8, 4 * concurrency)
    return [str(Path(sys.executable).with_name("vllm")), "bench", "serve", "--backend", "vllm",
            "--base-url", server.base_url, "--model", server.model_name, "--tokenizer", model,
            "--trust-remote-code", "--dataset-name", "random", "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len), "--num-prompts", str(prompts),
            "--max-concurrency", str(concurrency), "--ignore-eos", "--seed", "0", "--disable-tqdm",
            "--percentile-metrics", ",".join(METRICS),
            "--metric-percentiles", ",".join(str(p) for p in PERCENTILES),
            "--save-result", "--result-dir", str(result_dir), "--result-filename", name]


def summarize(raw: dict) -> dict:
    """The figures we report, from ``vllm bench serve``'s own result JSON."""
    out = {k: raw.get(k) for k in ("completed", "failed", "num_prompts", "max_concurrency", "duration",
                                  "request_throughput", "output_throughput", "total_token_throughput")}
    for metric in METRICS:
        for stat in ("mean", *(f"p{p}" for p in PERCENTILES)):
            key = f"{stat}_{metric}_ms"
            out[key] = raw.get(key, raw.get(f"median_{metric}_ms") if stat == "p50" else None)
    return out


def run_side(side: str, model: str, args, raw_dir: Path) -> dict:
    from vllm_bitcpm.testing.serve import ServerFailed, vllm_serve

    results = {}
    started = time.perf_counter()
    try:
        with vllm_serve(model, raw_dir / f"server-{side}.log", plugin=SIDES[side], served_name="bench-model",
                        args=server_args(args)) as server:
            ready = time.perf_counter() - started
            for concurrency in args.concurrency:
                name = f"{side}-c{concurrency}.json"
                try:
                    proc = subprocess.run(bench_command(server, model, args, concurrency, raw_dir, name),
                                          capture_output=True, text=True, timeout=3600)
                except subprocess.TimeoutExpired:
                    results[str(concurrency)] = {"error": "vllm bench serve did not finish within 3600 s"}
                    continue
                if proc.returncode != 0:
                    results[str(concurrency)] = {"error": (proc.stderr or proc.stdout)[-2000:]}
                    continue
                results[str(concurrency)] = summarize(json.loads((raw_dir / name).read_text()))
            log = server.log.read_text()
    except ServerFailed as error:
        return {"error": str(error)[-3000:]}
    return {"server_ready_seconds": ready, "by_concurrency": results,
            "plugin_log": next((line.split("] ", 1)[-1] for line in log.splitlines() if "bitcpm: packed" in line), None)}


def markdown(result: dict) -> str:
    sides = [s for s in result["sides"] if "error" not in result["sides"][s]]
    lines = [f"`vllm bench serve` (random dataset, {result['input_len']} in / {result['output_len']} out, "
             f"--ignore-eos) against `vllm serve` ({'eager' if result['eager'] else 'torch.compile'}, "
             f"{result['dtype']}); {Path(result['model']).name} on {machine_name(result['machine'])}", "",
             "| concurrency | metric | " + " | ".join(SIDE_LABELS[s] for s in sides)
             + (" | bitcpm / stock |" if len(sides) == 2 else " |"),
             "|" + "---|" * (2 + len(sides) + (1 if len(sides) == 2 else 0))]
    rows = [("request_throughput", "requests/s", "{:.2f}", True), ("output_throughput", "output tok/s", "{:.1f}", True),
            *[(f"{stat}_{m}_ms", f"{m.upper()} {stat} (ms)", "{:.1f}", False)
              for m in METRICS for stat in ("p50", "p99")]]
    for c in result["concurrency"]:
        for key, label, fmt, higher_better in rows:
            values = [result["sides"][s]["by_concurrency"].get(str(c), {}).get(key) for s in sides]
            cells = ["-" if v is None else fmt.format(v) for v in values]
            if len(sides) == 2:
                cells.append(f"{values[1] / values[0]:.2f}x" if None not in values and values[0] else "-")
            lines.append(f"| {c} | {label} | " + " | ".join(cells) + " |")
    for side, r in result["sides"].items():
        if "error" in r:
            lines.append(f"\n{SIDE_LABELS[side]} failed: {r['error'][-500:]}")
        for c, m in r.get("by_concurrency", {}).items():
            if "error" in m:
                lines.append(f"\n{SIDE_LABELS[side]}, concurrency {c} failed: {m['error'][-500:]}")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [("output_throughput", "output tok/s"), ("p50_ttft_ms", "TTFT p50 (ms)"), ("p50_tpot_ms", "TPOT p50 (ms)"),
              ("p99_itl_ms", "ITL p99 (ms)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3.2))
    for ax, (key, label) in zip(axes, panels):
        for side, r in result["sides"].items():
            if "error" in r:
                continue
            xs = [c for c in result["concurrency"] if r["by_concurrency"].get(str(c), {}).get(key) is not None]
            ax.plot(xs, [r["by_concurrency"][str(c)][key] for c in xs], marker="o", label=SIDE_LABELS[side])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("max concurrency")
        ax.set_title(label, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"vllm bench serve: {Path(result['model']).name}, {result['dtype']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> None:
    from tqdm import tqdm

    args = parse_args(argv)
    model = resolve_model(args)
    raw_dir = args.out.with_suffix("")
    raw_dir.mkdir(parents=True, exist_ok=True)
    sides = {}
    for side in tqdm(args.sides, unit="server", desc="sides"):
        sides[side] = run_side(side, model, args, raw_dir)
    from engine_sides import engine_platform

    result = {"kind": "bitcpm-serve-bench", "model": model, "machine": machine(engine_platform()),
              "dtype": args.dtype,
              "eager": args.eager, "mix": args.mix, "input_len": args.input_len, "output_len": args.output_len,
              "concurrency": args.concurrency, "smoke": args.smoke, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "command": " ".join(["python", "benchmarks/serve_bench.py", *(argv or sys.argv[1:])]), "sides": sides}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {args.out}, {args.out.with_suffix('.md')}")
    if plot(result, args.out.with_suffix(".png")):
        print(f"wrote {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
