"""Completions and chat: request -> validated job of engine requests -> submitted -> final outputs.

One HTTP request becomes prompts x n engine requests (choice index = prompt
index x n + j), submitted all-or-none. packserve.api.responses turns the
outputs into OpenAI responses (JSON or SSE chunks).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

from fastapi import Request
from packserve.api.errors import APIError
from packserve.api.protocol import (
    UINT64_MAX,
    ChatCompletionRequest,
    CompletionRequest,
    unsupported_fields,
)
from packserve.api import tool_calls
from packserve.api.structured import guided_spec
from packserve.api.tool_calls import ToolSetup, ToolStream
from packserve.api.text import encode, message_text, render_chat
from packserve.engine.async_engine import EngineDeadError, EngineRequest, RequestStream
from packserve.engine.request import (
    MAX_BAD_WORDS,
    GuidedSpec,
    ParameterError,
    RequestOutput,
    SamplingParams,
    validate_prompt,
)
from packserve.engine.scheduler import QueueFull

log = logging.getLogger(__name__)

MAX_BAD_WORD_CHARS = 256  # a bad word is at most MAX_BAD_WORD_TOKENS tokens: longer text is refused untokenized


@dataclass
class _Choice:
    index: int
    prompt_text: str  # echoed text (empty unless echo)
    prompt_index: int = 0  # which of the request's prompts
    sent_text: int = 0
    sent_tokens: int = 0
    started: bool = False
    final: RequestOutput | None = None
    tool_stream: ToolStream | None = None  # streamed chat with tools


@dataclass
class Job:
    """One HTTP generation request, prepared and validated."""

    kind: str  # "completion" | "chat"
    id: str
    model: str
    created: int
    requests: list[EngineRequest]
    choices: dict[str, _Choice]
    prompt_tokens: int
    logprobs: int | None
    include_usage: bool  # stream_options.include_usage (continuous_usage_stats: "always", usage in every chunk)
    echo: bool = False
    n: int = 1
    best_of: int | None = None  # > n: candidates per prompt, ranked by cumulative logprob (completions only)
    ids: bool = False  # return_tokens_as_token_ids: logprob tokens as "token_id:N"
    tools: ToolSetup | None = None  # chat with tools: outputs are parsed into content and tool_calls


# -- preparing ----------------------------------------------------------------------
def _param_error(e: ParameterError) -> APIError:
    return APIError(400, e.message, e.param, e.code or "invalid_value")


def _sampling(state, req, max_tokens: int | None, logprobs: int | None, seed: int | None,
              prompt_logprobs: int | None = None, structured: GuidedSpec | None = None,
              bad_words: tuple = ()) -> SamplingParams:
    # Token-id ranges (stop_token_ids vs the vocabulary) are checked by the engine's validate_request.
    stop = req.stop if req.stop is not None else ()
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p, top_k=0 if req.top_k is None else req.top_k,
            min_p=0.0 if req.min_p is None else req.min_p, seed=seed,
            presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            stop=stop, stop_token_ids=tuple(req.stop_token_ids or ()), ignore_eos=req.ignore_eos,
            logprobs=logprobs, include_stop_str_in_output=req.include_stop_str_in_output,
            min_tokens=req.min_tokens, prompt_logprobs=prompt_logprobs, logit_bias=req.logit_bias or (),
            allowed_token_ids=tuple(req.allowed_token_ids or ()), structured=structured,
            bad_words_ids=bad_words)
    except ParameterError as e:
        raise _param_error(e) from None


def _bad_words(state, words: list[str] | None) -> tuple[tuple[int, ...], ...]:
    """Each word's tokens, alone and after a space (how it reads mid-sentence), as vLLM bans them."""
    if not words:
        return ()
    words = list(dict.fromkeys(words))  # checked before any tokenizing: a long list costs nothing to refuse
    if len(words) > MAX_BAD_WORDS:
        raise APIError(400, f"at most {MAX_BAD_WORDS} distinct bad_words, got {len(words)}", "bad_words",
                       "invalid_value")
    seqs = []  # (encode() refuses without a tokenizer)
    for w in words:
        if not isinstance(w, str) or not w.strip() or len(w) > MAX_BAD_WORD_CHARS:
            raise APIError(400, f"bad_words must be non-empty strings of at most {MAX_BAD_WORD_CHARS} characters",
                           "bad_words", "invalid_value")
        for text in dict.fromkeys((w, " " + w.lstrip())):
            ids = encode(state, text, "bad_words")
            if ids:
                seqs.append(tuple(ids))
    return tuple(dict.fromkeys(seqs))


def check_model(state, model: str | None) -> None:
    """404 for a model name this server does not serve (None: the served one)."""
    if model is not None and model not in state.model_names:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {state.model_name!r}",
                       "model", "model_not_found")


def _check_common(state, req) -> None:
    check_model(state, req.model)
    bad = unsupported_fields(req)
    if bad is not None:
        raise APIError(400, f"{bad} is not supported by this server", bad, "unsupported_parameter")
    if not 1 <= req.n <= state.max_n:
        raise APIError(400, f"n must be between 1 and {state.max_n}, got {req.n}", "n", "invalid_value")
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options is only allowed with stream=true", "stream_options", "invalid_value")


def _seed(seed: int | None, j: int) -> int | None:
    # n > 1 with a seed: distinct, reproducible samples per choice.
    if seed is None or j == 0:
        return seed
    return seed + j if seed + j <= UINT64_MAX else seed - j


def _candidates(state, req) -> int:
    """Engine requests per prompt: n, or best_of when it asks for more (then ranked, and not streamed)."""
    best_of = getattr(req, "best_of", None)
    if best_of is None or best_of == req.n:
        return req.n
    if not req.n <= best_of <= state.max_n:
        raise APIError(400, f"best_of must be between n ({req.n}) and {state.max_n}, got {best_of}", "best_of",
                       "invalid_value")
    if req.stream:
        raise APIError(400, "best_of > n cannot be streamed (the best candidates are known only at the end)",
                       "best_of", "invalid_value")
    return best_of


# Prompt tokens one request may have scored (echo + logprobs, counted once per choice): a 147 KB request for 15
# prompts of 2047 tokens x n=16 x 20 top logprobs made a 306 MB response and held the engine for minutes.
MAX_PROMPT_LOGPROB_TOKENS = 65536


def _build(state, kind, req, prompts: list[tuple[str | None, list[int]]], max_tokens, logprobs, echo=False,
           tools: ToolSetup | None = None) -> Job:
    k = _candidates(state, req)
    if len(prompts) * k > state.max_waiting:
        raise APIError(400, f"{len(prompts)} prompts x {'best_of' if k > req.n else 'n'}={k} exceeds the server's "
                            f"queue capacity ({state.max_waiting})", "prompt", "invalid_value")
    if echo and logprobs is not None:  # every prompt token of every choice scored: bound the response's size
        scored = sum(len(ids) for _, ids in prompts) * k
        if scored > MAX_PROMPT_LOGPROB_TOKENS:
            raise APIError(400, f"echo with logprobs would score {scored} prompt tokens (prompt tokens x "
                                f"{'best_of' if k > req.n else 'n'}={k}); at most {MAX_PROMPT_LOGPROB_TOKENS} per "
                                "request: send fewer prompts per request, or n=1", "logprobs", "invalid_value")
    structured, bad_words = guided_spec(req), _bad_words(state, req.bad_words)
    if tools is not None and tools.spec is not None:
        if structured is not None:
            raise APIError(400, f"{structured.param} cannot be combined with tool calls (set tool_choice to "
                                "\"none\" to use it)", structured.param, "invalid_value")
        structured = tools.spec
    jid = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex
    now = time.monotonic()
    reqs, choices, total_prompt = [], {}, 0
    for p_idx, (text, ids) in enumerate(prompts):
        mt = max_tokens(ids) if callable(max_tokens) else max_tokens
        try:  # here too, not only in the engine: before the echo decodes the ids and the grammar compiles
            validate_prompt(ids, state.vocab_size, state.max_model_len, 1 if mt is None else mt)
        except ParameterError as e:
            err = _param_error(e)
            if kind == "chat" and err.param == "prompt":  # a chat's prompt is its messages
                err.param = "messages"
            raise err from None
        total_prompt += len(ids)
        echoed = ""
        if echo:
            echoed = text if text is not None else (state.tokenizer.decode(ids) if state.tokenizer else "")
        for j in range(k):
            # echo + logprobs scores the prompt too (max_tokens=0 then means "score only"). best_of ranks by
            # the sampled tokens' logprobs, so candidates compute them even when the client did not ask.
            want = logprobs if logprobs is not None or k == req.n else 0
            params = _sampling(state, req, mt, want, _seed(req.seed, j),
                               prompt_logprobs=logprobs if (echo and logprobs is not None) else None,
                               structured=structured, bad_words=bad_words)
            rid = f"{jid}-{p_idx * k + j}"
            reqs.append(EngineRequest(rid, ids, params, prompt=text, arrival_time=now,
                                      group=f"{jid}-{p_idx}" if k > 1 else None))
            choices[rid] = _Choice(p_idx * req.n + j, echoed, p_idx)  # best_of: re-indexed once ranked
            if tools is not None and tools.mode is not None and req.stream:
                choices[rid].tool_stream = ToolStream(tools)
    so = req.stream_options if req.stream else None
    include_usage = "always" if so and so.continuous_usage_stats else bool(so and so.include_usage)
    return Job(kind, jid, state.model_name, int(time.time()), reqs, choices, total_prompt, logprobs,
               include_usage, echo, req.n, k if k > req.n else None, req.return_tokens_as_token_ids, tools)


def prepare_completion(state, req: CompletionRequest) -> Job:
    _check_common(state, req)
    p = req.prompt
    if isinstance(p, list) and p and not isinstance(p[0], int) and len(p) * req.n > state.max_waiting:
        # Refuse oversized batches before tokenizing them.
        raise APIError(400, f"{len(p)} prompts x n={req.n} exceeds the server's queue capacity "
                            f"({state.max_waiting})", "prompt", "invalid_value")
    special = req.add_special_tokens
    if isinstance(p, str):
        prompts = [(p, encode(state, p, "prompt", special))]
    elif not p:
        raise APIError(400, "prompt is empty", "prompt", "invalid_value")
    elif all(isinstance(x, int) for x in p):
        prompts = [(None, list(p))]
    elif all(isinstance(x, str) for x in p):
        prompts = [(s, encode(state, s, "prompt", special)) for s in p]
    else:
        prompts = [(None, list(x)) for x in p]
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    return _build(state, "completion", req, prompts, max_tokens, req.logprobs, echo=req.echo)


def prepare_chat(state, req: ChatCompletionRequest) -> Job:
    _check_common(state, req)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs requires logprobs=true", "top_logprobs", "invalid_value")
    tools = tool_calls.setup(req, state.tool_format)
    text = render_chat(state, req, req.add_generation_prompt, req.continue_final_message,
                       tools=tools.tools if tools is not None else ())
    ids = encode(state, text, "messages", req.add_special_tokens)
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if limit is None:  # default: whatever context is left (documented)
        def limit(ids):
            return max(1, state.max_model_len - len(ids))
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    try:
        job = _build(state, "chat", req, [(text, ids)], limit, logprobs, tools=tools)
    except APIError as e:
        if e.param == "max_tokens" and req.max_completion_tokens is not None:
            e.param = "max_completion_tokens"
        if e.param == "logprobs" and req.top_logprobs is not None:  # chat's count is top_logprobs
            e.param = "top_logprobs"
            e.message = e.message.replace("logprobs", "top_logprobs", 1)
        raise
    if req.echo and req.messages[-1].role == "assistant":  # vLLM's chat echo: the reply repeats that message
        echoed = message_text(req.messages[-1].content)
        for ch in job.choices.values():
            ch.prompt_text = echoed
    return job


# -- running ------------------------------------------------------------------------
async def submit(state, job: Job, stream: bool = True) -> RequestStream:
    try:
        return await state.engine.submit(job.requests, final_only=not stream)
    except QueueFull:
        raise APIError(429, "the server's request queue is full; retry later", None, "queue_full",
                       headers={"Retry-After": "1"}) from None
    except ParameterError as e:
        raise _param_error(e) from None
    except EngineDeadError:
        raise APIError(503, "the engine is not running", None, "engine_unavailable") from None


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def collect(request: Request, stream: RequestStream) -> dict[str, RequestOutput] | None:
    """Final outputs of every request; None (and all aborted) if the client disconnects first."""
    finals: dict[str, RequestOutput] = {}

    async def run():
        async for out in stream:
            if out.finished:
                finals[out.request_id] = out

    task = asyncio.ensure_future(run())
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            return None
        task.result()  # re-raise an engine failure
        return finals
    finally:
        for t in (task, watch):
            if not t.done():
                t.cancel()
        stream.abort()
