"""Users and API keys, for keys with the `admin` scope (the CLI does the same: python -m serve_app.admin).

Each route calls Accounts (serve_app/auth/accounts.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query

from serve_app.auth.credentials import USER_NAME_PATTERN
from serve_app.http.deps import ServicesDep, require_admin
from serve_app.http.routes import AUTH_ERRORS
from serve_app.http.schemas import (
    CreatedKey,
    ErrorResponse,
    KeyCreate,
    KeyInfo,
    KeyList,
    KeyRotate,
    RotatedKey,
    User,
    UserCreate,
    UserList,
)

router = APIRouter(
    prefix="/v1/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses={**AUTH_ERRORS, 404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}},
)

UserName = Annotated[str, Path(pattern=USER_NAME_PATTERN)]
KeyId = Annotated[str, Path(pattern=r"^[0-9a-f]{16}$")]


@router.post("/users", response_model=User, status_code=201, responses={400: {"model": ErrorResponse}})
async def create_user(body: UserCreate, services: ServicesDep) -> User:
    """A new user (a tenant): its keys, jobs and history are its own."""
    return User(**await services.accounts.create_user(body.name, body.description))


@router.get("/users", response_model=UserList)
async def list_users(services: ServicesDep) -> UserList:
    return UserList(data=[User(**u) for u in await services.accounts.list_users()])


@router.delete("/users/{name}", response_model=User)
async def disable_user(name: UserName, services: ServicesDep) -> User:
    """Disable a user and revoke all its keys (their sessions end too)."""
    return User(**await services.accounts.disable_user(name))


@router.post("/keys", response_model=CreatedKey, status_code=201, responses={400: {"model": ErrorResponse}})
async def create_key(body: KeyCreate, services: ServicesDep) -> CreatedKey:
    """A new API key. The key is in this answer only; MongoDB keeps its hash."""
    key, view = await services.accounts.create_key(
        body.owner,
        name=body.name,
        scopes=body.scopes,
        expires_at=datetime.now(UTC) + timedelta(seconds=body.expires_in_s) if body.expires_in_s else None,
        rate_per_s=body.rate_limit_per_s,
        burst=body.burst,
        max_jobs=body.max_concurrent_jobs,
        token_rate_per_s=body.token_rate_per_s,
        token_burst=body.token_burst,
        max_inflight_tokens=body.max_inflight_tokens,
    )
    return CreatedKey(key=key, **view)


@router.get("/keys", response_model=KeyList)
async def list_keys(
    services: ServicesDep, owner: Annotated[str | None, Query(pattern=USER_NAME_PATTERN)] = None
) -> KeyList:
    """Keys, without their secrets; of one user if `owner` is given."""
    return KeyList(data=[KeyInfo(**k) for k in await services.accounts.list_keys(owner)])


@router.get("/keys/{key_id}", response_model=KeyInfo)
async def get_key(key_id: KeyId, services: ServicesDep) -> KeyInfo:
    return KeyInfo(**await services.accounts.get_key(key_id))


@router.delete("/keys/{key_id}", response_model=KeyInfo)
async def revoke_key(key_id: KeyId, services: ServicesDep) -> KeyInfo:
    """Revoke a key now: its cached lookup and its sessions are dropped."""
    return KeyInfo(**await services.accounts.revoke_key(key_id))


@router.post("/keys/{key_id}/rotate", response_model=RotatedKey, status_code=201)
async def rotate_key(key_id: KeyId, body: KeyRotate, services: ServicesDep) -> RotatedKey:
    """A new key with the same owner, scopes and limits; the old one expires after `grace_s`."""
    key, new, old = await services.accounts.rotate_key(key_id, body.grace_s)
    return RotatedKey(key=key, new=KeyInfo(**new), old=KeyInfo(**old))
