"""Named API errors and the one place that maps errors to HTTP responses."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error the client should see, with its HTTP status and an OpenAI-style body."""

    status_code = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(APIError):
    code = "invalid_request"


class ModelNotFoundError(APIError):
    status_code = 404
    code = "model_not_found"


class JobNotFoundError(APIError):
    status_code = 404
    code = "job_not_found"


class JobStateError(APIError):
    """The job's status does not allow what was asked (cancel an ended job, fetch an unfinished result)."""

    status_code = 409
    code = "job_state"


class ServiceUnavailableError(APIError):
    status_code = 503
    type = "service_unavailable"
    code = "service_unavailable"


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


async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.type, param=exc.param, code=exc.code), exc.status_code)


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    messages = [_describe(e) for e in errors]
    body = error_body("; ".join(messages) or "invalid request", "invalid_request_error", code="validation_error")
    if errors and errors[0]["type"] != "json_invalid":
        body["error"]["param"] = _location(errors[0]["loc"])
    # `detail` keeps FastAPI's documented 422 shape for clients and schema checkers.
    body["detail"] = [{k: e[k] for k in ("loc", "msg", "type")} for e in errors]
    return JSONResponse(body, 422)


async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    type_ = "not_found" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(
        error_body(str(exc.detail), type_, code=str(exc.status_code)), exc.status_code, headers=exc.headers
    )


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    request_id = getattr(request.state, "request_id", None)
    logger.exception("unhandled error in request %s", request_id)
    return JSONResponse(
        error_body(f"internal error; quote request id {request_id}", "internal_error", code="internal_error"), 500
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
