"""Users, API keys and the model repository, for keys with the `admin` scope.

The user and key routes call Accounts (serve_app/auth/accounts.py; the CLI does the same: python -m
serve_app.admin); the model routes, the repository (what python -m cluster models does)."""

from __future__ import annotations

import asyncio
import tarfile
import tempfile
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Literal

from bson import ObjectId
from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as PathParam
from pymongo.errors import PyMongoError

from serve_app import events
from serve_app.auth.credentials import USER_NAME_PATTERN
from serve_app.embeddings.catalog import pool_loaded, version_state
from serve_app.errors import (
    ConflictError,
    InvalidRequestError,
    ModelNotFoundError,
    PayloadTooLargeError,
    ServiceUnavailableError,
)
from serve_app.http.deps import ServicesDep, require_admin
from serve_app.http.routes import AUTH_ERRORS
from serve_app.http.schemas import (
    CreatedKey,
    ErrorResponse,
    KeyCreate,
    KeyInfo,
    KeyList,
    KeyRotate,
    RepositoryModel,
    RepositoryModelList,
    RotatedKey,
    StatsRow,
    StatsWindow,
    SystemLogEntry,
    SystemLogList,
    User,
    UserCreate,
    UserList,
)
from serve_app.model_repository import (
    NAME_PATTERN,
    Manifest,
    NotAModelError,
    VersionConflictError,
    VersionNotFoundError,
    check_name,
    describe_model,
)

router = APIRouter(
    prefix="/v1/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses={**AUTH_ERRORS, 404: {"model": ErrorResponse}, 409: {"model": ErrorResponse}},
)

UserName = Annotated[str, PathParam(pattern=USER_NAME_PATTERN)]
KeyId = Annotated[str, PathParam(pattern=r"^[0-9a-f]{16}$")]
ModelName = Annotated[str, PathParam(pattern=NAME_PATTERN.pattern)]


WINDOW_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
Window = Annotated[
    str,
    Query(
        pattern=r"^[1-9][0-9]{0,5}[smhd]$",
        description="How far back: a number and a unit (s, m, h, d), e.g. 15m, 1h, 7d; at most the history's TTL.",
    ),
]


@router.get("/stats", response_model=StatsWindow, responses={400: {"model": ErrorResponse}})
async def stats(
    services: ServicesDep,
    window: Window = "1h",
    owner: Annotated[str | None, Query(pattern=USER_NAME_PATTERN, description="One tenant's requests only.")] = None,
) -> StatsWindow:
    """Requests, texts, cache hit ratio, error ratios and p50/p99 latency over the window, for the whole API,
    per model and per route: one MongoDB aggregation over the request history (POSTs to the API)."""
    span = timedelta(seconds=int(window[:-1]) * WINDOW_UNITS[window[-1]])
    ttl = timedelta(days=services.settings.history_ttl_days)
    if span > ttl:
        raise InvalidRequestError(f"window {window} is longer than the history kept ({ttl.days}d)", param="window")
    until = datetime.now(UTC)
    facets = await services.history.stats(until - span, owner)

    def row(doc: dict | None, keyed: bool = True) -> StatsRow:
        doc = doc or {"requests": 0, "texts": 0, "cache_hits": 0, "cache_reads": 0}
        requests = doc["requests"]
        return StatsRow(
            key=doc.get("_id") if keyed else None,
            requests=requests,
            texts=doc["texts"],
            cache_hit_ratio=round(doc["cache_hits"] / doc["cache_reads"], 4) if doc["cache_reads"] else None,
            error_ratio=round(doc.get("server_errors", 0) / requests, 4) if requests else 0.0,
            client_error_ratio=round(doc.get("client_errors", 0) / requests, 4) if requests else 0.0,
            p50_ms=doc.get("p50_ms"),
            p99_ms=doc.get("p99_ms"),
        )

    return StatsWindow(
        window=window,
        since=(until - span).isoformat(),
        until=until.isoformat(),
        owner=owner,
        overall=row(facets["overall"][0] if facets["overall"] else None, keyed=False),
        by_model=[row(doc) for doc in facets["by_model"]],
        by_route=[row(doc) for doc in facets["by_route"]],
    )


@router.get("/logs", response_model=SystemLogList)
async def system_logs(
    services: ServicesDep,
    since: Annotated[datetime | None, Query(description="ISO 8601; events at or after it.")] = None,
    level: Annotated[
        Literal["debug", "info", "warning", "error", "critical"] | None, Query(description="This or worse.")
    ] = None,
    component: Annotated[str | None, Query(pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(pattern=r"^[0-9a-f]{24}$")] = None,
) -> SystemLogList:
    """System events from every replica (start-ups, model loads and version switches, dependency outages and
    returns, job failures), newest first, a page at a time; kept INFER_SYSTEM_LOG_TTL_DAYS."""
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    match = events.log_filter(since=since, level=level, component=component)
    collection = services.clients.db[events.COLLECTION]
    try:
        if cursor is not None:  # older than the page's last entry: by time, then by id within the same instant
            last = await collection.find_one({"_id": ObjectId(cursor)}, {"ts": 1})
            if last is None:
                raise InvalidRequestError("cursor names no entry (it may have expired)", param="cursor")
            older = [{"ts": {"$lt": last["ts"]}}, {"ts": last["ts"], "_id": {"$lt": last["_id"]}}]
            match = {"$and": [match, {"$or": older}]}
        docs = await collection.find(match).sort([("ts", -1), ("_id", -1)]).limit(limit + 1).to_list(limit + 1)
    except PyMongoError as exc:
        raise ServiceUnavailableError(
            "the system log cannot be read: MongoDB does not answer", service="mongodb"
        ) from exc
    page = docs[:limit]
    next_cursor = str(page[-1]["_id"]) if len(docs) > limit else None
    fields = set(SystemLogEntry.model_fields) - {"id", "ts"}
    entries = [
        SystemLogEntry(id=str(d["_id"]), ts=d["ts"].isoformat(), **{k: v for k, v in d.items() if k in fields})
        for d in page
    ]
    return SystemLogList(data=entries, next_cursor=next_cursor)


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


def check_names(name: str, version: str) -> None:
    """The repository's own rules for names (no '..', which the path pattern lets through): a 400."""
    try:
        check_name("model name", name)
        check_name("version", version)
    except ValueError as exc:
        raise InvalidRequestError(str(exc), param="name") from None


def _row(manifest: Manifest, state: str) -> RepositoryModel:
    return RepositoryModel(
        name=manifest.name,
        version=manifest.version,
        task=manifest.task,
        dims=manifest.dims,
        size=manifest.size,
        digest=manifest.digest[:12],
        pushed_at=manifest.created.isoformat(timespec="seconds"),
        state=state,
    )


@router.get("/models", response_model=RepositoryModelList, responses={503: {"model": ErrorResponse}})
async def list_repository(services: ServicesDep) -> RepositoryModelList:
    """Every version in the model repository and its state (what `python -m cluster models list` shows)."""
    catalog = services.embeddings.catalog
    listing = await catalog.listing(fresh=True)
    served = await catalog.served_versions()
    loaded = await pool_loaded(services.clients.redis)
    return RepositoryModelList(
        data=[
            _row(m, version_state(name, m.version, served, loaded))
            for name, manifests in listing.items()
            for m in manifests
        ]
    )


async def _manifest(services, name: str, version: str) -> Manifest:
    check_names(name, version)
    repository = services.embeddings.catalog.repository
    if repository is None:
        raise ServiceUnavailableError("this gateway has no model repository (no on-demand pool)")
    try:
        return await asyncio.to_thread(repository.manifest, name, version)
    except VersionNotFoundError as exc:
        raise ModelNotFoundError(str(exc), param="model") from None


@router.get("/models/{name}/versions/{version}")
async def get_repository_version(name: ModelName, version: ModelName, services: ServicesDep) -> dict:
    """One version's manifest: its files with their sizes and sha256, task, dims, max tokens, pooling."""
    manifest = await _manifest(services, name, version)
    return manifest.model_dump(mode="json") | {"digest": manifest.digest, "size": manifest.size}


@router.delete("/models/{name}/versions/{version}", response_model=RepositoryModel)
async def delete_repository_version(
    name: ModelName, version: ModelName, services: ServicesDep, force: bool = False
) -> RepositoryModel:
    """Remove a version from the repository; refused (409) while a pinned deployment serves it or it is
    that deployment's canary, unless `force` (its replicas then fail the next time they load it)."""
    catalog = services.embeddings.catalog
    manifest = await _manifest(services, name, version)
    pinned = (await catalog.pinned_infos()).get(name)
    if not force and pinned is not None and version in (pinned.version, pinned.canary_version):
        raise ConflictError(
            f"{name}:{version} is served now (or is its canary); deploy another version first (or force=true)"
        )
    await asyncio.to_thread(catalog.repository.delete, name, version)
    catalog.forget(name)
    return _row(manifest, "available")


PUSH_BODY = {
    "requestBody": {
        "description": "The model directory as a tar archive (gzip or not): its files at the top, or in one folder.",
        "required": True,
        "content": {"application/gzip": {}, "application/x-tar": {}, "application/octet-stream": {}},
    }
}


@router.post(
    "/models/{name}/versions/{version}",
    response_model=RepositoryModel,
    status_code=201,
    openapi_extra=PUSH_BODY,
    responses={400: {"model": ErrorResponse}, 413: {"model": ErrorResponse}, 503: {"model": ErrorResponse}},
)
async def push_repository_version(
    name: ModelName,
    version: ModelName,
    request: Request,
    services: ServicesDep,
    task: Annotated[Literal["embed", "rerank"] | None, Query()] = None,
) -> RepositoryModel:
    """Push a model version from a tar archive of its directory, as `python -m cluster models push` does:
    refused with what it lacks when it is not a model; a version with other files is a 409 (versions are
    immutable); the same files again change nothing. The task is read from its config.json unless given."""
    catalog = services.embeddings.catalog
    check_names(name, version)
    if catalog.repository is None:
        raise ServiceUnavailableError("this gateway has no model repository (no on-demand pool)")
    limit = services.settings.model_push_max_bytes
    with tempfile.TemporaryDirectory(prefix="model-push-") as scratch:
        archive = Path(scratch) / "model.tar"
        size = 0
        with archive.open("wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLargeError(f"the archive is over {limit} bytes (INFER_MODEL_PUSH_MAX_BYTES)")
                await asyncio.to_thread(out.write, chunk)
        if size == 0:
            raise InvalidRequestError("the body is empty: send the model directory as a tar archive")
        try:
            manifest = await asyncio.to_thread(_push_archive, catalog.repository, archive, name, version, task)
        except (NotAModelError, tarfile.TarError, EOFError, zlib.error) as exc:
            raise InvalidRequestError(f"not a model archive: {exc}") from None
        except OSError as exc:  # a gzip stream that is not one (BadGzipFile), a file it cannot write
            raise InvalidRequestError(f"not a model archive: {exc}") from None
        except VersionConflictError as exc:
            raise ConflictError(str(exc)) from None
    catalog.forget(name)
    return _row(manifest, "available")


def _push_archive(repository, archive: Path, name: str, version: str, task: str | None) -> Manifest:
    """Unpack safely (no links, nothing outside the folder: tarfile's data filter) and push the model in it."""
    target = archive.parent / "model"
    target.mkdir()
    with tarfile.open(archive) as tar:  # gzip or plain, by its first bytes
        tar.extractall(target, filter="data")
    entries = [p for p in target.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir():  # the usual `tar czf model.tgz my-model/`
        target = entries[0]
    return repository.push(target, name, version, **describe_model(target, task))
