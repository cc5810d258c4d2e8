"""32 concurrent streaming requests of different lengths, each identical to its sequential result."""

from __future__ import annotations

import asyncio
import json

import httpx

from packserve.checkpoints import CORPUS

N = 32


def _requests() -> list[dict]:
    words = CORPUS.split()
    reqs = []
    for i in range(N):
        start = (7 * i) % (len(words) - 40)
        prompt = " ".join(words[start:start + 1 + (i * 5) % 37])
        # Greedy; every 4th request samples with a seed (its own generator: batch-independent too).
        sampling = {"temperature": 0.9, "seed": 100 + i} if i % 4 == 3 else {"temperature": 0}
        reqs.append({"prompt": prompt, "max_tokens": 4 + (i * 11) % 41, "ignore_eos": i % 2 == 0, **sampling})
    return reqs


async def _stream(client: httpx.AsyncClient, body: dict) -> tuple[str, str, int]:
    text, reason, usage = "", None, None
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                             "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200, await r.aread()
        done = False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            obj = json.loads(line[6:])
            assert "error" not in obj, obj
            if obj.get("usage"):
                usage = obj["usage"]["completion_tokens"]
            for ch in obj["choices"]:
                text += ch["text"]
                reason = ch["finish_reason"] or reason
        assert done
    return text, reason, usage


def test_32_concurrent_streams_match_sequential(server, auth):
    reqs = _requests()
    with httpx.Client(base_url=server.url, headers=auth, timeout=120) as c:
        sequential = []
        for body in reqs:
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            ch = r.json()["choices"][0]
            sequential.append((ch["text"], ch["finish_reason"], r.json()["usage"]["completion_tokens"]))

    async def all_at_once():
        limits = httpx.Limits(max_connections=N + 4)
        async with httpx.AsyncClient(base_url=server.url, headers=auth, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(_stream(client, b) for b in reqs))

    concurrent = asyncio.run(all_at_once())
    assert len({len(r[0]) for r in sequential}) > 5  # lengths really differ
    for i, (seq, con) in enumerate(zip(sequential, concurrent)):
        assert con == seq, f"request {i}: concurrent {con!r} != sequential {seq!r}"

