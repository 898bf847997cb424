"""Named API errors: what a client sees (status, type, code). Raised anywhere; serve_app/http/errors.py renders them."""

from __future__ import annotations

import math

from serve_app import metrics


class APIError(Exception):
    """An error the client should see, with its HTTP status and an OpenAI-style body."""

    status_code = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers


class InvalidRequestError(APIError):
    code = "invalid_request"


class InvalidFieldError(APIError):
    """One field of the body is unacceptable for a reason only the server can tell (an address its host
    resolves to, say): a 422 in the shape of a validation error of that field."""

    status_code = 422
    code = "validation_error"

    def __init__(self, reason: str, *, param: str, location: str = "body") -> None:
        super().__init__(f"{param}: {reason}", param=param)
        self.reason = reason
        self.location = location


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


class AuthenticationError(APIError):
    """No credential, or one that is malformed, unknown, revoked or expired."""

    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})
        self.code = code or self.code


class PermissionDeniedError(APIError):
    status_code = 403
    type = "permission_error"
    code = "insufficient_scope"


class ConflictError(APIError):
    status_code = 409
    code = "conflict"


class NotFoundError(APIError):
    status_code = 404
    code = "not_found"


class PayloadTooLargeError(APIError):
    status_code = 413
    code = "request_too_large"


class RateLimitError(APIError):
    """Too many requests, too much model work, or too many jobs at once, for this key; retry after the given seconds."""

    status_code = 429
    type = "rate_limit_error"
    code = "rate_limited"

    def __init__(
        self, message: str, *, retry_after_s: float, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message, headers={**(headers or {}), "Retry-After": str(max(1, math.ceil(retry_after_s)))})
        self.code = code or self.code


class ServiceUnavailableError(APIError):
    """A dependency failed; `service` (redis, mongodb, rabbitmq, s3, model) counts in ray_dependency_errors_total."""

    status_code = 503
    type = "service_unavailable"
    code = "service_unavailable"

    def __init__(self, message: str, *, service: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message, headers=headers)
        self.service = service
        if service is not None:
            metrics.dependency_error(service)
