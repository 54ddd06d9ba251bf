"""Soak test: the plugin's ``vllm serve`` under load and faults: malformed requests, clients that
hang up mid-stream, bursts past the KV cache, edge-case parameters, SIGTERM under load, a restart.

    .venv/bin/python benchmarks/soak.py                       # 500 requests, concurrency 16, burst 64, 0.5B shape
    .venv/bin/python benchmarks/soak.py --requests 60 --concurrency 8 --bad-fraction 0.2 --burst-concurrency 16 \\
        --kv-cache-tokens 1024 --extremes-per-kind 1 --synthetic tiny          # (the test's size)

One server on 127.0.0.1 (eager, bfloat16, ``--max-model-len 512``, a KV cache of ``--kv-cache-tokens``
tokens), then these phases (each can be turned off):

1. **mix**: ``--requests`` requests from ``--concurrency`` client threads: ~10% malformed (bad JSON,
   negative or huge ``max_tokens``, a prompt longer than the context, an unknown model, bad
   ``logprobs``, ``logprobs``/``top_logprobs`` one past vLLM's limit of 20), the rest completions and
   chats, a third streamed; a third of the streamed ones close the connection after two chunks
   (``--client-aborts``); edge cases among the good ones (``--extremes``): ``max_tokens=1``, prompt +
   ``max_tokens`` exactly the context (served in full), one token past it (vLLM clamps: served one
   token short of asked), ``logprobs=20``, chat ``top_logprobs=20``.
2. **burst** (``--burst``): ``--burst-concurrency`` requests at once needing about twice the KV
   cache: they must queue (or be preempted) and all complete in full.
3. then the server must be healthy, serve a probe in full, and show no running or waiting requests
   in /metrics (aborted requests are not left behind); RSS (API server + engine processes) before
   the mix and here.
4. **sigterm** (``--sigterm``): SIGTERM to the API server while requests are in flight (as a
   container runtime stops it): every process of the server must exit within ``--shutdown-timeout``
   (passed to the server: in-flight requests drain that long, default 60 s) + 30 s; requests it cuts
   are counted, none may hang; then the same command on the same port must start and serve in full.
   With vLLM's default ``--shutdown-timeout 0`` (abort) vLLM 0.32's API server kills the engine at
   once and then waits for the aborted requests' connections to close, i.e. until the clients give
   up: ``--shutdown-timeout 0`` shows it (the check fails).

Every request ends completed, aborted by the client, rejected with 4xx, cut by shutdown, lost (no
answer: must be 0) or failed (a wrong answer: must be 0); see vllm_bitcpm/testing/soak_plan.py.
Writes benchmarks/results/soak.json (summary + every request); exit code 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from engine_sides import (  # noqa: E402
    RESULTS_DIR, add_source_arguments, logged_number, machine, resolve_model, write_json,
)

from vllm_bitcpm.testing.serve import prometheus_values  # noqa: E402
from vllm_bitcpm.testing.soak_plan import (  # noqa: E402
    BAD_KINDS, EXTREME_KINDS, MAX_MODEL_LEN, burst_plan, plan, probe_plan, send, shutdown_plan, tally,
)

SERVED_NAME = "soak"
#: Teardown window past the server's own --shutdown-timeout before its processes count as hung.
SHUTDOWN_GRACE_S = 30
#: The size the KV cache gets when the checkpoint's config cannot be read (a hub id).
FALLBACK_KV_CACHE_BYTES = 256 * 2**20


def kv_bytes_per_token(model: str) -> int | None:
    """bf16 K+V bytes per token from the checkpoint's config.json, to size the KV cache in tokens
    (the capacity vLLM reports in its log is what the burst is then sized against)."""
    try:
        cfg = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads
    if "kv_lora_rank" in cfg:  # MiniCPM3 (approximate: the logged capacity is what counts)
        k_dim, v_dim = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    else:
        k_dim = v_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return cfg["num_hidden_layers"] * kv_heads * (k_dim + v_dim) * 2


def server_args(args, model: str) -> list[str]:
    """The server's command-line options (the same for the first server and the restart)."""
    per_token = kv_bytes_per_token(model)
    kv_bytes = per_token * args.kv_cache_tokens if per_token else FALLBACK_KV_CACHE_BYTES
    return ["--dtype", "bfloat16", "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory-bytes", str(kv_bytes),
            "--gpu-memory-utilization", "0.05", "--trust-remote-code",
            "--max-num-seqs", str(max(args.concurrency, args.burst_concurrency if args.burst else 0)),
            "--shutdown-timeout", str(args.shutdown_timeout), *([] if args.compile else ["--enforce-eager"])]



def filler_token(base_url: str) -> int:
    """A token id for token-id prompts of exact length (the tokenizer's id for "token")."""
    import requests

    r = requests.post(f"{base_url}/tokenize", json={"model": SERVED_NAME, "prompt": "token",
                                                     "add_special_tokens": False}, timeout=30)
    r.raise_for_status()
    return r.json()["tokens"][-1]



def wait_for_metrics(base_url: str, done, timeout: float) -> tuple[bool, dict[str, float]]:
    """Poll /metrics until ``done(values)`` (gauges move only when the engine steps)."""
    deadline = time.monotonic() + timeout
    while True:
        values = prometheus_values(base_url)
        if done(values) or time.monotonic() > deadline:
            return done(values), values
        time.sleep(0.25)


def server_rss(process) -> int:
    """Resident bytes of the server and every process it started (API server, engine core)."""
    import psutil

    root = psutil.Process(process.pid)
    return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])


def run_requests(base_url: str, reqs: list[dict], workers: int, filler: int, desc: str,
                 timeout: float | tuple = 600) -> list[dict]:
    """Send ``reqs`` from ``workers`` client threads; their results in plan order."""
    from tqdm import tqdm

    with ThreadPoolExecutor(workers) as pool:
        return list(tqdm(pool.map(lambda r: send(base_url, SERVED_NAME, r, filler, timeout), reqs),
                         total=len(reqs), unit="request", desc=desc))


def sample_peaks(base_url: str, stop: threading.Event, peaks: dict) -> None:
    """The highest running and waiting counts /metrics shows until ``stop`` (queueing, seen)."""
    while not stop.is_set():
        with contextlib.suppress(Exception):
            values = prometheus_values(base_url)
            for key in ("running", "waiting"):
                peaks[key] = max(peaks.get(key, 0), values.get(f"vllm:num_requests_{key}", 0))
        stop.wait(0.25)


def burst(server, args, filler: int, first_id: int) -> tuple[list[dict], dict]:
    """More requests at once than the KV cache holds: all must complete, none be dropped."""
    capacity = logged_number(server.log.read_text(errors="replace"), "KV cache size: ", " tokens") \
        or args.kv_cache_tokens
    reqs = burst_plan(args.burst_concurrency, capacity, first_id)
    before = prometheus_values(server.base_url)
    peaks, stop = {}, threading.Event()
    sampler = threading.Thread(target=sample_peaks, args=(server.base_url, stop, peaks), daemon=True)
    sampler.start()
    started = time.perf_counter()
    results = run_requests(server.base_url, reqs, len(reqs), filler, "burst")
    stop.set()
    sampler.join()
    after = prometheus_values(server.base_url)
    demand = sum(r["prompt_tokens"] + r["max_tokens"] for r in reqs)
    return results, {
        "requests": len(reqs), "kv_cache_tokens": capacity, "demand_tokens": demand,
        "exceeds_kv_cache": demand > capacity, "seconds": time.perf_counter() - started,
        "peak_running": peaks.get("running"), "peak_waiting": peaks.get("waiting"),
        "preemptions": after.get("vllm:num_preemptions_total", 0) - before.get("vllm:num_preemptions_total", 0),
        "completed": sum(r["outcome"] == "completed" for r in results),
    }


def wait_gone(processes: list, deadline: float) -> list:
    """The processes still running at ``deadline`` (a zombie has exited: whoever inherits it reaps)."""
    import psutil

    def running(p) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    while (alive := [p for p in processes if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def sigterm_under_load(server, args, filler: int, first_id: int) -> tuple[list[dict], dict]:
    """SIGTERM to the API server process (as a container runtime sends it) with requests in flight:
    it and every process it started must exit within the limit, and no client may hang."""
    import psutil

    limit = args.shutdown_timeout + SHUTDOWN_GRACE_S
    family = [psutil.Process(server.process.pid), *psutil.Process(server.process.pid).children(recursive=True)]
    reqs = shutdown_plan(2 * args.concurrency, first_id)
    # The signal goes when two streams have their first chunk (client-side truth: those requests
    # are running, with SHUTDOWN_MAX_TOKENS - 1 tokens to go), not when a /metrics poll happens to
    # see them: on a busy machine a short batch could finish between two polls.
    streaming, lock = threading.Event(), threading.Lock()
    first_chunks = [0]

    def first_chunk():
        with lock:
            first_chunks[0] += 1
            if first_chunks[0] >= 2:
                streaming.set()

    pool = ThreadPoolExecutor(len(reqs))
    futures = [pool.submit(send, server.base_url, SERVED_NAME, r, filler, (10, limit + 60), first_chunk)
               for r in reqs]
    streaming.wait(120)
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    unfinished = sum(not f.done() for f in futures)
    at_signal = {}
    with contextlib.suppress(Exception):  # the gauges as the server last reported them (may lag)
        at_signal = prometheus_values(server.base_url)
    try:
        server.process.wait(timeout=limit)
        api_exit_s = time.monotonic() - started
    except subprocess.TimeoutExpired:
        api_exit_s = None
    alive = wait_gone(family, started + limit)
    all_exit_s = time.monotonic() - started if not alive else None
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait()
    for leftover in alive:  # our own server's processes that outlived the limit
        with contextlib.suppress(psutil.NoSuchProcess):
            leftover.kill()
    results = [f.result() for f in futures]
    pool.shutdown()
    return results, {
        "signal": "SIGTERM", "limit_s": limit, "server_shutdown_timeout_s": args.shutdown_timeout,
        "in_flight_at_signal": {"unfinished_requests": unfinished, "streams_started": first_chunks[0],
                                "running": at_signal.get("vllm:num_requests_running"),
                                "waiting": at_signal.get("vllm:num_requests_waiting"),
                                "loaded": streaming.is_set() and unfinished >= 2},
        "api_server_exit_s": api_exit_s, "all_processes_exit_s": all_exit_s, "processes": len(family),
        "leftover_pids": [p.pid for p in alive], "returncode": server.process.returncode,
        "clean": api_exit_s is not None and all_exit_s is not None,
    }


def restart(model: str, out: Path, cmd_args: list[str], port: int, filler: int,
            first_id: int) -> tuple[list[dict], float | None, str | None]:
    """The same command on the same port after the SIGTERM: it must start and serve in full."""
    from vllm_bitcpm.testing.serve import ServerFailed, vllm_serve

    started = time.perf_counter()
    try:
        with vllm_serve(model, out.with_suffix(".restart.log"), plugin=True, served_name=SERVED_NAME,
                        args=cmd_args, port=port) as server:
            startup_s = time.perf_counter() - started
            return run_requests(server.base_url, probe_plan(first_id, "restart"), 2, filler, "restart"), startup_s, None
    except ServerFailed as error:
        return [], None, str(error)[-2000:]


def check(summary: dict, args) -> dict[str, bool]:
    """Every check, by name (all must hold)."""
    checks = {
        "none_lost": summary["lost"] == 0, "none_failed": summary["failed"] == 0,
        "server_alive_at_end": summary["server_alive_at_end"],
        "no_requests_left_in_metrics": summary["metrics_settled"],
        "rss_growth_under_10pct": summary["rss_growth"] < 0.10,
        "plugin_packed_the_model": summary["plugin_packed_the_model"],
    }
    if args.client_aborts:
        checks["clients_aborted"] = summary["aborted_by_client"] > 0
    if args.burst:
        checks["burst_exceeded_kv_cache"] = summary["burst"]["exceeds_kv_cache"]
        checks["burst_all_completed"] = summary["burst"]["completed"] == summary["burst"]["requests"]
    if args.sigterm:
        checks["sigterm_hit_requests_in_flight"] = summary["shutdown"]["in_flight_at_signal"]["loaded"]
        checks["clean_shutdown_within_limit"] = summary["shutdown"]["clean"]
        checks["restart_served"] = summary["restart_served"]
    return checks


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_source_arguments(parser)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--bad-fraction", type=float, default=0.1)
    parser.add_argument("--kv-cache-tokens", type=int, default=4 * MAX_MODEL_LEN,
                        help="KV cache size in tokens (sized from the checkpoint's config; default 2048)")
    parser.add_argument("--client-aborts", action=argparse.BooleanOptionalAction, default=True,
                        help="a third of the streamed requests disconnect after two chunks")
    parser.add_argument("--extremes", action=argparse.BooleanOptionalAction, default=True,
                        help="edge-case max_tokens/logprobs among the good requests")
    parser.add_argument("--extremes-per-kind", type=int, default=3)
    parser.add_argument("--burst", action=argparse.BooleanOptionalAction, default=True,
                        help="a burst of --burst-concurrency requests needing twice the KV cache")
    parser.add_argument("--burst-concurrency", type=int, default=64)
    parser.add_argument("--sigterm", action=argparse.BooleanOptionalAction, default=True,
                        help="SIGTERM under load, then a restart")
    parser.add_argument("--shutdown-timeout", type=int, default=60,
                        help="the server's --shutdown-timeout: how long in-flight requests may drain after SIGTERM "
                             "(default 60; vLLM's default 0 aborts them, and vLLM 0.32's API server then waits "
                             "for their connections until the clients give up: it did not exit within 30 s)")
    parser.add_argument("--compile", action="store_true", help="serve with torch.compile (default: --enforce-eager)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS_DIR / "soak.json"))
    return parser.parse_args(argv)


def soak_one_server(model: str, args, mix: list[dict], out: Path, cmd_args: list[str]) -> tuple[list[dict], dict]:
    """Every phase on one server, up to its SIGTERM: the requests' results and what was measured."""
    import requests

    from vllm_bitcpm.testing.serve import vllm_serve

    results, facts = [], {}
    with vllm_serve(model, out.with_suffix(".server.log"), plugin=True, served_name=SERVED_NAME,
                    args=cmd_args) as server:
        facts["filler"] = filler = filler_token(server.base_url)
        facts["port"] = int(server.base_url.rsplit(":", 1)[1])
        results += run_requests(server.base_url, probe_plan(-10, "warmup")[:1], 1, filler, "warm-up")
        facts["rss_before_bytes"] = server_rss(server.process)
        started = time.perf_counter()
        results += run_requests(server.base_url, mix, args.concurrency, filler, "mix")
        facts["mix_seconds"] = time.perf_counter() - started
        if args.burst:
            burst_results, facts["burst"] = burst(server, args, filler, 10_000)
            results += burst_results
        probes = run_requests(server.base_url, probe_plan(20_000, "probe"), 2, filler, "probe")
        results += probes
        healthy = requests.get(f"{server.base_url}/health", timeout=10).status_code == 200
        facts["server_alive_at_end"] = healthy and all(r["outcome"] == "completed" for r in probes)
        idle = lambda m: m.get("vllm:num_requests_running", 1) + m.get("vllm:num_requests_waiting", 1) == 0  # noqa: E731
        facts["metrics_settled"], final = wait_for_metrics(server.base_url, idle, 30)
        facts["metrics_at_end"] = {k: final.get(f"vllm:num_requests_{k}") for k in ("running", "waiting")}
        # Tokens the server generated for the streams clients hung up on (all it generated, less what
        # the served requests got): under aborted_by_client x 64 when vLLM stopped them early.
        served_tokens = sum(r.get("tokens") or 0 for r in results if r["outcome"] == "completed")
        facts["tokens_generated_for_client_aborts"] = final.get("vllm:generation_tokens_total", 0) - served_tokens
        facts["rss_after_bytes"] = server_rss(server.process)
        facts["plugin_packed_the_model"] = "bitcpm: packed" in server.log.read_text()
        if args.sigterm:
            cut, facts["shutdown"] = sigterm_under_load(server, args, filler, 30_000)
            results += cut
    return results, facts


def summarize(results: list[dict], facts: dict, args) -> dict:
    """The JSON summary: outcome counts, per-kind statuses, the phases' measurements, the checks."""
    mixed = [r for r in results if r["phase"] == "mix"]
    summary = {
        **tally(results), "mix_requests": len(mixed), "concurrency": args.concurrency,
        "bad_status_by_kind": {k: sorted({r["status"] for r in mixed if r["kind"] == k}, key=str)
                               for k in BAD_KINDS},
        "extreme_outcomes_by_kind": {k: sorted({r["outcome"] for r in mixed if r["kind"] == k})
                                     for k in EXTREME_KINDS},
        "streamed_served": sum(bool(r.get("stream")) for r in mixed if r["kind"] != "client_abort"),
        "chat_served": sum(bool(r.get("chat")) for r in mixed),
        **{k: v for k, v in facts.items() if k not in ("filler", "port")},
        "rss_growth": facts["rss_after_bytes"] / facts["rss_before_bytes"] - 1,
        "failures": [r for r in results if r["outcome"] in ("lost", "failed")][:20],
    }
    summary["checks"] = check(summary, args)
    summary["passed"] = all(summary["checks"].values())
    return summary


def main(argv=None) -> int:
    args = parse_args(argv)
    model = resolve_model(args)
    mix = plan(args.requests, args.bad_fraction, args.seed, abort_fraction=1 / 3 if args.client_aborts else 0,
               extremes_per_kind=args.extremes_per_kind if args.extremes else 0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd_args = server_args(args, model)
    results, facts = soak_one_server(model, args, mix, out, cmd_args)
    if args.sigterm:
        restarted, startup_s, error = restart(model, out, cmd_args, facts["port"], facts["filler"], 40_000)
        results += restarted
        facts["restart"] = {"same_port": facts["port"], "startup_s": startup_s, "error": error}
        facts["restart_served"] = bool(restarted) and all(r["outcome"] == "completed" for r in restarted)
    summary = summarize(results, facts, args)
    report = {"kind": "bitcpm-soak", "model": model, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(),
              "command": " ".join(["python", "benchmarks/soak.py", *(argv if argv is not None else sys.argv[1:])]),
              "server_args": cmd_args, "summary": summary, "results": results}
    write_json(out, report)
    print(json.dumps({k: v for k, v in summary.items() if k != "failures"}, indent=2))
    for failure in summary["failures"]:
        print("FAILED:", json.dumps(failure))
    print(f"wrote {out}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
