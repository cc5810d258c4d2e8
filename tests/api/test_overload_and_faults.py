"""In-process servers: bounded queue (429), an error after streaming began, a dead engine loop (503)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest


def _wait_metric(helpers, url, name, target, timeout=10.0):
    deadline = time.monotonic() + timeout
    while True:
        m = helpers["metric_values"](url)
        if m.get(name) == target:
            return m
        assert time.monotonic() < deadline, (name, m.get(name), target)
        time.sleep(0.02)


@pytest.fixture(scope="module")
def tiny_queue_server(tiny_model, helpers):
    srv = helpers["InProcessServer"](tiny_model, max_waiting=1, max_num_seqs=1, max_num_batched_tokens=64,
                                     max_model_len=512)
    yield srv
    srv.stop()


def test_queue_full_429_with_retry_after(tiny_queue_server, helpers):
    url = tiny_queue_server.url
    with helpers["inflight_stream"](url, max_tokens=400):  # occupies the only running slot
        waiting: dict = {}

        def second():
            r = httpx.post(url + "/v1/completions", json={"prompt": "Hello", "max_tokens": 3, "temperature": 0},
                           timeout=60)
            waiting["status"] = r.status_code

        t = threading.Thread(target=second)
        t.start()
        _wait_metric(helpers, url, "packserve:num_requests_waiting", 1.0)
        r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 429, r.text
        assert r.headers["retry-after"] == "1"
        err = r.json()["error"]
        assert err["code"] == "queue_full" and set(err) == {"message", "type", "param", "code"}
        # Streaming requests are refused the same way (before any SSE begins).
        r = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "stream": True})
        assert r.status_code == 429
        t.join(60)
        assert waiting["status"] == 200
    m = helpers["metric_values"](url)
    assert m["packserve:http_errors_total{status_code=429}"] == 2.0


class _FaultyStream:
    """Wraps a RequestStream: raises after `after` outputs (an error once streaming has begun)."""

    def __init__(self, inner, after: int):
        self.inner, self.after, self.n = inner, after, 0
        self.request_ids = inner.request_ids

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.n >= self.after:
            raise RuntimeError("injected fault")
        self.n += 1
        return await self.inner.__anext__()

    def get_nowait(self):
        return None

    def abort(self):
        self.inner.abort()


def _inject_faults(state):
    real_submit = state.engine.submit

    async def submit(requests, **kw):
        rs = await real_submit(requests, **kw)
        if requests[0].prompt and "FAULT" in requests[0].prompt:
            return _FaultyStream(rs, after=3)
        return rs

    state.engine.submit = submit


@pytest.fixture(scope="module")
def faulty_server(tiny_model, helpers):
    srv = helpers["InProcessServer"](tiny_model, wrap_engine=_inject_faults, max_model_len=256)
    yield srv
    srv.stop()


def test_error_after_streaming_began(faulty_server, helpers):
    url = faulty_server.url
    with helpers["inflight_stream"](url):
        body = {"prompt": "FAULT here", "max_tokens": 50, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            events, done = helpers["read_sse"](r)
        assert done, "the stream must still end with [DONE]"
        assert 1 <= len(events) <= 4 and "choices" in events[0]
        err = events[-1]["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "server_error"
        assert "injected" not in err["message"]  # internals stay in the log

        import openai

        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.APIError):
            for _ in client.completions.create(model="tiny", prompt="FAULT again", max_tokens=50, stream=True,
                                               extra_body={"ignore_eos": True}):
                pass
    # The failed requests were aborted: nothing holds KV any more.
    _wait_metric(helpers, url, "packserve:kv_cache_usage_perc", 0.0)


def test_dead_engine_loop_gives_503(tiny_model, helpers):
    srv = helpers["InProcessServer"](tiny_model, max_model_len=256)
    try:
        url = srv.url
        engine = srv.async_engine.engine
        real_step = engine.step
        calls = {"n": 0}

        def failing_step():
            calls["n"] += 1
            if calls["n"] > 5:
                raise RuntimeError("simulated device failure")
            return real_step()

        engine.step = failing_step
        body = {"prompt": "Hello", "max_tokens": 50, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            events, done = helpers["read_sse"](r)
        assert done and "error" in events[-1]
        r = httpx.get(url + "/health")
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
        r = httpx.post(url + "/v1/completions", json={"prompt": "Hello"})
        assert r.status_code == 503
        assert json.loads(r.text)["error"]["type"] == "server_error"
    finally:
        srv.stop()


def test_drain_waits_for_a_request_still_being_tokenized(tiny_model, helpers):
    """Tokenizing runs in a worker thread, outside the engine: a request caught there when the server starts
    draining still counts as in flight, so the drain waits for it and it completes (200, not 503)."""
    import asyncio

    srv = helpers["InProcessServer"](tiny_model, max_model_len=256)
    entered, release = threading.Event(), threading.Event()
    tok = srv.state.tokenizer
    real_encode = tok.encode

    def held_encode(*args, **kwargs):  # the tokenizer itself, held at a point the test controls
        entered.set()
        release.wait(30)
        return real_encode(*args, **kwargs)

    tok.encode = held_encode
    result = {}

    def send():
        result["r"] = httpx.post(srv.url + "/v1/completions", json={"prompt": "Hello there", "max_tokens": 4},
                                 timeout=60)

    client = threading.Thread(target=send)
    try:
        client.start()
        assert entered.wait(30)
        assert srv.state.inflight == 1  # counted before tokenization finished

        async def drain_while_held():
            task = asyncio.ensure_future(srv.state.drain(30.0))
            await asyncio.sleep(0.3)
            early = task.done()
            release.set()
            await task
            return early

        assert not asyncio.run(drain_while_held())  # it waited for the request
        client.join(30)
        assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] == 4
    finally:
        release.set()
        tok.encode = real_encode
        srv.stop()


def test_huge_prompts_tokenize_two_at_a_time_and_small_ones_never_wait(tiny_model, helpers):
    """Prompts over BIG_TEXT_CHARS share two tokenizer threads (each takes ~200x its size in memory); a short
    prompt sent while both are busy is served at once."""
    from packserve.api.app import BIG_TEXT_CHARS

    srv = helpers["InProcessServer"](tiny_model, max_model_len=256)
    tok = srv.state.tokenizer
    real_encode = tok.encode
    lock, inside, release = threading.Lock(), [0], threading.Event()
    both = threading.Event()

    def held_encode(text, *args, **kwargs):
        if len(text) > BIG_TEXT_CHARS:
            with lock:
                inside[0] += 1
                if inside[0] == 2:
                    both.set()
            release.wait(60)
        return real_encode(text, *args, **kwargs)

    tok.encode = held_encode
    statuses = []
    big = "zebra " * (BIG_TEXT_CHARS // 6 + 10)

    def send_big():
        statuses.append(httpx.post(srv.url + "/v1/completions", json={"prompt": big, "max_tokens": 1},
                                   timeout=120).status_code)

    clients = [threading.Thread(target=send_big) for _ in range(3)]
    try:
        for c in clients:
            c.start()
        assert both.wait(60)
        small = httpx.post(srv.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=30)
        assert small.status_code == 200  # not queued behind the held big ones
        time.sleep(0.3)
        assert inside[0] == 2  # the third big prompt waits for a tokenizer slot
        release.set()
        for c in clients:
            c.join(120)
        assert statuses == [400, 400, 400] and inside[0] == 3  # each tokenized, then over --max-model-len
    finally:
        release.set()
        tok.encode = real_encode
        srv.stop()


def test_tokenizing_runs_off_the_event_loop(tiny_model, helpers):
    """While a text prompt is being tokenized (held inside the tokenizer here, as a multi-megabyte prompt would
    be for seconds), the event loop still answers: /health, and a token-id request end to end."""
    srv = helpers["InProcessServer"](tiny_model, max_model_len=256)
    tok = srv.state.tokenizer
    real_encode = tok.encode
    entered, release = threading.Event(), threading.Event()

    def held_encode(*args, **kwargs):
        entered.set()
        release.wait(60)
        return real_encode(*args, **kwargs)

    tok.encode = held_encode
    result = {}
    client = threading.Thread(target=lambda: result.setdefault("r", httpx.post(
        srv.url + "/v1/completions", json={"prompt": "Hello there", "max_tokens": 3}, timeout=60)))
    try:
        client.start()
        assert entered.wait(30)
        assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
        ids = httpx.post(srv.url + "/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 2}, timeout=10)
        assert ids.status_code == 200 and ids.json()["usage"]["completion_tokens"] == 2
        release.set()
        client.join(30)
        assert result["r"].status_code == 200
    finally:
        release.set()
        tok.encode = real_encode
        srv.stop()
