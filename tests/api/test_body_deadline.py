"""The request-body limits of packserve.api.middleware.BodyLimitMiddleware driven through the ASGI interface: a
body that trickles in (each gap under the read timeout) is cut off once it falls behind its rate allowance,
while a body arriving at a normal pace, or a large one arriving steadily, reaches the app."""

from __future__ import annotations

import asyncio
import json
import time

from packserve.api.middleware import BodyLimitMiddleware


async def _run(chunks: int, gap: float, size: int, grace: float = 0.5, rate: int = 1000):
    reached = []

    async def app(scope, receive, send):
        msg = await receive()
        reached.append(len(msg["body"]))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    mw = BodyLimitMiddleware(app, max_bytes=1 << 20, read_timeout=1.0)
    mw.BODY_GRACE, mw.MIN_BODY_RATE = grace, rate
    sent = 0

    async def receive():
        nonlocal sent
        if sent >= chunks:
            await asyncio.sleep(3600)  # the client has nothing more to send
        await asyncio.sleep(gap)
        sent += 1
        return {"type": "http.request", "body": b"x" * size, "more_body": sent < chunks}

    out = []

    async def send(msg):
        out.append(msg)

    t = time.monotonic()
    await mw({"type": "http", "method": "POST", "headers": [], "path": "/v1/completions"}, receive, send)
    status = out[0]["status"]
    body = b"".join(m.get("body", b"") for m in out if m["type"] == "http.response.body")
    return status, body, reached, time.monotonic() - t


def test_a_trickling_body_is_cut_off_by_its_rate_allowance():
    # One byte every 0.2 s: never a gap of the read timeout (1 s), but 0.5 s + 1 ms per byte received is spent
    # after ~0.6 s.
    status, body, reached, took = asyncio.run(_run(chunks=100, gap=0.2, size=1))
    assert status == 408 and not reached
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert took < 2.0


def test_bodies_at_a_normal_pace_reach_the_app():
    status, _, reached, _ = asyncio.run(_run(chunks=5, gap=0.05, size=10))
    assert status == 200 and reached == [50]
    # A large body arriving steadily earns its time: 8 chunks of 1000 bytes 0.3 s apart (2.4 s, past the grace)
    # keep within 0.5 s + 1 s per 1000 bytes.
    status, _, reached, took = asyncio.run(_run(chunks=8, gap=0.3, size=1000))
    assert status == 200 and reached == [8000] and took > 2.0
