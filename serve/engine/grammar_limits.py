"""What a structured-output spec may hold, checked before it compiles (xgrammar's compile cannot be interrupted).

Each limit is a shape whose compile time (or stack) grows fast, measured with xgrammar 0.2.9:
- size: a 588 KB enum took 30-55 s and ~350 MB;
- JSON nesting: an object nested 128 deep 0.25 s, 450 deep 8 s;
- regex group nesting in a schema's `pattern`: 30,000 "(" overflowed the C++ stack (the process died);
- a repetition bound: "[a-z]{3000}" in a pattern 0.5 s, "{10000}" 6 s; and all bounds of a spec together:
  alternatives of bounded repeats compile in time linear in their sum (100 alternatives of ".{999}": 38 s);
- optional properties of one object: ~cubic (1000: 5.5 s, 2000: 39 s).
Legitimate schemas sit far below all of them (OpenAI's own limits: 10 levels of nesting, 5000 properties).
"""

from __future__ import annotations

import json
import re

from packserve.engine.request import GuidedSpec, ParameterError
from packserve.jsontext import bracket_depths

MAX_SPEC_CHARS = 256 * 1024
MAX_NESTING = 64  # JSON brackets (schemas, structural tags), and regex groups
MAX_REPEAT = 1000  # one repetition bound {n}, {n,}, {n,m}: in patterns, regexes and grammars
MAX_REPEAT_TOTAL = 4096  # every bound of a spec together
MAX_OPTIONAL_PROPERTIES = 256  # per object schema
_REPEAT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


def check_spec(spec: GuidedSpec) -> None:
    """ParameterError naming the field for a spec over the limits (before anything compiles)."""
    text, what = spec.value, spec.kind.replace("_", " ")

    def refuse(message: str) -> None:
        raise ParameterError(f"the {what} {message}", spec.param)

    if len(text) > MAX_SPEC_CHARS:
        refuse(f"is {len(text)} characters; at most {MAX_SPEC_CHARS} are accepted")
    is_json = spec.kind in ("json_schema", "structural_tag")
    if is_json and max((d for _, d in bracket_depths(text)), default=0) > MAX_NESTING:
        refuse(f"nests deeper than {MAX_NESTING} levels")
    if spec.kind == "choice":
        return
    total = 0
    for m in _REPEAT.finditer(text):
        bound = max(int(m.group(1)), int(m.group(2) or 0))
        if bound > MAX_REPEAT:
            refuse(f"has a repetition bound above {MAX_REPEAT} ({m.group(0)!r})")
        total += bound
    if total > MAX_REPEAT_TOTAL:
        refuse(f"has repetition bounds summing to {total}; at most {MAX_REPEAT_TOTAL} are accepted")
    if not is_json:
        if _group_depth(text) > MAX_NESTING:
            refuse(f"nests regex groups deeper than {MAX_NESTING} levels")
        return
    try:
        value = json.loads(text)  # (nesting checked above: the parser's stack suffices)
    except ValueError:
        return  # not JSON: the compiler says so
    groups, optional = _walk(value)
    if groups > MAX_NESTING:
        refuse(f"nests regex groups deeper than {MAX_NESTING} levels (in a pattern)")
    if optional > MAX_OPTIONAL_PROPERTIES:
        refuse(f"has an object with {optional} optional properties; at most {MAX_OPTIONAL_PROPERTIES} are "
               "accepted (list the others in `required`)")


def _group_depth(text: str) -> int:
    """Deepest nesting of "(" groups, an escaped "\\(" not counted (conservative: "[(]" counts)."""
    depth = deepest = 0
    prev = ""
    for ch in text:
        if prev != "\\":
            if ch == "(":
                depth += 1
                deepest = max(deepest, depth)
            elif ch == ")" and depth:
                depth -= 1
        prev = ch if prev != "\\" else ""  # "\\\\(" : the second backslash is escaped, the "(" is not
    return deepest


def _walk(node) -> tuple[int, int]:
    """(deepest regex group nesting of any string, most optional properties of any object schema) in a JSON
    value: patterns are strings, and their escapes are a regex's once the JSON is decoded."""
    groups = optional = 0
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, str):
            groups = max(groups, _group_depth(n))
        elif isinstance(n, dict):
            props = n.get("properties")
            if isinstance(props, dict):
                required = n.get("required") if isinstance(n.get("required"), list) else []
                optional = max(optional, len(set(props) - {r for r in required if isinstance(r, str)}))
            stack.extend(n.keys())
            stack.extend(n.values())
        elif isinstance(n, list):
            stack.extend(n)
    return groups, optional
