"""Batch-1 decode vs model threads, OpenMP wait policy, max_logprobs, process layout and the int8 options.

    .venv/bin/python benchmarks/thread_scaling.py            # synthetic BitCPM4-0.5B shape
    .venv/bin/python benchmarks/thread_scaling.py --only "1 thread" --repeat 3   # a subset, interleaved rounds
    .venv/bin/python benchmarks/thread_scaling.py --compile --repeat 3 \
        --only "stock, 1 thread" "bitcpm, 1 thread" "bitcpm, 1 thread, int8 activations + lm_head"

Why: what a second model thread buys end to end (the kernels scale, the Python and
single-threaded ops between them do not; the OpenMP wait policy decides what the idle thread does
meanwhile), what full-vocabulary log-probs (max_logprobs=-1, the report's accuracy engines) cost,
and how vLLM's own process layout (engine process + model worker, one CPU reserved for the
engine) compares with the in-process engine the other benchmarks time. Each case is one child
process with one engine; the thread count is read back from the model's own process and checked.
Decode ms/token = (time for 65 new tokens - time for 1) / 64, best of 3 in one engine; with
--repeat N the selected cases run in N interleaved rounds (one engine each) and the median round
is reported, so slow drifts of this noisy VM hit every case alike. Engines run eager unless
--compile (torch.compile, vLLM's default; ~1.5 min of warm-up per engine). JSON in benchmarks/results/.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

INT8_HEAD = {"VLLM_BITCPM_LM_HEAD": "int8"}
INT8_ALL = {"VLLM_BITCPM_LM_HEAD": "int8", "VLLM_BITCPM_ACTIVATIONS": "int8"}

#: (label, plugin on, model threads, OMP_WAIT_POLICY or None, max_logprobs, engine in-process,
#: plugin options). In-process cases pin N OpenMP threads (engine_sides.model_threads_env); the
#: "vLLM processes" cases run vLLM as `LLM(...)`/`vllm serve` users get it: engine and model
#: worker in their own processes, threads from vLLM's own VLLM_CPU_OMP_THREADS_BIND ("auto"
#: reserves one CPU for the engine process). The int8 cases time the opt-in speed options.
CASES = [
    ("stock, 1 thread", False, 1, None, 20, True, {}),
    ("stock, 2 threads", False, 2, None, 20, True, {}),
    ("bitcpm, 1 thread", True, 1, None, 20, True, {}),
    ("bitcpm, 2 threads", True, 2, None, 20, True, {}),
    ("bitcpm, 2 threads, OMP_WAIT_POLICY=ACTIVE", True, 2, "ACTIVE", 20, True, {}),
    ("bitcpm, 2 threads, OMP_WAIT_POLICY=PASSIVE", True, 2, "PASSIVE", 20, True, {}),
    ("bitcpm, 1 thread, max_logprobs=-1", True, 1, None, -1, True, {}),
    ("bitcpm, 1 thread, int8 lm_head", True, 1, None, 20, True, INT8_HEAD),
    ("bitcpm, 2 threads, int8 lm_head", True, 2, None, 20, True, INT8_HEAD),
    ("bitcpm, 1 thread, int8 activations + lm_head", True, 1, None, 20, True, INT8_ALL),
    ("bitcpm, 2 threads, int8 activations + lm_head", True, 2, None, 20, True, INT8_ALL),
    ("stock, vLLM processes, bind auto", False, None, None, 20, False, {}),
    ("bitcpm, vLLM processes, bind auto", True, None, None, 20, False, {}),
    ("bitcpm, vLLM processes, bind auto, int8 activations + lm_head", True, None, None, 20, False, INT8_ALL),
]


def _child(model: str, max_logprobs: int, compile_model: bool) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype="bfloat16", trust_remote_code=True, enforce_eager=not compile_model,
              enable_prefix_caching=False, max_model_len=1024, max_num_seqs=16, max_logprobs=max_logprobs,
              kv_cache_memory_bytes=2**30, gpu_memory_utilization=0.05)
    prompt = [{"prompt_token_ids": [100, 200, 300, 400]}]

    def seconds(n: int) -> float:
        start = time.perf_counter()
        llm.generate(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - start

    from engine_sides import torch_threads

    (threads, *_) = llm.apply_model(torch_threads)
    seconds(8)
    first = min(seconds(1) for _ in range(3))
    total = min(seconds(65) for _ in range(3))
    print("RESULT " + json.dumps({"ms_per_token": (total - first) / 64 * 1000, "model_threads": threads}), flush=True)


def selects(text: str, label: str) -> bool:
    """--only: a text equal to some case label selects exactly that case, other texts by substring."""
    if any(text == case[0] for case in CASES):
        return text == label
    return text in label


def main() -> None:
    import argparse
    import statistics

    from tqdm import tqdm

    from engine_sides import RESULTS_DIR, machine, model_threads_env, resolve_model

    class Args:
        model, synthetic, checkpoints = None, "bitcpm4-0.5b", "checkpoints"

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="TEXT",
                        help="run only these cases: a TEXT equal to a case label selects that case, "
                             "any other TEXT every case whose label contains it")
    parser.add_argument("--repeat", type=int, default=1, help="interleaved rounds per case (median reported)")
    parser.add_argument("--compile", action="store_true", help="torch.compile (vLLM's default) instead of eager")
    args = parser.parse_args()
    cases = [c for c in CASES if not args.only or any(selects(text, c[0]) for text in args.only)]
    if not cases:
        raise SystemExit(f"no case label matches {args.only!r}")
    model = resolve_model(Args)
    rounds: dict[str, list[dict]] = {}
    for case in tqdm([c for _ in range(args.repeat) for c in cases], unit="engine"):
        label, plugin, threads, policy, max_logprobs, in_process, options = case
        env = {k: v for k, v in os.environ.items()
               if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "OMP_PLACES", "OMP_PROC_BIND",
                            "VLLM_CPU_OMP_THREADS_BIND", "VLLM_ENABLE_V1_MULTIPROCESSING", *INT8_ALL)}
        env["VLLM_PLUGINS"] = "bitcpm" if plugin else ""
        env.update(options)
        if in_process:
            env.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", **model_threads_env(threads)})
        else:
            env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # apply_model(_threads) crosses processes
        if policy:
            env["OMP_WAIT_POLICY"] = policy
        out = subprocess.run([sys.executable, __file__, "--child", model, str(max_logprobs),
                              "compile" if args.compile else "eager"], env=env,
                             capture_output=True, text=True, timeout=900)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{label}: no result\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        result = json.loads(line[7:])
        if threads is not None and result["model_threads"] != threads:
            raise SystemExit(f"{label}: the model ran {result['model_threads']} threads, not {threads}")
        ms = result["ms_per_token"]
        rounds.setdefault(label, []).append(
            {"case": label, "model_threads": result["model_threads"], "in_process": in_process,
             "omp_wait_policy": policy, "max_logprobs": max_logprobs, "options": options, "ms_per_token": ms,
             "tok_per_s": 1000 / ms})
        tqdm.write(f"{label}: {result['model_threads']} model threads, {1000 / ms:.1f} tok/s")
    rows = []
    for label, runs in rounds.items():
        median = statistics.median_low([r["ms_per_token"] for r in runs])
        row = next(r for r in runs if r["ms_per_token"] == median)
        rows.append({**row, "rounds_ms_per_token": [r["ms_per_token"] for r in runs]})
    print(f"\n| case | model threads | ms/token | tok/s (median of {args.repeat}) |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['model_threads']} | {r['ms_per_token']:.2f} | {r['tok_per_s']:.1f} |")
    name = "thread_scaling" + ("-compile" if args.compile else "") + (
        "-subset" if args.only or args.repeat > 1 else "") + ".json"
    path = RESULTS_DIR / name
    path.write_text(json.dumps({"model": model, "machine": machine(), "only": args.only, "repeat": args.repeat,
                                "engine": "torch.compile" if args.compile else "eager",
                                "rows": rows}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        _child(sys.argv[2], int(sys.argv[3]), sys.argv[4] == "compile")
    else:
        main()
