"""Tool-call formats of the model families: how a call is written, its grammar, and parsing it back.

A format knows how its family writes calls (Hermes/Qwen: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n
</tool_call>`; Llama 3.x JSON: `{"name": ..., "parameters": {...}}`, several joined by "; "; Mistral:
`[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`), builds the xgrammar structural tag that enforces it
(packserve.api.tool_calls picks which), and parses generated text into content and calls.

`parse` works on any prefix of the output: complete calls, the call being written (its name once the name is
whole, its arguments as far as they are certain), and the content that is certain (never the start of a
marker, nor whitespace that could turn out to border a call). Streaming sends the difference between two
parses; the final parse of the whole text gives the same content and calls, so streamed and unstreamed
responses agree. Content is the text outside calls, with the whitespace next to each call removed and one space
between the pieces a call separated ("Sure <call> done" -> "Sure done").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from packserve.jsontext import bracket_depths

NAME_HEADER = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(arguments|parameters)"\s*:\s*')
_PRIMITIVE = re.compile(r"-?(?:\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)|true|false|null")


@dataclass
class Call:
    name: str | None  # None while the name is still being written
    arguments: str  # JSON text of the arguments, as far as it is certain
    complete: bool = False


@dataclass
class Parsed:
    content: str
    calls: list[Call] = field(default_factory=list)


def scan_value(text: str, i: int) -> int | None:
    """End (exclusive) of the JSON value starting at text[i], or None when the text ends inside it."""
    c = text[i]
    if c in "{[":
        return next((j + 1 for j, depth in bracket_depths(text, i) if depth == 0), None)
    if c == '"':
        j, esc = i + 1, False
        while j < len(text):
            if esc:
                esc = False
            elif text[j] == "\\":
                esc = True
            elif text[j] == '"':
                return j + 1
            j += 1
        return None
    m = _PRIMITIVE.match(text, i)
    if m is None or m.end() == len(text):
        return None  # a number may go on
    return m.end()


def _skip_ws(text: str, j: int) -> int:
    while j < len(text) and text[j].isspace():
        j += 1
    return j


def _call(text: str, i: int) -> tuple[Call | None, int | None]:
    """The call object at text[i] == "{": (call so far, end) with end None while it is incomplete; call None for
    an object that is not a call."""
    end = scan_value(text, i)
    m = NAME_HEADER.match(text, i)
    if m is not None:
        name = json.loads('"' + m.group(1) + '"')
        a = m.end()
        if a == len(text):
            return Call(name, ""), None
        if text[a] in "{[":  # streamable: every character before the closing bracket is part of the arguments
            a_end = scan_value(text, a)
            return Call(name, text[a:a_end if a_end is not None else len(text)], a_end is not None), end
        a_end = scan_value(text, a)
        return Call(name, text[a:a_end] if a_end is not None else "", a_end is not None), end
    if end is None:
        return Call(None, ""), None  # the name is still to come
    try:  # a complete object whose keys come in another order
        obj = json.loads(text[i:end])
    except (ValueError, RecursionError):
        return None, end
    args = obj.get("arguments", obj.get("parameters")) if isinstance(obj, dict) else None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or args is None:
        return None, end
    return Call(obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False), True), end


@dataclass(frozen=True)
class ToolFormat:
    """How one model family writes tool calls. A region starts at `begin` (kept as part of the first call when
    `keep_begin`), then `open`, then call objects separated by `sep`, then `close`."""

    name: str
    begin: str
    args_key: str = "arguments"
    keep_begin: bool = False
    open: str = ""
    sep: str = ""  # between calls inside a region ("" = one call per region)
    close: str = ""
    call_prefix: str = ""  # written before each call object / after it (grammar only)
    call_suffix: str = ""
    separator: str = ""  # written between calls (grammar)
    strip: tuple[str, ...] = ()  # markers removed from content (special tokens some tokenizers keep)

    # -- grammar ------------------------------------------------------------------
    def _tag(self, tool: dict, any_order: bool) -> dict:
        fn = tool["function"]
        params = fn.get("parameters")
        schema = params if isinstance(params, dict) and fn.get("strict", True) is not False else True
        begin = self.call_prefix + '{"name": ' + json.dumps(fn["name"], ensure_ascii=False) + \
            f', "{self.args_key}": '
        return {"type": "tag", "begin": begin, "end": "}" + self.call_suffix,
                "content": {"type": "json_schema", "json_schema": schema, "any_order": any_order,
                            "max_whitespace_cnt": 1}}

    def structural_tag(self, tools: list[dict], mode: str, parallel: bool) -> dict:
        """xgrammar's structural tag for `mode`: "auto" (text, and calls once a call starts), "required" (only
        calls, at least one) or "forced" (one call of tools[0])."""
        tags = [self._tag(t, any_order=False) for t in tools]
        if mode == "forced":
            tags, parallel = tags[:1], False
        calls = {"type": "tags_with_separator", "tags": tags, "separator": self.separator, "at_least_one": True,
                 "stop_after_first": not parallel}
        if mode == "auto":
            if self.open:  # a list after the marker: one triggered region holding the calls
                region = {"type": "tag", "begin": self.begin + self.open, "content": calls, "end": self.close}
                fmt = {"type": "triggered_tags", "triggers": [self.begin], "tags": [region], "stop_after_first": True}
            else:
                fmt = {"type": "triggered_tags", "triggers": [self.begin], "tags": tags,
                       "stop_after_first": not parallel}
        elif self.open:
            fmt = {"type": "sequence", "elements": [{"type": "const_string", "value": self.begin + self.open},
                                                    calls, {"type": "const_string", "value": self.close}]}
        else:
            fmt = calls
        return {"type": "structural_tag", "format": fmt}

    # -- parsing ------------------------------------------------------------------
    def _region(self, text: str, j: int, calls: list[Call]) -> tuple[int | None, bool]:
        """Parse the calls of the region whose body starts at j. Returns (end, ok): end None while the region is
        incomplete; ok False when it is not a call region after all (then it is content from j on)."""
        j = _skip_ws(text, j)
        if self.open:
            if j == len(text):
                return None, True
            if not text.startswith(self.open, j):
                return j, False
            j = _skip_ws(text, j + len(self.open))
        while True:
            if j == len(text):
                return None, True
            if text[j] != "{":
                return j, False
            call, end = _call(text, j)
            if call is None:
                return j, False
            calls.append(call)
            if end is None:
                return None, True
            call.complete = True
            j = _skip_ws(text, end)
            if j == len(text):
                return None, True
            if self.sep and text.startswith(self.sep, j):
                j = _skip_ws(text, j + len(self.sep))
                continue
            if not self.close:
                return j, True
            if text.startswith(self.close, j):
                return j + len(self.close), True
            if self.close.startswith(text[j:]):
                return None, True
            return j, True  # a stray character after a complete call: it ends the region, the rest is content

    def parse(self, text: str, final: bool) -> Parsed:
        for marker in self.strip:
            text = text.replace(marker, "")
        pieces: list[str] = []
        calls: list[Call] = []
        start = pos = 0  # start of the current content piece; where to look for the next marker
        after_call = False  # the current piece follows a call (its leading space borders it)
        while True:
            i = text.find(self.begin, pos)
            if i < 0:
                piece = text[start:]
                if not final:  # hold back what may start a marker, and trailing space that may border a call
                    hold = max(_marker_prefix(piece, m) for m in (self.begin, *self.strip))
                    piece = piece[:len(piece) - hold].rstrip()
                pieces.append(piece.lstrip() if after_call else piece)
                break
            n = len(calls)
            end, ok = self._region(text, i if self.keep_begin else i + len(self.begin), calls)
            if not ok and len(calls) == n:  # not a call after all: the marker is text
                pos = i + len(self.begin)
                continue
            piece = text[start:i].rstrip()
            pieces.append(piece.lstrip() if after_call else piece)
            if end is None:
                break
            start = pos = end
            after_call = True
        if final:
            calls = [c for c in calls if c.name is not None]
        return Parsed(" ".join(p for p in pieces if p), calls)


def _marker_prefix(text: str, marker: str) -> int:
    """Length of the longest suffix of text that is a proper prefix of marker."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


FORMATS = {
    "hermes": ToolFormat("hermes", begin="<tool_call>", close="</tool_call>", call_prefix="<tool_call>\n",
                         call_suffix="\n</tool_call>", separator="\n"),
    "llama3_json": ToolFormat("llama3_json", begin='{"name"', args_key="parameters", keep_begin=True, sep=";",
                              separator="; ", strip=("<|python_tag|>",)),
    "mistral": ToolFormat("mistral", begin="[TOOL_CALLS]", open="[", sep=",", close="]", separator=", "),
}


def detect(chat_template: str | None) -> str:
    """The format a chat template writes tool calls in; Hermes when it shows none (documented)."""
    t = chat_template or ""
    if "[TOOL_CALLS]" in t:
        return "mistral"
    if "<|python_tag|>" in t or ("ipython" in t and '"parameters"' in t):
        return "llama3_json"
    return "hermes"
