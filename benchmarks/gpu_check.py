"""GPU check: does installing vllm-bitcpm keep a GPU at least as fast and as accurate as stock vLLM?

    python benchmarks/gpu_check.py                      # on a CUDA / ROCm / XPU machine with vLLM
    python benchmarks/gpu_check.py --smoke --cpu        # the same code on CPU, tiny model (CI)

On a device without a native ternary kernel the plugin repacks each ternary layer to 4-bit
``uint4b8`` and runs it through vLLM's own mixed-precision kernel (Marlin, Machete, ... chosen by
vLLM; see vllm_bitcpm/backends.py), or leaves it dense. This runs stock vLLM and vLLM + bitcpm on a
synthetic BitCPM4-0.5B-shaped checkpoint, one engine per side (benchmarks/engine_sides.py), and
records: which kernel the plugin chose (its load log), next-token agreement with stock and with the
float32 reference on the report's 7 prompts (benchmarks/accuracy.py), decode tok/s at batch 1 and
16, 252-token prefill tok/s, and weight memory (benchmarks/throughput.py's measurements).

Writes benchmarks/results/gpu_check.json and gpu_check.md (--smoke: results/smoke/). ``--cpu``
runs on CPU, with the plugin side on ``--backend`` (default int4, the path GPUs take), so CI
exercises this script; its timings say nothing about GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# Like report.py, this composes accuracy.py and throughput.py (both measured on the same engines).
import accuracy  # noqa: E402
import throughput  # noqa: E402
from engine_sides import (  # noqa: E402
    RESULTS_DIR, SIDE_LABELS, add_model_arguments, engine_settings, first_engine_info, flat_metrics, machine,
    resolve_model, run_sides, write_json,
)

BATCH = 16
SMOKE = {"synthetic": "tiny", "batch_max_tokens": [4], "single_max_tokens": 4, "decode_tokens": 4, "repeats": 1,
         "kv_cache_gib": 1 / 16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    accuracy.add_arguments(parser)
    throughput.add_arguments(parser)
    parser.add_argument("--cpu", action="store_true", help="run on CPU (tests this script; not a GPU figure)")
    parser.add_argument("--backend", default=None,
                        help="VLLM_BITCPM_BACKEND of the plugin side (default: auto on a GPU, int4 with --cpu)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, few tokens: " + json.dumps(SMOKE))
    parser.add_argument("--results-dir")
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            if key != "synthetic" or not args.model:
                setattr(args, key, value)
    args.sides = ["stock", "plugin"]
    args.llama_cpp = "no"
    args.backend = args.backend or ("int4" if args.cpu else "auto")
    args.results_dir = Path(args.results_dir or (RESULTS_DIR / "smoke" if args.smoke else RESULTS_DIR))
    return args


def device_or_exit(allow_cpu: bool) -> str:
    """The vLLM platform's device type; exits with the reason when it is a CPU and --cpu was not given."""
    from vllm.platforms import current_platform

    device = current_platform.device_type
    if current_platform.is_cpu() and not allow_cpu:
        raise SystemExit("gpu_check.py: vLLM found no GPU on this machine (platform: cpu), so nothing was "
                         "measured; run it where vLLM sees a GPU (or pass --cpu to test the script itself)")
    return device


def greedy_agreement(acc: dict) -> dict:
    """Next-token argmax of the plugin vs stock and vs the reference, per prompt."""
    rows = {side: c.get("per_prompt", []) for side, c in acc["candidates"].items()}
    stock, plugin = rows.get("stock", []), rows.get("plugin", [])
    same = [a["cand_top1_id"] == b["cand_top1_id"] for a, b in zip(stock, plugin)]
    return {"plugin_equals_stock": sum(same), "prompts": len(same),
            "plugin_equals_reference": sum(r["top1_match"] for r in plugin),
            "stock_equals_reference": sum(r["top1_match"] for r in stock)}


def run(args) -> dict:
    from tqdm import tqdm

    device = device_or_exit(args.cpu)
    os.environ["VLLM_BITCPM_BACKEND"] = args.backend  # read by the plugin side's engine (stock ignores it)
    model = resolve_model(args)
    settings = engine_settings(args, full_vocab_logprobs=True)
    inputs = accuracy.prepare(args, model, settings["max_model_len"])
    ref_logits, ref_nll = accuracy.reference_for(args, model, inputs, settings["max_model_len"])
    spec = {**throughput.measure_spec(args, throughput.model_vocab(model)), "batch": BATCH}
    with tqdm(total=len(args.sides), unit="engine", desc="engines") as bar:
        sides = run_sides(model, settings, {"accuracy": inputs.engine_spec(), "throughput": spec}, args.sides,
                          threads=1, progress=bar)
    info = {**machine(first_engine_info(sides)), "device": device}
    acc = accuracy.assemble(model, settings, args, inputs, ref_logits, sides, info, ref_nll)
    tp = throughput.assemble(model, settings, spec, {"1": {s: flat_metrics(r) for s, r in sides.items()}},
                             info)
    return {"kind": "bitcpm-gpu-check", "device": device, "cpu_stand_in": args.cpu, "smoke": args.smoke,
            "plugin_backend": args.backend, "model": model, "command": " ".join(["python", *sys.argv]),
            "plugin_kernels": sides.get("plugin", {}).get("plugin_log"), "greedy": greedy_agreement(acc),
            "accuracy": acc, "throughput": tp}


def markdown(result: dict) -> str:
    tp = result["throughput"]
    runs = tp["runs"]["1"]
    keys = ["decode_b1_tok_per_s", f"decode_b{BATCH}_tok_per_s", "prefill_tok_per_s", "weight_gib",
            "linear_weight_mib"]
    labels = {k: (label, fmt) for k, label, fmt in throughput.metric_rows(tp["spec"])}
    lines = [f"# GPU check: {Path(result['model']).name} on {result['device']}"
             + (" (CPU stand-in: not a GPU figure)" if result["cpu_stand_in"] else ""), "",
             f"- Plugin side: VLLM_BITCPM_BACKEND={result['plugin_backend']}; its load log: "
             f"`{result['plugin_kernels'] or '-'}`",
             f"- Next token (argmax) on {result['greedy']['prompts']} prompts: plugin = stock "
             f"{result['greedy']['plugin_equals_stock']}, plugin = reference {result['greedy']['plugin_equals_reference']}, "
             f"stock = reference {result['greedy']['stock_equals_reference']}",
             f"- Run: `{result['command']}`", "",
             "| metric | " + " | ".join(SIDE_LABELS[s] for s in runs) + " | plugin / stock |",
             "|" + "---|" * (len(runs) + 2)]
    for key in keys:
        label, fmt = labels[key]
        values = [runs[s].get(key) for s in runs]
        ratio = (f"{values[1] / values[0]:.2f}x" if len(values) == 2 and None not in values and values[0] else "-")
        lines.append(f"| {label} | " + " | ".join("-" if v is None else fmt.format(v) for v in values) + f" | {ratio} |")
    return "\n".join([*lines, "", accuracy.summary_table(result["accuracy"], with_published=False)]) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    result = run(args)
    name = "gpu_check-cpu" if args.cpu else "gpu_check"
    write_json(args.results_dir / f"{name}.json", result, default=str)
    text = markdown(result)
    (args.results_dir / f"{name}.md").write_text(text)
    print(text)
    print(f"wrote {args.results_dir / (name + '.json')}, {args.results_dir / (name + '.md')}")


if __name__ == "__main__":
    main()
