"""The big family members end to end on this machine: convert's memory, 3B side by side, 8B vs its ceiling.

    .venv/bin/python benchmarks/big_shapes.py                               # 3B and 8B (~22 GB of checkpoints, once)
    .venv/bin/python benchmarks/big_shapes.py --shapes bitcpm-cann-3b
    .venv/bin/python benchmarks/big_shapes.py --smoke                       # CI: the tiny shape, same steps

Per shape (synthetic BitCPM-CANN shapes at full depth, vllm_bitcpm.testing.synthetic):

1. the fake-quantized bf16 checkpoint, written shard by shard (cached under --checkpoints);
2. ``vllm-bitcpm convert`` in a child: wall time and peak memory, sampled from /proc (anonymous
   memory, which the converter allocates, and file pages, which the kernel can drop; the
   converter copies tensors out with positioned reads, so it maps no shard) and the kernel's
   own high-water mark, beside the bound it should respect: one source shard + one output
   shard + one layer;
3. engines (benchmarks/engine_sides.py, one child each, eager, bf16): stock vLLM on the
   fake-quantized checkpoint where its weights fit in this machine's memory (else the JSON says
   why not), vLLM + bitcpm on the packed one: decode tok/s at batch 1 and 4, prefill of a
   252-token prompt, weight memory, peak RSS;
4. each side's batch-1 decode against its memory-bandwidth ceiling: bytes a decode step must
   read (every linear weight and the head, not the embedding rows of an untied model) divided by
   this machine's measured read bandwidth at the same thread count.

Writes benchmarks/results/big_shapes.json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from engine_sides import (  # noqa: E402
    PREFILL_TOKENS, RESULTS_DIR, available_threads, engine_settings, flat_metrics, isa_class, machine, machine_name,
    run_sides, write_json,
)

SHAPES = ("bitcpm-cann-3b", "bitcpm-cann-8b")
#: Small workloads: a 3B/8B decode step takes a second or more on 2 cores.
SPEC = {"batch_max_tokens": [16], "single_max_tokens": 16, "decode_tokens": 2, "prompt_tokens": 16,
        "prefill_tokens": PREFILL_TOKENS, "batch": 4, "repeats": 1}
SMOKE_SPEC = {**SPEC, "batch_max_tokens": [4], "single_max_tokens": 4}
#: Memory left for the engine beyond its weights (KV cache, activations, Python, vLLM) before stock is tried.
HEADROOM_BYTES = 4 * 2**30


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--checkpoints", default="checkpoints", help="cache of the synthetic and packed checkpoints")
    parser.add_argument("--threads", type=int, default=available_threads())
    parser.add_argument("--granularity", default="per_group", choices=["per_row", "per_group"])
    parser.add_argument("--no-stock", action="store_true", help="plugin side only")
    parser.add_argument("--reuse-engines", action="store_true",
                        help="measure checkpoints and conversions only; keep each shape's engine figures from --out")
    parser.add_argument("--smoke", action="store_true", help="CI: the tiny shape, tiny workloads, small shards")
    parser.add_argument("--out", default=str(RESULTS_DIR / "big_shapes.json"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.shapes = ["tiny"]
    return args


# --------------------------------------------------------------------------------------------
# Checkpoints and the converter's memory


def source_checkpoint(args, shape: str) -> Path:
    """The fake-quantized checkpoint of ``shape``, written once, shard by shard."""
    from vllm_bitcpm.testing import synthetic

    path = Path(args.checkpoints) / f"synthetic-{shape}-{args.granularity}"
    if not (path / "config.json").exists():
        print(f"writing synthetic {shape} checkpoint to {path}", flush=True)
        shard = 400_000 if args.smoke else synthetic.DEFAULT_SHARD_BYTES
        synthetic.write_checkpoint(path, shape=shape, granularity=args.granularity, group_size=128, progress=True,
                                   overwrite=True, shard_bytes=shard)
    return path


def _proc_status_kib(pid: int, keys: tuple[str, ...]) -> dict[str, int]:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    values = {}
    for line in lines:
        key, _, rest = line.partition(":")
        if key in keys:
            values[key] = int(rest.split()[0])
    return values


def run_measuring_memory(command: list[str]) -> dict:
    """Run ``command``; its wall time, exit code and peak memory (sampled every 50 ms, plus VmHWM)."""
    peaks = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0, "VmHWM": 0}
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for key, value in _proc_status_kib(proc.pid, tuple(peaks)).items():
                peaks[key] = max(peaks[key], value)
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    done.set()
    sampler.join()
    return {"returncode": proc.returncode, "seconds": time.perf_counter() - started,
            "peak_anon_bytes": peaks["RssAnon"] * 1024, "peak_file_bytes": peaks["RssFile"] * 1024,
            "peak_rss_bytes": peaks["VmRSS"] * 1024, "vm_hwm_bytes": peaks["VmHWM"] * 1024,
            "stdout_tail": stdout[-2000:], "stderr_tail": stderr[-2000:]}


def _largest_tensor_bytes(path: Path) -> int:
    """From the safetensors headers (u64 length + JSON), without reading any tensor."""
    import struct

    largest = 0
    for file in sorted(path.glob("*.safetensors")):
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, info in header.items():
            if name != "__metadata__":
                largest = max(largest, info["data_offsets"][1] - info["data_offsets"][0])
    return largest


def convert_measured(args, source: Path) -> tuple[Path, dict]:
    """Convert ``source`` in a child (unless cached) and measure it; the packed path and the figures."""
    packed = Path(args.checkpoints) / f"{source.name}-packed"
    record = packed / "convert_measurement.json"
    if record.exists():
        return packed, json.loads(record.read_text())
    command = [sys.executable, "-m", "vllm_bitcpm.cli", "convert", str(source), str(packed), "--overwrite", "--quiet"]
    if args.smoke:
        command += ["--max-shard-gib", "0.0002"]
    print(f"converting {source} -> {packed} (measuring its memory)", flush=True)
    result = run_measuring_memory(command)
    if result["returncode"] != 0:
        raise SystemExit(f"convert failed: {result['stderr_tail']}")
    source_shards = [f.stat().st_size for f in source.glob("*.safetensors")]
    packed_shards = [f.stat().st_size for f in packed.glob("*.safetensors")]
    largest_layer = _largest_tensor_bytes(source)
    result.update({
        "source_bytes": sum(source_shards), "source_shards": len(source_shards),
        "largest_source_shard_bytes": max(source_shards), "packed_bytes": sum(packed_shards),
        "packed_shards": len(packed_shards), "largest_packed_shard_bytes": max(packed_shards),
        "largest_tensor_bytes": largest_layer,
        "bound_bytes": max(source_shards) + max(packed_shards) + largest_layer,
    })
    record.write_text(json.dumps(result, indent=2) + "\n")
    return packed, result


# --------------------------------------------------------------------------------------------
# Bandwidth ceiling


def read_bandwidth(threads: int, gib: float = 1.0) -> float:
    """Bytes per second a ``sum`` over a buffer far larger than the caches reads (best of 5)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        buffer = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            buffer.sum()
            best = min(best, time.perf_counter() - t0)
        return buffer.numel() * 4 / best
    finally:
        torch.set_num_threads(previous)


def decode_bytes(weights: dict, config: dict) -> int:
    """Bytes one decode step reads: all weights, less an untied embedding (only one row is read)."""
    total = weights["total_bytes"]
    if not config.get("tie_word_embeddings", True):
        total -= config["vocab_size"] * config["hidden_size"] * 2
    return total


# --------------------------------------------------------------------------------------------


def measure_shape(args, shape: str, bandwidth: float, previous: dict | None = None) -> dict:
    source = source_checkpoint(args, shape)
    packed, conversion = convert_measured(args, source)
    if previous is not None:
        # The engines stay as measured; the conversion says where and when it ran instead.
        conversion.update(time=time.strftime("%Y-%m-%dT%H:%M:%S"), machine=machine())
        return {**previous, "conversion": conversion}
    config = json.loads((source / "config.json").read_text())
    settings = {**engine_settings(argparse.Namespace(dtype="bfloat16", trust_remote_code=True, compile=False,
                                                     kv_cache_gib=0.25, gpu_memory_utilization=None)),
                "max_num_seqs": 4}
    spec = {**(SMOKE_SPEC if args.smoke else SPEC), "vocab": config["vocab_size"]}
    from psutil import virtual_memory

    available = virtual_memory().available
    sides = {"plugin": packed}
    stock_skipped = None
    if args.no_stock:
        stock_skipped = "--no-stock"
    elif conversion["source_bytes"] + HEADROOM_BYTES > available:
        stock_skipped = (f"stock bf16 weights {conversion['source_bytes'] / 2**30:.1f} GiB + "
                         f"{HEADROOM_BYTES / 2**30:.0f} GiB headroom > {available / 2**30:.1f} GiB available memory")
    else:
        sides = {"stock": source, **sides}
    results = {}
    for side, model in sides.items():
        print(f"{shape}: {side} engine on {model}", flush=True)
        (result,) = run_sides(str(model), settings, {"throughput": spec}, [side], args.threads).values()
        flat = flat_metrics(result)
        # One decode token after a single 252-token prefill is a difference of two noisy seconds-long
        # timings at these sizes: not a measurement, so it is left out.
        flat.pop("long_prompt_decode_ms_per_token", None)
        if "error" not in flat:
            flat["decode_bytes_per_token"] = decode_bytes(result["weights"], config)
            flat["bandwidth_ceiling_tok_per_s"] = bandwidth / flat["decode_bytes_per_token"]
            flat["fraction_of_ceiling"] = (flat["decode_b1_tok_per_s"] or 0) / flat["bandwidth_ceiling_tok_per_s"]
        results[side] = {**flat, "engine_platform": result.get("engine_platform")}
    return {"shape": shape, "config": {k: config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                               "vocab_size", "tie_word_embeddings") if k in config},
            "conversion": conversion, "sides": results, "stock_skipped": stock_skipped,
            "memory_available_bytes": available}


def _measured_on(conversion: dict) -> str:
    """Where a conversion ran when a --reuse-engines run measured it apart from the engines."""
    m = conversion.get("machine")
    if not m:
        return "the engines' machine"
    return f"{conversion['time'][:10]}, {m['cpu']}, {m['cores']} cores, {isa_class(m)}"


def markdown(result: dict) -> str:
    gib = 2**30
    lines = [f"Machine: {machine_name(result['machine'])}; {result['threads']} model thread(s); read bandwidth "
             f"{result['read_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s (torch sum over 1 GiB, same threads)", "",
             "**Converter memory** (`vllm-bitcpm convert`, streaming):", "",
             "| shape | source (GiB, shards) | packed (GiB, shards) | time (s) | peak anon. RSS (GiB) | peak RSS incl. "
             "mapped file pages (GiB) | bound: source shard + packed shard + layer (GiB) | measured on |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["shapes"]:
        c = r["conversion"]
        lines.append(f"| {r['shape']} | {c['source_bytes'] / gib:.2f} ({c['source_shards']}) | "
                     f"{c['packed_bytes'] / gib:.2f} ({c['packed_shards']}) | {c['seconds']:.0f} | "
                     f"{c['peak_anon_bytes'] / gib:.2f} | {c['vm_hwm_bytes'] / gib:.2f} | {c['bound_bytes'] / gib:.2f} | "
                     f"{_measured_on(c)} |")
    lines += ["", "**Engines** (eager, bf16; decode-only tok/s; ceiling = read bandwidth / bytes per decode step):", "",
              "| shape | side | decode b1 (tok/s) | decode b4 (tok/s) | prefill 252 (tok/s) | weights (GiB) | "
              "peak RSS (GiB) | bytes per step (GiB) | ceiling (tok/s) | b1 / ceiling |",
              "|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(value, pattern):
        return "-" if value is None else pattern.format(value)

    for r in result["shapes"]:
        for side, s in r["sides"].items():
            if "error" in s:
                lines.append(f"| {r['shape']} | {side} | failed: {s['error'][:120]} |||||||||")
                continue
            lines.append(
                f"| {r['shape']} | {side} | {fmt(s['decode_b1_tok_per_s'], '{:.2f}')} | "
                f"{fmt(s.get('decode_b4_tok_per_s'), '{:.2f}')} | {fmt(s['prefill_tok_per_s'], '{:.1f}')} | "
                f"{s['weight_gib']:.2f} | {fmt(s.get('peak_rss_gib'), '{:.2f}')} | "
                f"{s['decode_bytes_per_token'] / gib:.2f} | {s['bandwidth_ceiling_tok_per_s']:.2f} | "
                f"{s['fraction_of_ceiling']:.0%} |")
        if r["stock_skipped"]:
            lines.append(f"| {r['shape']} | stock | not run: {r['stock_skipped']} |||||||||")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    previous = {}
    if args.reuse_engines:
        earlier = json.loads(Path(args.out).read_text())
        bandwidth = earlier["read_bandwidth_bytes_per_s"]
        previous = {r["shape"]: r for r in earlier["shapes"]}
    else:
        bandwidth = read_bandwidth(args.threads)
    shapes = [measure_shape(args, shape, bandwidth, previous.get(shape)) for shape in args.shapes]
    engine_info = next((s.get("engine_platform") for r in shapes for s in r["sides"].values()
                        if s.get("engine_platform")), None)
    command = " ".join(["python", "benchmarks/big_shapes.py", *(argv if argv is not None else sys.argv[1:])])
    if args.reuse_engines:
        # Engines keep the machine and run they were measured on; the conversions say where they ran.
        measured = {r["shape"]: r for r in shapes}
        shapes = [measured.pop(r["shape"], r) for r in earlier["shapes"]] + list(measured.values())
        result = {**earlier, "shapes": shapes, "conversions_command": command}
    else:
        result = {"kind": "bitcpm-big-shapes", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": command,
                  "machine": machine(engine_info), "threads": args.threads, "read_bandwidth_bytes_per_s": bandwidth,
                  "spec": SMOKE_SPEC if args.smoke else SPEC, "shapes": shapes}
    print(markdown(result))
    out = write_json(args.out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
