"""Route dependencies as Annotated types, so a route's signature shows what it needs.

They are `async def` on purpose: FastAPI runs a plain `def` dependency in a worker thread,
a thread hop per request that the profile showed (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request, Response, Security
from fastapi.security import APIKeyCookie, APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from serve_app.auth.credentials import Principal
from serve_app.auth.work_budget import WorkMeter
from serve_app.embeddings.service import EmbeddingService
from serve_app.http.container import Services
from serve_app.jobs.service import JobService

SESSION_COOKIE = "infer_session"

# Declared as security schemes, so /docs has an "Authorize" button and the OpenAPI schema says
# how to authenticate; auto_error is off so that every refusal is our JSON 401.
_bearer = HTTPBearer(auto_error=False, description="An API key (ik_...) or a session token (is_...).")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key.")
_cookie = APIKeyCookie(name=SESSION_COOKIE, auto_error=False, description="A session token from /v1/auth/login.")


async def get_services(request: Request) -> Services:
    return request.app.state.services


async def get_embedding_service(request: Request) -> EmbeddingService:
    return request.app.state.services.embeddings


async def get_job_service(request: Request) -> JobService:
    return request.app.state.services.jobs


async def presented_credential(
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
    api_key: Annotated[str | None, Security(_api_key)],
    cookie: Annotated[str | None, Security(_cookie)],
) -> str | None:
    """The credential a request carries: Authorization, else X-API-Key, else the session cookie."""
    if bearer is not None:
        return bearer.credentials
    return api_key or cookie


async def authenticate(
    request: Request, response: Response, credential: Annotated[str | None, Depends(presented_credential)]
) -> Principal:
    """The caller, or a 401 (no, malformed, unknown, revoked or expired credential) or a 429.

    The key's x-ratelimit-*-requests headers go on the answer (FastAPI adds them to what a route
    returns as a model; a route that builds its own Response adds `request.state.ratelimit_headers`).
    """
    headers: dict[str, str] = {}
    principal = await request.app.state.services.auth.authenticate(credential, headers=headers)
    request.state.principal = principal  # the history middleware records who called
    request.state.ratelimit_headers = headers
    response.headers.update(headers)
    return principal


async def work_meter(request: Request, principal: Annotated[Principal, Depends(authenticate)]) -> WorkMeter:
    """This request's share of its key's work budget (what its cache misses may cost the model)."""
    return request.app.state.services.work.meter(principal)


def _scope(scope: str) -> Callable[[Principal], Awaitable[Principal]]:
    async def require(principal: Annotated[Principal, Depends(authenticate)]) -> Principal:
        return principal.require(scope)

    require.__name__ = f"require_{scope}"
    return require


require_infer = _scope("infer")
require_jobs = _scope("jobs")
require_admin = _scope("admin")

ServicesDep = Annotated[Services, Depends(get_services)]
EmbeddingServiceDep = Annotated[EmbeddingService, Depends(get_embedding_service)]
JobServiceDep = Annotated[JobService, Depends(get_job_service)]
CallerDep = Annotated[Principal, Depends(authenticate)]
InferCallerDep = Annotated[Principal, Depends(require_infer)]
JobsCallerDep = Annotated[Principal, Depends(require_jobs)]
CredentialDep = Annotated[str | None, Depends(presented_credential)]
WorkMeterDep = Annotated[WorkMeter, Depends(work_meter)]
