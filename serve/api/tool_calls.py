"""Tool calling on chat completions: the request's tools and tool_choice, the grammar that enforces them, the
messages that carry past calls, and the calls parsed out of the output (whole, or as stream deltas).

`tool_choice`: "none" (tools are left out of the prompt and nothing is parsed), "auto" (the default with tools:
free text, and once the model starts a call, the call is held to the function's parameter schema), "required"
(only calls, at least one) or {"type": "function", "function": {"name": ...}} (exactly one call of it);
`parallel_tool_calls: false` allows one call at most. Every mode but "none" is enforced with an xgrammar
structural tag in the model family's own call format (packserve.api.tool_parsers), so the arguments are JSON
valid for the schema; the same format parses the text back into `tool_calls`.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from packserve.api.errors import APIError
from packserve.api.tool_parsers import FORMATS, Call, ToolFormat
from packserve.engine.request import GuidedSpec

MAX_TOOLS = 128  # OpenAI's limit
NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


def _bad(param: str, message: str) -> APIError:
    return APIError(400, message, param, "invalid_value")


@dataclass(frozen=True)
class ToolSetup:
    """What a chat request's tools mean for this server: the template's tools and the enforced mode."""

    format: ToolFormat
    tools: tuple[dict, ...]  # passed to the chat template (empty with tool_choice "none")
    mode: str | None  # "auto" | "required" | "forced"; None: no tool calls (tool_choice "none")
    spec: GuidedSpec | None


def check_tools(tools: Any) -> list[dict]:
    if not isinstance(tools, list) or not tools or len(tools) > MAX_TOOLS:
        raise _bad("tools", f"tools must be a list of 1 to {MAX_TOOLS} tools")
    seen = set()
    out = []
    for k, tool in enumerate(tools):
        param = f"tools[{k}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise _bad(param, f'{param} must be {{"type": "function", "function": {{...}}}} (function tools only)')
        fn = tool.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not NAME.match(fn["name"]):
            raise _bad(f"{param}.function.name", f"{param}.function.name must be 1 to 64 letters, digits, "
                                                 "underscores, dots or dashes")
        if fn["name"] in seen:
            raise _bad(f"{param}.function.name", f"two tools are named {fn['name']!r}")
        seen.add(fn["name"])
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise _bad(f"{param}.function.parameters", f"{param}.function.parameters must be a JSON schema object")
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise _bad(f"{param}.function.description", f"{param}.function.description must be a string")
        clean = {k: fn[k] for k in ("name", "description", "parameters", "strict") if fn.get(k) is not None}
        out.append({"type": "function", "function": clean})
    return out


def setup(req, format_name: str) -> ToolSetup | None:
    """The request's tool setup, None without tools; 400 for anything malformed or contradictory."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise _bad("tool_choice", "tool_choice needs tools")
        return None
    tools = check_tools(req.tools)
    fmt = FORMATS[format_name]
    if choice is None or choice == "auto":
        mode, chosen = "auto", tools
    elif choice == "none":
        return ToolSetup(fmt, (), None, None)
    elif choice == "required":
        mode, chosen = "required", tools
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        chosen = [t for t in tools if t["function"]["name"] == name]
        if not chosen:
            raise _bad("tool_choice", f"tool_choice names {name!r}, which is not among the tools")
        mode = "forced"
    else:
        raise _bad("tool_choice", 'tool_choice must be "none", "auto", "required" or {"type": "function", '
                                  '"function": {"name": ...}}')
    parallel = req.parallel_tool_calls is not False
    tag = fmt.structural_tag(chosen, mode, parallel)
    return ToolSetup(fmt, tuple(tools), mode, GuidedSpec("structural_tag", json.dumps(tag, ensure_ascii=False),
                                                          "tools"))


def template_message(i: int, m) -> dict:
    """A chat message as chat templates expect it: assistant tool_calls with their arguments as objects (as
    Hugging Face templates render them), tool results with their tool_call_id."""
    out: dict[str, Any] = {"role": m.role}
    if m.name is not None:
        out["name"] = m.name
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        if m.role != "assistant":
            raise _bad(f"messages[{i}].tool_calls", "only assistant messages carry tool_calls")
        calls = []
        for j, c in enumerate(m.tool_calls):
            param = f"messages[{i}].tool_calls[{j}]"
            fn = c.get("function") if isinstance(c, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise _bad(param, f"{param} must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", "
                                  "\"arguments\"}}}}")
            args = fn.get("arguments", "{}")
            if isinstance(args, str):
                try:
                    args = json.loads(args) if args.strip() else {}
                except (ValueError, RecursionError):
                    pass  # a call cut off by max_tokens comes back as it was returned: the template gets the text
            elif not isinstance(args, dict):
                raise _bad(f"{param}.function.arguments", f"{param}.function.arguments must be a JSON string")
            calls.append({"id": c.get("id"), "type": "function",
                          "function": {"name": fn["name"], "arguments": args}})
        out["tool_calls"] = calls
    return out


def _call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def _finish_reason(setup_: ToolSetup, called: bool, reason: str | None) -> str | None:
    """"tool_calls" when the model chose to call (auto, required); a call forced by name ends "stop", as OpenAI's
    and vLLM's do. A call cut off by max_tokens ends "length" (its arguments are not whole JSON)."""
    return "tool_calls" if called and reason == "stop" and setup_.mode != "forced" else reason


def message(setup_: ToolSetup, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
    """The assistant message of a finished choice, and its finish_reason."""
    parsed = setup_.format.parse(text, final=True)
    content = parsed.content if setup_.mode == "auto" else ""  # required/forced: the output is calls only
    if not parsed.calls:
        return {"role": "assistant", "content": content}, finish_reason
    calls = [{"id": _call_id(), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
             for c in parsed.calls]
    msg = {"role": "assistant", "content": content or None, "tool_calls": calls}
    return msg, _finish_reason(setup_, True, finish_reason)


@dataclass
class ToolStream:
    """One streamed choice: turns its growing text into content and tool-call deltas, each sent once."""

    setup: ToolSetup
    sent_content: int = 0
    calls: list[tuple[str, int]] = field(default_factory=list)  # per started call: its id, arguments sent
    called: bool = False

    def delta(self, text: str, final: bool) -> dict:
        parsed = self.setup.format.parse(text, final)
        out: dict[str, Any] = {}
        if self.setup.mode == "auto" and len(parsed.content) > self.sent_content:
            out["content"] = parsed.content[self.sent_content:]
            self.sent_content = len(parsed.content)
        deltas = []
        for k, call in enumerate(parsed.calls):
            if call.name is None:
                break
            if k == len(self.calls):
                self.calls.append((_call_id(), 0))
                deltas.append({"index": k, "id": self.calls[k][0], "type": "function",
                               "function": {"name": call.name, "arguments": ""}})
            deltas += self._args(k, call)
        if deltas:
            self.called = True
            out["tool_calls"] = _merge(deltas)
        return out

    def _args(self, k: int, call: Call) -> list[dict]:
        cid, sent = self.calls[k]
        if len(call.arguments) <= sent:
            return []
        self.calls[k] = (cid, len(call.arguments))
        return [{"index": k, "function": {"arguments": call.arguments[sent:]}}]

    def finish_reason(self, reason: str | None) -> str | None:
        return _finish_reason(self.setup, self.called, reason)


def _merge(deltas: list[dict]) -> list[dict]:
    """One entry per call index: its header and first arguments in one piece."""
    out: dict[int, dict] = {}
    for d in deltas:
        cur = out.get(d["index"])
        if cur is None:
            out[d["index"]] = d
        else:
            cur["function"]["arguments"] += d["function"]["arguments"]
    return list(out.values())
