"""OpenAI responses of a generation job: the whole JSON response, or its SSE chunks as outputs arrive.

Outputs carry cumulative text and token ids; each choice remembers how much it has sent, so a slow consumer can
skip intermediate outputs and still get every character and logprob once. With tools, a chat choice's text goes
through its tool-call format (packserve.api.tool_calls): content and tool_calls, whole or as deltas.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from packserve.api import tool_calls
from packserve.api.errors import error_body
from packserve.api.logprobs import (
    chat_logprobs,
    completion_logprobs,
    echo_logprob_entries,
)
from packserve.api.serving import Job
from packserve.engine.async_engine import EngineDeadError, RequestStream
from packserve.engine.request import RequestOutput

log = logging.getLogger(__name__)

def _usage(job: Job, outs) -> dict:
    completion = sum(len(o.outputs[0].token_ids) for o in outs)
    cached: dict[int, int] = {}  # per prompt: its tokens served from the prefix cache (n choices share a prompt)
    for o in outs:
        p = job.choices[o.request_id].prompt_index
        cached[p] = max(cached.get(p, 0), o.num_cached_tokens)
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion,
            "total_tokens": job.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": sum(cached.values())}}


def _cumulative_logprob(out: RequestOutput) -> float:
    return sum(chosen.logprob for chosen, _ in (out.outputs[0].logprobs or []))


def _returned(job: Job, finals: dict[str, RequestOutput]) -> list[tuple[str, int]]:
    """(request id, choice index) of the choices to return: all of them, or per prompt the n of its best_of
    candidates with the highest cumulative logprob (ties: the earlier candidate)."""
    if job.best_of is None:
        return sorted(((rid, ch.index) for rid, ch in job.choices.items()), key=lambda x: x[1])
    by_prompt: dict[int, list[str]] = {}
    for rid, ch in job.choices.items():
        by_prompt.setdefault(ch.prompt_index, []).append(rid)
    picked = []
    for p_idx in sorted(by_prompt):
        ranked = sorted(by_prompt[p_idx], key=lambda rid: -_cumulative_logprob(finals[rid]))  # stable
        picked += [(rid, p_idx * job.n + rank) for rank, rid in enumerate(ranked[:job.n])]
    return picked


def full_response(state, job: Job, finals: dict[str, RequestOutput]) -> dict:
    choices = []
    for rid, index in _returned(job, finals):
        ch = job.choices[rid]
        out = finals[rid]
        comp = out.outputs[0]
        lps = (comp.logprobs or []) if job.logprobs is not None else None
        if job.kind == "completion":
            offset = len(ch.prompt_text)
            if lps is not None and job.echo:
                lps, offset = echo_logprob_entries(out) + lps, 0
            choices.append({"index": index, "text": ch.prompt_text + comp.text,
                            "logprobs": completion_logprobs(state, lps, offset, job.ids) if lps is not None
                            else None,
                            "finish_reason": comp.finish_reason, "stop_reason": comp.stop_reason})
        else:
            msg, reason = {"role": "assistant", "content": comp.text}, comp.finish_reason
            if job.tools is not None and job.tools.mode is not None:
                msg, reason = tool_calls.message(job.tools, comp.text, reason)
            if ch.prompt_text:  # chat echo
                msg["content"] = ch.prompt_text + (msg["content"] or "")
            choices.append({"index": index, "message": msg,
                            "logprobs": chat_logprobs(state, lps, job.ids) if lps is not None else None,
                            "finish_reason": reason, "stop_reason": comp.stop_reason})
    obj = "text_completion" if job.kind == "completion" else "chat.completion"
    return {"id": job.id, "object": obj, "created": job.created, "model": job.model, "choices": choices,
            "usage": _usage(job, finals.values())}


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def json_bytes(obj: Any) -> bytes:
    """A JSON response body as starlette's JSONResponse writes it, for a worker thread. json.dumps holds the GIL
    for its whole call (1.3 s for a tokenized 8 MB text; seconds for thousands of choices' logprobs), stalling
    the event loop all the same, so a dict's list values are encoded in pieces: one element at a time for
    containers (a choice), 4096 for scalars (token ids)."""
    if not isinstance(obj, dict):
        return _dumps(obj)
    parts = []
    for key, value in obj.items():
        if isinstance(value, list) and len(value) > 1:
            step = 1 if isinstance(value[0], (dict, list)) else 4096
            items = b",".join(_dumps(value[i:i + step])[1:-1] for i in range(0, len(value), step))
            parts.append(_dumps(key) + b":[" + items + b"]")
        else:
            parts.append(_dumps(key) + b":" + _dumps(value))
    return b"{" + b",".join(parts) + b"}"


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _chunk(job: Job, choice: dict, out: RequestOutput) -> dict:
    obj = "text_completion" if job.kind == "completion" else "chat.completion.chunk"
    c = {"id": job.id, "object": obj, "created": job.created, "model": job.model, "choices": [choice]}
    if job.include_usage == "always":  # this choice's usage so far
        n_prompt, n_out = len(out.prompt_token_ids), len(out.outputs[0].token_ids)
        c["usage"] = {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}
    elif job.include_usage:
        c["usage"] = None
    return c


def _delta_chunks(state, job: Job, out: RequestOutput) -> list[str]:
    ch = job.choices[out.request_id]
    comp = out.outputs[0]
    text = comp.text[ch.sent_text:] if len(comp.text) > ch.sent_text else ""
    # Logprobs go out with their tokens' text: never for a token whose text is still held back.
    upto = len(comp.token_ids) if out.finished or comp.num_text_tokens is None else comp.num_text_tokens
    upto = max(upto, ch.sent_tokens)
    new_lps = comp.logprobs[ch.sent_tokens:upto] if (job.logprobs is not None and comp.logprobs) else None
    finished = out.finished
    chunks = []
    if job.kind == "chat" and not ch.started:
        chunks.append(_sse(_chunk(job, {"index": ch.index, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}, out)))
        if ch.prompt_text:  # chat echo: the repeated final message, before the reply
            chunks.append(_sse(_chunk(job, {"index": ch.index, "delta": {"content": ch.prompt_text},
                                            "logprobs": None, "finish_reason": None}, out)))
    offset = ch.sent_text + (len(ch.prompt_text) if job.echo else 0)
    if job.kind == "completion" and not ch.started and ch.prompt_text:
        text = ch.prompt_text + text
        if job.echo and job.logprobs is not None:  # the echoed prompt's logprobs lead the first chunk
            new_lps, offset = echo_logprob_entries(out) + (new_lps or []), 0
    ch.started = True
    delta: dict[str, Any] = {"content": text} if text else {}
    reason = comp.finish_reason if finished else None
    if ch.tool_stream is not None:  # content and tool calls, each part once it is certain
        delta = ch.tool_stream.delta(comp.text, finished)
        reason = ch.tool_stream.finish_reason(reason)
    if delta or new_lps or finished:
        if job.kind == "completion":
            lp = completion_logprobs(state, new_lps, offset, job.ids) if new_lps is not None else None
            choice = {"index": ch.index, "text": text, "logprobs": lp,
                      "finish_reason": comp.finish_reason if finished else None}
        else:
            lp = chat_logprobs(state, new_lps, job.ids) if new_lps is not None else None
            choice = {"index": ch.index, "delta": delta, "logprobs": lp, "finish_reason": reason}
        if finished:
            choice["stop_reason"] = comp.stop_reason
        chunks.append(_sse(_chunk(job, choice, out)))
    ch.sent_text = len(comp.text)
    ch.sent_tokens = upto
    if finished:
        ch.final = out
    return chunks


async def stream_events(state, job: Job, stream: RequestStream) -> AsyncIterator[str]:
    """SSE body: chunks, the usage chunk when asked, an error chunk if something fails, then [DONE]."""
    try:
        async for out in stream:
            # Coalesce: outputs are cumulative, so only the newest per request matters.
            latest = {out.request_id: out}
            while (more := stream.get_nowait()) is not None:
                latest[more.request_id] = more
            for o in latest.values():
                for c in _delta_chunks(state, job, o):
                    yield c
        if job.include_usage:
            finals = [ch.final for ch in job.choices.values() if ch.final is not None]
            obj = "text_completion" if job.kind == "completion" else "chat.completion.chunk"
            yield _sse({"id": job.id, "object": obj, "created": job.created, "model": job.model,
                        "choices": [], "usage": _usage(job, finals)})
    except EngineDeadError:
        yield _sse(error_body("the engine stopped while generating", "server_error", None, "engine_unavailable"))
    except Exception:
        log.exception("error while streaming %s", job.id)
        yield _sse(error_body("internal error while streaming", "server_error", None, "internal_error"))
    yield "data: [DONE]\n\n"
