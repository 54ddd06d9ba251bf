"""`vllm serve <dir>` — the console script itself, as the README runs it — on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from vllm_bitcpm import synthetic

STARTUP_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = synthetic.write_checkpoint(tmp_path_factory.mktemp("serve") / "bitcpm-tiny", shape="tiny")
    port = _free_port()
    vllm_cli = Path(sys.executable).with_name("vllm")  # the venv's console script
    log_path = tmp_path_factory.mktemp("serve-log") / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}  # as a user's shell
    command = [
        str(vllm_cli), "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
        "--enforce-eager", "--kv-cache-memory-bytes", str(128 * 2**20),
        "--gpu-memory-utilization", "0.05", "--max-model-len", "1024",
        "--served-model-name", "bitcpm-tiny",
    ]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log_path.read_text()[-6000:]}")
        try:
            if requests.get(f"{base}/health", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"vllm serve not healthy after {STARTUP_TIMEOUT_S}s:\n{log_path.read_text()[-6000:]}")
        time.sleep(1)
    yield {"base": base, "proc": proc, "log": log_path}
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_completions(server):
    r = requests.post(f"{server['base']}/v1/completions", timeout=60, json={
        "model": "bitcpm-tiny", "prompt": "The capital of France is", "max_tokens": 8,
        "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == 8
    assert isinstance(body["choices"][0]["text"], str) and body["choices"][0]["text"]


def test_chat_completions(server):
    r = requests.post(f"{server['base']}/v1/chat/completions", timeout=60, json={
        "model": "bitcpm-tiny", "messages": [{"role": "user", "content": "Einstein is known for"}],
        "max_tokens": 8, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == 8
    # Random synthetic weights can emit bytes that are not yet complete UTF-8: the text may
    # then be empty, but it must be a string in an assistant message.
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert isinstance(body["choices"][0]["message"]["content"], str)


def test_streamed_completion(server):
    with requests.post(f"{server['base']}/v1/completions", timeout=60, stream=True, json={
            "model": "bitcpm-tiny", "prompt": "Quantum computing is", "max_tokens": 6,
            "temperature": 0, "ignore_eos": True, "stream": True}) as r:
        assert r.status_code == 200
        events = [line[len(b"data: "):] for line in r.iter_lines() if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    pieces = [json.loads(e)["choices"][0]["text"] for e in events[:-1] if json.loads(e)["choices"]]
    assert len(pieces) >= 2 and "".join(pieces)


def test_server_packed_the_model_and_stops_cleanly(server):
    """Runs last in this module: SIGINT (Ctrl-C) must shut the server down with exit code 0."""
    proc = server["proc"]
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("vllm serve did not stop within 60 s of SIGINT")
    log = server["log"].read_text()
    assert "bitcpm: packed" in log, log[-4000:]
    assert code == 0, log[-4000:]
