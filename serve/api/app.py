"""The FastAPI application: OpenAI-compatible routes, auth, body limit, CORS, health, metrics, drain.

`create_app(state)` takes a ServerState holding a started-or-not AsyncEngine;
the app starts the engine loop on startup and stops it on shutdown. The CLI
(`packserve.commands.serve`) builds the engine and runs uvicorn; tests can do the same
in-process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from functools import partial

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import Response
from packserve import __version__
from packserve.api import errors, responses, serving, tokenization
from packserve.api.body import install_schemas, openapi_body, parse_body
from packserve.api.errors import APIError
from packserve.api.grammars import GrammarCompiles
from packserve.api.middleware import BodyLimitMiddleware, GuardMiddleware
from packserve.api.protocol import ChatCompletionRequest, CompletionRequest
from packserve.api.text import chat_template
from packserve.api.tokenization import DetokenizeRequest, TokenizeBody
from packserve.api.tool_parsers import detect
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
        return detect(chat_template(self.tokenizer))

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


GRAMMAR_COMPILE_TIMEOUT = 25.0  # seconds a grammar may compile before its child process is killed (then a 400)
SSE_WRITE_TIMEOUT = 60.0  # seconds one chunk may wait for a client that does not read before the stream is dropped


class SSEResponse(StreamingResponse):
    """Streams SSE while watching for the client going away (then the body is cancelled and `on_close` aborts).
    A client that stops reading is dropped once a chunk has waited SSE_WRITE_TIMEOUT to be sent (its socket
    buffers full): it would otherwise hold its requests' outputs and a connection for as long as it likes."""

    media_type = "text/event-stream"

    def __init__(self, content, on_close=None, write_timeout: float | None = None):
        super().__init__(content, media_type=self.media_type,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close
        self.write_timeout = SSE_WRITE_TIMEOUT if write_timeout is None else write_timeout

    async def __call__(self, scope, receive, send) -> None:
        async def timed_send(message) -> None:
            with anyio.fail_after(self.write_timeout):
                await send(message)

        async def stream() -> None:
            try:
                await self.stream_response(timed_send)
            except TimeoutError:  # the response stays incomplete: the server closes the connection
                log.info("dropped a stream whose client read nothing for %.0f s", self.write_timeout)

        try:
            async with anyio.create_task_group() as tg:
                async def wrap(func) -> None:
                    await func()
                    tg.cancel_scope.cancel()

                tg.start_soon(wrap, stream)
                await wrap(partial(self.listen_for_disconnect, receive))
        except OSError:
            pass  # the client went away mid-write
        finally:
            if self.on_close is not None:
                self.on_close()


# Prompts with more characters are tokenized under a limiter of 2 (create_app), then the heap trimmed. At 1 MiB,
# 48 clients sending texts just under it filled anyio's 40 shared worker threads (each tokenization ~200x its size
# of heap: 7 GB kept) and every other request waited ~50 s for a thread to tokenize in.
BIG_TEXT_CHARS = 1 << 16



def trimmed(fn):
    """fn, then the heap trimmed in the same worker thread: tokenizing a big text took ~200x its size of heap,
    which the engine's malloc tuning would otherwise keep (and trimming a large heap is not for the event loop)."""
    def run(*args):
        try:
            return fn(*args)
        finally:
            trim_heap()
    return run


INLINE_IDS = 65536  # token-id prompts up to this many ids are prepared on the event loop


def _num_ids(prompt) -> int:
    return len(prompt) if not prompt or isinstance(prompt[0], int) else sum(map(len, prompt))


MAX_CHAT_MESSAGES = 4096  # messages per chat request (also at most the context length: each is >= 1 token)

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
                await grammars.compile(job.requests[0].params.structured)
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
            body = await anyio.to_thread.run_sync(
                lambda: responses.json_bytes(responses.full_response(state, job, finals)))
            return Response(body, media_type="application/json")
        finally:
            if not handed_off:
                state.release()

    # Tokenizing a text prompt of several MB takes seconds and about 200x its size in memory: at most two of
    # those at once. Shorter texts (the usual case) use anyio's shared worker threads and never wait behind them.
    big_texts = anyio.CapacityLimiter(2)
    # At most two grammar compiles at once, a bounded queue, a bounded wait (packserve.api.grammars), each compile
    # in a child process killed past GRAMMAR_COMPILE_TIMEOUT (packserve.engine.grammar_process).
    grammars = GrammarCompiles(
        lambda spec: state.engine.engine.structured_outputs(GRAMMAR_COMPILE_TIMEOUT).compile(spec),
        lambda spec: state.engine.engine.grammar_compiled(spec), timeout=GRAMMAR_COMPILE_TIMEOUT + 5)

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
            return await anyio.to_thread.run_sync(trimmed(fn), state, body, limiter=big_texts)
        return run

    def completion_bounds(data: dict) -> None:
        """Token-id prompts longer than the context, or more prompts than the queue holds: refused before
        validating millions of ids."""
        p = data.get("prompt")
        if not isinstance(p, list) or not p:
            return
        nested = isinstance(p[0], list)
        if nested and len(p) > state.max_waiting:
            raise APIError(400, f"{len(p)} prompts exceed the server's queue capacity ({state.max_waiting})",
                           "prompt", "invalid_value")
        longest = max((len(x) for x in p if isinstance(x, list)), default=0) if nested else len(p)
        if longest > state.max_model_len:
            raise APIError(400, f"a prompt of {longest} tokens exceeds the model's context length "
                                f"({state.max_model_len})", "prompt", "context_length_exceeded")

    def chat_bounds(data: dict) -> None:
        messages = data.get("messages")
        if isinstance(messages, list) and len(messages) > min(state.max_model_len, MAX_CHAT_MESSAGES):
            # each message renders to at least one token
            raise APIError(400, f"{len(messages)} messages: at most {min(state.max_model_len, MAX_CHAT_MESSAGES)}"
                                " per request (each renders to at least one token of the context of "
                                f"{state.max_model_len})", "messages", "context_length_exceeded")

    def tokenize_bounds(data: dict) -> None:
        messages = data.get("messages")
        if isinstance(messages, list) and len(messages) > MAX_CHAT_MESSAGES:
            raise APIError(400, f"{len(messages)} messages: at most {MAX_CHAT_MESSAGES} per request", "messages",
                           "invalid_value")

    @app.post("/v1/completions", openapi_extra=openapi_body(CompletionRequest))
    async def completions(request: Request):
        body = await parse_body(request, CompletionRequest, completion_bounds)
        admit()
        p = body.prompt
        texts = [p] if isinstance(p, str) else [x for x in p if isinstance(x, str)]
        chars = sum(map(len, texts)) if texts else None
        return await generate(request, prepare(serving.prepare_completion, body, chars), body.stream)

    @app.post("/v1/chat/completions", openapi_extra=openapi_body(ChatCompletionRequest))
    async def chat_completions(request: Request):
        body = await parse_body(request, ChatCompletionRequest, chat_bounds)
        admit()
        return await generate(request, prepare(serving.prepare_chat, body, _chat_chars(body)), body.stream)

    def model_card(name: str) -> dict:
        # root/parent as vLLM writes them (every name here is the one base model: no adapters).
        return {"id": name, "object": "model", "created": state.created, "owned_by": "packserve",
                "root": state.model_name, "parent": None,
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
        body = (await parse_body(request, TokenizeBody, tokenize_bounds)).root
        big = (_chat_chars(body) if hasattr(body, "messages") else len(body.prompt)) > BIG_TEXT_CHARS
        try:  # a big text under the same limiter and heap trim as a big prompt (prepare)
            return await tokenization.tokenize(state, body, big_texts if big else None)
        finally:
            if big:
                await anyio.to_thread.run_sync(trim_heap, limiter=big_texts)

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
