"""Newcomer demo: load a BitCPM model through vLLM with the plugin, show the packing, generate.

    python -m vllm_bitcpm.demo                      # the trained tiny model that ships with the package
    python -m vllm_bitcpm.demo openbmb/BitCPM4-0.5B # or any local path / hub id
    python -m vllm_bitcpm.demo --synthetic          # a random synthetic checkpoint (gibberish text)
    python -m vllm_bitcpm.demo --train              # retrain the tiny model locally (15-35 min on 2 cores) and use it

The plugin is picked up through its entry point, exactly as in ``vllm serve``; nothing here
enables it. The shipped model (vllm_bitcpm/data: a ternary QAT MiniCPM trained on Python's own
documentation, packed to 2 bits) writes readable, Python-docs-like text.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile

from vllm_bitcpm.testing.qat_training import DEFAULT_CHECKPOINT

SYNTHETIC_PROMPT = "The capital of France is"
TRAINED_PROMPT = "The for statement is used to"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="local checkpoint or hub id (default: the trained tiny model "
                                                 "shipped with the package)")
    parser.add_argument("--trained", help=f"a locally trained tiny model to use (with --train: where to train it; "
                                          f"default {DEFAULT_CHECKPOINT})")
    parser.add_argument("--train", action="store_true", help="train the tiny model into --trained if missing, use it")
    parser.add_argument("--synthetic", action="store_true", help="a random synthetic checkpoint instead (its text is gibberish)")
    parser.add_argument("--shape", default="small", help="synthetic shape: tiny, small, bitcpm4-0.5b")
    parser.add_argument("--prompt", help=f"default: {TRAINED_PROMPT!r} for the trained model, else {SYNTHETIC_PROMPT!r}")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)

    # One process and a small KV cache: seconds to start on a laptop CPU.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    with contextlib.ExitStack() as cleanup:
        model, synthetic_weights = args.model, False
        if model is None and not args.synthetic:
            if args.train or args.trained:
                from vllm_bitcpm.testing.qat_training import ensure_trained, read_record

                trained = args.trained or DEFAULT_CHECKPOINT
                if args.train:
                    ensure_trained(trained)
                if read_record(trained) is not None:
                    model = trained
                    print(f"demo: the trained ternary model in {model} (trained locally)")
                else:
                    print(f"demo: no trained model in {trained} (`python -m vllm_bitcpm.demo --train` trains one, "
                          "15-35 min once on 2 cores); using random synthetic weights, whose text is gibberish")
            else:
                from vllm_bitcpm.data import tiny_model_path

                model = tiny_model_path()
                print(f"demo: the trained tiny ternary model shipped with the package ({model})")
            if model is not None:
                args.prompt = args.prompt or TRAINED_PROMPT
        if model is None:
            from vllm_bitcpm.testing import synthetic

            synthetic_weights = True
            # Removed on exit, error or not: the demo leaves nothing behind.
            scratch = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="bitcpm-demo-"))
            model = os.path.join(scratch, f"synthetic-{args.shape}")
            print(f"demo: writing a synthetic BitCPM checkpoint ({args.shape}) to {model} (removed at exit)")
            synthetic.write_checkpoint(model, shape=args.shape, granularity="per_row")
        _run(model, args, synthetic_weights)


def _run(model: str, args, synthetic_weights: bool) -> None:
    """Load ``model`` through vLLM (the plugin comes in by its entry point), report packing, generate."""
    prompt = args.prompt or SYNTHETIC_PROMPT
    from vllm import LLM, SamplingParams

    from vllm_bitcpm.testing.sidebyside import inspect_linear_layers

    llm = LLM(
        model=model,
        dtype=args.dtype,
        enforce_eager=True,
        kv_cache_memory_bytes=256 * 1024 * 1024,
        gpu_memory_utilization=0.05,
        max_model_len=4096,
    )
    (layers, *_) = llm.apply_model(inspect_linear_layers)
    total = layers["packed_layers"] + layers["dense_layers"]
    bits = layers["bits_per_packed_weight"]
    print(
        f"\ndemo: {layers['packed_layers']}/{total} linear layers packed ternary"
        + (f" at {bits:.3f} bits/weight" if bits else "")
        + f"; packed linear weights {layers['packed_bytes'] / 2**20:.1f} MiB,"
        f" dense linear weights {layers['dense_bytes'] / 2**20:.1f} MiB"
    )
    # Random synthetic weights may pick the end-of-sequence token first; show tokens anyway.
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=synthetic_weights)
    (output,) = llm.generate([prompt], params, use_tqdm=False)
    print(f"demo: prompt:     {prompt!r}\ndemo: generation: {output.outputs[0].text!r}")


if __name__ == "__main__":
    main()
