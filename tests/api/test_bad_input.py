"""Every kind of bad input, one test each: status, OpenAI error body, and a stream already in flight completes
unharmed."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

MAX_LEN = 256


def _err(r: httpx.Response, status: int, param: str | None = "skip") -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "/" not in body["error"]["message"] or "Bearer" in body["error"]["message"]  # no paths leak
    assert "Traceback" not in r.text
    if param != "skip":
        assert body["error"]["param"] == param, body
    return body["error"]


def _post(server, auth, body, path="/v1/completions", **kw):
    return httpx.post(server.url + path, json=body, headers=auth, timeout=60, **kw)


@pytest.mark.parametrize("raw,param", [
    (b'{"prompt": "hi", ', None),                                   # malformed JSON
    (b'{"prompt": "hi", "max_tokens": "many"}', "max_tokens"),      # wrong type
    (b'{"prompt": "hi", "temperature": [1]}', "temperature"),
    (b'{"max_tokens": 3}', "prompt"),                               # missing prompt
    (b'{"prompt": "hi", "stream": "maybe"}', "stream"),
    (b'[1, 2]', None),                                              # not an object
])
def test_malformed_and_wrong_types(server, auth, inflight, raw, param):
    with inflight():
        r = httpx.post(server.url + "/v1/completions", content=raw,
                       headers={**auth, "content-type": "application/json"})
        _err(r, 400, param)


@pytest.mark.parametrize("body,param", [
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),   # unknown field value
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
])
def test_chat_bad_values(server, auth, inflight, body, param):
    with inflight():
        _err(_post(server, auth, body, "/v1/chat/completions"), 400, param)


def test_empty_prompt(server, auth, inflight):
    with inflight():
        for prompt in ("", [], [[]]):
            _err(_post(server, auth, {"prompt": prompt}), 400, "prompt")


def test_prompt_longer_than_context(server, auth, inflight):
    with inflight():
        e = _err(_post(server, auth, {"prompt": list(range(10, 10 + MAX_LEN + 5)), "max_tokens": 1}), 400, "prompt")
        assert str(MAX_LEN + 5) in e["message"] and str(MAX_LEN) in e["message"]


def test_prompt_plus_max_tokens_over_context(server, auth, inflight):
    with inflight():
        e = _err(_post(server, auth, {"prompt": list(range(10, 210)), "max_tokens": 100}), 400, "max_tokens")
        assert "256" in e["message"]
        e = _err(_post(server, auth, {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 999},
                       "/v1/chat/completions"), 400, "max_completion_tokens")


@pytest.mark.parametrize("field,value", [
    ("max_tokens", 0), ("max_tokens", -3), ("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5), ("n", 0),
    ("n", 17), ("n", 10**6), ("stop", [f"s{i}" for i in range(17)]), ("logprobs", 21), ("top_k", -2),
    ("presence_penalty", 3.0), ("seed", 2**70), ("stop_token_ids", [10**9]), ("min_tokens", -1),
])
def test_sampling_out_of_range(server, auth, inflight, field, value):
    with inflight():
        _err(_post(server, auth, {"prompt": "hi", field: value}), 400, field)


def test_unsupported_openai_fields(server, auth, inflight):
    with inflight():
        _err(_post(server, auth, {"prompt": "hi", "suffix": "x"}), 400, "suffix")
        for bad in ({"best_of": 3, "stream": True}, {"best_of": 1, "n": 2}, {"best_of": 10 ** 6}):
            _err(_post(server, auth, {"prompt": "hi", **bad}), 400, "best_of")
        for bias in ({"5": 1000}, {"x": 1}, {"-3": 1}, {"10000000": 1}, {str(i): 1 for i in range(2049)}):
            _err(_post(server, auth, {"prompt": "hi", "logit_bias": bias}), 400, "logit_bias")
        _err(_post(server, auth, {"prompt": "hi", "max_tokens": 0}), 400, "max_tokens")  # 0 needs echo+logprobs
        chat = {"messages": [{"role": "user", "content": "hi"}]}
        _err(_post(server, auth, {**chat, "functions": [{"name": "f"}]}, "/v1/chat/completions"), 400, "functions")
        _err(_post(server, auth, {**chat, "response_format": {"type": "xml"}}, "/v1/chat/completions"),
             400, "response_format")
        # Defaults of those fields are fine.
        r = _post(server, auth, {**chat, "max_tokens": 2, "tools": [], "tool_choice": "none", "logit_bias": {},
                                 "response_format": {"type": "text"}}, "/v1/chat/completions")
        assert r.status_code == 200, r.text


def test_unknown_model(server, auth, inflight):
    with inflight():
        _err(_post(server, auth, {"model": "gpt-17", "prompt": "hi"}), 404, "model")


def test_auth(server, auth, inflight):
    with inflight():
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": auth["Authorization"] + "x"},
                        {"Authorization": "Basic " + auth["Authorization"].split()[1]}):
            r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi"}, headers=headers)
            _err(r, 401)
            assert r.headers.get("www-authenticate") == "Bearer"
        _err(httpx.get(server.url + "/v1/models"), 401)
        assert httpx.get(server.url + "/health").status_code == 200
        assert httpx.get(server.url + "/metrics").status_code == 200


def test_body_too_large(server, auth, inflight):
    with inflight():
        r = _post(server, auth, {"prompt": "x" * (9 * 2**20)})
        _err(r, 413)


def test_unknown_route_and_method(server, auth, inflight):
    with inflight():
        _err(httpx.get(server.url + "/v1/nothing", headers=auth), 404)
        _err(httpx.get(server.url + "/v1/completions", headers=auth), 405)


def test_client_disconnect_aborts_and_frees_kv(server, auth, helpers, inflight):
    values = helpers["metric_values"]
    before = values(server.url)
    aborted0 = before.get("packserve:request_success_total{finished_reason=abort}", 0.0)
    with inflight():
        body = {"prompt": "Once upon a time", "max_tokens": 240, "temperature": 0, "ignore_eos": True,
                "stream": True, "n": 8}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=auth, timeout=60) as r:
            lines = r.iter_lines()
            got = 0
            for line in lines:
                got += line.startswith("data: ")
                if got == 3:
                    break
        # Closed after 3 chunks of 8 x 240: the server must abort all 8.
        deadline = time.monotonic() + 10
        while values(server.url).get("packserve:request_success_total{finished_reason=abort}", 0.0) < aborted0 + 8:
            assert time.monotonic() < deadline, "disconnect did not abort the request"
            time.sleep(0.05)
    deadline = time.monotonic() + 10
    while True:
        m = values(server.url)
        if m["packserve:kv_cache_usage_perc"] == 0.0 and m["packserve:num_requests_running"] == 0.0:
            break
        assert time.monotonic() < deadline, m
        time.sleep(0.05)
    assert m["packserve:request_success_total{finished_reason=abort}"] == aborted0 + 8


def test_nonstreaming_disconnect_aborts(server, auth, helpers):
    """The client sends a long non-streamed request, waits until the engine runs it, then closes the connection:
    all 16 choices are aborted (no timing assumption about how long generation takes)."""
    values = helpers["metric_values"]
    aborted0 = values(server.url).get("packserve:request_success_total{finished_reason=abort}", 0.0)
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 240, "temperature": 0,  # max-model-len 256
                       "ignore_eos": True, "n": 16}).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: {auth['Authorization']}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                     + body)
        deadline = time.monotonic() + 10
        while values(server.url).get("packserve:num_requests_running", 0.0) < 16:
            assert time.monotonic() < deadline, "the request never ran"
            time.sleep(0.01)
    deadline = time.monotonic() + 10
    while values(server.url).get("packserve:request_success_total{finished_reason=abort}", 0.0) < aborted0 + 16:
        assert time.monotonic() < deadline, "disconnect did not abort the non-streamed request"
        time.sleep(0.05)


def test_batch_larger_than_queue(server, auth, inflight):
    with inflight():
        _err(_post(server, auth, {"prompt": ["hi"] * 40, "n": 2}), 400, "prompt")
        _err(_post(server, auth, {"prompt": [[11, 12]] * 65}), 400, "prompt")
