"""Batch-1 decode vs model threads, OpenMP wait policy and max_logprobs: stock vs bitcpm.

    .venv/bin/python benchmarks/thread_scaling.py            # synthetic BitCPM4-0.5B shape

Why: on a small VM the second model thread gives little end to end (the kernels scale, the
Python and single-threaded ops between them do not; the OpenMP wait policy decides what the idle
thread does meanwhile), and the report's accuracy engines allow full-vocabulary log-probs
(max_logprobs=-1) while its throughput engines do not. Each case is one child process with one in-process engine; decode ms/token =
(time for 65 new tokens - time for 1) / 64, best of 3. JSON in benchmarks/results/.
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

#: (label, plugin on, threads bind, OMP_WAIT_POLICY or None, max_logprobs)
CASES = [
    ("stock, 1 thread", False, "0", None, 20),
    ("stock, 2 threads", False, "0,1", None, 20),
    ("bitcpm, 1 thread", True, "0", None, 20),
    ("bitcpm, 2 threads", True, "0,1", None, 20),
    ("bitcpm, 2 threads, OMP_WAIT_POLICY=ACTIVE", True, "0,1", "ACTIVE", 20),
    ("bitcpm, 2 threads, OMP_WAIT_POLICY=PASSIVE", True, "0,1", "PASSIVE", 20),
    ("bitcpm, 1 thread, max_logprobs=-1", True, "0", None, -1),
]


def _child(model: str, max_logprobs: int) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype="bfloat16", trust_remote_code=True, enforce_eager=True,
              enable_prefix_caching=False, max_model_len=1024, max_num_seqs=16, max_logprobs=max_logprobs,
              kv_cache_memory_bytes=2**30, gpu_memory_utilization=0.05)
    prompt = [{"prompt_token_ids": [100, 200, 300, 400]}]

    def seconds(n: int) -> float:
        start = time.perf_counter()
        llm.generate(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - start

    seconds(8)
    first = min(seconds(1) for _ in range(3))
    total = min(seconds(65) for _ in range(3))
    print("RESULT " + json.dumps({"ms_per_token": (total - first) / 64 * 1000}), flush=True)


def main() -> None:
    from tqdm import tqdm

    from engine_sides import RESULTS_DIR, machine, resolve_model

    class Args:
        model, synthetic, checkpoints = None, "bitcpm4-0.5b", "checkpoints"

    model = resolve_model(Args)
    rows = []
    for label, plugin, bind, policy, max_logprobs in tqdm(CASES, unit="engine"):
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_PLUGINS": "bitcpm" if plugin else "",
               "VLLM_CPU_OMP_THREADS_BIND": bind}
        env.pop("OMP_WAIT_POLICY", None)
        if policy:
            env["OMP_WAIT_POLICY"] = policy
        out = subprocess.run([sys.executable, __file__, "--child", model, str(max_logprobs)], env=env,
                             capture_output=True, text=True, timeout=900)
        line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            raise SystemExit(f"{label}: no result\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        ms = json.loads(line[7:])["ms_per_token"]
        rows.append({"case": label, "threads_bind": bind, "omp_wait_policy": policy,
                     "max_logprobs": max_logprobs, "ms_per_token": ms, "tok_per_s": 1000 / ms})
    print("\n| case | ms/token | tok/s |\n|---|---:|---:|")
    for r in rows:
        print(f"| {r['case']} | {r['ms_per_token']:.2f} | {r['tok_per_s']:.1f} |")
    path = RESULTS_DIR / "thread_scaling.json"
    path.write_text(json.dumps({"model": model, "machine": machine(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        _child(sys.argv[2], int(sys.argv[3]))
    else:
        main()
