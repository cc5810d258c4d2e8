"""Tokenizer and model endpoints against the real server (vLLM's shapes): /tokenize of a prompt and of chat
messages, /detokenize, /tokenizer_info, /v1/models/{id} through the openai SDK, and HEAD /health; each checked
against the checkpoint's own tokenizer and the server's own completions."""

from __future__ import annotations

import httpx
import openai
import pytest

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}]


def test_tokenize_prompt_matches_the_tokenizer_and_the_completion_usage(server, auth, offline_llm, openai_client):
    tok = offline_llm.tokenizer
    text = "The quick brown fox jumps"
    r = httpx.post(server.url + "/tokenize", headers=auth, json={"prompt": text, "return_token_strs": True})
    assert r.status_code == 200, r.text
    got = r.json()
    want = tok.encode(text, add_special_tokens=True)
    assert got["tokens"] == want and got["count"] == len(want) and got["max_model_len"] == 256
    assert got["token_strs"] == tok.convert_ids_to_tokens(want)
    # add_special_tokens=false counts exactly what /v1/completions feeds the model.
    plain = httpx.post(server.url + "/tokenize", headers=auth,
                       json={"model": "llama", "prompt": text, "add_special_tokens": False}).json()
    usage = openai_client.completions.create(model="llama", prompt=text, max_tokens=1, temperature=0).usage
    assert plain["count"] == usage.prompt_tokens and plain["token_strs"] is None


def test_tokenize_chat_applies_the_template_like_chat_completions(server, auth, offline_llm, openai_client):
    tok = offline_llm.tokenizer
    r = httpx.post(server.url + "/tokenize", headers=auth, json={"messages": CHAT})
    assert r.status_code == 200, r.text
    rendered = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert r.json()["tokens"] == tok.encode(rendered, add_special_tokens=False)
    usage = openai_client.chat.completions.create(model="llama", messages=CHAT, max_tokens=1, temperature=0).usage
    assert r.json()["count"] == usage.prompt_tokens
    no_prompt = httpx.post(server.url + "/tokenize", headers=auth,
                           json={"messages": CHAT, "add_generation_prompt": False}).json()
    assert no_prompt["count"] < r.json()["count"]


def test_detokenize_round_trips(server, auth, offline_llm):
    ids = offline_llm.tokenizer.encode("Hello world, again", add_special_tokens=False)
    r = httpx.post(server.url + "/detokenize", headers=auth, json={"tokens": ids})
    assert r.status_code == 200 and r.json() == {"prompt": offline_llm.tokenizer.decode(ids)}


@pytest.mark.parametrize("path,body,status,param", [
    ("/detokenize", {"tokens": [1, 10 ** 9]}, 400, "tokens"),
    ("/detokenize", {"tokens": [True]}, 400, None),
    ("/tokenize", {"prompt": "x", "model": "nope"}, 404, "model"),
    ("/tokenize", '{"prompt": "\\ud800"}', 400, "prompt"),  # a lone surrogate (raw JSON: httpx cannot encode it)
    ("/tokenize", {"messages": []}, 400, None),
    ("/tokenize", {"messages": CHAT, "continue_final_message": True}, 400, "continue_final_message"),
    ("/tokenize", {}, 400, None),
])
def test_bad_tokenizer_requests_get_openai_errors(server, auth, path, body, status, param):
    if isinstance(body, str):
        r = httpx.post(server.url + path, headers={**auth, "Content-Type": "application/json"}, content=body)
    else:
        r = httpx.post(server.url + path, headers=auth, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and (param is None or err["param"] == param)


def test_tokenizer_endpoints_need_the_api_key(server):
    assert httpx.post(server.url + "/tokenize", json={"prompt": "x"}).status_code == 401
    assert httpx.get(server.url + "/tokenizer_info").status_code == 401


def test_tokenizer_info_describes_the_tokenizer(server, auth, offline_llm):
    info = httpx.get(server.url + "/tokenizer_info", headers=auth).json()
    tok = offline_llm.tokenizer
    assert info["tokenizer_class"] == type(tok).__name__ and info["model_max_length"] == 256
    assert info["eos_token"] == tok.eos_token and info["eos_token_id"] == tok.eos_token_id
    assert info["vocab_size"] >= len(tok) - len(tok.added_tokens_encoder) and "chat_template" in info


def test_models_retrieve_and_head_health(server, openai_client):
    card = openai_client.models.retrieve("llama")
    assert card.id == "llama" and card.object == "model"
    with pytest.raises(openai.NotFoundError):
        openai_client.models.retrieve("gpt-nothing")
    head = httpx.head(server.url + "/health")
    assert head.status_code == 200 and head.content == b""
