"""Start ``vllm serve`` on 127.0.0.1 as a user's shell would, and stop it (tests and benchmarks)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

STARTUP_TIMEOUT_S = 600


def prometheus_values(base_url: str) -> dict[str, float]:
    """Every sample of the server's /metrics (vLLM's or llama-server's), summed over its labels."""
    import requests

    values: dict[str, float] = {}
    for line in requests.get(f"{base_url}/metrics", timeout=10).text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        name = key.split("{", 1)[0]
        values[name] = values.get(name, 0.0) + float(value)
    return values


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    base_url: str
    process: subprocess.Popen
    log: Path
    model_name: str


class ServerFailed(RuntimeError):
    """``vllm serve`` exited or did not become healthy; the message ends with its log tail."""


@contextlib.contextmanager
def vllm_serve(model: str, log: Path, plugin: bool = True, served_name: str | None = None,
               args: list[str] | None = None, env: dict[str, str] | None = None,
               timeout: float = STARTUP_TIMEOUT_S, port: int | None = None) -> Iterator[Server]:
    """``vllm serve MODEL --host 127.0.0.1 --port <free>`` through the venv's console script, with the
    plugin on (entry point, as installed) or off (``VLLM_PLUGINS=""``); waits for /health, and on exit
    sends SIGINT (Ctrl-C), then kills its whole process group after 60 s. ``port`` pins the port (a
    restart on the port a stopped server had); a caller that stops the server itself leaves nothing
    to do at exit."""
    port = port or free_port()
    served_name = served_name or Path(model).name
    command = [str(Path(sys.executable).with_name("vllm")), "serve", str(model), "--host", "127.0.0.1",
               "--port", str(port), "--served-model-name", served_name, *(args or [])]
    full_env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    if not plugin:
        full_env["VLLM_PLUGINS"] = ""
    full_env.update(env or {})
    with serve_process(command, log, port, served_name, "vllm serve", env=full_env, timeout=timeout,
                       stop_timeout=60) as server:
        yield server


@contextlib.contextmanager
def serve_process(command: list[str], log: Path, port: int, model_name: str, what: str,
                  env: dict[str, str] | None = None, timeout: float = STARTUP_TIMEOUT_S,
                  stop_timeout: float = 60, poll_s: float = 1.0) -> Iterator[Server]:
    """Start an HTTP server ``command`` (its output to ``log``, first line ``$ command``) listening on
    127.0.0.1:``port``, wait until ``/health`` answers 200, yield it; on exit SIGINT (Ctrl-C), then
    SIGKILL to its whole process group after ``stop_timeout`` s. Shared by ``vllm serve`` and the
    llama-server peer (benchmarks/llama_server.py). ``what`` names it in errors."""
    import requests

    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        # Its own process group, so a kill reaches the processes it starts (vLLM's engine), not only it.
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise ServerFailed(f"{what} exited with {process.returncode}:\n{log.read_text()[-6000:]}")
            try:
                if requests.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise ServerFailed(f"{what} not healthy after {timeout:.0f}s:\n{log.read_text()[-6000:]}")
            time.sleep(poll_s)
        yield Server(base, process, log, model_name)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=stop_timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
