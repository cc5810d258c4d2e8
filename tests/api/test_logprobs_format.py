"""Logprobs exactly as OpenAI returns them, on the checkpoint's real byte-level BPE tokenizer: partial-character
tokens get their raw bytes (chat `bytes`, completions `bytes:\\xNN` keys) and top_logprobs dicts never lose an
entry to a key collision."""

import types

import pytest

from packserve.api.logprobs import chat_logprobs, completion_logprobs, token_bytes
from packserve.engine.request import Logprob


@pytest.fixture(scope="module")
def state(checkpoint_factory):
    from transformers import AutoTokenizer

    return types.SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(checkpoint_factory("llama")))


def _partial_ids(tok):
    """Tokens that decode to U+FFFD alone: the byte tokens of UTF-8 continuation and lead bytes."""
    return [i for i in range(len(tok)) if "\ufffd" in tok.decode([i])]


def test_partial_character_tokens_get_their_raw_bytes(state):
    tok = state.tokenizer
    euro = "€".encode("utf-8")  # three bytes, each a token of its own in byte-level BPE unless merged
    ids = [tok.convert_tokens_to_ids(piece) for piece in tok.convert_ids_to_tokens(
        tok.encode("€", add_special_tokens=False))]
    assert b"".join(token_bytes(state, i) for i in ids) == euro
    partial = _partial_ids(tok)
    assert len(partial) >= 64  # the tokenizer has byte tokens >= 0x80
    raw = [token_bytes(state, i) for i in partial]
    assert all(b != "\ufffd".encode() and len(b) >= 1 for b in raw)
    assert len(set(raw)) == len(raw)  # distinct tokens, distinct bytes


def test_top_logprobs_keep_every_alternative(state):
    tok = state.tokenizer
    partial = _partial_ids(tok)[:20]
    top = [Logprob(t, -1.0 - k) for k, t in enumerate(partial)]
    chosen = Logprob(partial[0], -1.0)
    out = completion_logprobs(state, [(chosen, top)], 0)
    keys = out["top_logprobs"][0]
    assert len(keys) == 20  # before: every one of them was keyed "\ufffd" and 19 were lost
    assert all(k.startswith("bytes:\\x") for k in keys)
    assert keys[f"bytes:\\x{token_bytes(state, partial[3])[0]:02x}"] == -4.0
    chat = chat_logprobs(state, [(chosen, top)])["content"][0]
    assert [bytes(t["bytes"]) for t in chat["top_logprobs"]] == [token_bytes(state, t) for t in partial]


def test_duplicate_texts_fall_back_to_token_ids(state):
    """Two different ids with the same text (here the same id twice stands in for it) stay two entries."""
    tok = state.tokenizer
    a = tok.encode(" the", add_special_tokens=False)[0]
    out = completion_logprobs(state, [(Logprob(a, -0.5), [Logprob(a, -0.5), Logprob(a, -0.7)])], 0)
    assert out["top_logprobs"][0] == {tok.decode([a]): -0.5, f"token_id:{a}": -0.7}
