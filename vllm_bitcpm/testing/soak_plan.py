"""What ``benchmarks/soak.py`` sends to the server and how it judges each answer.

The request plans (the main mix, the KV-cache burst, the load a SIGTERM lands on, the requests a
restarted server must serve) and one verdict per request, kept apart from soak.py's phases and
server control so each reads on its own. Every request ends in exactly one outcome:

* ``completed``: a request meant to be served got 200 with exactly the tokens it asked for
  (``ignore_eos``; streams end with ``[DONE]``; logprob widths as asked);
* ``aborted_by_client``: the client closed the stream itself after a few chunks, on purpose;
* ``rejected_4xx``: a malformed request got a 4xx;
* ``cut_by_shutdown``: in the SIGTERM phase, a request the shutdown ended early (a connection
  error, a 5xx, a stream or answer shorter than asked);
* ``lost``: no answer at all (a connection error outside the SIGTERM phase, or a client timeout
  anywhere: a server that stops answering); must be 0;
* ``failed``: an answer, but the wrong one (a good request not served in full, a bad one not 4xx).
"""

from __future__ import annotations

import json
import random
import time

MAX_MODEL_LEN = 512
#: vLLM's default ``--max-logprobs`` (``ModelConfig.max_logprobs`` in vllm/config/model.py); the soak
#: server keeps the default, so ``logprobs``/``top_logprobs`` of 20 pass and 21 is rejected
#: (``SamplingParams._validate_logprobs``, a 400).
MAX_LOGPROBS = 20
BAD_KINDS = ("bad_json", "negative_max_tokens", "huge_max_tokens", "prompt_too_long", "unknown_model",
             "bad_logprobs", "logprobs_over_max", "top_logprobs_over_max")
#: Good requests at the edges of what the server accepts (each planned ``extremes_per_kind`` times).
EXTREME_KINDS = ("max_tokens_1", "full_context", "past_context_clamped", "logprobs_max", "top_logprobs_max")
#: Served kinds: judged by "served in full".
OUTCOMES = ("completed", "aborted_by_client", "rejected_4xx", "cut_by_shutdown", "lost", "failed")
#: A disconnecting client reads this many stream chunks, then closes; it asks for enough tokens that
#: the stream is still going when it does.
ABORT_AFTER_CHUNKS = 2
ABORT_MAX_TOKENS = 64
#: Output of each request the SIGTERM lands on: the signal goes as soon as two streams have their
#: first chunk, so each still has 63 tokens to go (in flight whatever the machine's load), and 32 of
#: them drain within the 60 s shutdown timeout on the 0.5B shape (128 each did not, under load).
SHUTDOWN_MAX_TOKENS = 64
#: Prompt of the context-limit requests, in tokens (token-id prompts, so the length is exact).
EDGE_PROMPT_TOKENS = MAX_MODEL_LEN // 2


def plan(count: int, bad_fraction: float, seed: int, abort_fraction: float = 1 / 3,
         extremes_per_kind: int = 3) -> list[dict]:
    """The main mix, deterministic: ~``bad_fraction`` malformed (kinds in turn), the rest good
    completions and chats, a third streamed; ``abort_fraction`` of the streamed ones disconnect
    early; ``extremes_per_kind`` of each edge case spread evenly over the good ones."""
    rng = random.Random(seed)
    requests = []
    bad = 0
    for i in range(count):
        if rng.random() < bad_fraction:
            requests.append({"id": i, "phase": "mix", "kind": BAD_KINDS[bad % len(BAD_KINDS)]})
            bad += 1
            continue
        req = {"id": i, "phase": "mix", "kind": "good", "chat": rng.random() < 0.3, "stream": rng.random() < 0.33,
               "max_tokens": rng.randint(1, 16), "prompt_words": rng.randint(1, 40)}
        if req["stream"] and rng.random() < abort_fraction:
            req.update(kind="client_abort", max_tokens=ABORT_MAX_TOKENS, abort_after=ABORT_AFTER_CHUNKS)
        requests.append(req)
    _place_extremes(requests, extremes_per_kind)
    for req in requests:
        if "max_tokens" in req:
            req.setdefault("expected_tokens", req["max_tokens"])
    return requests


def _place_extremes(requests: list[dict], per_kind: int) -> None:
    """Turn evenly spaced good requests into the edge cases, kinds in turn."""
    good = [i for i, r in enumerate(requests) if r["kind"] == "good"]
    n = min(len(good), per_kind * len(EXTREME_KINDS))
    for j in range(n):
        i = good[j * len(good) // n]
        kind = EXTREME_KINDS[j % len(EXTREME_KINDS)]
        requests[i] = {"id": requests[i]["id"], "phase": "mix", "kind": kind, **_extreme(kind)}


def _extreme(kind: str) -> dict:
    """One edge case: the fewest tokens, exactly the whole context, one token past it (vLLM clamps
    ``max_tokens`` to the context left, vllm/entrypoints/serve/utils/api_utils.py ``get_max_tokens``:
    served, one token short of asked), the widest logprobs the server allows."""
    left = MAX_MODEL_LEN - EDGE_PROMPT_TOKENS
    return {
        "max_tokens_1": {"chat": False, "stream": True, "max_tokens": 1, "prompt_words": 12},
        "full_context": {"chat": False, "stream": False, "prompt_tokens": EDGE_PROMPT_TOKENS, "max_tokens": left},
        "past_context_clamped": {"chat": False, "stream": False, "prompt_tokens": EDGE_PROMPT_TOKENS,
                                 "max_tokens": left + 1, "expected_tokens": left},
        "logprobs_max": {"chat": False, "stream": False, "max_tokens": 4, "prompt_words": 8, "logprobs": MAX_LOGPROBS},
        "top_logprobs_max": {"chat": True, "stream": False, "max_tokens": 4, "prompt_words": 8,
                             "top_logprobs": MAX_LOGPROBS},
    }[kind]


def burst_plan(count: int, kv_cache_tokens: int, first_id: int) -> list[dict]:
    """``count`` requests sent at once whose prompts + outputs need about twice the KV cache (as far
    as ``MAX_MODEL_LEN`` per request allows): the scheduler must queue or preempt, never drop. Each
    has its own ``cache_salt``, so the equal prompts share no prefix-cache blocks."""
    per_request = min(MAX_MODEL_LEN, -(-2 * kv_cache_tokens // count))
    prompt = per_request // 2
    return [{"id": first_id + i, "phase": "burst", "kind": "burst", "chat": False, "stream": i % 2 == 0,
             "prompt_tokens": prompt, "max_tokens": per_request - prompt, "expected_tokens": per_request - prompt,
             "cache_salt": f"burst-{first_id + i}"} for i in range(count)]


def shutdown_plan(count: int, first_id: int) -> list[dict]:
    """Requests for SIGTERM to land on: in flight when it comes, short enough to drain in the
    server's shutdown timeout."""
    return [{"id": first_id + i, "phase": "shutdown", "kind": "good", "chat": i % 3 == 2, "stream": i % 2 == 0,
             "prompt_words": 16, "max_tokens": SHUTDOWN_MAX_TOKENS, "expected_tokens": SHUTDOWN_MAX_TOKENS}
            for i in range(count)]


def probe_plan(first_id: int, phase: str) -> list[dict]:
    """One of each shape (completion/chat, streamed or not): what a server must still serve."""
    return [{"id": first_id + i, "phase": phase, "kind": "good", "chat": chat, "stream": stream, "prompt_words": 5,
             "max_tokens": 8, "expected_tokens": 8}
            for i, (chat, stream) in enumerate([(False, False), (False, True), (True, False), (True, True)])]


def body(req: dict, model: str, filler_id: int) -> tuple[str, str | dict]:
    """(endpoint, JSON body or raw text) for one planned request; token-id prompts repeat
    ``filler_id`` so their length is exact."""
    words = " ".join(["token"] * req.get("prompt_words", 8))
    base = {"model": model, "temperature": 0, "ignore_eos": True}
    kind = req["kind"]
    if kind == "bad_json":
        return "/v1/completions", '{"model": "' + model + '", "prompt": "unterminated'
    bad = {
        "negative_max_tokens": {"prompt": words, "max_tokens": -5},
        "huge_max_tokens": {"prompt": words, "max_tokens": 10**9},
        "prompt_too_long": {"prompt": " ".join(["token"] * (MAX_MODEL_LEN * 4)), "max_tokens": 4},
        "unknown_model": {"model": "no-such-model", "prompt": words, "max_tokens": 4},
        "bad_logprobs": {"prompt": words, "max_tokens": 4, "logprobs": -3},
        "logprobs_over_max": {"prompt": words, "max_tokens": 4, "logprobs": MAX_LOGPROBS + 1},
    }
    if kind in bad:
        return "/v1/completions", {**base, **bad[kind]}
    if kind == "top_logprobs_over_max":
        return "/v1/chat/completions", {**base, "messages": [{"role": "user", "content": words}], "max_tokens": 4,
                                        "logprobs": True, "top_logprobs": MAX_LOGPROBS + 1}
    common = {**base, "max_tokens": req["max_tokens"], "stream": req["stream"],
              **({"stream_options": {"include_usage": True}} if req["stream"] else {})}
    if req["chat"]:
        extra = {"logprobs": True, "top_logprobs": req["top_logprobs"]} if "top_logprobs" in req else {}
        return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": words}], **extra}
    prompt = [filler_id] * req["prompt_tokens"] if "prompt_tokens" in req else words
    return "/v1/completions", {**common, "prompt": prompt,
                               **{k: req[k] for k in ("logprobs", "cache_salt") if k in req}}


def _read_stream(response, req: dict, on_first_chunk=None) -> dict:
    """Tokens (from the usage chunk), [DONE], error events; a disconnecting client stops after
    ``abort_after`` chunks and closes the connection. ``on_first_chunk()`` runs when the first
    event arrives (the request is then in the engine, not queued in front of it)."""
    events = []
    for line in response.iter_lines():
        if not line.startswith(b"data: "):
            continue
        events.append(line[6:])
        if len(events) == 1 and on_first_chunk is not None:
            on_first_chunk()
        if req.get("abort_after") and len(events) >= req["abort_after"] and events[-1] != b"[DONE]":
            response.close()
            return {"aborted": True, "chunks": len(events)}
    done = bool(events) and events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events if e != b"[DONE]"]
    usage = [c["usage"] for c in chunks if c.get("usage")]
    return {"tokens": usage[-1]["completion_tokens"] if usage else None, "done": done, "chunks": len(events),
            "stream_errors": [c["error"] for c in chunks if c.get("error")][:3]}


def _read_whole(response, req: dict) -> dict:
    """Tokens from usage; for logprob requests, whether every token carries the logprobs asked."""
    data = response.json()
    got = {"tokens": data["usage"]["completion_tokens"], "done": True}
    choice = data["choices"][0]
    if "logprobs" in req:  # completions: a {token: logprob} dict per token, the top 20 and the sampled
        # token (up to 21; equal token strings merge, so possibly fewer)
        top = (choice.get("logprobs") or {}).get("top_logprobs") or []
        got["logprob_widths"] = sorted({len(t or {}) for t in top})
        got["logprobs_ok"] = (len(top) == req["expected_tokens"]
                              and all(1 <= len(t or {}) <= MAX_LOGPROBS + 1 for t in top))
    if "top_logprobs" in req:  # chat: a list per token, exactly top_logprobs long
        content = (choice.get("logprobs") or {}).get("content") or []
        got["logprob_widths"] = sorted({len(c["top_logprobs"]) for c in content})
        got["logprobs_ok"] = len(content) == req["expected_tokens"] and got["logprob_widths"] == [MAX_LOGPROBS]
    return got


def send(base_url: str, model: str, req: dict, filler_id: int, timeout: float | tuple = 600,
         on_first_chunk=None) -> dict:
    """Send one request; what came back and its outcome (``on_first_chunk``: see _read_stream)."""
    import requests

    endpoint, payload = body(req, model, filler_id)
    started = time.perf_counter()
    try:
        if isinstance(payload, str):
            r = requests.post(base_url + endpoint, data=payload, headers={"Content-Type": "application/json"},
                              timeout=timeout)
        else:
            r = requests.post(base_url + endpoint, json=payload, timeout=timeout, stream=bool(payload.get("stream")))
        got = {}
        if r.status_code == 200:
            got = _read_stream(r, req, on_first_chunk) if payload.get("stream") else _read_whole(r, req)
        elif r.status_code >= 400:
            got = {"detail": r.text[:300]}
    except Exception as error:  # noqa: BLE001 - every way of getting no answer is an outcome here
        result = {**req, "status": None, "error": f"{type(error).__name__}: {error}"[:500],
                  "timed_out": isinstance(error, requests.Timeout), "seconds": time.perf_counter() - started}
        return {**result, "outcome": judge(result)}
    result = {**req, "status": r.status_code, **got, "seconds": time.perf_counter() - started}
    return {**result, "outcome": judge(result)}


def judge(result: dict) -> str:
    """The one outcome of a request (see the module docstring)."""
    shutdown = result["phase"] == "shutdown"
    status, kind = result["status"], result["kind"]
    if status is None:
        return "cut_by_shutdown" if shutdown and not result.get("timed_out") else "lost"
    if kind in BAD_KINDS:
        return "rejected_4xx" if 400 <= status < 500 else "failed"
    if kind == "client_abort" and result.get("aborted"):
        return "aborted_by_client"
    expected = result["expected_tokens"]
    if (status == 200 and result.get("tokens") == expected and result.get("done")
            and result.get("logprobs_ok", True) and not result.get("stream_errors")):
        return "completed"
    short = status >= 500 or (status == 200 and ((result.get("tokens") or 0) < expected or not result.get("done")
                                                 or result.get("stream_errors")))
    return "cut_by_shutdown" if shutdown and short else "failed"


def tally(results: list[dict]) -> dict:
    """Outcome counts, overall and per phase."""
    counts = {"sent": len(results), **{o: sum(r["outcome"] == o for r in results) for o in OUTCOMES}}
    phases = sorted({r["phase"] for r in results})
    counts["by_phase"] = {p: {o: n for o in OUTCOMES if (n := sum(r["outcome"] == o for r in results
                                                                  if r["phase"] == p))} for p in phases}
    return counts
