"""How a request becomes prompt tokens, as vLLM's clients rely on: chat's add_generation_prompt /
continue_final_message / chat_template_kwargs / echo / message names, completions' add_special_tokens (BOS), and
completions' legacy top_logprobs holding the sampled token. Units on a real tokenizer with its own template, then
the same fields through the real server."""

from __future__ import annotations

import types

import httpx
import pytest
from tokenizers import processors

from packserve.api.errors import APIError
from packserve.api.logprobs import completion_logprobs
from packserve.api.protocol import ChatCompletionRequest, CompletionRequest
from packserve.api.serving import prepare_completion
from packserve.api.text import render_chat
from packserve.engine.request import Logprob

# A template that shows every variable the request can set.
TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}{% if m['name'] is defined %}:{{ m['name'] }}{% endif %}]"
            "{{ m['content'] }}{% if not (loop.last and continue_final_message) %}</s>{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}[assistant]{% endif %}{% if think is defined %}<think={{ think }}>{% endif %}")
CHAT = [{"role": "user", "content": "Hi", "name": "ann"}, {"role": "assistant", "content": "Hel"}]


@pytest.fixture(scope="module")
def tokenizer(checkpoint_factory):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint_factory("llama"))
    tok.chat_template = TEMPLATE
    return tok


def _state(tok):
    return types.SimpleNamespace(tokenizer=tok, vocab_size=len(tok), max_model_len=256, max_waiting=64, max_n=4,
                                 model_name="m", model_names=("m",))


def _render(tok, **fields):
    req = ChatCompletionRequest(messages=CHAT, **fields)
    return render_chat(_state(tok), req, req.add_generation_prompt, req.continue_final_message)


def test_generation_prompt_and_continuing_the_final_message(tokenizer):
    assert _render(tokenizer) == "[user:ann]Hi</s>[assistant]Hel</s>[assistant]"
    assert _render(tokenizer, add_generation_prompt=False) == "[user:ann]Hi</s>[assistant]Hel</s>"
    cont = _render(tokenizer, add_generation_prompt=False, continue_final_message=True)
    assert cont.endswith("Hel")  # the reply continues the assistant's words
    with pytest.raises(APIError) as e:
        _render(tokenizer, continue_final_message=True)  # with the default add_generation_prompt=true
    assert e.value.status == 400 and e.value.param == "continue_final_message"


def test_chat_template_kwargs_reach_the_template(tokenizer):
    assert _render(tokenizer, chat_template_kwargs={"think": False}).endswith("<think=False>")
    for reserved in ("tokenize", "chat_template", "add_generation_prompt"):
        with pytest.raises(APIError) as e:
            _render(tokenizer, chat_template_kwargs={reserved: True})
        assert e.value.status == 400 and e.value.param == "chat_template_kwargs"


def test_completion_prompts_get_the_bos_by_default(tokenizer):
    """A tokenizer that adds a BOS (Llama's, Mistral's): completions add it unless add_special_tokens=false."""
    tok = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer.__class__.from_str(
        tokenizer.backend_tokenizer.to_str()))
    bos = tok.convert_tokens_to_ids("<|begin|>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin|> $A", special_tokens=[("<|begin|>", bos)])
    plain = tok.encode("Hello there", add_special_tokens=False)
    for body, want in (({}, [bos] + plain), ({"add_special_tokens": False}, plain)):
        job = prepare_completion(_state(tok), CompletionRequest(prompt="Hello there", **body))
        assert job.requests[0].prompt_token_ids == want
    ids_job = prepare_completion(_state(tok), CompletionRequest(prompt=plain))  # token ids are taken as they are
    assert ids_job.requests[0].prompt_token_ids == plain


def test_legacy_top_logprobs_hold_the_sampled_token(tokenizer):
    state = _state(tokenizer)
    a, b, c = (tokenizer.encode(w, add_special_tokens=False)[0] for w in (" the", " of", " and"))
    out = completion_logprobs(state, [(Logprob(c, -3.0), [Logprob(a, -0.5), Logprob(b, -1.0)]),
                                      (Logprob(a, -0.5), [Logprob(a, -0.5), Logprob(b, -1.0)]),
                                      (Logprob(b, -1.0), [])], 0)
    assert out["top_logprobs"][0] == {tokenizer.decode([a]): -0.5, tokenizer.decode([b]): -1.0,
                                      tokenizer.decode([c]): -3.0}  # k + 1: the sampled one was not in the top k
    assert len(out["top_logprobs"][1]) == 2  # already among them: k
    assert out["top_logprobs"][2] == {tokenizer.decode([b]): -1.0}  # logprobs=0: the sampled token alone


# -- through the server ---------------------------------------------------------------------
def _post(server, auth, path, body):
    return httpx.post(server.url + path, json={"model": "llama", **body}, headers=auth, timeout=60)


def test_server_continues_and_echoes_the_final_message(server, auth):
    msgs = [{"role": "user", "content": "Say hello"}, {"role": "assistant", "content": "Hello the"}]
    cont = {"messages": msgs, "add_generation_prompt": False, "continue_final_message": True, "max_tokens": 4,
            "temperature": 0}
    tok = _post(server, auth, "/tokenize", {"messages": msgs, "add_generation_prompt": False,
                                             "continue_final_message": True}).json()
    new_turn = _post(server, auth, "/tokenize", {"messages": msgs}).json()
    assert tok["count"] < new_turn["count"]  # no end-of-turn and no new assistant header
    out = _post(server, auth, "/v1/chat/completions", cont).json()
    assert out["usage"]["prompt_tokens"] == tok["count"]
    reply = out["choices"][0]["message"]["content"]
    echoed = _post(server, auth, "/v1/chat/completions", {**cont, "echo": True}).json()
    assert echoed["choices"][0]["message"]["content"] == "Hello the" + reply
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers=auth, timeout=60,
                      json={"model": "llama", **cont, "echo": True, "stream": True}) as r:
        import json

        deltas = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(d["choices"][0]["delta"].get("content") or "" for d in deltas) == "Hello the" + reply
    bad = _post(server, auth, "/v1/chat/completions", {"messages": msgs, "continue_final_message": True})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "continue_final_message"


@pytest.mark.parametrize("body,param", [
    ({"chat_template": "{{ messages }}"}, "chat_template"),
    ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_server_refuses_what_it_will_not_do(server, auth, body, param):
    r = _post(server, auth, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                      "max_tokens": 2, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
