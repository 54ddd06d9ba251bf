"""End-to-end vLLM throughput, stock vs plugin, side by side in one invocation.

    .venv/bin/python benchmarks/throughput.py                  # synthetic BitCPM4-0.5B shape
    .venv/bin/python benchmarks/throughput.py --model PATH --threads 1 2

For each model-thread count, stock vLLM and vLLM + bitcpm run in their own child process
(plugins register process-wide) with the same settings: in-process engine, the model's OpenMP
threads pinned with VLLM_CPU_OMP_THREADS_BIND, prefix caching off (repeated prompts would
otherwise be served from cache), bf16. Measured per engine:

* decode tok/s at batch 1 and batch 10: (time for 1 + N new tokens - time for 1) / N, so
  prefill and the first step are not counted;
* prefill tok/s of a 252-token prompt (max_tokens=1);
* linear-weight memory, engine load time.

Prints a Markdown table with plugin/stock ratios, writes JSON (and a PNG plot when matplotlib is
installed) to benchmarks/results/. Numbers from a noisy 2-core machine: compare ratios taken in
the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PREFILL_TOKENS = 252
BATCH = 10


def _prompts(vocab: int, count: int, length: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, vocab) for _ in range(length - 1)] for _ in range(count)]


def child() -> None:
    """One engine: warm up, then prefill and decode measurements (runs in the child process)."""
    from vllm import LLM, SamplingParams

    from vllm_bitcpm.sidebyside import emit_result, inspect_linear_layers, read_payload

    spec = read_payload()
    started = time.perf_counter()
    llm = LLM(model=spec["model"], dtype=spec["dtype"], trust_remote_code=True,
              enforce_eager=not spec["compile"], enable_prefix_caching=False,
              kv_cache_memory_bytes=1 << 30, gpu_memory_utilization=0.05,
              max_model_len=1024, max_num_seqs=max(BATCH, 16), seed=0)
    load_seconds = time.perf_counter() - started
    vocab = min(spec["vocab"], llm.get_tokenizer().vocab_size)
    seed = iter(range(1000))

    def timed(prompts, max_tokens):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return time.perf_counter() - t0

    timed(_prompts(vocab, 1, 16, next(seed)), 8)  # warm-up
    repeats = spec["repeats"]
    prefill = [timed(_prompts(vocab, 1, PREFILL_TOKENS, next(seed)), 1) for _ in range(repeats)]
    result = {"load_seconds": load_seconds,
              "prefill_tok_per_s": PREFILL_TOKENS / statistics.median(prefill)}
    n = spec["new_tokens"]
    for batch in (1, BATCH):
        first = [timed(_prompts(vocab, batch, 16, next(seed)), 1) for _ in range(repeats)]
        full = [timed(_prompts(vocab, batch, 16, next(seed)), n + 1) for _ in range(repeats)]
        decode_seconds = statistics.median(full) - statistics.median(first)
        result[f"decode_b{batch}_tok_per_s"] = batch * n / decode_seconds
    (layers, *_) = llm.apply_model(inspect_linear_layers)
    result["linear_weight_mib"] = (layers["packed_bytes"] + layers["dense_bytes"]) / 2**20
    result["packed_layers"] = layers["packed_layers"]
    result["bits_per_packed_weight"] = layers["bits_per_packed_weight"]
    emit_result(result)


#: (name, plugin enabled, extra environment): stock, the default ternary path, the fast options.
SIDES = [
    ("stock", False, {}),
    ("plugin", True, {}),
    ("plugin-int8", True, {"VLLM_BITCPM_ACTIVATIONS": "int8", "VLLM_BITCPM_LM_HEAD": "int8"}),
]

METRICS = [
    ("decode_b1_tok_per_s", "decode batch 1 (tok/s)", "{:.1f}"),
    ("decode_b10_tok_per_s", f"decode batch {BATCH}, total (tok/s)", "{:.1f}"),
    ("prefill_tok_per_s", f"prefill {PREFILL_TOKENS}-token prompt (tok/s)", "{:.0f}"),
    ("linear_weight_mib", "linear weights (MiB)", "{:.1f}"),
    ("load_seconds", "engine load (s)", "{:.1f}"),
]


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    keys = [k for k, _, _ in METRICS[:3]]
    runs = result["runs"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5))
    for ax, key in zip(axes, keys):
        threads = sorted(runs, key=int)
        width = 0.27
        for i, (side, _, _) in enumerate(SIDES):
            xs = [j + (i - 1) * width for j in range(len(threads))]
            ax.bar(xs, [runs[t][side][key] for t in threads], width, label=side)
        ax.set_xticks(range(len(threads)), [f"{t} thread(s)" for t in threads])
        ax.set_title(next(label for k, label, _ in METRICS if k == key), fontsize=9)
    axes[0].legend()
    fig.suptitle(f"vLLM {result['machine']['vllm']}: stock vs bitcpm ({Path(result['model']).name})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help="checkpoint path or hub id (default: synthetic --shape)")
    parser.add_argument("--shape", default="bitcpm4-0.5b")
    parser.add_argument("--checkpoints", default="checkpoints", help="cache of synthetic checkpoints")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--compile", action="store_true", help="torch.compile instead of eager")
    parser.add_argument("--out", default=str(HERE / "results" / "throughput.json"))
    args = parser.parse_args()
    if args.child:
        return child()

    from load_and_memory import machine

    from vllm_bitcpm import synthetic
    from vllm_bitcpm.sidebyside import run_child

    model = args.model
    if model is None:
        model = str(Path(args.checkpoints) / f"synthetic-{args.shape}")
        if not (Path(model) / "config.json").exists():
            synthetic.write_checkpoint(model, shape=args.shape, granularity="per_row", progress=True)
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"] if Path(model).is_dir() else 32000
    spec = {"model": model, "dtype": args.dtype, "compile": args.compile, "vocab": vocab,
            "new_tokens": args.new_tokens, "repeats": args.repeats}
    runs: dict[str, dict] = {}
    for threads in args.threads:
        bind = "0" if threads == 1 else f"0-{threads - 1}"
        runs[str(threads)] = {}
        for side, plugin, env in SIDES:
            print(f"[{threads} thread(s)] {side} ...", flush=True)
            result, log = run_child([sys.executable, __file__, "--child"], spec, plugin, timeout=3600,
                                    extra_env={"VLLM_CPU_OMP_THREADS_BIND": bind, **env})
            runs[str(threads)][side] = result

    print(f"\n### {Path(model).name}, {args.dtype}, {'compiled' if args.compile else 'eager'}\n")
    print("bitcpm = default (exact activations, bf16 head); bitcpm-int8 = int8 activations + int8 head\n")
    for t in runs:
        print(f"**{t} model thread(s)**\n")
        print("| metric | stock | bitcpm | ratio | bitcpm-int8 | ratio |\n|---|---|---|---|---|---|")
        for key, label, fmt in METRICS:
            s = runs[t]["stock"][key]
            cells = [fmt.format(s)]
            for side in ("plugin", "plugin-int8"):
                p = runs[t][side][key]
                cells += [fmt.format(p), f"{p / s:.2f}x"]
            print(f"| {label} | " + " | ".join(cells) + " |")
        print()
    result = {"model": model, "spec": spec, "machine": machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "threads_bind": "VLLM_CPU_OMP_THREADS_BIND=0 (1 thread) / 0-1 (2 threads), in-process engine",
              "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    if plot(result, out.with_suffix(".png")):
        print(f"wrote {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
