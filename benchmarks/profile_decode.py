"""Where one decode step's time goes: torch.profiler over batch-N decode in a real vLLM engine.

    .venv/bin/python benchmarks/profile_decode.py                    # plugin, 1 thread, batch 1
    .venv/bin/python benchmarks/profile_decode.py --stock --batch 10 --threads 2
    .venv/bin/python benchmarks/profile_decode.py --prefill 252      # one 252-token prefill instead
    .venv/bin/python benchmarks/profile_decode.py --sides plugin-int8 --compile   # one side, as served

Not a benchmark (profiling slows every op); it answers "what should be optimised next" by
printing the ops that take the most self CPU time per decode step, grouped by op name. The engine
runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so the profiler sees the model's ops.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from engine_sides import (SIDES, add_model_arguments, apply_isa_mode, engine_settings, model_threads_env,
                              resolve_model)

    from vllm_bitcpm.testing.sidebyside import child_env

    add_model_arguments(parser)
    parser.set_defaults(sides=None)  # one side here: --sides SIDE (default plugin), --stock = --sides stock
    parser.add_argument("--stock", action="store_true", help="profile stock vLLM (plugin disabled)")
    parser.add_argument("--threads", type=int, default=1, help="model OpenMP threads, pinned")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=32, help="decode steps profiled")
    parser.add_argument("--prefill", type=int, metavar="TOKENS",
                        help="profile one prefill of a TOKENS-long prompt per sequence (max_tokens=1) instead")
    parser.add_argument("--rows", type=int, default=25, help="ops listed")
    args = parser.parse_args()
    side = "stock" if args.stock else (args.sides or ["plugin"])[0]
    if args.sides and (len(args.sides) != 1 or (args.stock and side != "stock")):
        parser.error("profile_decode.py profiles one side: --sides SIDE (or --stock)")
    _, plugin_on, side_env, side_settings = next(entry for entry in SIDES if entry[0] == side)
    # The side's environment as its engine child would get it (sidebyside.child_env); the engine
    # runs in this process, so a side's PYTHONPATH (zentorch's site) also goes on sys.path.
    os.environ.update(child_env(plugin_on, side_env))
    sys.path[:0] = [p for p in side_env.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.update(model_threads_env(args.threads))  # before torch starts OpenMP (AVX2 mode imports it early)
    apply_isa_mode(args)
    model = resolve_model(args)
    settings = engine_settings(args)
    settings.update(side_settings)
    settings["max_logprobs"] = 20

    import torch
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, **settings)
    assert torch.get_num_threads() == args.threads, (torch.get_num_threads(), args.threads)
    prompts = [{"prompt_token_ids": [100 + i, 200 + i, 300 + i, 400 + i]} for i in range(args.batch)]
    warm = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    llm.generate(prompts, warm, use_tqdm=False)

    steps = 1 if args.prefill else args.tokens + 1
    if args.prefill:  # fresh random-ish prompts (prefix caching is off), one step each
        prompts = [{"prompt_token_ids": [(7 * i + 13 * j) % 30000 + 3 for j in range(args.prefill)]}
                   for i in range(args.batch)]
        llm.generate(prompts, SamplingParams(max_tokens=1), use_tqdm=False)  # this prompt length once
    params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
    walls = []  # the same work unprofiled: what a step really takes, profiler overhead aside
    for _ in range(2):
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        walls.append(time.perf_counter() - start)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        llm.generate(prompts, params, use_tqdm=False)
    events = prof.key_averages()
    total_us = sum(e.self_cpu_time_total for e in events)
    what = f"prefill of {args.prefill} tokens" if args.prefill else f"{steps} steps"
    mode = "compiled" if args.compile else "eager"
    print(f"\n{side} ({settings['dtype']}, {mode}): batch {args.batch}, {args.threads} thread(s), "
          f"{what}, {total_us / steps / 1000:.2f} ms self CPU per step (profiled)")
    print(f"{min(walls) / steps * 1000:.2f} ms wall per step unprofiled (min of 2 runs; includes the engine's "
          "scheduling, sampling and output handling)")
    calls = sum(e.count for e in events) / steps
    print(f"{calls:.0f} op calls per step (VLLM_BITCPM_FUSED_CPU_OPS={os.environ.get('VLLM_BITCPM_FUSED_CPU_OPS', 'auto')})")
    print(f"{'op':60s} {'calls/step':>10s} {'ms/step':>8s} {'share':>6s}")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.rows]:
        print(f"{e.key[:60]:60s} {e.count / steps:10.1f} {e.self_cpu_time_total / steps / 1000:8.3f} "
              f"{e.self_cpu_time_total / total_us:6.1%}")


if __name__ == "__main__":
    main()
