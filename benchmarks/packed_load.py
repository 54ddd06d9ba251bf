"""Convert once, serve small: checkpoint size and engine-load peak RSS, fake-quantized vs packed.

    .venv/bin/python benchmarks/packed_load.py                 # synthetic BitCPM4-0.5B shape
    .venv/bin/python benchmarks/packed_load.py --model PATH    # a fake-quantized BitCPM checkpoint

Converts the checkpoint with `vllm-bitcpm convert` (timed), then loads each version in its own
fresh process through vLLM + plugin and records the process's peak RSS after the engine is up
(VmHWM, read before any request), the RSS then, the load time, and one greedy step, so the two loads are compared on equal terms.
JSON to benchmarks/results/packed_load.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def vm_hwm_mib() -> float:
    """Peak RSS of this process image. Not ru_maxrss: Linux carries that over from the parent
    across fork + exec, so a child started after the conversion would report the converter's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child() -> None:
    from vllm import LLM, SamplingParams

    from vllm_bitcpm.testing.sidebyside import emit_result, inspect_linear_layers, read_payload

    spec = read_payload()
    started = time.perf_counter()
    # Small batches: vLLM's warm-up forward otherwise dominates peak RSS (activations and
    # logits for max_num_batched_tokens tokens), hiding the weights this benchmark compares.
    llm = LLM(model=spec["model"], dtype="bfloat16", enforce_eager=True, kv_cache_memory_bytes=64 * 2**20,
              gpu_memory_utilization=0.05, max_model_len=256, max_num_batched_tokens=256, max_num_seqs=4,
              trust_remote_code=True)
    load_seconds = time.perf_counter() - started
    import psutil

    peak_rss_mib = vm_hwm_mib()  # before any request
    rss_after_load_mib = psutil.Process().memory_info().rss / 2**20
    (out,) = llm.generate([{"prompt_token_ids": [1, 2000, 3000, 4000]}],
                          SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False)
    (layers, *_) = llm.apply_model(inspect_linear_layers)
    emit_result({"load_seconds": load_seconds, "peak_rss_mib": peak_rss_mib, "rss_after_load_mib": rss_after_load_mib,
                 "tokens": list(out.outputs[0].token_ids), "layers": layers})


def dir_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help="fake-quantized checkpoint directory (default: synthetic --shape)")
    parser.add_argument("--shape", default="bitcpm4-0.5b")
    parser.add_argument("--checkpoints", default="checkpoints")
    parser.add_argument("--out", default=str(HERE / "results" / "packed_load.json"))
    args = parser.parse_args()
    if args.child:
        return child()

    from engine_sides import machine, write_json

    from vllm_bitcpm import packed_checkpoint
    from vllm_bitcpm.testing import synthetic
    from vllm_bitcpm.testing.sidebyside import run_child

    source = Path(args.model or Path(args.checkpoints) / f"synthetic-{args.shape}")
    if args.model is None and not (source / "config.json").exists():
        synthetic.write_checkpoint(source, shape=args.shape, granularity="per_row", progress=True)
    packed = source.with_name(source.name + "-packed")
    started = time.perf_counter()
    summary = packed_checkpoint.convert(str(source), packed, overwrite=True, progress=False)
    convert_seconds = time.perf_counter() - started

    loads = {}
    for label, path in (("fake-quantized bf16", source), ("packed", packed)):
        print(f"loading {label} ({path}) ...", flush=True)
        loads[label], _ = run_child([sys.executable, __file__, "--child"], {"model": str(path)}, plugin=True)
    same = loads["packed"]["tokens"] == loads["fake-quantized bf16"]["tokens"]
    print("\n| checkpoint | on disk (MiB) | engine load (s) | peak RSS during load (MiB) | RSS after load (MiB) |")
    print("|---|---|---|---|---|")
    for label, path in (("fake-quantized bf16", source), ("packed", packed)):
        r = loads[label]
        print(f"| {label} | {dir_mib(path):.1f} | {r['load_seconds']:.1f} | {r['peak_rss_mib']:.0f} | {r['rss_after_load_mib']:.0f} |")
    print(f"\nconvert: {convert_seconds:.1f} s; greedy tokens identical: {same}")
    result = {"source": str(source), "packed": str(packed), "convert_seconds": convert_seconds,
              "convert_summary": summary, "disk_mib": {"fake-quantized bf16": dir_mib(source), "packed": dir_mib(packed)},
              "loads": loads, "identical_tokens": same, "machine": machine(),
              "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
