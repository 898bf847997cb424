"""Everything a gateway replica talks to, built once from settings, with readiness checks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pymongo import AsyncMongoClient
from ray.serve.handle import DeploymentHandle

from serve_app.auth import Authenticator, KeyStore
from serve_app.embedding_service import EmbeddingService
from serve_app.history import HistoryWriter, mongo_client
from serve_app.job_queue import JobPublisher
from serve_app.job_service import JobService
from serve_app.job_store import JobStore
from serve_app.model_client import ModelClient
from serve_app.model_repository import ModelRepository
from serve_app.object_store import JobObjects
from serve_app.result_cache import GuardedRedis
from serve_app.schemas import ComponentStatus, Readiness
from serve_app.settings import Settings

CHECK_TIMEOUT_S = 3.0


@dataclass
class Services:
    settings: Settings
    redis: GuardedRedis
    mongo: AsyncMongoClient
    history: HistoryWriter
    repository: ModelRepository
    models: dict[str, ModelClient]
    embeddings: EmbeddingService
    job_store: JobStore
    job_publisher: JobPublisher
    job_objects: JobObjects
    jobs: JobService
    keys: KeyStore
    auth: Authenticator
    job_worker: DeploymentHandle | None
    _readiness: tuple[float, Readiness] | None = None
    _readiness_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        handles: dict[str, DeploymentHandle],
        job_worker: DeploymentHandle | None = None,
    ) -> Services:
        redis = GuardedRedis.from_settings(settings)
        mongo = mongo_client(settings)
        embeddings = EmbeddingService.from_settings(settings, handles, redis)
        job_store = JobStore(mongo, settings, redis)
        publisher = JobPublisher(settings)
        objects = JobObjects(settings)
        keys = KeyStore(mongo[settings.mongo_db], redis, settings)
        auth = Authenticator(settings, keys, redis)
        return cls(
            settings=settings,
            redis=redis,
            mongo=mongo,
            history=HistoryWriter.from_settings(settings, mongo),
            repository=ModelRepository.from_settings(settings, timeout_s=CHECK_TIMEOUT_S),
            models=embeddings.models,
            embeddings=embeddings,
            job_store=job_store,
            job_publisher=publisher,
            job_objects=objects,
            jobs=JobService(settings, job_store, publisher, objects, embeddings, auth),
            keys=keys,
            auth=auth,
            job_worker=job_worker,
        )

    async def start(self) -> None:
        self.history.start()

    async def stop(self) -> None:
        try:
            await self.history.stop()
            await asyncio.to_thread(self.job_publisher.close)
        finally:
            await self.redis.close()
            await self.mongo.close()

    async def readiness(self) -> Readiness:
        """Each dependency's status (at most a second old). A model down: unavailable; else degraded."""
        async with self._readiness_lock:
            if self._readiness is None or time.monotonic() - self._readiness[0] > self.settings.readiness_cache_s:
                self._readiness = (time.monotonic(), await self._check_all())
            return self._readiness[1]

    async def _check_all(self) -> Readiness:
        checks: dict[str, Callable[[], Awaitable[object]]] = {
            "redis": self.redis.ping,
            "rabbitmq": self.job_publisher.ping,
            "mongodb": lambda: self.mongo.admin.command("ping"),
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
