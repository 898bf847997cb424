"""Sessions: trade an API key for a short-lived token (and cookie), end it, and say who is calling."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fastapi import APIRouter, Request, Response

from serve_app.auth.credentials import Principal
from serve_app.http.deps import SESSION_COOKIE, CallerDep, CredentialDep, ServicesDep
from serve_app.http.routes import AUTH_ERRORS
from serve_app.http.schemas import ErrorResponse, Identity, LoggedOut, Session

router = APIRouter(tags=["auth"], responses=AUTH_ERRORS)


def identity(principal: Principal) -> Identity:
    expires = principal.expires_at
    return Identity(
        key_id=principal.key_id,
        owner=principal.owner,
        scopes=list(principal.scopes),
        via=principal.via,
        rate_limit_per_s=principal.rate_per_s,
        burst=principal.burst,
        max_concurrent_jobs=principal.max_jobs,
        expires_at=datetime.fromtimestamp(expires, UTC).isoformat() if expires else None,
        token_rate_per_s=principal.token_rate_per_s,
        token_burst=principal.token_burst,
        max_inflight_tokens=principal.max_inflight_tokens,
    )


@router.post("/v1/auth/login", response_model=Session)
async def login(request: Request, response: Response, services: ServicesDep, caller: CallerDep) -> Session:
    """A session token for the API key presented, also set as an HttpOnly cookie for browser tools."""
    token, ttl_s = await services.sessions.login(caller)
    secure = request.headers.get("x-forwarded-proto", request.url.scheme) == "https"
    response.set_cookie(
        SESSION_COOKIE, token, max_age=int(ttl_s), httponly=True, secure=secure, samesite="strict", path="/"
    )
    return Session(
        token=token,
        expires_in_s=int(ttl_s),
        expires_at=(datetime.now(UTC) + timedelta(seconds=ttl_s)).isoformat(),
        key_id=caller.key_id,
        owner=caller.owner,
    )


@router.post("/v1/auth/logout", response_model=LoggedOut, responses={400: {"model": ErrorResponse}})
async def logout(response: Response, services: ServicesDep, caller: CallerDep, credential: CredentialDep) -> LoggedOut:
    """End the session presented (its token, as a bearer token or the cookie)."""
    ended = await services.sessions.logout(credential or "")
    response.delete_cookie(SESSION_COOKIE, path="/")
    return LoggedOut(ended=ended)


@router.get("/v1/auth/whoami", response_model=Identity)
async def whoami(caller: CallerDep) -> Identity:
    """The key (or session) presented: its owner, scopes and limits."""
    return identity(caller)
