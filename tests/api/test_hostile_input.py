"""Hostile and malformed input, against the real server: each case answers a clear 400/401 and nothing else
breaks (issue: hardening, items 5-10)."""

import json
import socket
import threading
import time

import httpx
import pytest


def _post(server, path, body=None, headers=None, content=None):
    return httpx.post(server.url + path, json=body, content=content, headers=headers, timeout=60)


def _error(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "abc \ud800", "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": ["fine", "abc \udfff x"], "max_tokens": 2}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "ok"},
                                           {"role": "user", "content": "abc \ud800"}], "max_tokens": 2},
     "messages[1].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}],
                              "max_tokens": 2}, "messages[0].content"),
])
def test_lone_surrogates_are_a_400_naming_the_field(server, auth, path, body, param):
    """JSON's "\\ud800" escapes decode to lone surrogates, which the tokenizer cannot encode (it raised TypeError:
    a 500 with a traceback)."""
    r = _post(server, path, content=json.dumps(body).encode(), headers={**auth, "Content-Type": "application/json"})
    err = _error(r, 400)
    assert err["param"] == param and "surrogate" in err["message"]


@pytest.mark.parametrize("prompt", [[True], [5, False, 7], [[1, 2], [True]]])
def test_booleans_are_not_token_ids(server, auth, prompt):
    err = _error(_post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 2}, auth), 400)
    assert err["param"].startswith("prompt")
    err = _error(_post(server, "/v1/completions", {"prompt": [5, 6], "stop_token_ids": [True]}, auth), 400)
    assert err["param"].startswith("stop_token_ids")


def test_tiny_temperature_is_greedy_not_an_empty_answer(server, auth):
    """temperature 1e-45 made every probability NaN and the sampler picked token 0 (EOS): an empty "stop"."""
    body = {"prompt": [5, 6, 7, 8], "max_tokens": 8, "ignore_eos": True}
    greedy = _post(server, "/v1/completions", {**body, "temperature": 0}, auth).json()
    tiny = _post(server, "/v1/completions", {**body, "temperature": 1e-45}, auth).json()
    assert tiny["choices"][0]["text"] == greedy["choices"][0]["text"]
    assert tiny["usage"]["completion_tokens"] == 8


def test_a_body_that_is_not_json_says_so(server, auth):
    r = _post(server, "/v1/completions", content=b"prompt=hi", headers={**auth, "Content-Type": "text/plain"})
    err = _error(r, 400)
    assert "application/json" in err["message"] and "text/plain" in err["message"]
    err = _error(_post(server, "/v1/completions", content=b"[1, 2]",
                       headers={**auth, "Content-Type": "application/json"}), 400)
    assert "JSON object" in err["message"]


@pytest.mark.parametrize("content", [b'{"prompt": "\xff\xfe", "max_tokens": 1}', b"[" * 100_000 + b"]" * 100_000])
def test_undecodable_bodies_say_why(server, auth, content):
    r = _post(server, "/v1/completions", content=content, headers={**auth, "Content-Type": "application/json"})
    err = _error(r, 400)
    assert err["code"] == "invalid_json" and ("UTF-8" in err["message"] or "nested too deeply" in err["message"])


def test_top_logprobs_out_of_range_names_top_logprobs(server, auth):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "logprobs": True,
            "top_logprobs": 10_000}
    err = _error(_post(server, "/v1/chat/completions", body, auth), 400)
    assert err["param"] == "top_logprobs" and "top_logprobs" in err["message"]


def test_the_key_is_checked_before_the_body(server):
    """Without the key, a malformed body gets 401, not a 400 that shows the body was parsed."""
    for content in (b"{not json", b'{"prompt": [true]}'):
        r = _post(server, "/v1/completions", content=content, headers={"Content-Type": "application/json"})
        assert _error(r, 401)["code"] == "invalid_api_key"


def test_docs_need_the_key_and_probes_do_not(server, auth):
    for path in ("/docs", "/redoc", "/openapi.json", "/v1/models"):
        assert httpx.get(server.url + path, timeout=10).status_code == 401, path
        assert httpx.get(server.url + path, headers=auth, timeout=10).status_code == 200, path
    for path in ("/health", "/metrics", "/version"):
        assert httpx.get(server.url + path, timeout=10).status_code == 200, path


def test_transfer_encoding_with_content_length_is_refused_and_closed(server, auth):
    """Both framings at once (RFC 9112 6.1, request smuggling behind proxies): 400 and the connection closed, so
    nothing after the ambiguous body is read as a next request."""
    body = b'{"prompt": [5, 6], "max_tokens": 1}'
    smuggled = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    raw = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
           + f"Authorization: {auth['Authorization']}\r\n".encode()
           + b"Transfer-Encoding: chunked\r\n" + f"Content-Length: {len(chunked)}\r\n\r\n".encode()
           + chunked + smuggled)
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as s:
        s.sendall(raw)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break  # the server closed the connection
            data += chunk
    assert data.startswith(b"HTTP/1.1 400") and b"Transfer-Encoding and Content-Length" in data
    assert data.count(b"HTTP/1.1") == 1  # the smuggled request was never answered


def test_a_chat_of_many_tiny_messages_is_refused_before_rendering(server, auth):
    """100,000 messages of "hi" (1.3 MB of JSON, ~1.2M tokens once rendered) slipped under the large-prompt
    limiter: now the message count alone refuses it, and other clients are answered meanwhile."""
    body = {"messages": [{"role": "user", "content": "hi"}] * 100_000, "max_tokens": 2}
    result = {}

    def send():
        result["r"] = _post(server, "/v1/chat/completions", body, auth)

    th = threading.Thread(target=send)
    th.start()
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200
    th.join(60)
    err = _error(result["r"], 400)
    assert err["param"] == "messages" and err["code"] == "context_length_exceeded"


@pytest.mark.parametrize("stop,what", [(["x"] * 17, "at most 16"), (["y" * 1025], "at most 1024")])
def test_stop_lists_are_bounded(server, auth, stop, what):
    err = _error(_post(server, "/v1/completions", {"prompt": [5, 6], "max_tokens": 2, "stop": stop}, auth), 400)
    assert err["param"] == "stop" and what in err["message"]


def test_huge_token_id_bodies_are_parsed_off_the_event_loop(server, auth):
    """Two 6.7 MB lists of token ids: parsing them on the event loop held /health for seconds; now the probes
    sent meanwhile are answered at once, and the bodies get their 400 (too long for the context)."""
    body = json.dumps({"prompt": [31999] * 1_000_000, "max_tokens": 1}).encode()  # 7 bytes per id
    assert len(body) > 6_000_000
    results = []

    def send():
        results.append(_post(server, "/v1/completions", content=body,
                             headers={**auth, "Content-Type": "application/json"}))

    threads = [threading.Thread(target=send) for _ in range(2)]
    for th in threads:
        th.start()
    worst = 0.0
    while any(th.is_alive() for th in threads):
        t = time.monotonic()
        assert httpx.get(server.url + "/health", timeout=10).status_code == 200
        worst = max(worst, time.monotonic() - t)
        time.sleep(0.05)
    assert worst < 1.0
    assert [r.status_code for r in results] == [400, 400]
    assert all(r.json()["error"]["param"] == "prompt" for r in results)
