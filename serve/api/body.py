"""Request bodies parsed off the event loop.

FastAPI parses and validates a declared body model on the event loop: a 6.7 MB list of token ids took ~1.5 s of
json.loads and pydantic there, during which no other stream moved and /health went unanswered. The routes here
read the raw body and parse it in a worker thread when it is large (at most two at once); small bodies, the
usual case, are parsed in place. The OpenAPI document still describes the bodies (`openapi_body`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from packserve.api.errors import APIError

M = TypeVar("M", bound=BaseModel)
INLINE_BYTES = 64 * 1024  # bodies up to this size parse on the loop (well under a millisecond)
_big_bodies = anyio.CapacityLimiter(2)


def is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _parse(raw: bytes, model: type[M], precheck: Callable[[dict], None] | None = None) -> M:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise APIError(400, "the request body is not valid JSON (it must be UTF-8)", None, "invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body's JSON is nested too deeply", None, "invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", None, "invalid_value")
    if precheck is not None:  # sizes checked on the raw JSON: validating 250,000 messages took seconds of GIL
        precheck(data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None


async def parse_body(request: Request, model: type[M], precheck: Callable[[dict], None] | None = None) -> M:
    """The body as `model`; `precheck` sees the decoded JSON object first (cheap bounds, raising APIError)."""
    content_type = request.headers.get("content-type")
    if content_type is not None and not is_json(content_type):
        raise APIError(400, f"send the request body as JSON with Content-Type: application/json (got "
                            f"{content_type.split(';', 1)[0].strip() or 'none'!r})", None, "invalid_content_type")
    raw = await request.body()
    if not raw:
        raise APIError(400, "a JSON request body is required", None, "missing_body")
    if len(raw) <= INLINE_BYTES:
        return _parse(raw, model, precheck)
    return await anyio.to_thread.run_sync(_parse, raw, model, precheck, limiter=_big_bodies)


def openapi_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route that parses `model` itself (see install_schemas)."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def install_schemas(app: FastAPI, *models: type[BaseModel]) -> None:
    """Add the models' JSON schemas (and their nested definitions) to the app's OpenAPI components."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        doc = base()
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for model in models:
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
        app.openapi_schema = doc
        return doc

    app.openapi = openapi
