"""Structured outputs through the openai SDK against the real server: the random-weight model's output parses and
validates (jsonschema) for nested objects, arrays, enums, required fields, string patterns, a regex and a choice;
streamed equals non-streamed; n > 1; bad constraints are 400s naming the field."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
        "address": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                                     "ok": {"type": "boolean"}},
                    "required": ["zip", "ok"], "additionalProperties": False},
    },
    "required": ["name", "age", "role", "code", "tags", "address"],
    "additionalProperties": False,
}
CHAT = [{"role": "user", "content": "Describe a person."}]


def _json_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


def test_chat_json_schema_validates_streamed_and_not(openai_client):
    full = openai_client.chat.completions.create(model="llama", messages=CHAT, max_tokens=200, temperature=0,
                                                 response_format=_json_format(PERSON))
    text = full.choices[0].message.content
    jsonschema.validate(json.loads(text), PERSON)
    assert full.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in openai_client.chat.completions.create(
        model="llama", messages=CHAT, max_tokens=200, temperature=0, response_format=_json_format(PERSON),
        stream=True) if c.choices)
    assert streamed == text


@pytest.mark.parametrize("seed", [1, 2])
def test_sampled_choices_all_validate(openai_client, seed):
    schema = {"type": "array", "items": {"enum": [1, 2, 3]}, "minItems": 1, "maxItems": 4}
    out = openai_client.completions.create(model="llama", prompt="List:", max_tokens=40, temperature=1.0, seed=seed,
                                           n=3, extra_body={"guided_json": schema})
    assert len(out.choices) == 3
    for c in out.choices:
        jsonschema.validate(json.loads(c.text), schema)


def test_regex_choice_and_structured_outputs_object(openai_client):
    rx = openai_client.completions.create(model="llama", prompt="Code:", max_tokens=20, temperature=0,
                                          extra_body={"guided_regex": r"[A-Z]{3}-\d{2,4}"})
    assert re.fullmatch(r"[A-Z]{3}-\d{2,4}", rx.choices[0].text)
    choices = ["red", "green", "blue velvet"]
    ch = openai_client.chat.completions.create(model="llama", messages=CHAT, max_tokens=10, temperature=1.0, seed=4,
                                               extra_body={"guided_choice": choices})
    assert ch.choices[0].message.content in choices
    so = openai_client.completions.create(model="llama", prompt="Person:", max_tokens=200, temperature=0,
                                          extra_body={"structured_outputs": {"json": PERSON}})
    jsonschema.validate(json.loads(so.choices[0].text), PERSON)


def test_json_object_starts_an_object(openai_client):
    """Any JSON object: the random model may not close a free-form object within max_tokens, but what it writes
    is a JSON object's beginning, and a finished one parses."""
    out = openai_client.completions.create(model="llama", prompt="{}", max_tokens=30, temperature=0,
                                           extra_body={"response_format": {"type": "json_object"}})
    text = out.choices[0].text
    assert text.startswith("{")
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("extra,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_grammar": "root ::= "}, "guided_grammar"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"guided_json": "{not json"}, "guided_json"),
])
def test_bad_constraints_are_400s_naming_the_field(openai_client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        openai_client.completions.create(model="llama", prompt="x", max_tokens=5, extra_body=extra)
    assert e.value.body["param"] == param, e.value.body
    assert ".cc:" not in e.value.body["message"]  # the parser's message, not its C++ source location
