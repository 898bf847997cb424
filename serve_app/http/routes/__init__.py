"""One router per resource."""

from serve_app.http.schemas import ErrorResponse

# What any authenticated route may answer besides its own responses.
AUTH_ERRORS: dict[int | str, dict] = {
    400: {"model": ErrorResponse, "description": "A body that cannot be parsed, or a request that cannot be met."},
    401: {"model": ErrorResponse, "description": "No credential, or a malformed, unknown, revoked or expired one."},
    403: {"model": ErrorResponse, "description": "The key lacks the scope this route needs."},
    429: {"model": ErrorResponse, "description": "Over the key's rate limit or job quota; see Retry-After."},
    503: {"model": ErrorResponse, "description": "A dependency (model, key store, queue) is unavailable."},
}
