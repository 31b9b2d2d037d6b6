"""OpenAI's error objects for the HTTP door (no jax): a front-door error, an HTTP status or a request
body's pydantic validation error as ``{"error": {"message", "type", "param", "code"}}``, the message
one line naming the field, the value and the rule.
"""

from __future__ import annotations

import re

from fastapi.exceptions import RequestValidationError
from starlette.responses import JSONResponse

from serving.frontdoor import Code, FrontDoorError

# code -> (HTTP status, OpenAI error type)
_HTTP = {
    Code.INVALID_ARGUMENT: (400, "invalid_request_error"),
    Code.NOT_FOUND: (404, "not_found_error"),
    Code.ALREADY_EXISTS: (409, "invalid_request_error"),
    Code.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    Code.UNAUTHENTICATED: (401, "authentication_error"),
    Code.UNAVAILABLE: (503, "service_unavailable_error"),
    Code.INTERNAL: (500, "internal_server_error"),
}
_BY_STATUS = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
              413: "invalid_request_error", 500: "internal_server_error"}


def error_body(exc: FrontDoorError) -> tuple[int, dict]:
    status, kind = _HTTP[exc.code]
    return status, {"error": {"message": exc.message, "type": kind, "param": exc.param,
                              "code": exc.code.value}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = _BY_STATUS.get(status, "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first pydantic error as one line naming the field, the value and the rule. Errors of
    one field's union members (``prompt``: str | list[str] | ...) become one line listing them."""
    errs = exc.errors()
    err = errs[0]
    kind = err.get("type", "")
    if kind == "json_invalid":
        return f"request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}", None
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    if not loc:
        return f"request body is invalid: {err.get('msg')} (expected a JSON object)", None
    group = [e for e in errs if tuple(e.get("loc", ()))[:2] == tuple(err.get("loc", ()))[:2]]
    if len(group) > 1 and kind not in ("missing", "extra_forbidden"):
        locs = [[str(x) for x in e["loc"] if x != "body"] for e in group]
        n = 0
        while all(len(x) > n for x in locs) and len({x[n] for x in locs}) == 1:
            n += 1
        field = _name(".".join(locs[0][:n]))
        shortest = min(group, key=lambda e: len(e["loc"]))
        tags = list(dict.fromkeys(x[n] for x in locs if len(x) > n))
        return f"{field}={_shown(shortest.get('input'))} is invalid: expected {' or '.join(tags)}", loc[0]
    raw = ".".join(loc)
    field = _name(raw)
    if kind == "missing":
        return f"{field} is required", raw
    if kind == "extra_forbidden":
        return f"{field} is not a supported field", raw
    return f"{field}={_shown(err.get('input'))} is invalid: {err.get('msg')}", loc[0]


def _name(field: str) -> str:
    """A field path as sent, quoted when it is not plain (an unknown key may hold a newline: the
    message stays one line)."""
    return field if _PLAIN.fullmatch(field) else repr(field)


_PLAIN = re.compile(r"[A-Za-z0-9_.\-]+")


def _shown(value) -> str:
    r = repr(value)
    return r if len(r) <= 80 else r[:77] + "..."
