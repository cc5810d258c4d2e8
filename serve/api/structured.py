"""Structured-output fields of a request -> one GuidedSpec (packserve.engine.structured compiles it).

OpenAI's `response_format` ({"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema",
"strict"}}) on chat and completions, and vLLM's extras: `guided_json` (a schema, as an object or JSON text),
`guided_regex`, `guided_choice` (a list of strings), `guided_grammar` (EBNF in xgrammar's GBNF dialect), or the
newer `structured_outputs` object with the keys `json`, `regex`, `choice`, `grammar`. At most one constraint per
request; anything malformed is a 400 naming the field.
"""

from __future__ import annotations

import json
from typing import Any

from packserve.api.errors import APIError
from packserve.engine.request import GuidedSpec

MAX_CHOICES = 1024


def _bad(param: str, message: str) -> APIError:
    return APIError(400, message, param, "invalid_value")


def _schema_text(value: Any, param: str) -> str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser's stack
            raise _bad(param, f"{param} must be a JSON schema (an object, or its JSON text)") from None
    if not isinstance(value, dict):
        raise _bad(param, f"{param} must be a JSON schema object")
    return json.dumps(value)  # key order kept: it is the order the properties are generated in


def _from_response_format(rf: dict[str, Any]) -> GuidedSpec | None:
    kind = rf.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return GuidedSpec("json_object", "", "response_format")
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict) or "schema" not in js:
            raise _bad("response_format", 'response_format of type "json_schema" needs json_schema.schema')
        return GuidedSpec("json_schema", _schema_text(js["schema"], "response_format"), "response_format")
    raise _bad("response_format", f"response_format type {kind!r} is not supported (text, json_object, "
                                  "json_schema)")


def _choice(value: Any, param: str) -> GuidedSpec:
    if (not isinstance(value, list) or not value or len(value) > MAX_CHOICES
            or not all(isinstance(c, str) and c for c in value)):
        raise _bad(param, f"{param} must be a list of 1 to {MAX_CHOICES} non-empty strings")
    return GuidedSpec("choice", json.dumps(value, ensure_ascii=False), param)


def _text(value: Any, param: str, kind: str) -> GuidedSpec:
    if not isinstance(value, str) or not value:
        raise _bad(param, f"{param} must be a non-empty string")
    return GuidedSpec(kind, value, param)


def guided_spec(req) -> GuidedSpec | None:
    """The one constraint a completion or chat request asks for, or None."""
    specs: list[GuidedSpec] = []
    rf = getattr(req, "response_format", None)
    if rf is not None:
        spec = _from_response_format(rf)
        if spec is not None:
            specs.append(spec)
    if req.guided_json is not None:
        specs.append(GuidedSpec("json_schema", _schema_text(req.guided_json, "guided_json"), "guided_json"))
    if req.guided_regex is not None:
        specs.append(_text(req.guided_regex, "guided_regex", "regex"))
    if req.guided_choice is not None:
        specs.append(_choice(req.guided_choice, "guided_choice"))
    if req.guided_grammar is not None:
        specs.append(_text(req.guided_grammar, "guided_grammar", "grammar"))
    so = req.structured_outputs
    if so is not None:
        given = {k: v for k, v in so.items() if v is not None and k in ("json", "regex", "choice", "grammar")}
        for key, value in given.items():
            param = f"structured_outputs.{key}"
            if key == "json":
                specs.append(GuidedSpec("json_schema", _schema_text(value, param), param))
            elif key == "choice":
                specs.append(_choice(value, param))
            else:
                specs.append(_text(value, param, key))
    if len(specs) > 1:
        raise _bad(specs[1].param, f"only one structured output constraint per request ({specs[0].param} and "
                                   f"{specs[1].param} given)")
    return specs[0] if specs else None
