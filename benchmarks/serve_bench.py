"""Serving under load, measured with vLLM's own tool: ``vllm bench serve`` against ``vllm serve``.

    .venv/bin/python benchmarks/serve_bench.py                      # synthetic BitCPM4-0.5B, concurrency 1 4 16 32
    .venv/bin/python benchmarks/serve_bench.py --mix prompt-heavy   # 1024 in / 32 out: prefill under load
    .venv/bin/python benchmarks/serve_bench.py --model PATH --concurrency 1 8
    .venv/bin/python benchmarks/serve_bench.py --peers llama-server --llama-threads 2 1
    .venv/bin/python benchmarks/serve_bench.py --smoke              # tiny model, few requests (CI)

For each side (stock vLLM with the plugin disabled, vLLM + bitcpm, and with its int8 options) this
starts ``vllm serve`` on 127.0.0.1 as a user does (the console script; vLLM's own process layout
and thread binding), and for each concurrency runs ``vllm bench serve --dataset-name random`` with
fixed input and output lengths (``--ignore-eos``), saving vLLM's result JSON. ``--peers
llama-server`` adds llama.cpp's own server on the GGUF of the same checkpoint (TQ2_0 linears,
benchmarks/llama_server.py), as many slots as the highest concurrency, continuous batching, the
same per-request context, driven by the same command (``--backend openai``). Collected per side
and concurrency: request throughput, output tok/s, TTFT / TPOT / ITL mean, p50 and p99, and the
tokens each server itself counts (its /metrics): every side must generate every request's full
length, and output tok/s is those server-counted tokens over the run's duration (``vllm bench
serve`` re-tokenizes a server's text when no usage chunk reaches it, which undercounts random
weights' output). Writes benchmarks/results/serve_bench.json (+ the raw result files and server
logs beside it in serve_bench/), a plot and a Markdown table. Sides run one after the other: one
server at a time on this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from engine_sides import (  # noqa: E402
    RESULTS_DIR, SIDE_LABELS, add_source_arguments, apply_isa_mode, engine_platform, machine, machine_name,
    resolve_model, write_json,
)

from vllm_bitcpm.testing import zentorch_site  # noqa: E402

#: vLLM sides: plugin on or off, the environment that selects its options, and the engine dtype
#: (None: --dtype). stock-fp32 is what a user of a CPU without bf16 hardware can serve instead of
#: stock's slow bf16 default (ATen's bf16 fallback), the AVX2 targets' second baseline.
SIDES = {"stock": (False, {}, None), "plugin": (True, {}, None),
         "plugin-int8": (True, {"VLLM_BITCPM_ACTIVATIONS": "int8", "VLLM_BITCPM_LM_HEAD": "int8"}, None),
         "plugin-int16": (True, {"VLLM_BITCPM_ACTIVATIONS": "int16", "VLLM_BITCPM_LM_HEAD": "int8"}, None),
         "stock-fp32": (False, {}, "float32"),
         # vLLM's ZenCpuPlatform (AMD CPUs with AVX512, zentorch importable): stock's faster dense
         # GEMMs there (docs/platforms.md); zentorch lives outside the venv's path.
         "stock-zentorch": (False, zentorch_site.env(), None),
         "plugin-zentorch": (True, zentorch_site.env(), None)}
#: What runs unless --sides says otherwise.
DEFAULT_SIDES = ["stock", "plugin", "plugin-int8"]
PEERS = ("llama-server",)
METRICS = ("ttft", "tpot", "itl")
PERCENTILES = (50, 99)
#: Request shapes (input tokens, output tokens): a chat-like default and a prompt-heavy mix, where
#: prefill (the ternary GEMM) dominates the server's time.
MIXES = {"chat": (128, 64), "prompt-heavy": (1024, 32)}
SMOKE = {"synthetic": "tiny", "sides": ["stock", "plugin"], "concurrency": [1, 4], "num_prompts": 8,
         "input_len": 32, "output_len": 8, "eager": True}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_arguments(parser)
    parser.add_argument("--sides", nargs="*", default=DEFAULT_SIDES, choices=list(SIDES),
                        help=f"vLLM servers to run (default {' '.join(DEFAULT_SIDES)}; plugin-int16: int16 "
                             "activations + int8 head; stock-fp32: stock served in float32)")
    parser.add_argument("--peers", nargs="*", default=[], choices=PEERS,
                        help="other servers driven by the same command (llama-server: scripts/setup-llama-cpp.sh)")
    parser.add_argument("--llama-threads", type=int, nargs="+", default=[os.cpu_count() or 1],
                        help="llama-server --threads, one side each (default: every CPU, as a user starts it)")
    parser.add_argument("--llama-head", nargs="+", default=["q8_0"], choices=["f16", "q8_0"],
                        help="llama-server GGUF head type, one side each (linears are TQ2_0)")
    parser.add_argument("--isa", choices=["native", "avx2"], default="native",
                        help="avx2: AVX2 mode on an AVX512 machine (vllm_bitcpm/testing/isa_mode.py) and "
                             "llama-server's AVX2-only build")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--mix", choices=list(MIXES), default="chat",
                        help="request shape: " + ", ".join(f"{k} {i} in / {o} out" for k, (i, o) in MIXES.items())
                        + " (--input-len / --output-len override it)")
    parser.add_argument("--num-prompts", type=int, default=None,
                        help="requests per concurrency level (default: --waves x concurrency, at least 8)")
    parser.add_argument("--waves", type=int, default=4,
                        help="requests per concurrency level as a multiple of the concurrency (default 4; "
                             "2 where a slow side would take hours, e.g. stock bf16 on a CPU without bf16 hardware)")
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


def server_args(args, dtype: str | None = None) -> list[str]:
    out = ["--dtype", dtype or args.dtype, "--kv-cache-memory-bytes", str(int(args.kv_cache_gib * 2**30)),
           "--gpu-memory-utilization", "0.05", "--max-model-len", str(args.max_model_len), "--trust-remote-code"]
    return out + (["--enforce-eager"] if args.eager else [])


def num_prompts(args, concurrency: int) -> int:
    return args.num_prompts or max(8, args.waves * concurrency)


def bench_command(server, model: str, args, concurrency: int, result_dir: Path, name: str,
                  backend: str = "vllm") -> list[str]:
    """``vllm bench serve`` as a user runs it; ``backend`` "openai" for servers other than vLLM."""
    endpoint = ["--endpoint", "/v1/completions"] if backend == "openai" else []
    return [str(Path(sys.executable).with_name("vllm")), "bench", "serve", "--backend", backend, *endpoint,
            "--base-url", server.base_url, "--model", server.model_name, "--tokenizer", model,
            "--trust-remote-code", "--dataset-name", "random", "--random-input-len", str(args.input_len),
            "--random-output-len", str(args.output_len), "--num-prompts", str(num_prompts(args, concurrency)),
            "--max-concurrency", str(concurrency), "--ignore-eos",
            # fresh prompts per level: both servers cache prompts (llama-server reuses a slot's
            # whole prompt, vLLM its prefix blocks), and with one seed every level replays the last
            "--seed", str(concurrency), "--disable-tqdm",
            "--percentile-metrics", ",".join(METRICS),
            "--metric-percentiles", ",".join(str(p) for p in PERCENTILES),
            "--save-result", "--save-detailed", "--result-dir", str(result_dir), "--result-filename", name,
            # A fresh connection per request, for every server: llama-server (cpp-httplib) closes
            # idle keep-alive connections that aiohttp's pool then reuses, and vllm bench serve
            # counts those requests as failed (2 of 40 in a test here; 0 with this header).
            "--header", "Connection=close"]


#: Per-request lists --save-detailed adds to vLLM's result file: read here, then left out of the
#: saved copy (they would add ~100 KB per run to the repository).
PER_REQUEST = ("input_lens", "output_lens", "ttfts", "itls", "latencies", "start_times", "queue_times",
               "generated_texts", "errors")


def tpot_from_chunks(raw: dict, output_len: int) -> list[float]:
    """Per-request time per output token (ms) from the streamed chunk gaps and the known length.

    vLLM's own TPOT divides by the token count it gets from a usage chunk, else by re-tokenizing
    the streamed text; llama-server sends usage in its last chunk beside a choice, which
    ``vllm bench serve`` does not read, and random weights' text re-tokenizes short. Every side
    here generates exactly ``output_len`` tokens (--ignore-eos, checked against the server's own
    count), so (latency - TTFT) / (output_len - 1) is the same figure for every server."""
    if output_len < 2:
        return []
    return [sum(itl) * 1000 / (output_len - 1) for itl, err in zip(raw["itls"], raw["errors"]) if not err]


def summarize(raw: dict) -> dict:
    """The figures we report, from ``vllm bench serve``'s own result JSON."""
    out = {k: raw.get(k) for k in ("completed", "failed", "num_prompts", "max_concurrency", "duration",
                                  "request_throughput", "output_throughput", "total_token_throughput")}
    for metric in METRICS:
        for stat in ("mean", *(f"p{p}" for p in PERCENTILES)):
            key = f"{stat}_{metric}_ms"
            out[key] = raw.get(key, raw.get(f"median_{metric}_ms") if stat == "p50" else None)
    return out


def side_names(args) -> list[str]:
    """vLLM sides, then one llama-server side per head type and thread count."""
    peers = [f"llama-server-{head}-t{threads}" for head in args.llama_head for threads in args.llama_threads
             if "llama-server" in args.peers]
    return [*args.sides, *peers]


def side_label(side: str) -> str:
    if side.startswith("llama-server-"):
        _, _, head, threads = side.split("-")
        return f"llama-server TQ2_0{' + Q8_0 head' if head == 'q8_0' else ''}, {threads[1:]} thr"
    return SIDE_LABELS[side]


@contextlib.contextmanager
def start_server(side: str, model: str, args, raw_dir: Path):
    """The side's server, started as its users start it; yields (server, backend, metrics kind)."""
    log = raw_dir / f"server-{side}.log"
    if side.startswith("llama-server-"):
        from llama_cpp_peer import ensure_gguf
        from llama_server import llama_serve

        _, _, head, threads = side.split("-")
        threads = int(threads[1:])
        cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:threads])
        with llama_serve(ensure_gguf(model, head), log, slots=max(args.concurrency), ctx_per_slot=args.max_model_len,
                         threads=threads, cpus=cpus, isa=args.isa) as server:
            yield server, "openai", "llama-server"
        return
    from vllm_bitcpm.testing.serve import vllm_serve

    plugin, env, dtype = SIDES[side]
    with vllm_serve(model, log, plugin=plugin, served_name="bench-model", args=server_args(args, dtype),
                    env=env) as server:
        yield server, "vllm", "vllm"


def server_counts(server, kind: str) -> dict:
    """Generated and prompt tokens the server itself has counted so far (its /metrics)."""
    from llama_server import GENERATED_COUNTERS, PROMPT_COUNTERS

    from vllm_bitcpm.testing.serve import prometheus_values

    values = prometheus_values(server.base_url)  # one /metrics read for both counts
    return {"generated": values.get(GENERATED_COUNTERS[kind]), "prompt": values.get(PROMPT_COUNTERS[kind])}


def run_level(server, backend: str, kind: str, model: str, args, concurrency: int, raw_dir: Path, name: str) -> dict:
    """One ``vllm bench serve`` run; its figures with the server's own token counts beside them."""
    before = server_counts(server, kind)
    try:
        proc = subprocess.run(bench_command(server, model, args, concurrency, raw_dir, name, backend),
                              capture_output=True, text=True, timeout=3600)
    except subprocess.TimeoutExpired:
        return {"error": "vllm bench serve did not finish within 3600 s"}
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout)[-2000:]}
    after = server_counts(server, kind)
    raw_file = raw_dir / name
    raw = json.loads(raw_file.read_text())
    out = summarize(raw)
    expected = num_prompts(args, concurrency) * args.output_len  # (vllm bench's ready check is off by default)
    delta = {k: None if None in (before[k], after[k]) else after[k] - before[k] for k in before}
    generated = delta["generated"]
    out.update({"bench_output_throughput": out["output_throughput"], "bench_p50_tpot_ms": out["p50_tpot_ms"],
                "bench_p99_tpot_ms": out["p99_tpot_ms"], "server_generated_tokens": generated,
                "server_prompt_tokens": delta["prompt"], "expected_generated_tokens": expected,
                "full_length": generated == expected,
                "request_errors": sorted({e.strip().splitlines()[-1][:200] for e in raw.get("errors", []) if e})})
    if generated is not None and out.get("duration"):
        out["output_throughput"] = generated / out["duration"]
    tpots = tpot_from_chunks(raw, args.output_len) if "itls" in raw else []
    if tpots:
        import numpy as np

        out.update({"mean_tpot_ms": float(np.mean(tpots)),
                    **{f"p{p}_tpot_ms": float(np.percentile(tpots, p)) for p in PERCENTILES}})
    raw_file.write_text(json.dumps({k: v for k, v in raw.items() if k not in PER_REQUEST}, indent=1) + "\n")
    return out


def run_side(side: str, model: str, args, raw_dir: Path) -> dict:
    from vllm_bitcpm.testing.serve import ServerFailed

    results = {}
    started = time.perf_counter()
    try:
        with start_server(side, model, args, raw_dir) as (server, backend, kind):
            ready = time.perf_counter() - started
            for concurrency in args.concurrency:
                results[str(concurrency)] = run_level(server, backend, kind, model, args, concurrency, raw_dir,
                                                      f"{side}-c{concurrency}.json")
            log = server.log.read_text()
    except (ServerFailed, FileNotFoundError) as error:
        return {"error": str(error)[-3000:]}
    return {"server_ready_seconds": ready, "by_concurrency": results,
            "server_command": log.splitlines()[0][2:] if log.startswith("$ ") else None,
            "plugin_log": next((line.split("] ", 1)[-1] for line in log.splitlines() if "bitcpm: packed" in line), None)}


def markdown(result: dict) -> str:
    """One table: a row per concurrency and metric, a column per side, each ratio to stock beside it."""
    sides = [s for s in result["sides"] if "error" not in result["sides"][s]]
    base = "stock" if "stock" in sides else None
    lines = [f"`vllm bench serve` (random dataset, {result['input_len']} in / {result['output_len']} out, "
             f"--ignore-eos) against each server ({'eager' if result['eager'] else 'torch.compile'} vLLM, "
             f"{result['dtype']}); {Path(result['model']).name} on {machine_name(result['machine'])}. "
             "Output tok/s counts the tokens each server reports generating (its /metrics); TPOT is "
             "(latency - TTFT) / (output tokens - 1) per request"
             + (f"; (x) is the ratio to {side_label(base)}" if base else "") + ".", "",
             "| concurrency | metric | " + " | ".join(side_label(s) for s in sides) + " |",
             "|" + "---|" * (2 + len(sides))]
    rows = [("failed", "failed requests", "{:d}"),
            ("request_throughput", "requests/s", "{:.2f}"), ("output_throughput", "output tok/s", "{:.1f}"),
            *[(f"{stat}_{m}_ms", f"{m.upper()} {stat} (ms)", "{:.1f}") for m in METRICS for stat in ("p50", "p99")]]
    for c in result["concurrency"]:
        for key, label, fmt in rows:
            level = {s: result["sides"][s]["by_concurrency"].get(str(c), {}) for s in sides}
            ref = level[base].get(key) if base else None
            cells = []
            for s in sides:
                v = level[s].get(key)
                cell = "-" if v is None else fmt.format(v)
                if v is not None and ref and s != base and key != "failed":
                    cell += f" ({v / ref:.2f}x)"
                if key == "output_throughput" and level[s] and not level[s].get("full_length", True):
                    cell += " (short outputs)"
                cells.append(cell)
            lines.append(f"| {c} | {label} | " + " | ".join(cells) + " |")
    for side, r in result["sides"].items():
        if "error" in r:
            lines.append(f"\n{side_label(side)} failed: {r['error'][-500:]}")
        for c, m in r.get("by_concurrency", {}).items():
            if "error" in m:
                lines.append(f"\n{side_label(side)}, concurrency {c} failed: {m['error'][-500:]}")
            elif not m.get("full_length", True):
                lines.append(f"\n{side_label(side)}, concurrency {c}: the server generated "
                             f"{m['server_generated_tokens']} tokens, {m['expected_generated_tokens']} expected")
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
            ax.plot(xs, [r["by_concurrency"][str(c)][key] for c in xs], marker="o", label=side_label(side))
        ax.set_xscale("log", base=2)
        if key.endswith("_ms"):
            ax.set_yscale("log")  # latencies span milliseconds to minutes across servers
        ax.set_xlabel("max concurrency")
        ax.set_title(label, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"vllm bench serve: {Path(result['model']).name}, {result['dtype']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


#: Settings from the environment that change how a server runs (thread binding, OpenMP waiting,
#: the plugin's options); the JSON records the ones set, since the command line does not show them.
SERVING_ENV_PREFIXES = ("VLLM_CPU_", "OMP_", "KMP_", "GOMP_", "VLLM_BITCPM_", "LD_PRELOAD")


def serving_environment() -> dict[str, str]:
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith(SERVING_ENV_PREFIXES)}


def main(argv=None) -> None:
    from tqdm import tqdm

    args = parse_args(argv)
    apply_isa_mode(args)
    model = resolve_model(args)
    raw_dir = args.out.with_suffix("")
    raw_dir.mkdir(parents=True, exist_ok=True)
    sides = {}
    for side in tqdm(side_names(args), unit="server", desc="sides"):
        sides[side] = run_side(side, model, args, raw_dir)
    result = {"kind": "bitcpm-serve-bench", "model": model, "machine": machine(engine_platform()),
              "dtype": args.dtype, "isa_mode": args.isa,
              "eager": args.eager, "mix": args.mix, "input_len": args.input_len, "output_len": args.output_len,
              "concurrency": args.concurrency, "smoke": args.smoke, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "command": " ".join(["python", "benchmarks/serve_bench.py", *(argv or sys.argv[1:])]),
              "environment": serving_environment(), "sides": sides}
    if "llama-server" in args.peers:
        from llama_server import version

        with contextlib.suppress(FileNotFoundError):
            result["llama_server_version"] = version(args.isa)
    write_json(args.out, result)
    text = markdown(result)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    print(f"wrote {args.out}, {args.out.with_suffix('.md')}")
    if plot(result, args.out.with_suffix(".png")):
        print(f"wrote {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
