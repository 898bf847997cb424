"""One router per resource, and what the model routes share."""

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Request

from serve_app.auth.work_budget import WorkMeter
from serve_app.errors import RateLimitError
from serve_app.http.schemas import ErrorResponse

# What any authenticated route may answer besides its own responses.
AUTH_ERRORS: dict[int | str, dict] = {
    400: {"model": ErrorResponse, "description": "A body that cannot be parsed, or a request that cannot be met."},
    401: {"model": ErrorResponse, "description": "No credential, or a malformed, unknown, revoked or expired one."},
    403: {"model": ErrorResponse, "description": "The key lacks the scope this route needs."},
    429: {"model": ErrorResponse, "description": "Over the key's rate limit or job quota; see Retry-After."},
    503: {"model": ErrorResponse, "description": "A dependency (model, key store, queue) is unavailable."},
}


CACHE_HITS_HEADER = "X-Cache-Hits"
MODEL_VERSION_HEADER = "X-Model-Version"


@asynccontextmanager
async def metered(request: Request, meter: WorkMeter, history: dict) -> AsyncIterator[dict[str, str]]:
    """Around a model call paid from the key's work budget: yields the answer's rate-limit headers (the
    key's request limits, then its token budget's once the call has charged it), puts them on a 429
    too, and records in history what the call charged, whatever happened."""
    headers: dict[str, str] = dict(getattr(request.state, "ratelimit_headers", {}))
    try:
        yield headers
    except RateLimitError as exc:
        exc.headers = {**headers, **(exc.headers or {})}
        raise
    finally:
        if meter.charged:
            history["work_tokens"] = meter.charged
    headers.update(meter.headers)
