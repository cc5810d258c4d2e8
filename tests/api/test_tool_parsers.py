"""Tool-call formats without a server: parsing (whole and streamed, which must agree on every split of the text),
format detection from chat templates, and the structural-tag grammars driven token by token on a real tokenizer:
whatever the grammar lets through parses into calls whose arguments validate against the tool's schema."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from packserve.api.tool_calls import ToolSetup, ToolStream, message
from packserve.api.tool_parsers import FORMATS, detect, scan_value
from packserve.engine.request import GuidedSpec

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["c", "f"]}}, "required": ["city", "unit"],
           "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"],
       "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}

# (format, text, expected content, expected [(name, arguments)])
CASES = [
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n'
               '</tool_call>', "Let me check.", [("get_weather", '{"city": "Paris", "unit": "c"}')]),
    ("hermes", '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n<tool_call>\n'
               '{"name": "add", "arguments": {"a": 3, "b": 4}}\n</tool_call>\nDone.', "Done.",
     [("add", '{"a": 1, "b": 2}'), ("add", '{"a": 3, "b": 4}')]),
    ("hermes", "a <tool_call> is how I call, see", "a <tool_call> is how I call, see", []),
    ("hermes", '<tool_call>{"arguments": {"a": 1}, "name": "add"}</tool_call>', "", [("add", '{"a": 1}')]),
    ("hermes", 'x <tool_call>\n{"name": "add", "arguments": {"a": "}\\"{", "b": [1, {"c": 2}]}}\n</tool_call>', "x",
     [("add", '{"a": "}\\"{", "b": [1, {"c": 2}]}')]),
    ("hermes", "plain answer, no calls ", "plain answer, no calls ", []),
    ("hermes", 'Sure <tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n done.', "Sure done.",
     [("add", '{"a": 1, "b": 2}')]),
    ("llama3_json", '{"name": "add", "parameters": {"a": 1, "b": 2}}; {"name": "get_weather", "parameters": '
                    '{"city": "Oslo", "unit": "f"}}', "",
     [("add", '{"a": 1, "b": 2}'), ("get_weather", '{"city": "Oslo", "unit": "f"}')]),
    ("llama3_json", '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}', "", [("add", '{"a": 1, "b": 2}')]),
    ("llama3_json", 'I am {"name": "bob"} and fine', 'I am {"name": "bob"} and fine', []),
    ("mistral", '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "add", "arguments": '
                '{"a": 5, "b": 6}}]', "", [("add", '{"a": 1, "b": 2}'), ("add", '{"a": 5, "b": 6}')]),
    ("mistral", 'Sure [TOOL_CALLS] is a token', "Sure [TOOL_CALLS] is a token", []),
]


def _setup(fmt: str) -> ToolSetup:
    return ToolSetup(FORMATS[fmt], tuple(TOOLS), "auto", None)


@pytest.mark.parametrize("fmt,text,content,calls", CASES)
def test_parse_whole(fmt, text, content, calls):
    parsed = FORMATS[fmt].parse(text, final=True)
    assert parsed.content == content
    assert [(c.name, c.arguments) for c in parsed.calls] == calls
    assert all(c.complete for c in parsed.calls)
    msg, reason = message(_setup(fmt), text, "stop")
    if calls:
        assert reason == "tool_calls" and msg["content"] == (content or None)
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in msg["tool_calls"]] == calls
        assert len({c["id"] for c in msg["tool_calls"]}) == len(calls)
    else:
        assert reason == "stop" and msg == {"role": "assistant", "content": content}


def _stream(fmt: str, text: str, cuts: list[int], reason: str = "stop") -> tuple[str, list[tuple[str, str]], str | None]:
    """Feed the text's prefixes at `cuts` to a ToolStream; assemble the deltas as the openai SDK does."""
    ts = ToolStream(_setup(fmt))
    content, calls = "", {}
    for k in cuts + [len(text)]:
        d = ts.delta(text[:k], final=k == len(text))
        content += d.get("content", "")
        for tc in d.get("tool_calls", []):
            if "id" in tc:  # a new call: its header comes once
                assert tc["index"] not in calls and tc["type"] == "function"
                calls[tc["index"]] = [tc["function"]["name"], ""]
            calls[tc["index"]][1] += tc["function"]["arguments"]
    return content, [tuple(calls[i]) for i in sorted(calls)], ts.finish_reason(reason)


@pytest.mark.parametrize("fmt,text,content,calls", CASES)
def test_stream_equals_whole_on_every_split(fmt, text, content, calls):
    every = _stream(fmt, text, list(range(1, len(text))))
    assert every == (content, calls, "tool_calls" if calls else "stop")
    rng = random.Random(0)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 6))))
        assert _stream(fmt, text, cuts) == every


def test_truncated_call_keeps_its_partial_arguments():
    text = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b'
    msg, reason = message(_setup("hermes"), text, "length")
    assert reason == "length" and msg["tool_calls"][0]["function"] == {"name": "add", "arguments": '{"a": 1, "b'}
    assert _stream("hermes", text, list(range(1, len(text))), "length") == ("", [("add", '{"a": 1, "b')], "length")


def test_scan_value_incomplete_and_complete():
    assert scan_value('{"a": "}"}x', 0) == 10
    assert scan_value('{"a": [1, 2', 0) is None
    assert scan_value('"ab\\"c" ', 0) == 7
    assert scan_value("12", 0) is None and scan_value("12,", 0) == 2


def test_detect_from_chat_template():
    from packserve.checkpoints import CHAT_TEMPLATE

    assert detect(CHAT_TEMPLATE) == "hermes"
    assert detect("{% for m in messages %}[TOOL_CALLS]{% endfor %}") == "mistral"
    assert detect("<|start_header_id|>ipython<|end_header_id|> {\"name\": ..., \"parameters\": ...}") == "llama3_json"
    assert detect(None) == "hermes"


# -- grammars, token by token -------------------------------------------------------
@pytest.fixture(scope="module")
def outputs():
    from packserve.checkpoints import build_tokenizer
    from packserve.engine.structured import StructuredOutputs

    tok = build_tokenizer(512)
    return tok, StructuredOutputs(tok, len(tok), [tok.eos_token_id])


def _walk(outputs, spec: GuidedSpec, seed: int, prefix: str = "", max_tokens: int = 200) -> tuple[str, bool]:
    """Random tokens among those the grammar (and the text mask) allows, ending early at EOS when allowed."""
    import torch
    import xgrammar as xgr

    tok, so = outputs
    m = so.matcher(spec)
    assert m.accept_string(prefix) if prefix else True
    rng = random.Random(seed)
    bitmask = xgr.allocate_token_bitmask(1, so.vocab_size)
    ids = []
    while not m.is_terminated() and len(ids) < max_tokens:
        m.fill_next_token_bitmask(bitmask)
        words = bitmask[0] & so.text_words
        bits = (words.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
        allowed = bits.flatten()[:so.vocab_size].nonzero().flatten().tolist()
        assert allowed, "the grammar left no token"
        t = tok.eos_token_id if tok.eos_token_id in allowed and rng.random() < 0.3 else rng.choice(allowed)
        assert m.accept_token(t)
        ids.append(t)
    return prefix + tok.decode([i for i in ids if i != tok.eos_token_id]), m.is_terminated()


def _valid_calls(fmt: str, text: str) -> list:
    parsed = FORMATS[fmt].parse(text, final=True)
    for c in parsed.calls:
        assert c.complete, text
        jsonschema.validate(json.loads(c.arguments), SCHEMAS[c.name])
    return parsed.calls


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("seed", range(4))
def test_forced_and_required_grammars_give_valid_calls(outputs, fmt, seed):
    def spec(mode, parallel, tools=TOOLS):
        tag = FORMATS[fmt].structural_tag(tools, mode, parallel)
        return GuidedSpec("structural_tag", json.dumps(tag), "tools")

    text, done = _walk(outputs, spec("forced", True, TOOLS[1:]), seed)
    assert done and [c.name for c in _valid_calls(fmt, text)] == ["add"]
    text, done = _walk(outputs, spec("required", False), seed)
    assert done and len(_valid_calls(fmt, text)) == 1
    text, _ = _walk(outputs, spec("required", True), seed, max_tokens=120)
    parsed = FORMATS[fmt].parse(text, final=True)
    assert parsed.calls and all(c.name in SCHEMAS for c in parsed.calls) and parsed.content == ""
    assert all(jsonschema.validate(json.loads(c.arguments), SCHEMAS[c.name]) is None
               for c in parsed.calls if c.complete)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_auto_grammar_holds_a_started_call_to_the_schema(outputs, fmt):
    f = FORMATS[fmt]
    spec = GuidedSpec("structural_tag", json.dumps(f.structural_tag(TOOLS, "auto", False)), "tools")
    for seed in range(3):
        text, done = _walk(outputs, spec, seed, prefix="Checking. " + f.begin, max_tokens=300)
        assert done
        calls = _valid_calls(fmt, text)
        assert len(calls) == 1 and FORMATS[fmt].parse(text, final=True).content.startswith("Checking.")
    free, done = _walk(outputs, spec, 0)  # free text ends whenever the model ends it
    assert done
