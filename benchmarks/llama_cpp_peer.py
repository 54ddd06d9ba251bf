"""llama.cpp's TQ2_0 on the same checkpoint: the peer a user would pick instead of vLLM + bitcpm.

    .venv/bin/python benchmarks/llama_cpp_peer.py [--model PATH | --synthetic SHAPE] [--threads 1] [--isa avx2]
    .venv/bin/python benchmarks/llama_cpp_peer.py --system-info [--isa avx2]

Needs `bash scripts/setup-llama-cpp.sh` (llama-cpp-python built from source, plus an AVX2-only
build of the same llama.cpp for ``--isa avx2``). benchmarks/report.py and throughput.py run it in
the same invocation as the vLLM sides when it is installed.

1. The fake-quantized checkpoint is written as GGUF with the ``gguf`` package, as llama.cpp's own
   ``convert_hf_to_gguf.py --outtype tq2_0`` writes a MiniCPM (arch ``minicpm``: muP scales as
   embedding/residual/logit scale, LongRoPE factors, q/k rows permuted to llama.cpp's rotary
   layout; the synthetic byte-level BPE vocabulary as a ``gpt2`` tokenizer). Linear weights become
   TQ2_0, checked lossless (dequantized == the bf16 source, bit for bit); the tied embedding/head
   stays F16 as that converter leaves it (``--head q8_0``: Q8_0, the peer of the plugin's int8
   head). Cached in a gguf/ folder beside the checkpoint.
2. llama.cpp's own ``llama-bench`` (built by ``scripts/setup-llama-cpp.sh --server-only``), pinned
   to the same CPUs as the engines' model threads, times prefill (pp252: one batch of the
   252-token prompt) and decode at batch 1 (tg64 after a 16-token prompt), medians over repeats.
   Where only llama-cpp-python is built, a child process loads the GGUF with it and times the
   same two figures (one llama_decode of the prompt; one token per llama_decode, greedy).
   llama.cpp's own system info (the ISA its CPU backend was built for) goes into the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from engine_sides import (  # noqa: E402
    add_model_arguments, apply_isa_mode, llama_cpp_binary, resolve_model, threads_bind,
)

#: Where scripts/setup-llama-cpp.sh puts the AVX2-only build (a llama_cpp package with its libs).
AVX2_BUILD = ROOT / "build" / "llama-cpp-avx2"
SETUP_HINT = "bash scripts/setup-llama-cpp.sh"
#: GGML type of the embedding/head per --head choice (F16 is what convert_hf_to_gguf keeps for TQ2_0).
HEAD_TYPES = {"f16": "F16", "q8_0": "Q8_0"}
#: HF weights whose rows are permuted to llama.cpp's rotary layout -> the config key of their head count.
ROTARY_PERMUTED = {"self_attn.q_proj.weight": "num_attention_heads", "self_attn.k_proj.weight": "num_key_value_heads"}


class GGUFExportError(ValueError):
    """A checkpoint that cannot become a lossless TQ2_0 GGUF; the message names file and tensor."""


# --------------------------------------------------------------------------------------------
# GGUF export


def gguf_path(model: str, head: str) -> Path:
    """Cached next to the checkpoint: <its folder>/gguf/<name>-tq2_0-<head>.gguf."""
    return Path(model).resolve().parent / "gguf" / f"{Path(model).name}-tq2_0-{head}.gguf"


def _permute_for_llama_rope(weight, n_head: int):
    """HF's rotary layout (two halves per head) to llama.cpp's (interleaved pairs), rows only."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _vocabulary(model_dir: Path, vocab_size: int):
    """Tokens, token types and tokenizer-pre of a tokenizers-library BPE vocabulary, padded to the model's."""
    import gguf

    tokenizer = json.loads((model_dir / "tokenizer.json").read_text())
    if tokenizer.get("model", {}).get("type") != "BPE":
        raise GGUFExportError(f"{model_dir / 'tokenizer.json'}: only BPE tokenizers are exported (the synthetic "
                              "checkpoints' kind); real BitCPM checkpoints convert with llama.cpp's convert_hf_to_gguf.py")
    by_id = {i: t for t, i in tokenizer["model"]["vocab"].items()}
    special = {t["id"]: t["content"] for t in tokenizer.get("added_tokens", [])}
    by_id.update(special)
    if max(by_id) >= vocab_size:
        raise GGUFExportError(f"{model_dir / 'tokenizer.json'}: token id {max(by_id)} >= vocab_size {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i in special:
            tokens.append(special[i]), types.append(gguf.TokenType.CONTROL)
        elif i in by_id:
            tokens.append(by_id[i]), types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]"), types.append(gguf.TokenType.UNUSED)
    return tokens, types


def write_gguf(model_dir: str | Path, out: str | Path, head: str = "f16", progress: bool = True) -> dict:
    """Write ``model_dir`` (a fake-quantized MiniCPM checkpoint) as a TQ2_0 GGUF at ``out``; a summary dict.

    Every linear weight is checked to dequantize back to its bf16 source exactly, so the peer runs
    the same model; a weight that is not ternary per 256-block raises GGUFExportError naming it.
    """
    import gguf
    import numpy as np
    from safetensors import safe_open
    from tqdm import tqdm

    model_dir, out = Path(model_dir), Path(out)
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") != "minicpm":
        raise GGUFExportError(f"{model_dir / 'config.json'}: model_type {config.get('model_type')!r}, "
                              "the llama.cpp peer exports MiniCPM (minicpm) checkpoints only")
    n_layer, hidden, n_head = config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]
    arch = gguf.MODEL_ARCH.MINICPM
    names = gguf.get_tensor_name_map(arch, n_layer)
    head_type = getattr(gguf.GGMLQuantizationType, HEAD_TYPES[head])

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".gguf.partial")
    writer = gguf.GGUFWriter(partial, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_block_count(n_layer)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(config.get("num_key_value_heads", n_head))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(config.get("rope_theta", 10000.0))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_TQ2_0)
    writer.add_embedding_scale(float(config["scale_emb"]))
    writer.add_residual_scale(config["scale_depth"] / n_layer ** 0.5)
    writer.add_logit_scale(hidden / config["dim_model_base"])
    rope = config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type")) in ("longrope", "su"):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        for kind in ("long", "short"):
            name = gguf.TENSOR_NAMES[getattr(gguf.MODEL_TENSOR, f"ROPE_FACTORS_{kind.upper()}")] + ".weight"
            writer.add_tensor(name, np.asarray(rope[f"{kind}_factor"], dtype=np.float32))
    tokens, types = _vocabulary(model_dir, config["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=len(tokens)).add_to_gguf(writer)

    summary = {"tensors": 0, "tq2_0_weights": 0, "head_type": HEAD_TYPES[head], "lossless": True}
    files = _weight_files(model_dir)
    with tqdm(total=sum(len(safe_open(str(f), "pt").keys()) for f in files), unit="tensor",
              desc=f"GGUF {out.name}", disable=not progress) as bar:
        for file in files:
            with safe_open(str(file), "pt") as tensors:
                for hf_name in tensors.keys():
                    name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                    if name is None:
                        raise GGUFExportError(f"{file}: tensor {hf_name} has no llama.cpp minicpm name")
                    data = tensors.get_tensor(hf_name).float().numpy()
                    for suffix, heads_key in ROTARY_PERMUTED.items():
                        if hf_name.endswith(suffix):
                            data = _permute_for_llama_rope(data, config.get(heads_key) or n_head)
                    if data.ndim == 1:
                        writer.add_tensor(name, data)
                    elif name.startswith(("token_embd", "output.")):
                        writer.add_tensor(name, gguf.quants.quantize(data, head_type), raw_dtype=head_type)
                    elif data.shape[-1] % 256:
                        raise GGUFExportError(f"{file}: tensor {hf_name} has rows of {data.shape[-1]} weights; TQ2_0 "
                                              "packs whole 256-weight blocks (use a shape whose sizes are multiples "
                                              "of 256, e.g. --synthetic small)")
                    else:
                        packed = gguf.quants.quantize(data, gguf.GGMLQuantizationType.TQ2_0)
                        back = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.TQ2_0)
                        if not np.array_equal(back, data):
                            bad = int(np.argmax(np.abs(back - data).max(axis=1)))
                            raise GGUFExportError(
                                f"{file}: tensor {hf_name} is not ternary per 256-weight block (row {bad} changes "
                                f"by {np.abs(back - data).max():.3g} in TQ2_0): not a fake-quantized BitCPM weight")
                        writer.add_tensor(name, packed, raw_dtype=gguf.GGMLQuantizationType.TQ2_0)
                        summary["tq2_0_weights"] += data.size
                    summary["tensors"] += 1
                    bar.update()
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    partial.replace(out)
    summary["bytes"] = out.stat().st_size
    return summary


def _weight_files(model_dir: Path) -> list[Path]:
    """The checkpoint's weight files (packed_checkpoint's lookup); safetensors only, read lazily here."""
    from vllm_bitcpm.packed_checkpoint import ConversionError, weight_files

    try:
        files = weight_files(model_dir)
    except ConversionError as error:
        raise GGUFExportError(str(error)) from None
    if any(f.suffix != ".safetensors" for f in files):
        raise GGUFExportError(f"{model_dir}: pytorch_model*.bin weights; the llama.cpp peer reads *.safetensors "
                              "(run `vllm-bitcpm convert` or save as safetensors first)")
    return files


def ensure_gguf(model: str, head: str) -> Path:
    """The cached GGUF of ``model``, (re)written when missing or older than the checkpoint."""
    path = gguf_path(model, head)
    newest = max(f.stat().st_mtime for f in [*_weight_files(Path(model)), Path(model) / "config.json"])
    if not path.exists() or path.stat().st_mtime < newest:
        print(f"writing {path} (llama.cpp peer, TQ2_0 linears, {HEAD_TYPES[head]} head)", flush=True)
        write_gguf(model, path, head)
    return path


# --------------------------------------------------------------------------------------------
# Measurement (child process: the chosen llama.cpp build, pinned CPUs)


def _child_env(isa: str) -> dict[str, str]:
    """PYTHONPATH that makes ``import llama_cpp`` take the build for ``isa``."""
    env = dict(os.environ)
    if isa == "avx2":
        if not (AVX2_BUILD / "llama_cpp").exists():
            raise FileNotFoundError(f"no AVX2 llama.cpp build at {AVX2_BUILD}: run {SETUP_HINT}")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(AVX2_BUILD), env.get("PYTHONPATH")]))
    return env


def installed(isa: str = "native") -> str | None:
    """None when the peer can run (llama.cpp's llama-bench, else llama-cpp-python), else why not."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        return f"the gguf package is not installed ({SETUP_HINT})"
    import importlib.util

    if llama_bench_binary(isa) is None and importlib.util.find_spec("llama_cpp") is None:
        return f"neither llama-bench nor llama-cpp-python is built ({SETUP_HINT})"
    return None


def llama_bench_binary(isa: str = "native") -> Path | None:
    """llama.cpp's own llama-bench for ``isa`` (scripts/setup-llama-cpp.sh), or None."""
    try:
        return llama_cpp_binary("llama-bench", isa)
    except FileNotFoundError:
        return None


def measure_llama_bench(gguf_file: Path, threads: int, cpus: str, spec: dict, isa: str = "native",
                        timeout: float = 1800) -> dict:
    """The same two figures timed by llama.cpp's own llama-bench, pinned to ``cpus``: pp<prefill>
    (one batch of the prompt) and tg<decode> at depth <prompt_tokens> (one token per step);
    its per-repetition samples give the median, as the llama-cpp-python child reports."""
    base = ["taskset", "-c", cpus, str(llama_bench_binary(isa)), "-m", str(gguf_file), "-t", str(threads),
            "-r", str(spec["repeats"]), "-o", "json"]
    prefill = ["-p", str(spec["prefill_tokens"]), "-n", "0"]
    decode = ["-p", "0", "-n", str(spec["decode_tokens"]), "-d", str(spec["prompt_tokens"])]
    runs = []
    for argv in ([*base, *prefill], [*base, *decode]):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1][:500]}
        runs.append(json.loads(proc.stdout)[0])
    pp, tg = runs
    prefill_s = statistics.median(ns / 1e9 for ns in pp["samples_ns"])
    return {
        "prefill_seconds": prefill_s,
        "prefill_tok_per_s": spec["prefill_tokens"] / prefill_s,
        "decode_b1_tok_per_s": statistics.median(tg["samples_ts"]),
        "weight_gib": pp["model_size"] / 2**30,
        "model_threads": threads,
        "model_threads_bind": cpus,
        "isa_paths": {"llama.cpp": f"{pp['backends']} {pp['cpu_info']}"},
        "llama_bench": {"build_commit": pp["build_commit"], "build_number": pp["build_number"],
                        "binary": os.path.relpath(llama_bench_binary(isa), ROOT)},
    }


def system_info(isa: str = "native") -> str:
    """llama.cpp's ``llama_print_system_info()`` for the build ``isa`` selects (its CPU features)."""
    code = "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
    return subprocess.run([sys.executable, "-c", code], env=_child_env(isa), check=True, capture_output=True,
                          text=True).stdout.strip()


def measure(gguf_file: Path, threads: int, cpus: str, spec: dict, isa: str = "native", timeout: float = 1800) -> dict:
    """Run the timing child on ``cpus`` (comma list); its metrics dict."""
    env = _child_env(isa)
    env.update({"OMP_NUM_THREADS": str(threads), "OMP_PLACES": "{" + cpus + "}", "OMP_PROC_BIND": "true"})
    job = {"gguf": str(gguf_file), "threads": threads, "cpus": [int(c) for c in cpus.split(",")], **spec}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1][:500] if (proc.stderr or proc.stdout)
                else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child(job: dict) -> None:
    os.sched_setaffinity(0, job["cpus"])
    import llama_cpp
    import numpy as np
    import psutil

    t0 = time.perf_counter()
    llm = llama_cpp.Llama(job["gguf"], n_ctx=job.get("n_ctx", 1024), n_batch=512, n_ubatch=512,
                          n_threads=job["threads"], n_threads_batch=job["threads"], verbose=False, seed=0)
    init_seconds = time.perf_counter() - t0
    vocab = llm.n_vocab()
    rng = random.Random(1)

    def prompt(length: int) -> list[int]:
        return [1] + [rng.randrange(3, min(vocab, job.get("prompt_vocab", vocab))) for _ in range(length - 1)]

    def next_token() -> int:
        # greedy, as the vLLM sides sample (llama-cpp-python keeps no logits without logits_all)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(vocab,))))

    def prefill(ids: list[int]) -> float:
        llm.reset()  # the next eval drops the KV cache past position 0
        t = time.perf_counter()
        llm.eval(ids)
        return time.perf_counter() - t

    def decode(steps: int) -> float:
        """Seconds for ``steps`` greedy single-token evaluations after a short prompt."""
        prefill(prompt(job["prompt_tokens"]))
        t = time.perf_counter()
        for _ in range(steps):
            llm.eval([next_token()])
        return time.perf_counter() - t

    prefill(prompt(job["prefill_tokens"]))  # warm-up: allocations and first-touch of the weights
    decode(4)
    prefills = [prefill(prompt(job["prefill_tokens"])) for _ in range(job["repeats"])]
    decodes = [decode(job["decode_tokens"]) for _ in range(job["repeats"])]
    result = {
        "prefill_seconds": statistics.median(prefills),
        "prefill_tok_per_s": job["prefill_tokens"] / statistics.median(prefills),
        "decode_b1_tok_per_s": job["decode_tokens"] / statistics.median(decodes),
        "weight_gib": llm._model.size() / 2**30,
        "rss_gib_after_load": psutil.Process().memory_info().rss / 2**30,
        "init_seconds": init_seconds,
        "model_threads": job["threads"],
        "model_threads_bind": ",".join(map(str, job["cpus"])),
        # what ran: the CPU features llama.cpp's CPU backend was built with (cf. the engines' isa_paths)
        "isa_paths": {"llama.cpp": llama_cpp.llama_print_system_info().decode().strip()},
        "llama_cpp_python": llama_cpp.__version__,
        "library": os.path.relpath(Path(llama_cpp.__file__).parent, ROOT)
        if Path(llama_cpp.__file__).is_relative_to(ROOT) else str(Path(llama_cpp.__file__).parent),
    }
    print(json.dumps(result))


def run_peers(model: str, threads: int, cpus: str, spec: dict, isa: str, heads=("f16", "q8_0")) -> dict[str, dict]:
    """{side name: metrics} for the llama.cpp peers, or one entry with the reason they cannot run."""
    why = installed(isa)
    if why:
        return {f"llama.cpp-{head}": {"error": why} for head in heads}
    peers = {}
    for head in heads:
        try:
            path = ensure_gguf(model, head)
        except (GGUFExportError, FileNotFoundError, KeyError) as error:
            peers[f"llama.cpp-{head}"] = {"error": f"GGUF export: {error}"}
            continue
        timer = measure_llama_bench if llama_bench_binary(isa) else measure
        try:
            peers[f"llama.cpp-{head}"] = {**timer(path, threads, cpus, spec, isa), "gguf": str(path),
                                          "gguf_bytes": path.stat().st_size}
        except (FileNotFoundError, subprocess.TimeoutExpired) as error:
            peers[f"llama.cpp-{head}"] = {"error": str(error)}
    return peers


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--system-info", action="store_true", help="print the build's CPU features and exit")
    add_model_arguments(parser)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--head", nargs="+", choices=sorted(HEAD_TYPES), default=["f16", "q8_0"])
    parser.add_argument("--prefill-tokens", type=int, default=252)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="write the JSON here")
    args = parser.parse_args(argv)
    if args.child:
        return _child(json.loads(args.child))
    if args.system_info:
        print(f"llama.cpp ({args.isa}): {system_info(args.isa)}")
        return
    apply_isa_mode(args)
    model = resolve_model(args)
    spec = {k: getattr(args, k) for k in ("prefill_tokens", "decode_tokens", "prompt_tokens", "repeats")}
    peers = run_peers(model, args.threads, threads_bind(args.threads), spec, args.isa, args.head)
    text = json.dumps({"model": model, "isa": args.isa, "spec": spec, "peers": peers}, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
