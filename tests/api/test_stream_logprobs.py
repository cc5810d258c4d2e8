"""Streamed logprobs travel with their text: a chunk never lists a token whose text has not been sent yet (held
back for an incomplete UTF-8 character or a possible stop string), and every token is listed exactly once."""

from __future__ import annotations

import httpx
import pytest
from transformers import AutoTokenizer

from tests.api.conftest import read_sse


@pytest.mark.parametrize("echo,seed", [(False, 1), (True, 2), (False, 3)])
def test_completion_logprobs_never_run_ahead_of_text(server, auth, tiny_model, echo, seed):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompt = "Unicode: café, 日本語"
    body = {"prompt": prompt, "max_tokens": 48, "temperature": 1.0, "seed": seed, "stream": True, "logprobs": 1,
            "echo": echo, "return_tokens_as_token_ids": True, "stop": ["@@@@"], "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=auth, timeout=60) as r:
        assert r.status_code == 200
        events, done = read_sse(r)
    assert done
    text, ids = "", []
    for ev in events:
        if not ev["choices"]:
            continue
        ch = ev["choices"][0]
        text += ch["text"]
        ids += [int(t.split(":")[1]) for t in ch["logprobs"]["tokens"]] if ch["logprobs"] else []
        gen = ids[len(tok.encode(prompt, add_special_tokens=False)):] if echo else ids
        sent = text[len(prompt):] if echo else text
        decoded = tok.decode(gen, skip_special_tokens=True)
        assert sent.startswith(decoded), (decoded, sent)  # every listed token's text is out already
    final = events[-1]["choices"][0] if events[-1]["choices"] else events[-2]["choices"][0]
    assert final["finish_reason"] == "length"
    gen = ids[len(tok.encode(prompt, add_special_tokens=False)):] if echo else ids
    assert len(gen) == 48 and tok.decode(gen, skip_special_tokens=True) == (text[len(prompt):] if echo else text)


def test_chat_logprobs_never_run_ahead_of_text(server, auth, tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    body = {"messages": [{"role": "user", "content": "日本語 emoji 🙂"}], "max_tokens": 48, "temperature": 1.0,
            "seed": 4, "stream": True, "logprobs": True, "stop": ["@@@@"], "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=auth, timeout=60) as r:
        events, done = read_sse(r)
    assert done
    text, raw = "", b""
    for ev in events:
        if not ev["choices"]:
            continue
        ch = ev["choices"][0]
        text += ch["delta"].get("content") or ""
        for entry in (ch["logprobs"] or {}).get("content") or []:
            raw += bytes(entry["bytes"])
        assert text.startswith(raw.decode("utf-8", errors="replace")), (raw, text)
    assert raw.decode("utf-8", errors="replace") == text and len(tok.encode(text, add_special_tokens=False)) > 0
