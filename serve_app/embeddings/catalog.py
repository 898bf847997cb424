"""Which deployment answers a request's `model`: a pinned deployment, or the on-demand pool.

`model` is `name` or `name:version`. A name the Serve config pins goes to its own deployment when
no version is given or the version is the one it serves; any other version of it, and any other
model in the repository, goes to the multiplexed ModelPool (deployments/model_pool.py) with
`multiplexed_model_id="name:version"`, so Serve routes it to a replica that already holds it. An
unversioned name that is not pinned means its newest version. A pinned model's replicas may name a
canary version (their user_config's canary_version and canary_percent): that share of the requests
for the bare name goes to the canary through the pool, and its answers say so in X-Model-Version
and history. The repository is read through a
short-lived cache (`listing_ttl_s`), so a request does not list the bucket, and a version pushed
a moment ago is servable within that time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import OrderedDict
from dataclasses import dataclass

from ray.serve.handle import DeploymentHandle

from serve_app.embeddings.contract import ModelInfo, model_id
from serve_app.embeddings.model_client import ModelClient
from serve_app.errors import InvalidRequestError, ModelNotFoundError, ServiceUnavailableError
from serve_app.infra.redis import GuardedRedis
from serve_app.model_repository import NAME_PATTERN, Manifest, ModelRepository

logger = logging.getLogger(__name__)

TASK_ROUTES = {"embed": "/v1/embeddings", "rerank": "/v1/rerank"}
MAX_POOL_CLIENTS = 256
NAMES_RECHECK_S = 1.0


def parse_model(spec: str) -> tuple[str, str | None]:
    """`name` or `name:version`; a 400 naming the field for anything else."""
    name, colon, version = spec.partition(":")
    if not NAME_PATTERN.match(name) or (colon and not NAME_PATTERN.match(version)) or ".." in spec:
        raise InvalidRequestError(
            f"model {spec!r} must be NAME or NAME:VERSION, each 1-128 letters, digits, '.', '_' or '-'",
            param="model",
        )
    return name, version or None


@dataclass(frozen=True)
class Resolved:
    client: ModelClient
    pinned: bool


@dataclass(frozen=True)
class Described:
    """What a model version is, without loading it: for metadata (the v2 protocol's, say)."""

    name: str
    version: str
    task: str
    dims: int
    framework: str
    versions: list[str]


class ModelCatalog:
    def __init__(
        self,
        pinned: dict[str, ModelClient],
        pool: DeploymentHandle | None,
        repository: ModelRepository | None,
        *,
        refresh_s: float,
        timeout_s: float,
        listing_ttl_s: float = 5.0,
        lane: str = "interactive",
    ) -> None:
        self.pinned = pinned
        self.lane = lane  # of the pool's clients, as of the pinned ones
        self.pool = pool
        self.repository = repository
        self.refresh_s = refresh_s
        self.timeout_s = timeout_s
        self.listing_ttl_s = listing_ttl_s
        self._versions: dict[str, tuple[float, list[Manifest]]] = {}
        self._pool_clients: OrderedDict[str, ModelClient] = OrderedDict()
        self._names: tuple[float, set[str]] | None = None
        self._names_lock = asyncio.Lock()
        self._random = random.Random()

    async def resolve(self, spec: str, task: str) -> Resolved:
        """The client that serves `spec` for `task`; 404 for a model or version the cluster lacks, 400 for
        a model of another task."""
        name, version = parse_model(spec)
        client = self.pinned.get(name)
        if client is not None:
            info = await client.info()
            if version is None and info.canary_version and self._canary_draw(info.canary_percent):
                canary = await self._canary(name, info.canary_version, task)
                if canary is not None:
                    return canary
            if version is None or version == info.version:
                self._check_task(spec, info.task, task)
                return Resolved(client, pinned=True)
        manifest = await self._manifest(name, version)
        self._check_task(spec, manifest.task, task)
        return Resolved(self._pool_client(manifest.name, manifest.version), pinned=False)

    async def describe(self, spec: str) -> Described:
        """The model version `spec` names (404 as resolve says), from what serves it or its manifest."""
        name, version = parse_model(spec)
        client = self.pinned.get(name)
        if client is not None:
            info = await client.info()
            if version is None or version == info.version:
                try:
                    versions = [m.version for m in await self.versions(name)]
                except ServiceUnavailableError:
                    versions = []
                return Described(name, info.version, info.task, info.dims, info.framework, versions or [info.version])
        manifest = await self._manifest(name, version)
        versions = [m.version for m in await self.versions(name)]
        return Described(name, manifest.version, manifest.task, manifest.dims, manifest.framework, versions)

    def _canary_draw(self, percent: float) -> bool:
        return self.pool is not None and self._random.random() * 100 < percent

    async def _canary(self, name: str, version: str, task: str) -> Resolved | None:
        """The canary version's client, or None (the pinned version answers) when the repository lacks it."""
        try:
            manifest = await self._manifest(name, version)
        except (ModelNotFoundError, ServiceUnavailableError) as exc:
            logger.warning("canary %s:%s is not servable, the pinned version answers: %s", name, version, exc)
            return None
        self._check_task(f"{name}:{version}", manifest.task, task)
        return Resolved(self._pool_client(name, version), pinned=False)

    async def versions(self, name: str, *, fresh: bool = False) -> list[Manifest]:
        """The repository's versions of `name`, oldest first (at most `listing_ttl_s` old unless `fresh`)."""
        cached = self._versions.get(name)
        if not fresh and cached is not None and time.monotonic() - cached[0] <= self.listing_ttl_s:
            return cached[1]
        if self.repository is None:
            return []
        if not fresh and not await self._known(name):
            return []  # no such model: found without listing its versions
        try:
            found = await asyncio.to_thread(self.repository.versions, name)
        except Exception as exc:  # the object store down or refusing: the model cannot be loaded either
            raise ServiceUnavailableError(
                f"the model repository did not answer: {type(exc).__name__}", service="s3"
            ) from exc
        self._versions[name] = (time.monotonic(), found)
        if len(self._versions) > 4 * MAX_POOL_CLIENTS:  # names asked for that do not exist, say
            self._versions.pop(next(iter(self._versions)))
        return found

    async def _known(self, name: str) -> bool:
        """Whether the repository has `name`, from one listing of its names shared by every request. A
        name it did not have is looked for again at most once a second (a model pushed a moment ago is
        found at once; a stream of made-up names costs one listing a second, not one each)."""
        async with self._names_lock:
            now = time.monotonic()
            stale = self._names is None or now - self._names[0] > self.listing_ttl_s
            if stale or (name not in self._names[1] and now - self._names[0] > NAMES_RECHECK_S):
                try:
                    names = await asyncio.to_thread(self.repository.names)
                except Exception as exc:
                    raise ServiceUnavailableError(
                        f"the model repository did not answer: {type(exc).__name__}", service="s3"
                    ) from exc
                self._names = (time.monotonic(), set(names))
            return name in self._names[1]

    def forget(self, name: str) -> None:
        """Drop what this gateway knows of name's versions (after it changed them itself)."""
        self._versions.pop(name, None)

    async def listing(self, *, fresh: bool = False) -> dict[str, list[Manifest]]:
        """Every model in the repository with its versions, oldest first; {} when there is no pool."""
        if self.repository is None or self.pool is None:
            return {}
        try:
            names = await asyncio.to_thread(self.repository.names)
        except Exception as exc:
            raise ServiceUnavailableError(
                f"the model repository did not answer: {type(exc).__name__}", service="s3"
            ) from exc
        found = await asyncio.gather(*(self.versions(name, fresh=fresh) for name in names))
        return {name: manifests for name, manifests in zip(names, found, strict=True) if manifests}

    async def pinned_infos(self) -> dict[str, ModelInfo]:
        """What each pinned model serves now (its version and canary)."""
        infos = await asyncio.gather(*(client.info() for client in self.pinned.values()))
        return dict(zip(self.pinned, infos, strict=True))

    async def pinned_answers(self, names: list[str], *, wait_s: float) -> dict[str, ModelInfo | Exception]:
        """What each named pinned model serves now, or why it does not say within `wait_s` (a deployment
        starting, or its replicas down): for listings, which show the others instead of failing."""

        async def ask(client: ModelClient) -> ModelInfo | Exception:
            try:
                # Not shielded: a deployment that hangs must not collect a refresh per listing.
                return await asyncio.wait_for(client.info(), wait_s)
            except TimeoutError:
                return ServiceUnavailableError(
                    f"model {client.name!r} did not answer within {wait_s:g}s", service="model"
                )
            except ServiceUnavailableError as exc:
                return exc

        answers = await asyncio.gather(*(ask(self.pinned[name]) for name in names))
        return dict(zip(names, answers, strict=True))

    async def served_versions(self) -> dict[str, str]:
        """The version each pinned model serves now."""
        return {name: info.version for name, info in (await self.pinned_infos()).items()}

    async def _manifest(self, name: str, version: str | None) -> Manifest:
        if self.pool is None:
            served = ", ".join(sorted(self.pinned)) or "none"
            raise ModelNotFoundError(f"the model {name!r} does not exist; served models: {served}", param="model")
        manifests = await self.versions(name)
        if not manifests:
            pinned = ", ".join(sorted(self.pinned)) or "none"
            raise ModelNotFoundError(
                f"the model {name!r} does not exist: the repository has no such model (pinned models: {pinned}; "
                "GET /v1/models lists every model)",
                param="model",
            )
        if version is None:
            return manifests[-1]
        for manifest in manifests:
            if manifest.version == version:
                return manifest
        known = ", ".join(m.version for m in manifests)
        raise ModelNotFoundError(f"the model {name!r} has no version {version!r}; versions: {known}", param="model")

    def _pool_client(self, name: str, version: str) -> ModelClient:
        key = model_id(name, version)
        client = self._pool_clients.get(key)
        if client is None:
            assert self.pool is not None
            handle = self.pool.options(multiplexed_model_id=key)
            client = ModelClient(
                name,
                handle,
                refresh_s=self.refresh_s,
                timeout_s=self.timeout_s,
                info_timeout_s=self.timeout_s,
                lane=self.lane,
            )
            self._pool_clients[key] = client
            if len(self._pool_clients) > MAX_POOL_CLIENTS:
                self._pool_clients.popitem(last=False)
        else:
            self._pool_clients.move_to_end(key)
        return client

    @staticmethod
    def _check_task(spec: str, has: str, wanted: str) -> None:
        if has != wanted:
            route = TASKS_HINT.get(has, "")
            raise InvalidRequestError(
                f"the model {spec!r} is {_a(has)} model, not {_a(wanted)} model{route}",
                param="model",
            )


def _a(task: str) -> str:
    return f"an {task}" if task[:1] in "aeiou" else f"a {task}"


TASKS_HINT = {task: f": use POST {route}" for task, route in TASK_ROUTES.items()}


State = str  # "pinned" | "loaded" | "available"


def version_state(name: str, version: str, served: dict[str, str], loaded: set[str]) -> State:
    if served.get(name) == version:
        return "pinned"
    return "loaded" if model_id(name, version) in loaded else "available"


async def pool_loaded(redis: GuardedRedis) -> set[str]:
    """The model ids ("name:version") that on-demand pool replicas hold now (empty when Redis is down);
    one HGETALL of a hash with a field per replica, whatever else Redis holds."""
    from serve_app.embeddings.contract import LOADED_KEY, LOADED_TTL_S

    async def read(r) -> set[str]:
        held: set[str] = set()
        oldest = time.time() - LOADED_TTL_S
        gone = []
        for field, value in (await r.hgetall(LOADED_KEY)).items():
            entry = json.loads(value)
            if entry.get("at", 0) < oldest:
                gone.append(field)  # a replica that died without saying so
            else:
                held.update(entry.get("ids", []))
        if gone:
            await r.hdel(LOADED_KEY, *gone)
        return held

    return await redis.run(read, set())
