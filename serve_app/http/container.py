"""Everything a gateway replica talks to, built once from settings, with readiness checks.

The object graph: Clients (Redis, MongoDB) -> the stores (keys, jobs, history, the model
repository) -> the services the routes call (authenticator, sessions, work budget, embeddings,
jobs). Routes reach it through serve_app/http/deps.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ray.serve.handle import DeploymentHandle

from serve_app.auth.accounts import Accounts
from serve_app.auth.authenticator import Authenticator
from serve_app.auth.key_store import KeyStore
from serve_app.auth.sessions import Sessions
from serve_app.auth.work_budget import WorkBudget
from serve_app.embeddings.model_client import ModelClient
from serve_app.embeddings.service import EmbeddingService
from serve_app.history import HistoryWriter
from serve_app.http.schemas import ComponentStatus, Readiness
from serve_app.infra.clients import Clients
from serve_app.jobs.service import JobService
from serve_app.model_repository import ModelRepository
from serve_app.rerank.service import RerankService
from serve_app.settings import Settings

CHECK_TIMEOUT_S = 3.0
STOP_STEP_TIMEOUT_S = 10.0  # history's own flush is bounded at 5 s

logger = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    clients: Clients
    history: HistoryWriter
    repository: ModelRepository
    models: dict[str, ModelClient]
    embeddings: EmbeddingService
    rerank: RerankService
    jobs: JobService
    keys: KeyStore
    accounts: Accounts
    auth: Authenticator
    sessions: Sessions
    work: WorkBudget
    # The job workers' deployment: asked only whether it consumes, for readiness. (Binding it in
    # build_app is what deploys it; the gateway never sends it work: jobs go through RabbitMQ.)
    job_worker: DeploymentHandle | None
    _readiness: tuple[float, Readiness] | None = None
    _readiness_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        handles: dict[str, DeploymentHandle],
        job_worker: DeploymentHandle | None = None,
        pool: DeploymentHandle | None = None,
    ) -> Services:
        clients = Clients.from_settings(settings)
        embeddings = EmbeddingService.from_settings(settings, handles, clients.redis, pool)
        keys = KeyStore(clients.db, clients.redis, settings)
        return cls(
            settings=settings,
            clients=clients,
            history=HistoryWriter.from_settings(settings, clients.mongo),
            repository=ModelRepository.from_settings(settings, timeout_s=CHECK_TIMEOUT_S),
            models=embeddings.models,
            embeddings=embeddings,
            rerank=RerankService(embeddings.catalog, embeddings.cache, call_max_tokens=embeddings.call_max_tokens),
            jobs=JobService.from_settings(settings, clients, embeddings, keys),
            keys=keys,
            accounts=Accounts(keys),
            auth=Authenticator(settings, keys, clients.redis),
            sessions=Sessions(settings, keys, clients.redis),
            work=WorkBudget(settings, clients.redis),
            job_worker=job_worker,
        )

    async def start(self) -> None:
        self.history.start()

    async def stop(self) -> None:
        """Flush history, close the queue and the clients: each step bounded and logged by name if it
        does not finish, so a stuck dependency never holds a replica's shutdown (or says which one did)."""
        steps = (("history", self.history.stop), ("jobs", self.jobs.close), ("clients", self.clients.close))
        for name, step in steps:
            try:
                async with asyncio.timeout(STOP_STEP_TIMEOUT_S):
                    await step()
            except TimeoutError:
                logger.error("shutdown: %s did not close within %gs; going on without it", name, STOP_STEP_TIMEOUT_S)
            except Exception:
                logger.exception("shutdown: closing %s failed", name)

    async def readiness(self) -> Readiness:
        """Each dependency's status (at most a second old). A model down: unavailable; else degraded."""
        async with self._readiness_lock:
            if self._readiness is None or time.monotonic() - self._readiness[0] > self.settings.readiness_cache_s:
                self._readiness = (time.monotonic(), await self._check_all())
            return self._readiness[1]

    async def _check_all(self) -> Readiness:
        checks: dict[str, Callable[[], Awaitable[object]]] = {
            "redis": self.clients.redis.ping,
            "rabbitmq": self.jobs.publisher.ping,
            "mongodb": lambda: self.clients.mongo.admin.command("ping"),
            "object_store": lambda: asyncio.to_thread(self.repository.client.bucket_exists, self.repository.bucket),
        }
        for name, client in self.models.items():
            checks[f"model:{name}"] = lambda client=client: client.info(refresh=True)
        if self.job_worker is not None:
            checks["job_worker"] = lambda: self.job_worker.consuming.remote()
        results = await asyncio.gather(*(_check(fn) for fn in checks.values()))
        components = dict(zip(checks, results, strict=True))
        if any(status.status == "down" for name, status in components.items() if name.startswith("model:")):
            overall = "unavailable"
        elif any(status.status == "down" for status in components.values()):
            overall = "degraded"
        else:
            overall = "ready"
        return Readiness(status=overall, components=components)


async def _check(probe: Callable[[], Awaitable[object]]) -> ComponentStatus:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            result = await probe()
    except Exception as exc:  # a check reports every failure, whatever its kind
        detail = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        return ComponentStatus(status="down", detail=detail[:300])
    latency_ms = round((time.perf_counter() - started) * 1000, 2)
    version = getattr(result, "version", None)
    return ComponentStatus(status="ok", latency_ms=latency_ms, detail=f"version {version}" if version else None)
