"""`vllm serve <dir>` — the console script itself, as the README runs it — on 127.0.0.1."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest
import requests

from vllm_bitcpm.testing import synthetic
from vllm_bitcpm.testing.serve import ServerFailed, vllm_serve


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The console script as a user's shell runs it (plugin from its entry point), on 127.0.0.1."""
    model = synthetic.write_checkpoint(tmp_path_factory.mktemp("serve") / "bitcpm-tiny", shape="tiny")
    log_path = tmp_path_factory.mktemp("serve-log") / "server.log"
    args = ["--enforce-eager", "--kv-cache-memory-bytes", str(128 * 2**20), "--gpu-memory-utilization", "0.05",
            "--max-model-len", "1024"]
    try:
        with vllm_serve(str(model), log_path, plugin=True, served_name="bitcpm-tiny", args=args) as running:
            yield {"base": running.base_url, "proc": running.process, "log": running.log}
    except ServerFailed as error:
        pytest.fail(str(error))


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
