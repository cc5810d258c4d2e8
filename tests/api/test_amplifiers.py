"""Requests that cost the server far more than they cost the client (found by a red-team pass), each bounded:
long stop-id and bad-word lists are refused before any per-step or tokenizing work, JSON nested past the parser's
stack is a 400 (was a 500), grammar specs over the size / nesting / repetition limits are refused before they
compile, compiles are bounded in number and wait (packserve.api.grammars), undelivered outputs are coalesced per
request, and a stream whose client reads nothing is dropped."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import time

import httpx
import pytest

from packserve.api.errors import APIError
from packserve.api.grammars import GrammarCompiles
from packserve.engine.async_engine import _Outputs
from packserve.engine.request import MAX_STOP_TOKEN_IDS, GuidedSpec, ParameterError, RequestOutput, SamplingParams
from packserve.engine.grammar_limits import (MAX_NESTING, MAX_OPTIONAL_PROPERTIES, MAX_REPEAT, MAX_REPEAT_TOTAL,
                                               MAX_SPEC_CHARS, check_spec)

DEEP = "[" * 2000 + "]" * 2000


def _post(server, auth, path, body):
    return httpx.post(server.url + path, json={"model": "llama", **body}, headers=auth, timeout=60)


def _param(r) -> str:
    assert r.status_code == 400, r.text
    return r.json()["error"]["param"]


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": list(range(MAX_STOP_TOKEN_IDS + 1))}, "stop_token_ids"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [7] * 200_000}, "stop_token_ids"),
    ("/v1/completions", {"prompt": "hi", "bad_words": [f"w{i}" for i in range(100_000)]}, "bad_words"),
    ("/v1/completions", {"prompt": "hi", "bad_words": ["x" * 100_000]}, "bad_words"),
    ("/v1/completions", {"prompt": "hi", "guided_json": DEEP}, "guided_json"),
    ("/v1/completions", {"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": DEEP}}}, "response_format"),
    ("/v1/completions", {"prompt": "hi", "guided_json": {"type": "string", "pattern": "[a-z]{1,30000}"}}, "guided_json"),
    ("/v1/completions", {"prompt": "hi", "guided_regex": "(ab){5000}"}, "guided_regex"),
    ("/v1/completions", {"prompt": "hi", "guided_choice": ["y" * 4000] * 100}, "guided_choice"),
    # bounded on the raw JSON, before validation (250,000 messages took seconds of the engine's GIL)
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": ""}] * 250_000}, "messages"),
    ("/tokenize", {"messages": [{"role": "user", "content": ""}] * 250_000}, "messages"),
    ("/v1/completions", {"prompt": [5] * 1_000_000}, "prompt"),
    ("/v1/completions", {"prompt": [[5]] * 100_000}, "prompt"),
])
def test_amplifying_requests_are_refused(server, auth, inflight, path, body, param):
    with inflight():  # a normal stream runs throughout, unharmed
        t = time.monotonic()
        assert _param(_post(server, auth, path, {"max_tokens": 2, **body})) == param
        assert time.monotonic() - t < 20  # refused, not worked through (a generous bound: a shared 2-core host)


def test_deeply_nested_tool_arguments_are_text(server, auth):
    """Past arguments nested past the parser's stack reach the template as text, as other non-JSON ones do."""
    msgs = [{"role": "user", "content": "hi"},
            {"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                  "function": {"name": "f", "arguments": DEEP}}]},
            {"role": "tool", "tool_call_id": "c", "content": "ok"}]
    tok = _post(server, auth, "/tokenize", {"messages": msgs})
    assert tok.status_code == 200 and tok.json()["count"] > 1000
    r = _post(server, auth, "/v1/chat/completions", {"messages": msgs, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text  # (256 here)


def test_stop_token_ids_are_deduplicated():
    p = SamplingParams(stop_token_ids=[5, 7, 5] * 600)
    assert p.stop_token_ids == (5, 7)


@pytest.mark.parametrize("kind,value,fits", [
    ("json_schema", json.dumps({"type": "string", "pattern": f"[a-z]{{1,{MAX_REPEAT}}}"}), True),
    ("json_schema", json.dumps({"type": "string", "pattern": f"[a-z]{{{MAX_REPEAT + 1}}}"}), False),
    ("regex", f"a{{{MAX_REPEAT + 1},}}", False),
    ("grammar", f'root ::= "a"{{2,{MAX_REPEAT + 1}}}', False),
    ("json_schema", '{"a": "{5000}"}'.replace('"{5000}"', '"[[[["'), True),  # brackets inside strings: not nesting
    ("json_schema", "[" * MAX_NESTING + "]" * MAX_NESTING, True),
    ("json_schema", "[" * (MAX_NESTING + 1) + "]" * (MAX_NESTING + 1), False),
    ("json_schema", json.dumps({"enum": ["v" * 1000] * (MAX_SPEC_CHARS // 1000)}), False),
    ("json_schema", json.dumps({"type": "string", "pattern": "(" * (MAX_NESTING + 1) + ")" * (MAX_NESTING + 1)}),
     False),  # 30,000 of them overflowed xgrammar's stack
    ("json_schema", json.dumps({"type": "string", "pattern": "\\(" * 200 + "x"}), True),  # escaped: not groups
    ("regex", "(" * (MAX_NESTING + 1) + "a" + ")" * (MAX_NESTING + 1), False),
    ("json_schema", json.dumps({"type": "string", "pattern": "|".join(f"(.{{{MAX_REPEAT}}}x{i})" for i in range(
        MAX_REPEAT_TOTAL // MAX_REPEAT + 1))}), False),
    ("json_schema", json.dumps({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(
        MAX_OPTIONAL_PROPERTIES + 1)}}), False),
    ("json_schema", json.dumps({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(
        2 * MAX_OPTIONAL_PROPERTIES)}, "required": [f"p{i}" for i in range(MAX_OPTIONAL_PROPERTIES)]}), True),
])
def test_spec_limits(kind, value, fits):
    spec = GuidedSpec(kind, value, "p")
    if fits:
        check_spec(spec)
    else:
        with pytest.raises(ParameterError) as e:
            check_spec(spec)
        assert e.value.param == "p"


# -- grammar compiles: bounded in number and wait -----------------------------------
def _spec(i) -> GuidedSpec:
    return GuidedSpec("regex", f"a{i}", "guided_regex")


def _slow_compiler():
    """A compile function that blocks until released, recording what it was asked to compile."""
    started, release = [], threading.Event()

    def slow(spec):
        started.append(spec)
        release.wait(10)
        return spec

    return slow, started, release


def test_compiles_run_once_per_spec_and_bounded():
    slow, started, release = _slow_compiler()

    async def main():
        gc = GrammarCompiles(slow, lambda spec: False, slots=1, max_queued=1, timeout=60)
        same = [asyncio.ensure_future(gc.compile(_spec(0))) for _ in range(3)]  # one compile for three requests
        while not started:  # the worker runs it (the queue is empty again)
            await asyncio.sleep(0.01)
        queued = asyncio.ensure_future(gc.compile(_spec(1)))  # waits for the slot
        await asyncio.sleep(0.2)
        with pytest.raises(APIError) as busy:  # a third distinct spec: over slots + queue
            await gc.compile(_spec(2))
        assert busy.value.status == 503 and busy.value.headers.get("Retry-After")
        release.set()
        await asyncio.gather(*same, queued)
        return started

    assert asyncio.run(main()) == [_spec(0), _spec(1)]


def test_compile_wait_is_bounded_and_abandoned_compiles_never_start():
    slow, started, release = _slow_compiler()

    async def main():
        gc = GrammarCompiles(slow, lambda spec: spec == _spec(9), slots=1, max_queued=4, timeout=0.3)
        first = asyncio.ensure_future(gc.compile(_spec(0)))  # compiles past the timeout: the spec's fault
        while not started:
            await asyncio.sleep(0.01)
        with pytest.raises(APIError) as queued:  # never got the worker: the server's fault, retry later
            await gc.compile(_spec(1))
        assert queued.value.status == 503 and queued.value.code == "grammar_compiler_busy"
        with pytest.raises(APIError) as slow_one:
            await first
        assert slow_one.value.status == 400 and slow_one.value.code == "grammar_too_complex"
        await gc.compile(_spec(9))  # already compiled: no wait behind the busy worker
        release.set()
        await asyncio.sleep(0.3)
        await gc.compile(_spec(0))  # finished meanwhile: waits for nothing new (compiled again: ours caches)
        return started

    started = asyncio.run(main())
    assert _spec(1) not in started  # nobody waited for it when the slot freed


def test_compile_errors_are_400s():
    def bad(spec):
        raise ParameterError("the regex does not compile: x", spec.param)

    async def main():
        with pytest.raises(APIError) as e:
            await GrammarCompiles(bad, lambda spec: False).compile(_spec(0))
        return e.value

    err = asyncio.run(main())
    assert err.status == 400 and err.param == "guided_regex" and "does not compile" in err.message


# -- undelivered outputs and stalled readers ------------------------------------------
def _out(rid: str, n: int, finished=False) -> RequestOutput:
    from packserve.engine.request import CompletionOutput

    return RequestOutput(rid, None, [1], [CompletionOutput(0, "x" * n, list(range(n)), None, None)], finished)


def test_undelivered_outputs_keep_the_newest_per_request():
    async def main():
        q = _Outputs()
        for n in range(1, 1000):
            q.put_nowait(_out("a", n))
            q.put_nowait(_out("b", n))
        q.put_nowait(_out("a", 1000, finished=True))
        q.put_nowait(RuntimeError("engine died"))
        got = [await q.get(), await q.get()]
        return got, await q.get()

    got, last = asyncio.run(main())
    assert [(o.request_id, len(o.outputs[0].token_ids), o.finished) for o in got] == [("a", 1000, True),
                                                                                      ("b", 999, False)]
    assert isinstance(last, RuntimeError)  # after the outputs already there


def test_a_stream_nobody_reads_is_dropped(tiny_model, helpers, monkeypatch):
    import packserve.api.app as app

    monkeypatch.setattr(app, "SSE_WRITE_TIMEOUT", 1.0)
    srv = helpers["InProcessServer"](tiny_model, max_model_len=1024)
    try:
        body = json.dumps({"model": "tiny", "prompt": "hi", "n": 8, "max_tokens": 900, "ignore_eos": True,
                           "logprobs": 20, "echo": True, "stream": True}).encode()
        sock = socket.create_connection(("127.0.0.1", srv.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:  # never read; the engine ends the requests (done, or aborted)
            if _value(httpx.get(srv.url + "/metrics", timeout=10).text, "packserve:num_requests_running") == 0:
                break
            time.sleep(0.5)
        time.sleep(3 * app.SSE_WRITE_TIMEOUT)  # (the stalled send gives up after the write timeout)
        # Dropped: reading now finds the connection closed before the stream's end. (A server still waiting to
        # send would resume and finish with [DONE] on a connection it keeps open.)
        sock.settimeout(20)
        tail, closed = b"", False
        try:
            while chunk := sock.recv(1 << 16):
                tail = (tail + chunk)[-64:]
            closed = True
        except (TimeoutError, ConnectionResetError):
            closed = not isinstance(sys.exc_info()[1], TimeoutError)
        assert closed and b"[DONE]" not in tail, tail
        sock.close()
        r = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 4},
                       timeout=60)
        assert r.status_code == 200
    finally:
        srv.stop()


def _value(metrics: str, name: str, label: str = "") -> float:
    for line in metrics.splitlines():
        if line.startswith(name) and label in line:
            return float(line.rsplit(" ", 1)[1])
    return -1.0


@pytest.mark.parametrize("obj", [
    {"choices": [{"text": "é\u2028", "logprobs": {"top": [{"a": -1.0}] * 3}}, {"text": ""}], "usage": {"n": 1}},
    {"count": 9000, "tokens": list(range(9000)), "token_strs": None, "empty": [], "one": [[1]]},
    [1, 2, {"x": "y"}], {},
])
def test_response_bodies_encoded_in_pieces_are_the_same_json(obj):
    """Responses are encoded piecewise so no single json.dumps call holds the GIL for long; the bytes parse back to
    the same value and equal starlette's compact encoding."""
    from starlette.responses import JSONResponse

    from packserve.api.responses import json_bytes

    assert json_bytes(obj) == JSONResponse(obj).body


def test_echo_with_logprobs_is_bounded_per_request(tiny_model, helpers, monkeypatch):
    """echo + logprobs scores every prompt token of every choice: prompt tokens x n is bounded per request (15
    prompts of 2047 tokens x n=16 made a 306 MB response); the bound's edge passes."""
    from packserve.api import serving

    monkeypatch.setattr(serving, "MAX_PROMPT_LOGPROB_TOKENS", 600)
    srv = helpers["InProcessServer"](tiny_model, max_model_len=256)
    try:
        def score(prompts, n):
            return httpx.post(srv.url + "/v1/completions", json={"prompt": prompts, "n": n, "max_tokens": 0,
                                                                 "echo": True, "logprobs": 2}, timeout=60)
        ok = score([[5] * 100] * 3, 2)  # 600 scored
        assert ok.status_code == 200, ok.text
        assert len(ok.json()["choices"]) == 6 and len(ok.json()["choices"][0]["logprobs"]["tokens"]) == 100
        err = score([[5] * 100] * 3, 3)  # 900
        assert err.status_code == 400 and err.json()["error"]["param"] == "logprobs", err.text
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": [[5] * 100] * 3, "n": 3, "max_tokens": 2},
                       timeout=60)
        assert r.status_code == 200  # without echo nothing is scored
    finally:
        srv.stop()

