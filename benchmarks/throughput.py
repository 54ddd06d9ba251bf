"""End-to-end vLLM throughput, latency and memory: stock vs plugin vs plugin-int8 in one invocation.

    .venv/bin/python benchmarks/throughput.py                          # synthetic BitCPM4-0.5B shape
    .venv/bin/python benchmarks/throughput.py --model PATH_OR_HUB_ID --threads 1 2

The published BitCPM4 report's workload, for any platform. For each model-thread count, every
side runs in its own child process with one in-process engine (benchmarks/engine_sides.py):
the model's OpenMP threads pinned with VLLM_CPU_OMP_THREADS_BIND, prefix caching off (repeated
prompts would otherwise be served from cache), bf16 unless --dtype says otherwise. Measured:

* batch 10 with max_tokens 32 / 64 / 128: total time, input and output tok/s;
* one request of 128 new tokens: end-to-end tok/s;
* a 252-token prompt: prefill tok/s (max_tokens=1) and decode ms/token after it;
* decode-only tok/s at batch 1 and 10: (time for N new tokens - time for 1) / (N - 1);
* memory: all weight bytes (embedding included), linear weights, KV cache capacity and max
  concurrency at 1024 tokens per request, process RSS; engine init time.

Times are medians over --repeats. Prints Markdown tables with ratios to stock, writes JSON and a
PNG plot to benchmarks/results/. On a shared or noisy machine compare ratios from the same run.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from engine_sides import (  # noqa: E402
    PREFILL_TOKENS, RESULTS_DIR, SIDE_LABELS, TOKENS_PER_REQUEST, add_model_arguments, apply_isa_mode, available_threads,
    engine_settings, first_engine_info, flat_metrics, machine, machine_name, resolve_model, run_sides, threads_bind,
    write_json,
)

BATCH = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("throughput")
    group.add_argument("--batch-max-tokens", type=int, nargs="+", default=[32, 64, 128],
                       help=f"max_tokens of the batch-{BATCH} runs")
    group.add_argument("--single-max-tokens", type=int, default=128, help="new tokens of the single request")
    group.add_argument("--decode-tokens", type=int, default=64, help="new tokens after the 252-token prompt")
    group.add_argument("--prompt-tokens", type=int, default=16, help="prompt length of the batch and single runs")
    group.add_argument("--repeats", type=int, default=3)
    group.add_argument("--llama-cpp", choices=["auto", "yes", "no"], default="auto",
                       help="also time llama.cpp TQ2_0 on the same checkpoint and CPUs (benchmarks/llama_cpp_peer.py; "
                            "auto: when scripts/setup-llama-cpp.sh has installed it, else the report says why not)")


def measure_spec(args, vocab: int) -> dict:
    return {"batch_max_tokens": args.batch_max_tokens, "single_max_tokens": args.single_max_tokens,
            "decode_tokens": args.decode_tokens, "prompt_tokens": args.prompt_tokens,
            "prefill_tokens": PREFILL_TOKENS, "batch": BATCH, "repeats": args.repeats, "vocab": vocab}


def run_peers(args, model: str, spec: dict, threads: int) -> dict[str, dict]:
    """The llama.cpp peer sides for one thread count (same CPUs as the engines), per --llama-cpp."""
    if args.llama_cpp == "no":
        return {}
    import llama_cpp_peer

    peer_spec = {"prefill_tokens": spec["prefill_tokens"], "decode_tokens": spec["single_max_tokens"],
                 "prompt_tokens": spec["prompt_tokens"], "repeats": spec["repeats"], "prompt_vocab": spec["vocab"]}
    peers = llama_cpp_peer.run_peers(model, threads, threads_bind(threads), peer_spec, args.isa)
    failed = {side: r["error"] for side, r in peers.items() if "error" in r}
    if failed and args.llama_cpp == "yes":
        raise SystemExit(f"--llama-cpp yes: {failed}")
    return peers


def model_vocab(model: str) -> int:
    """Vocabulary to draw random prompt ids from (token ids, so every side sees the same input)."""
    config = Path(model) / "config.json"
    return json.loads(config.read_text())["vocab_size"] if config.exists() else 32000


# --------------------------------------------------------------------------------------------
# Child side: engine_sides' engine child runs this for the "throughput" measurement (this module's name)


def _prompts(vocab: int, count: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, vocab) for _ in range(length - 1)] for _ in range(count)]


def measure_engine(llm, spec: dict, scratch: str) -> dict:
    """Time the report's workloads on a started engine; a flat dict of numbers."""
    from vllm import SamplingParams

    vocab = min(spec["vocab"], llm.get_tokenizer().vocab_size)
    seeds = iter(range(1, 1_000_000))
    repeats = spec["repeats"]

    def timed(count: int, length: int, max_tokens: int) -> float:
        """Median seconds of ``repeats`` generate calls on fresh random prompts."""
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        times = []
        for _ in range(repeats):
            requests = [{"prompt_token_ids": p} for p in _prompts(vocab, count, length, next(seeds))]
            t0 = time.perf_counter()
            llm.generate(requests, params, use_tqdm=False)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    batch, length = spec["batch"], spec["prompt_tokens"]
    warm_up = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    for count, prompt_length in ((batch, length), (1, length), (1, spec["prefill_tokens"])):
        # Every prefill and decode shape once, so one-time costs (kernel selection, caches) stay out.
        llm.generate([{"prompt_token_ids": p} for p in _prompts(vocab, count, prompt_length, 0)], warm_up,
                     use_tqdm=False)

    out: dict[str, float] = {}
    first_batch = timed(batch, length, 1)
    for n in spec["batch_max_tokens"]:
        seconds = timed(batch, length, n)
        out[f"batch{batch}_mt{n}_seconds"] = seconds
        out[f"batch{batch}_mt{n}_output_tok_per_s"] = batch * n / seconds
        out[f"batch{batch}_mt{n}_input_tok_per_s"] = batch * length / seconds
    longest = max(spec["batch_max_tokens"])
    out[f"decode_b{batch}_tok_per_s"] = _per_second(batch * (longest - 1),
                                                    out[f"batch{batch}_mt{longest}_seconds"] - first_batch)

    n = spec["single_max_tokens"]
    single = timed(1, length, n)
    out["single_seconds"] = single
    out["single_tok_per_s"] = n / single
    out["decode_b1_tok_per_s"] = _per_second(n - 1, single - timed(1, length, 1))

    prefill = timed(1, spec["prefill_tokens"], 1)
    out["prefill_seconds"] = prefill
    out["prefill_tok_per_s"] = spec["prefill_tokens"] / prefill
    d = spec["decode_tokens"]
    decode_seconds = timed(1, spec["prefill_tokens"], d) - prefill
    out["long_prompt_decode_ms_per_token"] = 1000 * decode_seconds / (d - 1) if d > 1 and decode_seconds > 0 else None
    return out


def _per_second(tokens: int, seconds: float) -> float | None:
    """Decode rate from a difference of two timings; None where noise made the difference useless."""
    return tokens / seconds if tokens > 0 and seconds > 0 else None


# --------------------------------------------------------------------------------------------
# Parent side: tables, ratios, plot


def metric_rows(spec: dict) -> list[tuple[str, str, str]]:
    """(key, label, format) of every reported metric, in table order."""
    b, p = spec["batch"], spec["prefill_tokens"]
    rows = []
    for n in spec["batch_max_tokens"]:
        rows += [(f"batch{b}_mt{n}_seconds", f"batch {b} x {n} tokens: total (s)", "{:.2f}"),
                 (f"batch{b}_mt{n}_output_tok_per_s", f"batch {b} x {n} tokens: output (tok/s)", "{:.1f}"),
                 (f"batch{b}_mt{n}_input_tok_per_s", f"batch {b} x {n} tokens: input (tok/s)", "{:.1f}")]
    rows += [
        ("single_tok_per_s", f"single request, {spec['single_max_tokens']} tokens (tok/s)", "{:.1f}"),
        ("decode_b1_tok_per_s", "decode only, batch 1 (tok/s)", "{:.1f}"),
        (f"decode_b{b}_tok_per_s", f"decode only, batch {b} (tok/s)", "{:.1f}"),
        ("prefill_tok_per_s", f"prefill, {p}-token prompt (tok/s)", "{:.0f}"),
        ("long_prompt_decode_ms_per_token", f"decode after {p}-token prompt (ms/token)", "{:.2f}"),
        ("weight_gib", "weights, all incl. embedding (GiB)", "{:.3f}"),
        ("linear_weight_mib", "linear-layer weights (MiB)", "{:.1f}"),
        ("kv_cache_tokens", "KV cache capacity (tokens)", "{:,.0f}"),
        ("max_concurrency", f"max concurrency at {TOKENS_PER_REQUEST} tokens/request", "{:.1f}x"),
        ("rss_gib_after_load", "process RSS after load (GiB)", "{:.2f}"),
        ("peak_rss_gib", "process peak RSS (GiB)", "{:.2f}"),
        ("init_seconds", "engine init (s)", "{:.1f}"),
    ]
    return rows


def _cell(fmt: str, value) -> str:
    return "-" if value is None else fmt.format(value)


def markdown_tables(result: dict) -> str:
    """One table per thread count: every metric per side and its ratio to stock."""
    lines = []
    for threads, runs in result["runs"].items():
        sides = list(runs)
        lines += [f"**{threads} model thread(s)** (`VLLM_CPU_OMP_THREADS_BIND={runs[sides[0]].get('model_threads_bind', '?')}`)", ""]
        failed = [s for s in sides if "error" in runs[s]]
        for side in failed:
            lines.append(f"- {SIDE_LABELS.get(side, side)}: not measured: {runs[side]['error']}")
        sides = [s for s in sides if s not in failed]
        header = ["metric"]
        for side in sides:
            header += [SIDE_LABELS[side]] + (["ratio"] if side != "stock" and "stock" in sides else [])
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for key, label, fmt in metric_rows(result["spec"]):
            if not any(runs[s].get(key) is not None for s in sides):
                continue
            cells = [label]
            for side in sides:
                value = runs[side].get(key)
                cells.append(_cell(fmt, value))
                if side != "stock" and "stock" in sides:
                    base = runs["stock"].get(key)
                    cells.append(f"{value / base:.2f}x" if value is not None and base else "-")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


PLOTTED = ["batch10_mt{n}_output_tok_per_s", "single_tok_per_s", "prefill_tok_per_s", "weight_gib"]


def plot(result: dict, path: Path) -> bool:
    """Bars per side for the headline metrics (one panel each), grouped by thread count."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    spec = result["spec"]
    labels = {k: label for k, label, _ in metric_rows(spec)}
    keys = [k.format(n=max(spec["batch_max_tokens"])) for k in PLOTTED]
    runs = result["runs"]
    threads = list(runs)
    sides = [s for s in next(iter(runs.values())) if all("error" not in runs[t][s] for t in threads)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3.4))
    width = 0.8 / max(len(sides), 1)
    for ax, key in zip(axes, keys):
        for i, side in enumerate(sides):
            xs = [j + (i - (len(sides) - 1) / 2) * width for j in range(len(threads))]
            ax.bar(xs, [runs[t][side].get(key) or 0 for t in threads], width, label=SIDE_LABELS[side])
        ax.set_xticks(range(len(threads)), [f"{t} thread(s)" for t in threads])
        ax.set_title(labels[key], fontsize=8)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{Path(result['model']).name}, {result['settings']['dtype']}: {machine_name(result['machine'])}",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def assemble(model: str, settings: dict, spec: dict, runs: dict, info: dict, isa: str = "native") -> dict:
    """The throughput JSON: inputs, machine, per-thread per-side metrics, ratios to stock."""
    ratios = {}
    for threads, sides in runs.items():
        stock = sides.get("stock", {})
        ratios[threads] = {
            side: {k: v / stock[k] for k, v in metrics.items()
                   if isinstance(v, (int, float)) and isinstance(stock.get(k), (int, float)) and stock[k]}
            for side, metrics in sides.items() if side != "stock" and "error" not in metrics
        } if "error" not in stock else {}
    return {"model": model, "settings": settings, "spec": spec, "machine": info, "isa_mode": isa,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "threads_bind": "in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0) with N OpenMP threads pinned "
                            "to the first N allowed CPUs (OMP_NUM_THREADS/OMP_PLACES/OMP_PROC_BIND; "
                            "torch.get_num_threads() checked in each engine)",
            "runs": runs, "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_arguments(parser)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2] if available_threads() >= 2 else [1],
                        help="model thread counts to run (each one engine per side)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "throughput.json"))
    args = parser.parse_args()
    apply_isa_mode(args)

    from tqdm import tqdm

    model = resolve_model(args)
    settings = engine_settings(args)
    spec = measure_spec(args, model_vocab(model))
    runs: dict[str, dict] = {}
    with tqdm(total=len(args.threads) * len(args.sides), unit="engine") as bar:
        for threads in args.threads:
            sides = run_sides(model, settings, {"throughput": spec}, args.sides, threads, progress=bar)
            runs[str(threads)] = {side: flat_metrics(r) for side, r in sides.items()}
            runs[str(threads)].update(run_peers(args, model, spec, threads))
    result = assemble(model, settings, spec, runs, machine(first_engine_info(sides)), args.isa)
    print(f"\n### Throughput: {Path(model).name}, {args.dtype}, {'compiled' if args.compile else 'eager'}\n")
    print(markdown_tables(result))
    out = write_json(args.out, result)
    print(f"wrote {out}")
    if plot(result, out.with_suffix(".png")):
        print(f"wrote {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
