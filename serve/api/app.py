"""The FastAPI application: OpenAI-compatible routes, auth, body limit, CORS, health, metrics, drain.

`create_app(state)` takes a ServerState holding a started-or-not AsyncEngine;
the app starts the engine loop on startup and stops it on shutdown. The CLI
(`packserve.api.cli`) builds the engine and runs uvicorn; tests can do the same
in-process.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from functools import partial

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from packserve import __version__
from packserve.api import errors, responses, serving, tokenization
from packserve.api.body import install_schemas, openapi_body, parse_body
from packserve.api.errors import APIError
from packserve.api.protocol import ChatCompletionRequest, CompletionRequest
from packserve.api.tokenization import DetokenizeRequest, TokenizeBody
from packserve.api.tool_parsers import detect
from packserve.checkpoints import CHAT_TEMPLATE
from packserve.engine.async_engine import AsyncEngine
from packserve.host import trim_heap
from packserve.metrics import CONTENT_TYPE, EngineMetrics
from starlette.responses import StreamingResponse

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    engine: AsyncEngine
    model_name: str
    metrics: EngineMetrics
    max_waiting: int
    max_n: int = 16
    api_keys: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    max_body_bytes: int = 8 * 2**20
    read_timeout: float = 15.0  # seconds each part of a request body may take to arrive
    is_demo: bool = False
    tool_call_parser: str = "auto"  # "auto": chosen from the chat template (packserve.api.tool_parsers.detect)
    extra_model_names: tuple[str, ...] = ()
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False
    inflight: int = 0

    @property
    def tokenizer(self):
        return self.engine.engine.tokenizer

    @property
    def vocab_size(self) -> int:
        return self.engine.engine.info.vocab_size

    @property
    def max_model_len(self) -> int:
        return self.engine.engine.max_model_len

    @property
    def tool_format(self) -> str:
        if self.tool_call_parser != "auto":
            return self.tool_call_parser
        return detect(getattr(self.tokenizer, "chat_template", None) or CHAT_TEMPLATE)

    @property
    def model_names(self) -> tuple[str, ...]:
        return (self.model_name,) + self.extra_model_names

    def release(self) -> None:
        self.inflight -= 1

    async def drain(self, timeout: float) -> None:
        """Stop admitting; let in-flight requests finish within `timeout`, then abort the rest."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while self.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.inflight > 0:
            log.warning("shutdown timeout: aborting %d in-flight requests", self.inflight)
            self.engine.abort_all()
            grace = time.monotonic() + 5.0
            while self.inflight > 0 and time.monotonic() < grace:
                await asyncio.sleep(0.05)


class SSEResponse(StreamingResponse):
    """Streams SSE while watching for the client going away (then the body is cancelled and `on_close` aborts)."""

    media_type = "text/event-stream"

    def __init__(self, content, on_close=None):
        super().__init__(content, media_type=self.media_type,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def wrap(func) -> None:
                    await func()
                    tg.cancel_scope.cancel()

                tg.start_soon(wrap, partial(self.stream_response, send))
                await wrap(partial(self.listen_for_disconnect, receive))
        except OSError:
            pass  # the client went away mid-write
        finally:
            if self.on_close is not None:
                self.on_close()


class BodyLimitMiddleware:
    """413 for request bodies over the limit (by Content-Length, or counted while reading); 408 and the
    connection closed when the body stops arriving for `read_timeout` seconds (a slow body held its connection
    and its request slot forever)."""

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
        while True:
            try:
                msg = await asyncio.wait_for(receive(), self.read_timeout)
            except TimeoutError:
                return await self._error(APIError(408, f"the request body did not arrive within "
                                                       f"{self.read_timeout:g} s", None, "request_timeout"),
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


BIG_TEXT_CHARS = 1 << 20  # prompts with more characters are tokenized under a limiter (create_app)


INLINE_IDS = 65536  # token-id prompts up to this many ids are prepared on the event loop


def _num_ids(prompt) -> int:
    return len(prompt) if not prompt or isinstance(prompt[0], int) else sum(map(len, prompt))


CHAT_MESSAGE_CHARS = 32  # what a chat template adds around each message (role markers), as characters


def _chat_chars(body: ChatCompletionRequest) -> int:
    """The rendered size of a chat, estimated from every field before rendering: 100,000 messages of "hi" are
    200k characters of content but ~1.2M tokens once the template wraps each one."""
    n = len(json.dumps(body.tools)) if body.tools else 0  # the template lists the tools
    for m in body.messages:
        n += CHAT_MESSAGE_CHARS + len(m.name or "") + (len(json.dumps(m.tool_calls)) if m.tool_calls else 0)
        c = m.content
        if isinstance(c, str):
            n += len(c)
        elif isinstance(c, list):
            n += sum(len(part.text or "") + len(part.type) for part in c)
    return n


def create_app(state: ServerState) -> FastAPI:
    async def lifespan(app: FastAPI):
        state.engine.start()
        yield
        state.engine.stop()

    app = FastAPI(title="packserve", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible completions and chat over packed-prefill inference")
    app.state.server = state
    errors.install(app, on_error=state.metrics.http_error)
    app.add_middleware(BodyLimitMiddleware, max_bytes=state.max_body_bytes, on_error=state.metrics.http_error,
                       read_timeout=state.read_timeout)
    if state.allowed_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(state.allowed_origins), allow_methods=["*"],
                           allow_headers=["*"])

    # Outermost (added last): the key and framing checks run before the body is read or limited. With a key,
    # every path but /health, /metrics and /version needs it, /docs and /openapi.json included.
    app.add_middleware(GuardMiddleware, keys=state.api_keys, on_error=state.metrics.http_error)

    def admit() -> None:
        if state.draining:
            raise APIError(503, "the server is shutting down", None, "shutting_down")
        if not state.engine.alive:
            raise APIError(503, "the engine is not running", None, "engine_unavailable")

    async def generate(request: Request, prepare_job, stream: bool):
        state.inflight += 1  # before preparing: a drain must wait for a request that is still being tokenized
        handed_off = False
        try:
            job = await prepare_job()
            if job.requests and job.requests[0].params.structured is not None:
                await anyio.to_thread.run_sync(serving.compile_grammars, state, job, limiter=grammars)
            rs = await serving.submit(state, job, stream)
            if stream:
                def on_close():
                    rs.abort()
                    state.release()

                handed_off = True
                return SSEResponse(responses.stream_events(state, job, rs), on_close=on_close)
            try:
                finals = await serving.collect(request, rs)
            except serving.EngineDeadError:
                raise APIError(500, "the engine stopped while generating", None, "engine_failed") from None
            if finals is None:  # the client went away; nobody reads this
                return Response(status_code=499)
            return JSONResponse(responses.full_response(state, job, finals))
        finally:
            if not handed_off:
                state.release()

    # Tokenizing a text prompt of several MB takes seconds and about 200x its size in memory: at most two of
    # those at once. Shorter texts (the usual case) use anyio's shared worker threads and never wait behind them.
    big_texts = anyio.CapacityLimiter(2)
    # At most two grammar compiles (~0.4 s of CPU each) at once: many distinct schemas queue instead of flooding.
    grammars = anyio.CapacityLimiter(2)

    def prepare(fn, body, text_chars: int | None):
        """Tokenizing text (and rendering a chat template) runs in a worker thread: the tokenizer releases the
        GIL, and the event loop keeps every other stream going meanwhile. Token-id prompts (text_chars None)
        stay on the loop."""
        async def run() -> serving.Job:
            if text_chars is None:  # token ids: checking a million of them in Python takes a while too
                if _num_ids(body.prompt) <= INLINE_IDS:
                    return fn(state, body)
                return await anyio.to_thread.run_sync(fn, state, body)
            if text_chars <= BIG_TEXT_CHARS:
                return await anyio.to_thread.run_sync(fn, state, body)
            try:
                return await anyio.to_thread.run_sync(fn, state, body, limiter=big_texts)
            finally:  # tokenizing it took ~200x its size of heap, which the engine's malloc tuning would keep
                trim_heap()
        return run

    @app.post("/v1/completions", openapi_extra=openapi_body(CompletionRequest))
    async def completions(request: Request):
        body = await parse_body(request, CompletionRequest)
        admit()
        p = body.prompt
        texts = [p] if isinstance(p, str) else [x for x in p if isinstance(x, str)]
        chars = sum(map(len, texts)) if texts else None
        return await generate(request, prepare(serving.prepare_completion, body, chars), body.stream)

    @app.post("/v1/chat/completions", openapi_extra=openapi_body(ChatCompletionRequest))
    async def chat_completions(request: Request):
        body = await parse_body(request, ChatCompletionRequest)
        admit()
        if len(body.messages) > state.max_model_len:  # each renders to at least one token: checked before rendering
            raise APIError(400, f"{len(body.messages)} messages cannot fit the context of {state.max_model_len} "
                                "tokens", "messages", "context_length_exceeded")
        return await generate(request, prepare(serving.prepare_chat, body, _chat_chars(body)), body.stream)

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": state.created, "owned_by": "packserve",
                "max_model_len": state.max_model_len, "demo": state.is_demo,
                "description": "built-in demo model (random weights)" if state.is_demo else None}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(state.model_name)]}

    @app.get("/v1/models/{model_id:path}")  # :path: served names may hold slashes ("org/model")
    async def model(model_id: str):
        serving.check_model(state, model_id)
        return model_card(model_id)

    @app.post("/tokenize", openapi_extra=openapi_body(TokenizeBody))
    async def tokenize(request: Request):
        return await tokenization.tokenize(state, (await parse_body(request, TokenizeBody)).root)

    @app.post("/detokenize", openapi_extra=openapi_body(DetokenizeRequest))
    async def detokenize(request: Request):
        return await tokenization.detokenize(state, await parse_body(request, DetokenizeRequest))

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return tokenization.tokenizer_info(state)

    @app.get("/health")
    async def health():
        if not state.engine.alive:
            raise APIError(503, "the engine loop is not running", None, "engine_unavailable")
        if state.draining:
            raise APIError(503, "the server is shutting down", None, "shutting_down")
        return {"status": "ok"}

    app.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)  # load balancers' probes

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/version")
    async def version():
        return {"version": __version__}

    install_schemas(app, CompletionRequest, ChatCompletionRequest, TokenizeBody, DetokenizeRequest)
    return app
