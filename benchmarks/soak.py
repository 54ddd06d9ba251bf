"""Soak test: the plugin's ``vllm serve`` under many concurrent requests, some of them malformed.

    .venv/bin/python benchmarks/soak.py                       # 500 requests, concurrency 16, 0.5B shape
    .venv/bin/python benchmarks/soak.py --requests 60 --concurrency 8 --synthetic tiny   # (the test's size)

Sends ``--requests`` requests from ``--concurrency`` client threads to one server on 127.0.0.1:
~10% malformed (bad JSON, negative or huge ``max_tokens``, a prompt longer than the context, an
unknown model name, bad ``logprobs``), the rest good completions and chat completions, a third of
them streamed. Checks: every good request answered 200 with exactly the requested tokens
(``ignore_eos``; streams end with ``[DONE]``), every bad one answered 4xx, the server healthy and
serving at the end; reports the server's RSS (API server + engine processes) before and after.
Writes benchmarks/results/soak.json; exit code 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from engine_sides import RESULTS_DIR, add_source_arguments, resolve_model  # noqa: E402

MAX_MODEL_LEN = 512
BAD_KINDS = ("bad_json", "negative_max_tokens", "huge_max_tokens", "prompt_too_long", "unknown_model",
             "bad_logprobs")


def plan(count: int, bad_fraction: float, seed: int) -> list[dict]:
    """The request mix, deterministic: kinds, streaming, max_tokens."""
    rng = random.Random(seed)
    requests = []
    for i in range(count):
        if rng.random() < bad_fraction:
            requests.append({"id": i, "kind": BAD_KINDS[len([r for r in requests if r["kind"] != "good"]) % len(BAD_KINDS)]})
        else:
            requests.append({"id": i, "kind": "good", "chat": rng.random() < 0.3, "stream": rng.random() < 0.33,
                             "max_tokens": rng.randint(1, 16), "prompt_words": rng.randint(1, 40)})
    return requests


def _body(req: dict, model: str) -> tuple[str, str | dict]:
    """(endpoint, JSON body or raw text) for one planned request."""
    words = " ".join(["token"] * req.get("prompt_words", 8))
    base = {"model": model, "temperature": 0, "ignore_eos": True}
    kind = req["kind"]
    if kind == "bad_json":
        return "/v1/completions", '{"model": "' + model + '", "prompt": "unterminated'
    if kind == "negative_max_tokens":
        return "/v1/completions", {**base, "prompt": words, "max_tokens": -5}
    if kind == "huge_max_tokens":
        return "/v1/completions", {**base, "prompt": words, "max_tokens": 10**9}
    if kind == "prompt_too_long":
        return "/v1/completions", {**base, "prompt": " ".join(["token"] * (MAX_MODEL_LEN * 4)), "max_tokens": 4}
    if kind == "unknown_model":
        return "/v1/completions", {**base, "model": "no-such-model", "prompt": words, "max_tokens": 4}
    if kind == "bad_logprobs":
        return "/v1/completions", {**base, "prompt": words, "max_tokens": 4, "logprobs": -3}
    if req["chat"]:
        return "/v1/chat/completions", {**base, "messages": [{"role": "user", "content": words}],
                                        "max_tokens": req["max_tokens"], "stream": req["stream"],
                                        **({"stream_options": {"include_usage": True}} if req["stream"] else {})}
    return "/v1/completions", {**base, "prompt": words, "max_tokens": req["max_tokens"], "stream": req["stream"],
                               **({"stream_options": {"include_usage": True}} if req["stream"] else {})}


def send(base_url: str, model: str, req: dict) -> dict:
    """Send one request; what came back, judged against what was asked."""
    import requests

    endpoint, body = _body(req, model)
    started = time.perf_counter()
    try:
        if isinstance(body, str):
            r = requests.post(base_url + endpoint, data=body, headers={"Content-Type": "application/json"}, timeout=600)
        else:
            r = requests.post(base_url + endpoint, json=body, timeout=600, stream=bool(body.get("stream")))
        status = r.status_code
        tokens, done = None, None
        if status == 200 and isinstance(body, dict) and body.get("stream"):
            events = [line[6:] for line in r.iter_lines() if line.startswith(b"data: ")]
            done = bool(events) and events[-1] == b"[DONE]"
            usage = [json.loads(e)["usage"] for e in events[:-1] if json.loads(e).get("usage")]
            tokens = usage[-1]["completion_tokens"] if usage else None
        elif status == 200:
            tokens = r.json()["usage"]["completion_tokens"]
            done = True
    except Exception as error:  # noqa: BLE001 - a lost request is what this test looks for
        return {**req, "status": None, "error": f"{type(error).__name__}: {error}",
                "seconds": time.perf_counter() - started}
    result = {**req, "status": status, "tokens": tokens, "done": done, "seconds": time.perf_counter() - started}
    if req["kind"] == "good":
        result["ok"] = status == 200 and tokens == req["max_tokens"] and done
    else:
        result["ok"] = status is not None and 400 <= status < 500
    return result


def server_rss(process) -> int:
    """Resident bytes of the server and every process it started (API server, engine core)."""
    import psutil

    root = psutil.Process(process.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def main(argv=None) -> int:
    import requests
    from tqdm import tqdm

    from vllm_bitcpm.testing.serve import vllm_serve

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_arguments(parser)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--bad-fraction", type=float, default=0.1)
    parser.add_argument("--compile", action="store_true", help="serve with torch.compile (default: --enforce-eager)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS_DIR / "soak.json"))
    args = parser.parse_args(argv)

    model = resolve_model(args)
    mix = plan(args.requests, args.bad_fraction, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    server_args = ["--dtype", "bfloat16", "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory-bytes",
                   str(256 * 2**20), "--gpu-memory-utilization", "0.05", "--trust-remote-code",
                   "--max-num-seqs", str(args.concurrency), *([] if args.compile else ["--enforce-eager"])]
    with vllm_serve(model, out.with_suffix(".server.log"), plugin=True, served_name="soak",
                    args=server_args) as server:
        warm = send(server.base_url, "soak", {"id": -1, "kind": "good", "chat": False, "stream": False,
                                              "max_tokens": 4, "prompt_words": 8})
        rss_before = server_rss(server.process)
        started = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(tqdm(pool.map(lambda r: send(server.base_url, "soak", r), mix), total=len(mix),
                                unit="request", desc="soak"))
        seconds = time.perf_counter() - started
        rss_after = server_rss(server.process)
        alive = requests.get(f"{server.base_url}/health", timeout=10).status_code == 200
        final = send(server.base_url, "soak", {"id": -2, "kind": "good", "chat": True, "stream": True,
                                               "max_tokens": 8, "prompt_words": 5})
        packed = "bitcpm: packed" in server.log.read_text()
    good = [r for r in results if r["kind"] == "good"]
    bad = [r for r in results if r["kind"] != "good"]
    summary = {
        "requests": len(results), "good": len(good), "bad": len(bad), "concurrency": args.concurrency,
        "good_ok": sum(r["ok"] for r in good), "bad_answered_4xx": sum(r["ok"] for r in bad),
        "bad_status_by_kind": {k: sorted({r["status"] for r in bad if r["kind"] == k}, key=str) for k in BAD_KINDS},
        "lost": [r for r in results if r["status"] is None],
        "failures": [r for r in results if not r["ok"]][:20],
        "streamed_good": sum(bool(r.get("stream")) for r in good), "chat_good": sum(bool(r.get("chat")) for r in good),
        "seconds": seconds, "server_alive_at_end": alive and bool(final["ok"]) and bool(warm["ok"]),
        "plugin_packed_the_model": packed,
        "rss_before_bytes": rss_before, "rss_after_bytes": rss_after, "rss_growth": rss_after / rss_before - 1,
    }
    summary["passed"] = (summary["good_ok"] == len(good) and summary["bad_answered_4xx"] == len(bad)
                         and summary["server_alive_at_end"] and summary["rss_growth"] < 0.10 and packed)
    report = {"kind": "bitcpm-soak", "model": model, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "command": " ".join(["python", "benchmarks/soak.py", *(argv if argv is not None else sys.argv[1:])]),
              "summary": summary, "results": results}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k not in ("failures", "lost")}, indent=2))
    for failure in summary["failures"]:
        print("FAILED:", json.dumps(failure))
    print(f"wrote {out}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
