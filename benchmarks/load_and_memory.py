"""Linear-weight memory, bits per weight, load time and a short greedy decode: stock vs plugin.

    .venv/bin/python benchmarks/load_and_memory.py                      # synthetic BitCPM4-0.5B shape
    .venv/bin/python benchmarks/load_and_memory.py --model PATH_OR_HUB_ID

Both sides run in the same invocation (one child process each, see vllm_bitcpm.testing.sidebyside),
on the same prompt token ids. Prints a Markdown table and writes JSON to benchmarks/results/.
The plugin's ternary layers run the op's PyTorch reference kernel until the C++ CPU kernel
lands, so its decode speed here is the reference's, not the target.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint path or hub id (default: synthetic --shape)")
    parser.add_argument("--shape", default="bitcpm4-0.5b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--checkpoints", default="checkpoints", help="where synthetic checkpoints are cached")
    parser.add_argument("--out", default=str(HERE / "results" / "load_and_memory.json"))
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from vllm_bitcpm.testing import synthetic
    from vllm_bitcpm.config import register_config
    from vllm_bitcpm.testing.sidebyside import EngineJob, run_engine_jobs

    model = args.model
    if model is None:
        model = str(Path(args.checkpoints) / f"synthetic-{args.shape}")
        if not (Path(model) / "config.json").exists():
            print(f"writing synthetic {args.shape} checkpoint to {model}")
            synthetic.write_checkpoint(model, shape=args.shape, granularity="per_row", progress=True)
    register_config()
    tokenizer = AutoTokenizer.from_pretrained(model)
    prompt = [tokenizer(synthetic.REPORT_PROMPTS[0]).input_ids]
    job = EngineJob(model=model, prompts=prompt, max_tokens=args.decode_tokens, logprobs=0,
                    dtype=args.dtype, trust_remote_code=True,
                    llm_kwargs={"kv_cache_memory_bytes": 256 * 2**20, "max_model_len": 1024})
    runs = {}
    for side, plugin in (("stock", False), ("plugin", True)):
        print(f"running {side} vLLM on {model} ...", flush=True)
        (runs[side],) = run_engine_jobs([job], plugin=plugin)
        if "error" in runs[side]:
            sys.exit(f"{side} failed: {runs[side]['error']}\n{runs[side]['log'][-3000:]}")

    def row(side: str) -> dict:
        run = runs[side]
        (layers,) = run["layers"]
        linear_bytes = layers["packed_bytes"] + layers["dense_bytes"]
        return {
            "linear_weight_mib": linear_bytes / 2**20,
            "packed_layers": layers["packed_layers"],
            "dense_layers": layers["dense_layers"],
            "bits_per_packed_weight": layers["bits_per_packed_weight"],
            "load_seconds": run["load_seconds"],
            "decode_tok_per_s": args.decode_tokens / run["generate_seconds"],
            "summary_log_line": next((l.split("] ", 1)[-1] for l in run["log"].splitlines()
                                      if "bitcpm: packed" in l), None),
        }

    table = {side: row(side) for side in runs}
    stock, plugin = table["stock"], table["plugin"]
    print("\n| | stock vLLM | vLLM + bitcpm | ratio |\n|---|---|---|---|")
    print(f"| linear weights (MiB) | {stock['linear_weight_mib']:.1f} | {plugin['linear_weight_mib']:.1f} "
          f"| {plugin['linear_weight_mib'] / stock['linear_weight_mib']:.3f}x |")
    print(f"| packed / dense linear layers | {stock['packed_layers']} / {stock['dense_layers']} "
          f"| {plugin['packed_layers']} / {plugin['dense_layers']} | |")
    bits = plugin["bits_per_packed_weight"]
    print(f"| bits per packed weight (incl. scales) | - | {bits:.3f} | |" if bits else "| bits | - | - | |")
    print(f"| engine load (s) | {stock['load_seconds']:.1f} | {plugin['load_seconds']:.1f} | |")
    print(f"| greedy decode, batch 1 (tok/s) | {stock['decode_tok_per_s']:.2f} | {plugin['decode_tok_per_s']:.2f} "
          f"| {plugin['decode_tok_per_s'] / stock['decode_tok_per_s']:.2f}x |")
    print(f"\nplugin log: {plugin['summary_log_line']}")
    from engine_sides import machine, write_json

    result = {"model": model, "dtype": args.dtype, "decode_tokens": args.decode_tokens,
              "machine": machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": table}
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
