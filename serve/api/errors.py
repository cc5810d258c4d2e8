"""OpenAI error objects: every error is {"error": {"message", "type", "param", "code"}}.

FastAPI's 422 validation errors become 400 naming the field; HTTP errors of the
router (404 route, 405 method) keep their status in the same shape; anything
unexpected is a 500 whose text never carries paths or tracebacks (those go to
the server log only).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "invalid_request_error",
          404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _loc_to_param(loc) -> str | None:
    parts = [p for p in loc if p != "body"]
    # Pydantic names union branches in the location (e.g. "list[int]"): not useful to a client.
    parts = [p for p in parts if not (isinstance(p, str) and ("[" in p or p in ("str", "int", "function-after")))]
    if not parts:
        return None
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def validation_error(exc: RequestValidationError) -> APIError:
    """A body that parsed but does not fit the model (packserve.api.body raises the JSON-level errors itself)."""
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request")
    e = errors[0]
    param = _loc_to_param(tuple(e.get("loc", ())))
    where = param or "body"
    return APIError(400, f"{where}: {e.get('msg', 'invalid value')}", param, "invalid_value")


def install(app: FastAPI, on_error=None) -> None:
    """Exception handlers; `on_error(status)` counts error responses (metrics)."""

    def respond(err: APIError) -> JSONResponse:
        if on_error is not None:
            on_error(err.status)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return respond(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return respond(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        msg = {404: "not found", 405: "method not allowed"}.get(exc.status_code, "request failed")
        return respond(APIError(exc.status_code, msg, headers=getattr(exc, "headers", None)))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return respond(APIError(500, "internal server error", code="internal_error"))
