"""llama.cpp's own ``llama-server`` as a serving peer: started on 127.0.0.1 the way a user starts it.

    .venv/bin/python benchmarks/serve_bench.py --peers llama-server          # drives it like vllm serve
    .venv/bin/python benchmarks/llama_server.py --version [--isa avx2]       # which build would run

Why: a user with a BitCPM model and a CPU weighs ``vllm serve`` against llama-server (or Ollama,
built on the same code), so serve_bench.py measures both with the same ``vllm bench serve``
command. The binaries come from the llama.cpp tree the pinned llama-cpp-python sdist vendors,
built by ``bash scripts/setup-llama-cpp.sh --server-only`` into build/llama-server/<native|avx2>/.
The model is the GGUF benchmarks/llama_cpp_peer.py writes of the same checkpoint (TQ2_0 linears,
checked lossless; F16 or Q8_0 head). The server gets ``--parallel`` slots with continuous
batching, each slot the context vLLM's ``--max-model-len`` gives a request (``--no-kv-unified``),
``--metrics`` so the harness counts generated tokens from the server itself: ``vllm bench serve``
re-tokenizes a non-vLLM server's streamed text when no usage arrives, which undercounts the
outputs of random weights.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

# Which build an ISA mode runs is the core's (llama_cpp_peer.py's llama-bench comes from the same builds).
from engine_sides import LLAMA_CPP_SETUP_HINT, llama_cpp_binary  # noqa: E402

from vllm_bitcpm.testing.serve import prometheus_values  # noqa: E402

STARTUP_TIMEOUT_S = 300
#: Prometheus counters llama-server exports with --metrics, and vLLM's equivalents.
GENERATED_COUNTERS = {"llama-server": "llamacpp:tokens_predicted_total", "vllm": "vllm:generation_tokens_total"}
PROMPT_COUNTERS = {"llama-server": "llamacpp:prompt_tokens_total", "vllm": "vllm:prompt_tokens_total"}


def installed(isa: str = "native") -> str | None:
    """None when the llama-server peer can run, else why not (one line)."""
    try:
        llama_cpp_binary("llama-server", isa)
    except FileNotFoundError as error:
        return str(error)
    import importlib.util

    # The GGUF writer (llama_cpp_peer.write_gguf) needs the gguf package; llama-cpp-python is not needed.
    if importlib.util.find_spec("gguf") is None:
        return f"the gguf package is not installed ({LLAMA_CPP_SETUP_HINT})"
    return None


def version(isa: str = "native") -> str:
    """llama-server's own ``--version`` line (build number and commit)."""
    proc = subprocess.run([str(llama_cpp_binary("llama-server", isa)), "--version"], capture_output=True, text=True,
                          timeout=60)
    return " ".join((proc.stdout + proc.stderr).split())


def server_command(gguf: Path, port: int, slots: int, ctx_per_slot: int, threads: int, isa: str,
                   alias: str) -> list[str]:
    """The command line: continuous batching over ``slots`` slots of ``ctx_per_slot`` tokens each."""
    return [str(llama_cpp_binary("llama-server", isa)), "--model", str(gguf), "--host", "127.0.0.1",
            "--port", str(port), "--alias", alias, "--parallel", str(slots), "--cont-batching", "--no-kv-unified",
            "--ctx-size", str(slots * ctx_per_slot), "--threads", str(threads), "--threads-batch", str(threads),
            "--metrics", "--no-webui"]


@contextlib.contextmanager
def llama_serve(gguf: Path, log: Path, slots: int, ctx_per_slot: int, threads: int, cpus: str | None = None,
                isa: str = "native", alias: str = "bench-model",
                timeout: float = STARTUP_TIMEOUT_S) -> Iterator:
    """Start llama-server pinned to ``cpus`` (comma list; all when None), wait for /health, yield a
    ``vllm_bitcpm.testing.serve.Server``; SIGINT on exit (SIGKILL after 30 s)."""
    from vllm_bitcpm.testing.serve import free_port, serve_process

    port = free_port()
    command = server_command(gguf, port, slots, ctx_per_slot, threads, isa, alias)
    if cpus:
        command = ["taskset", "-c", cpus, *command]
    with serve_process(command, log, port, alias, "llama-server", timeout=timeout, stop_timeout=30,
                       poll_s=0.5) as server:
        yield server


def counter(base_url: str, name: str) -> float | None:
    """One Prometheus counter from the server's /metrics (None when it does not export it)."""
    return prometheus_values(base_url).get(name)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="store_true", help="print the build's version line")
    parser.add_argument("--isa", choices=["native", "avx2"], default="native")
    args = parser.parse_args(argv)
    print(f"{llama_cpp_binary('llama-server', args.isa)}: {version(args.isa)}")


if __name__ == "__main__":
    main()
