"""Logprobs in OpenAI's response shapes: completions (tokens, token_logprobs, top_logprobs, text_offset), chat
(content entries with bytes and top_logprobs), and the prompt entries that echo + logprobs leads with.

A token's text is its decoded string; a token that is only part of a UTF-8 character decodes to U+FFFD, so its
raw bytes come from the vocabulary itself (byte-level BPE's printable byte alphabet, or SentencePiece's <0xNN>
byte tokens). Completions' top_logprobs is a dict keyed by text: tokens that would collide there are keyed
"bytes:\\xNN..." (partial characters, as OpenAI and vLLM write them) or "token_id:N" (any other duplicate), so
the dict always holds the number of alternatives asked for, plus the sampled token when it is not among them
(OpenAI's legacy completions: up to logprobs + 1 entries; logprobs=0 gives the sampled token alone).
"""

from __future__ import annotations

import json
from functools import lru_cache

from packserve.engine.request import RequestOutput

MIN_LOGPROB = -9999.0  # JSON has no -Infinity


def _tok(state, tid: int) -> str:
    return _decode_one(state.tokenizer, tid) if state.tokenizer is not None else f"<{tid}>"


@lru_cache(maxsize=1 << 16)
def _decode_one(tokenizer, tid: int) -> str:
    """One token's text (cached: a response with 20 alternatives per token decodes the same ids again and again)."""
    return tokenizer.decode([tid])


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in character for each byte value (GPT-2's scheme), inverted."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


@lru_cache(maxsize=8)
def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    try:
        decoder = json.loads(backend.to_str()).get("decoder") or {}
    except (ValueError, AttributeError):
        return False
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", []) or []]
    return "ByteLevel" in kinds


def token_bytes(state, tid: int) -> bytes:
    """The raw bytes a token stands for (what a client concatenates to rebuild the text)."""
    text = _tok(state, tid)
    if "\ufffd" not in text or state.tokenizer is None:
        return text.encode("utf-8")
    piece = state.tokenizer.convert_ids_to_tokens(tid)
    if isinstance(piece, str) and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])  # SentencePiece byte fallback
    alphabet = _byte_alphabet()
    if _is_byte_level(state.tokenizer) and isinstance(piece, str) and all(c in alphabet for c in piece):
        return bytes(alphabet[c] for c in piece)
    return text.encode("utf-8")


def _top_dict(state, top, as_ids: bool) -> dict[str, float]:
    out: dict[str, float] = {}
    for t in top:
        if as_ids:
            out[f"token_id:{t.token_id}"] = _lp(t.logprob)
            continue
        key = _tok(state, t.token_id)
        if "\ufffd" in key:
            key = "bytes:" + "".join(f"\\x{b:02x}" for b in token_bytes(state, t.token_id))
        if key in out:
            key = f"token_id:{t.token_id}"
        out[key] = _lp(t.logprob)
    return out


def _lp(x: float | None) -> float | None:
    return x if x is None or x > MIN_LOGPROB else MIN_LOGPROB


def completion_logprobs(state, entries, offset: int, as_ids: bool = False) -> dict:
    """as_ids (vLLM's return_tokens_as_token_ids): tokens and keys "token_id:N"; text offsets stay the text's."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for chosen, top in entries:
        s = _tok(state, chosen.token_id)
        tokens.append(f"token_id:{chosen.token_id}" if as_ids else s)
        token_lps.append(_lp(chosen.logprob))
        if chosen.logprob is None:
            tops.append(None)
        else:  # the sampled token is always among its alternatives (so there may be k + 1), as OpenAI's are
            listed = any(t.token_id == chosen.token_id for t in top)
            tops.append(_top_dict(state, top if listed else [*top, chosen], as_ids))
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def echo_logprob_entries(out: RequestOutput) -> list:
    """The prompt's entries for echo + logprobs; the first token has no logprob (OpenAI: null)."""
    from packserve.engine.request import Logprob

    pl = out.prompt_logprobs or []
    first = (Logprob(out.prompt_token_ids[0], None), [])
    return [first] + [e for e in pl[1:]]


def chat_logprobs(state, entries, as_ids: bool = False) -> dict:
    def item(lp):
        s = f"token_id:{lp.token_id}" if as_ids else _tok(state, lp.token_id)
        return {"token": s, "logprob": _lp(lp.logprob), "bytes": list(token_bytes(state, lp.token_id))}

    return {"content": [{**item(chosen), "top_logprobs": [item(t) for t in top]} for chosen, top in entries]}
