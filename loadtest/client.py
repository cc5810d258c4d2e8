"""One streamed request to an OpenAI-compatible server, timed the way vLLM's `bench serve` times it.

Timing (all `time.perf_counter()` seconds):
- TTFT = first chunk whose content is non-empty - send time. Chunks carrying only a role, a finish reason
  or usage are not tokens. (vLLM's server sends its role chunk together with the first token, so its
  numbers and ours agree.)
- ITL = gaps between consecutive content chunks.
- E2E = last `data:` chunk (any kind, before `[DONE]`) - send time.
Output tokens come from `usage.completion_tokens` when the server sends it (we ask with
`stream_options.include_usage`), else from the tokenizer over the generated text, else from the number
of content chunks.

Every failure ends as a `RequestResult` with `error` set to a kind (`http_429`, `timeout`, `connect_error`,
`stream_error`, ...); nothing here raises except cancellation.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from .workload import RequestSpec

ENDPOINT_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass
class RequestResult:
    """What happened to one request; mutated while it streams so a cancelled request keeps its partial state."""

    index: int
    prompt_len: int | None = None
    expected_output_len: int = 0
    send_time: float = 0.0  # perf_counter at send
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    chunk_times: list[float] = field(default_factory=list)  # perf_counter of each content chunk
    e2e: float | None = None
    output_tokens: int | None = None
    token_source: str | None = None  # usage | tokenizer | chunks
    generated_text: str = ""
    status: int | None = None
    error: str | None = None
    error_detail: str | None = None
    warmup: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and self.ttft is not None

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.e2e is None or not self.output_tokens or self.output_tokens <= 1:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


def build_payload(spec: RequestSpec, endpoint: str, model: str, ignore_eos: bool, include_usage: bool,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": spec.output_len, "stream": True, "temperature": 0.0}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        body["prompt"] = spec.prompt
    if ignore_eos:
        body["ignore_eos"] = True
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    body.update(extra or {})
    return body


def _content(chunk: dict, endpoint: str) -> str:
    choices = chunk.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return ""
    if endpoint == "chat":
        delta = choices[0].get("delta") or {}
        # Reasoning models stream thinking in a separate field; it is output too.
        return (delta.get("content") or "") + (delta.get("reasoning_content") or delta.get("reasoning") or "")
    return choices[0].get("text") or ""


def _error_text(body: bytes) -> str:
    text = body.decode("utf-8", "replace")[:300]
    try:
        err = json.loads(text).get("error")
        return err.get("message", text) if isinstance(err, dict) else str(err or text)
    except Exception:
        return text


async def _stream(client: httpx.AsyncClient, url: str, body: dict, headers: dict, endpoint: str,
                  res: RequestResult) -> None:
    res.send_time = time.perf_counter()
    async with client.stream("POST", url, json=body, headers=headers) as resp:
        res.status = resp.status_code
        if resp.status_code != 200:
            res.error, res.error_detail = f"http_{resp.status_code}", _error_text(await resp.aread())
            return
        last = None
        async for line in resp.aiter_lines():
            line = line.strip()
            if not line.startswith("data:"):
                continue  # blank separators, `:` keep-alive comments, `event:` lines
            data = line[5:].strip()
            if data == "[DONE]":
                break
            now = time.perf_counter()
            try:
                chunk = json.loads(data)
            except json.JSONDecodeError:
                res.error, res.error_detail = "bad_json", data[:200]
                return
            if not isinstance(chunk, dict):
                continue
            if "error" in chunk:  # error after streaming began (OpenAI error object in a chunk)
                res.error, res.error_detail = "stream_error", _error_text(json.dumps(chunk).encode())
                return
            last = now
            text = _content(chunk, endpoint)
            if text:
                if res.ttft is None:
                    res.ttft = now - res.send_time
                else:
                    res.itl.append(now - res.chunk_times[-1])
                res.chunk_times.append(now)
                res.generated_text += text
            usage = chunk.get("usage")
            if isinstance(usage, dict):
                if isinstance(usage.get("completion_tokens"), int):
                    res.output_tokens, res.token_source = usage["completion_tokens"], "usage"
                if isinstance(usage.get("prompt_tokens"), int):
                    res.prompt_len = usage["prompt_tokens"]
        if res.ttft is None:
            res.error = "no_content"
            return
        res.e2e = last - res.send_time  # set with the chunk that set ttft, or later


async def send_request(client: httpx.AsyncClient, base_url: str, endpoint: str, body: dict,
                       res: RequestResult, timeout: float, api_key: str | None = None,
                       tokenizer: Any | None = None) -> RequestResult:
    """Send one streamed request, filling `res`; returns it. Never raises except on cancellation."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    url = base_url.rstrip("/") + ENDPOINT_PATHS[endpoint]
    try:
        async with asyncio.timeout(timeout):  # whole-request bound; httpx's own timeouts are per read
            await _stream(client, url, body, headers, endpoint, res)
    except (TimeoutError, httpx.TimeoutException):
        res.error = "timeout"
    except httpx.ConnectError as exc:
        res.error, res.error_detail = "connect_error", str(exc)[:200]
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
        res.error, res.error_detail = "protocol_error", str(exc)[:200]
    except (httpx.HTTPError, OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        res.error, res.error_detail = type(exc).__name__, str(exc)[:200]
    finalize_tokens(res, tokenizer)
    return res


def finalize_tokens(res: RequestResult, tokenizer: Any | None) -> None:
    """Fill output_tokens when the server sent no usage: tokenizer count, else one token per content chunk."""
    if res.output_tokens is not None or not res.chunk_times:
        return
    if tokenizer is not None:
        res.output_tokens = len(tokenizer.encode(res.generated_text, add_special_tokens=False))
        res.token_source = "tokenizer"
    else:
        res.output_tokens = len(res.chunk_times)
        res.token_source = "chunks"
