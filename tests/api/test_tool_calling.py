"""Tool calling through the openai SDK against the real server: a full round trip (call -> tool result -> answer),
streamed and not; tool_choice required / named / auto / none; parallel calls; every call format; and 400s for
malformed tools. The random-weight model calls under the grammar, so its arguments validate against the schema."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState

from tests.api.conftest import InProcessServer

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                                        "b": {"type": "integer", "minimum": 0, "maximum": 999}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module", params=["auto", "llama3_json", "mistral"])
def tools_server(request, tiny_model):
    srv = InProcessServer(tiny_model, max_model_len=1024, tool_call_parser=request.param)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(tools_server):
    return openai.OpenAI(base_url=tools_server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def _check_calls(calls, n: int | None = None, name: str | None = None):
    assert calls, "no tool calls"
    if n is not None:
        assert len(calls) == n
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_")
        assert c.function.name in SCHEMAS and (name is None or c.function.name == name)
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])
    assert len({c.id for c in calls}) == len(calls)


def _streamed(client, **kw):
    state = ChatCompletionStreamState()
    chunks = list(client.chat.completions.create(stream=True, **kw))
    for c in chunks:
        state.handle_chunk(c)
    return state.current_completion_snapshot, chunks


def test_round_trip_streamed_and_not(client, tools_server):
    kw = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
              max_tokens=200, temperature=0)
    full = client.chat.completions.create(**kw)
    choice = full.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    _check_calls(choice.message.tool_calls, n=1)
    snap, chunks = _streamed(client, **kw)
    assert snap.choices[0].finish_reason == "tool_calls"
    got = snap.choices[0].message.tool_calls
    assert [(c.function.name, c.function.arguments) for c in got] == \
        [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    arg_chunks = [c for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(arg_chunks) > 2, "arguments should stream in pieces"
    assert sum(1 for c in arg_chunks if c.choices[0].delta.tool_calls[0].id) == 1  # the header once

    call = choice.message.tool_calls[0]
    history = ASK + [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"}]
    answer = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=12,
                                            temperature=0, tool_choice="none")
    assert answer.choices[0].message.tool_calls is None and answer.choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=history, tools=TOOLS, max_tokens=12, temperature=0, tool_choice="none", stream=True)
        if c.choices)
    assert streamed == answer.choices[0].message.content
    # The call and the tool's result reached the prompt through the chat template.
    r = httpx.post(tools_server.url + "/tokenize", json={"messages": history, "tools": TOOLS}, timeout=30)
    text = httpx.post(tools_server.url + "/detokenize", json={"tokens": r.json()["tokens"]}, timeout=30).json()["prompt"]
    assert "18 degrees and sunny" in text and call.function.name in text and "get_weather" in text


def test_named_function_is_called(client):
    kw = dict(model="tiny", messages=ASK, tools=TOOLS, max_tokens=200, temperature=0,
              tool_choice={"type": "function", "function": {"name": "add"}})
    out = client.chat.completions.create(**kw)
    # OpenAI's (and vLLM's) finish_reason for a call forced by name is "stop"; "tool_calls" is for auto/required.
    assert out.choices[0].finish_reason == "stop" and out.choices[0].message.content is None
    _check_calls(out.choices[0].message.tool_calls, n=1, name="add")
    snap, _ = _streamed(client, **kw)
    assert snap.choices[0].finish_reason == "stop"
    assert snap.choices[0].message.tool_calls[0].function.arguments == out.choices[0].message.tool_calls[0].function.arguments


@pytest.mark.parametrize("max_tokens", [3, 8, 20])
def test_call_cut_by_max_tokens(client, max_tokens):
    """A required call cut off by max_tokens ends "length" with no marker text leaking into content, and the
    message (its arguments not whole JSON) can be sent back in the next turn, as OpenAI's can."""
    kw = dict(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=max_tokens, temperature=0)
    out = client.chat.completions.create(**kw)
    ch = out.choices[0]
    assert ch.finish_reason == "length" and not ch.message.content
    snap, chunks = _streamed(client, **kw)
    assert all(c.choices[0].delta.content in (None, "") for c in chunks if c.choices)
    assert snap.choices[0].finish_reason == "length"
    if ch.message.tool_calls:
        history = ASK + [ch.message.model_dump(exclude_none=True)] + [
            {"role": "tool", "tool_call_id": c.id, "content": "error: cut off"} for c in ch.message.tool_calls]
        again = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=4,
                                               temperature=0, tool_choice="none")
        assert again.choices[0].finish_reason in ("stop", "length")


def test_parallel_calls_and_n(client):
    out = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="required",
                                         max_tokens=160, temperature=1.0, seed=3, n=2)
    assert len(out.choices) == 2
    for ch in out.choices:
        calls = ch.message.tool_calls
        complete = calls if ch.finish_reason == "tool_calls" else calls[:-1]  # "length" may cut the last one
        assert calls and all(c.function.name in SCHEMAS for c in calls)
        _check_calls(complete) if complete else None


def test_auto_and_none(client):
    auto = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, max_tokens=30, temperature=0)
    ch = auto.choices[0]
    if ch.message.tool_calls:
        _check_calls([c for c in ch.message.tool_calls] if ch.finish_reason == "tool_calls" else [])
    else:
        assert ch.finish_reason in ("stop", "length") and ch.message.content is not None
    snap, _ = _streamed(client, model="tiny", messages=ASK, tools=TOOLS, max_tokens=30, temperature=0)
    assert snap.choices[0].message.content == ch.message.content
    none = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=5,
                                         temperature=0)
    assert none.choices[0].message.tool_calls is None
    assert none.usage.prompt_tokens < auto.usage.prompt_tokens  # "none" leaves the tools out of the prompt


@pytest.mark.parametrize("body,param", [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools[0].function.parameters"),
    ({"tools": TOOLS + TOOLS[:1]}, "tools[2].function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"messages": ASK + [{"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {
        "name": "add", "arguments": 5}}]}]}, "messages[1].tool_calls[0].function.arguments"),
    ({"messages": ASK + [{"role": "user", "tool_calls": [{"id": "1", "type": "function", "function": {
        "name": "add", "arguments": "{}"}}]}]}, "messages[1].tool_calls"),
])
def test_bad_tool_requests_are_400(tools_server, body, param):
    r = httpx.post(tools_server.url + "/v1/chat/completions", timeout=30,
                   json={"model": "tiny", "messages": ASK, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
