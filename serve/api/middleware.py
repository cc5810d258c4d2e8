"""ASGI middlewares that act before FastAPI reads a body: the API key and framing checks, and the body's size and
arrival-time limits. Their errors are OpenAI-style JSON like every other error."""

from __future__ import annotations

import asyncio
import hmac
import time

from fastapi.responses import JSONResponse

from packserve.api.errors import APIError


class BodyLimitMiddleware:
    """413 for request bodies over the limit (by Content-Length, or counted while reading); 408 and the
    connection closed when the body stops arriving for `read_timeout` seconds (a slow body held its connection
    and its request slot forever), or arrives slower on average than MIN_BODY_RATE after BODY_GRACE seconds (a
    byte every few seconds kept a connection, and its file descriptor, for as long as the client liked)."""

    BODY_GRACE = 30.0  # seconds any body may take ...
    MIN_BODY_RATE = 64 * 1024  # ... plus one per this many bytes received (a 8 MiB body: 158 s)

    def __init__(self, app, max_bytes: int, on_error=None, read_timeout: float | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.on_error = on_error
        self.read_timeout = read_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                try:
                    too_big = int(v) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    return await self._reject(scope, receive, send)
        chunks, size = [], 0
        start = time.monotonic()
        while True:
            # The next chunk within read_timeout, and the body so far within its rate allowance.
            wait = self.BODY_GRACE + size / self.MIN_BODY_RATE - (time.monotonic() - start)
            if self.read_timeout is not None:
                wait = min(wait, self.read_timeout)
            try:
                if wait <= 0:
                    raise TimeoutError
                msg = await asyncio.wait_for(receive(), wait)
            except TimeoutError:
                return await self._error(APIError(408, "the request body arrived too slowly (a gap of "
                                                       f"{self.read_timeout:g} s, or under "
                                                       f"{self.MIN_BODY_RATE // 1024} KiB/s after "
                                                       f"{self.BODY_GRACE:g} s)", None, "request_timeout"),
                                         scope, receive, send)
            if msg["type"] != "http.request":
                return  # disconnected before the body was complete
            body = msg.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                return await self._reject(scope, receive, send)
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    DRAIN_BYTES = 64 * 2**20  # an oversized body is read and dropped up to this much before the 413 ...
    DRAIN_SECONDS = 2.0

    async def _reject(self, scope, receive, send):
        # ... because closing with the client's unsent body in flight makes the kernel reset the connection, and
        # the client then sees "connection reset" instead of the 413.
        drained, deadline = 0, time.monotonic() + self.DRAIN_SECONDS
        try:
            while drained < self.DRAIN_BYTES:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
                if msg["type"] != "http.request" or not msg.get("more_body", False):
                    break
                drained += len(msg.get("body", b""))
        except TimeoutError:
            pass
        err = APIError(413, f"request body exceeds {self.max_bytes} bytes", None, "request_too_large")
        await self._error(err, scope, receive, send)

    async def _error(self, err: APIError, scope, receive, send):
        err.headers = {**(err.headers or {}), "Connection": "close"}  # the rest of the body is not read
        await send_error(err, self.on_error, scope, receive, send)


async def send_error(err: APIError, on_error, scope, receive, send) -> None:
    """An error response from middleware (before FastAPI's exception handlers exist for the request)."""
    if on_error is not None:
        on_error(err.status)
    await JSONResponse(err.body(), status_code=err.status, headers=err.headers)(scope, receive, send)


class GuardMiddleware:
    """Checks that need no body, before anything reads one: the API key (a bad body from a client without the key
    gets 401, not a 400 that shows it was parsed), and requests carrying both Transfer-Encoding and
    Content-Length (RFC 9112 6.1: a proxy and this server could split the stream differently, which is how
    requests are smuggled): 400, and the connection is closed."""

    OPEN = ("/health", "/metrics", "/version")  # never need the key (probes, scrapers)

    def __init__(self, app, keys: tuple[str, ...], on_error=None):
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.on_error = on_error

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        given = token.strip() if scheme.lower() == b"bearer" else b""
        ok = False
        for k in self.keys:  # compare against every key: timing does not reveal which (or whether one) matched
            ok |= hmac.compare_digest(given, k)
        return ok

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers", ()))
        err = None
        if b"transfer-encoding" in headers and b"content-length" in headers:
            err = APIError(400, "a request may not carry both Transfer-Encoding and Content-Length", None,
                           "ambiguous_length", headers={"Connection": "close"})
        elif (self.keys and scope["path"] not in self.OPEN and scope["method"] != "OPTIONS"  # CORS preflights
              and not self._authorized(headers)):
            err = APIError(401, "missing or invalid API key (send Authorization: Bearer <key>)", None,
                           "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if err is None:
            return await self.app(scope, receive, send)
        await send_error(err, self.on_error, scope, receive, send)
