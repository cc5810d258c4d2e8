"""A deterministic OpenAI-compatible streaming server for the load-test tests (plain asyncio, no framework).

Run as a subprocess (its own GIL, so the client's work never delays its timing):
    python fake_server.py --ttft 0.08 --itl 0.02 [--metrics]
It prints `PORT <n>` once listening on 127.0.0.1.

Timing: the first content chunk goes out `ttft` seconds after the request is read, chunk k at ttft + k*itl
(absolute deadlines, so sleep overshoot never accumulates). `max_tokens` chunks of one token each.
The model name picks a behaviour:
    fake            normal; usage in a final chunk when stream_options.include_usage
    fake-nousage    never sends usage
    fake-multi      two tokens per content chunk (usage counts tokens, chunks are half as many)
    fake-500        HTTP 500 with an OpenAI error object
    fake-429        HTTP 429 with Retry-After
    fake-flaky      every third fake-flaky request gets 429, others are normal
    fake-midstream  two content chunks, then an error chunk and [DONE]
    fake-hang       headers, then silence (for timeouts)
Chat requests get a role-only chunk immediately (not a token). GET /metrics (with --metrics) exposes
packserve: counters/histograms advanced once per completion request; GET /v1/models lists "fake".

GET /debug/timeline returns what the server actually did, keyed by prompt text: {"accept": perf_counter
when the connection was accepted, "content": [perf_counter of each content chunk], "last": perf_counter of
the last event before [DONE]}. perf_counter is CLOCK_MONOTONIC on Linux, shared by all processes, so tests
compare the client's measurements with these exact times rather than with nominal delays plus noise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

ARGS: argparse.Namespace
COUNTER = {"requests": 0, "flaky": 0}
TIMELINE: dict[str, dict] = {}


def _metrics_registry():
    from prometheus_client import CollectorRegistry, Counter, Histogram

    reg = CollectorRegistry()
    m = {
        "pre": Counter("packserve:num_preemptions", "preemptions", ["model_name"], registry=reg),
        "queue": Histogram("packserve:request_queue_time_seconds", "queue time", ["model_name"], registry=reg),
        "pack": Histogram("packserve:prefill_packing_efficiency", "packing", ["model_name"], registry=reg,
                          buckets=(0.5, 0.8, 0.9, 0.95, 1.0)),
        "gen": Counter("packserve:generation_tokens", "tokens", ["model_name"], registry=reg),
    }
    return reg, m


REG = METRICS = None


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    length = 0
    for line in lines[1:]:
        k, _, v = line.partition(":")
        if k.strip().lower() == "content-length":
            length = int(v.strip())
    body = await reader.readexactly(length) if length else b""
    return method, path, body


def _plain(writer: asyncio.StreamWriter, status: str, body: bytes, ctype: str = "application/json",
           extra: str = "") -> None:
    writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n{extra}"
                 f"Connection: close\r\n\r\n".encode() + body)


def _error(code: int, message: str, typ: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": typ, "param": None, "code": code}}).encode()


async def _send_event(writer: asyncio.StreamWriter, obj: dict | str) -> float:
    data = ("data: " + (obj if isinstance(obj, str) else json.dumps(obj)) + "\n\n").encode()
    t = time.perf_counter()
    writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    await writer.drain()
    return t


async def _stream(writer: asyncio.StreamWriter, req: dict, chat: bool, t0: float) -> None:
    model = req.get("model", "fake")
    n = int(req.get("max_tokens") or 16)
    want_usage = bool((req.get("stream_options") or {}).get("include_usage")) and model != "fake-nousage"
    per_chunk = 2 if model == "fake-multi" else 1
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                 b"Connection: close\r\n\r\n")
    await writer.drain()
    key = req["messages"][0]["content"] if chat else str(req.get("prompt"))
    tl = TIMELINE[key] = {"accept": t0, "content": [], "last": None}
    base = {"id": "cmpl-1", "created": int(time.time()), "model": model,
            "object": "chat.completion.chunk" if chat else "text_completion"}
    if chat:
        await _send_event(writer, base | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    if model == "fake-hang":
        await asyncio.sleep(3600)
    chunks = (n + per_chunk - 1) // per_chunk
    for k in range(chunks):
        delay = t0 + ARGS.ttft + k * ARGS.itl - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if model == "fake-midstream" and k == 2:
            await _send_event(writer, json.loads(_error(500, "engine failed mid-stream", "internal_error")))
            await _send_event(writer, "[DONE]")
            writer.write(b"0\r\n\r\n")
            return
        text = "".join(f" t{k * per_chunk + j}" for j in range(per_chunk) if k * per_chunk + j < n)
        choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
        tl["content"].append(await _send_event(writer, base | {"choices": [choice | {"finish_reason": None}]}))
    last = {"index": 0, "delta": {}} if chat else {"index": 0, "text": ""}
    tl["last"] = await _send_event(writer, base | {"choices": [last | {"finish_reason": "length"}]})
    if want_usage:
        prompt_tokens = len(req["messages"][0]["content"].split()) if chat else len(str(req.get("prompt", "")).split())
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
        tl["last"] = await _send_event(writer, base | {"choices": [], "usage": usage})
    await _send_event(writer, "[DONE]")
    writer.write(b"0\r\n\r\n")
    if METRICS is not None:
        METRICS["gen"].labels(model).inc(n)


def _flaky_fails() -> bool:
    COUNTER["flaky"] += 1
    return COUNTER["flaky"] % 3 == 0


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    t0 = time.perf_counter()  # at accept: the client's send time plus connect latency only
    try:
        method, path, body = await _read_request(reader)
        if method == "GET" and path == "/metrics" and REG is not None:
            from prometheus_client import generate_latest

            _plain(writer, "200 OK", generate_latest(REG), "text/plain; version=0.0.4")
        elif method == "GET" and path == "/debug/timeline":
            _plain(writer, "200 OK", json.dumps(TIMELINE).encode())
        elif method == "GET" and path == "/v1/models":
            _plain(writer, "200 OK", json.dumps({"object": "list", "data": [{"id": "fake", "object": "model"}]}).encode())
        elif method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
            req = json.loads(body)
            COUNTER["requests"] += 1
            model = req.get("model", "fake")
            if METRICS is not None:
                METRICS["pre"].labels(model).inc()
                METRICS["queue"].labels(model).observe(0.01)
                METRICS["pack"].labels(model).observe(0.9)
            if model == "fake-500":
                _plain(writer, "500 Internal Server Error", _error(500, "boom", "internal_error"))
            elif model == "fake-429" or (model == "fake-flaky" and _flaky_fails()):
                _plain(writer, "429 Too Many Requests", _error(429, "queue full", "rate_limit"), extra="Retry-After: 1\r\n")
            else:
                await _stream(writer, req, path.endswith("chat/completions"), t0)
        else:
            _plain(writer, "404 Not Found", _error(404, "not found", "not_found"))
        await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def serve() -> None:
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print("PORT", server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--ttft", type=float, default=0.08)
    p.add_argument("--itl", type=float, default=0.02)
    p.add_argument("--metrics", action="store_true")
    ARGS = p.parse_args()
    if ARGS.metrics:
        REG, METRICS = _metrics_registry()
    asyncio.run(serve())
