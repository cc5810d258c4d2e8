"""Logprobs in OpenAI's response shapes: completions (tokens, token_logprobs, top_logprobs, text_offset), chat
(content entries with bytes and top_logprobs), and the prompt entries that echo + logprobs leads with."""

from __future__ import annotations

from packserve.engine.request import RequestOutput

MIN_LOGPROB = -9999.0  # JSON has no -Infinity


def _tok(state, tid: int) -> str:
    return state.tokenizer.decode([tid]) if state.tokenizer is not None else f"<{tid}>"


def _lp(x: float | None) -> float | None:
    return x if x is None or x > MIN_LOGPROB else MIN_LOGPROB


def completion_logprobs(state, entries, offset: int) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    for chosen, top in entries:
        s = _tok(state, chosen.token_id)
        tokens.append(s)
        token_lps.append(_lp(chosen.logprob))
        tops.append(({_tok(state, t.token_id): _lp(t.logprob) for t in top} or None) if chosen.logprob is not None
                    else None)
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def echo_logprob_entries(out: RequestOutput) -> list:
    """The prompt's entries for echo + logprobs; the first token has no logprob (OpenAI: null)."""
    from packserve.engine.request import Logprob

    pl = out.prompt_logprobs or []
    first = (Logprob(out.prompt_token_ids[0], None), [])
    return [first] + [e for e in pl[1:]]


def chat_logprobs(state, entries) -> dict:
    def item(lp):
        s = _tok(state, lp.token_id)
        return {"token": s, "logprob": _lp(lp.logprob), "bytes": list(s.encode("utf-8"))}

    return {"content": [{**item(chosen), "top_logprobs": [item(t) for t in top]} for chosen, top in entries]}
