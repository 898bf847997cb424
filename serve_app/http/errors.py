"""The one place that maps errors to HTTP responses: OpenAI's error shape, and under /v2 the Open
Inference Protocol's ({"error": "message"}), for the same errors with the same statuses."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pymongo.errors import PyMongoError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve_app import metrics
from serve_app.errors import APIError, AuthenticationError, InvalidFieldError, RateLimitError

logger = logging.getLogger(__name__)


def error_body(message: str, type_: str, *, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _location(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def _describe(error: dict) -> str:
    if error["type"] == "json_invalid":
        position = error["loc"][-1] if error["loc"] else "?"
        reason = (error.get("ctx") or {}).get("error", "invalid JSON")
        return f"the body is not valid JSON (character {position}: {reason})"
    return f"{_location(error['loc'])}: {error['msg']}"


# The limiter behind each 429's code, and the reason behind each 401's (ray_rate_limited_total,
# ray_auth_refusals_total). A key refused for what it is says so in its message, not its code.
LIMITERS = {
    "rate_limited": "requests",
    "tokens_rate_limited": "tokens",
    "inflight_limit_exceeded": "inflight",
    "job_quota_exceeded": "jobs",
}
AUTH_CODES = {"missing_api_key": "missing", "invalid_session": "invalid_session"}
AUTH_WORDS = ("malformed", "revoked", "expired")


def refusal_reason(exc: AuthenticationError) -> str:
    if exc.code in AUTH_CODES:
        return AUTH_CODES[exc.code]
    return next((word for word in AUTH_WORDS if word in exc.message), "unknown_key")


def _count(exc: APIError) -> None:
    if isinstance(exc, AuthenticationError):
        metrics.auth_refused(refusal_reason(exc))
    elif isinstance(exc, RateLimitError):
        metrics.rate_limited(LIMITERS.get(exc.code or "", "other"))


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    _count(exc)
    body = error_body(exc.message, exc.type, param=exc.param, code=exc.code)
    if isinstance(exc, InvalidFieldError):  # FastAPI's documented 422 shape, as for any validation error
        body["detail"] = [{"loc": [exc.location, exc.param], "msg": exc.reason, "type": "value_error"}]
    return JSONResponse(body, exc.status_code, headers=exc.headers)


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    messages = [_describe(e) for e in errors]
    body = error_body("; ".join(messages) or "invalid request", "invalid_request_error", code="validation_error")
    if errors and errors[0]["type"] != "json_invalid":
        body["error"]["param"] = _location(errors[0]["loc"])
    # `detail` keeps FastAPI's documented 422 shape for clients and schema checkers.
    body["detail"] = [{k: e[k] for k in ("loc", "msg", "type")} for e in errors]
    return JSONResponse(body, 422)


# FastAPI's words for a body it cannot decode at all (invalid UTF-8, say), made specific.
_UNPARSABLE_BODY = "There was an error parsing the body"


def _beyond_parser_limits(cause: BaseException | None) -> str | None:
    """What is wrong with JSON that is well-formed UTF-8 but beyond what Python's parser takes, if that is why."""
    if isinstance(cause, RecursionError):
        return (
            f"the body is not valid JSON for this API: arrays or objects are nested too deeply "
            f"(the parser stops at about {sys.getrecursionlimit()} levels)"
        )
    if isinstance(cause, ValueError) and not isinstance(cause, UnicodeError) and "integer string" in str(cause):
        return f"the body is not valid JSON for this API: a number has more than {sys.get_int_max_str_digits()} digits"
    return None


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    type_ = "not_found" if exc.status_code == 404 else "invalid_request_error"
    message = str(exc.detail)
    if exc.status_code == 400 and message == _UNPARSABLE_BODY:
        if (reason := _beyond_parser_limits(exc.__cause__)) is not None:
            # Malformed for us like any other bad JSON: a 422 in the same shape, saying what exceeds the limit.
            body = error_body(reason, "invalid_request_error", code="validation_error")
            body["detail"] = [{"loc": ["body"], "msg": reason, "type": "json_invalid"}]
            return JSONResponse(body, 422)
        message = "the body could not be parsed: send JSON encoded as UTF-8"
    return JSONResponse(error_body(message, type_, code=str(exc.status_code)), exc.status_code, headers=exc.headers)


async def _mongo_error(request: Request, exc: PyMongoError) -> JSONResponse:
    metrics.dependency_error("mongodb")
    logger.warning("MongoDB error in request %s: %r", getattr(request.state, "request_id", None), exc)
    body = error_body("MongoDB is unavailable; try again shortly", "service_unavailable", code="service_unavailable")
    return JSONResponse(body, 503)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    request_id = getattr(request.state, "request_id", None)
    logger.exception("unhandled error in request %s", request_id)
    return JSONResponse(
        error_body(f"internal error; quote request id {request_id}", "internal_error", code="internal_error"), 500
    )


PROTOCOL_V2_PREFIX = "/v2"

Handler = Callable[[Request, Exception], Awaitable[JSONResponse]]


def _in_protocol_shape(handler: Handler) -> Handler:
    """Under /v2, the same answer with the body the Open Inference Protocol gives errors."""

    @functools.wraps(handler)
    async def handle(request: Request, exc: Exception) -> JSONResponse:
        response = await handler(request, exc)
        path = request.url.path
        if path != PROTOCOL_V2_PREFIX and not path.startswith(PROTOCOL_V2_PREFIX + "/"):
            return response
        message = json.loads(response.body)["error"]["message"]
        headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
        return JSONResponse({"error": message}, response.status_code, headers=headers)

    return handle


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _in_protocol_shape(_api_error))
    app.add_exception_handler(RequestValidationError, _in_protocol_shape(_validation_error))
    app.add_exception_handler(StarletteHTTPException, _in_protocol_shape(_http_error))
    app.add_exception_handler(PyMongoError, _in_protocol_shape(_mongo_error))
    app.add_exception_handler(Exception, _in_protocol_shape(_unexpected_error))
