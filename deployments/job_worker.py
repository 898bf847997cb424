"""The job-worker deployment: consumes RabbitMQ and runs jobs through Serve, so it autoscales like any other.

Each replica runs a consumer thread (bounded prefetch, manual ack). A delivered job is run by
calling `run_job` through this deployment's own handle: Serve balances jobs over the replicas
and counts them as ongoing requests, which is what its autoscaler scales on. Each replica also
delivers ended jobs' callbacks, concurrently and within per-destination and per-tenant bounds
(deployments/callbacks.py), through serve_app/outbound.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.callbacks import CallbackDispatcher, SecretCache
from deployments.job_runner import JobRunner, Settlement
from serve_app.auth import KeyStore
from serve_app.embedding_service import EmbeddingService
from serve_app.history import mongo_client
from serve_app.job_queue import Disposition, JobConsumer, JobPublisher
from serve_app.job_store import JobStore
from serve_app.object_store import JobObjects
from serve_app.outbound import Outbound
from serve_app.result_cache import GuardedRedis
from serve_app.settings import get_settings

logger = logging.getLogger("ray.serve")


@serve.deployment(
    max_ongoing_requests=4,
    ray_actor_options={"num_cpus": 0.1},
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1},
)
class JobWorker:
    async def __init__(self, models: dict[str, DeploymentHandle]) -> None:
        self.settings = settings = get_settings()
        self.redis = GuardedRedis.from_settings(settings)
        self.mongo = mongo_client(settings)
        self.store = JobStore(self.mongo, settings, self.redis)
        embeddings = EmbeddingService.from_settings(settings, models, self.redis)
        self.runner = JobRunner(settings, self.store, embeddings, JobObjects(settings))
        self.publisher = JobPublisher(settings)
        self.loop = asyncio.get_running_loop()
        context = serve.get_replica_context()
        self.dispatch: DeploymentHandle = serve.get_deployment_handle(context.deployment, context.app_name).options(
            method_name="run_job"
        )
        self.outbound = Outbound.from_settings(settings)
        keys = KeyStore(self.mongo[settings.mongo_db], self.redis, settings)
        self.callbacks = CallbackDispatcher(settings, self.store, SecretCache(keys.callback_secret), self.outbound)
        self.consumer = JobConsumer(settings, self._on_delivery)
        self.consumer.start()
        self.tasks = [
            self.loop.create_task(self._sweep_unpublished(), name="sweep-unpublished"),
            self.loop.create_task(self.callbacks.run(), name="deliver-callbacks"),
        ]
        with contextlib.suppress(Exception):
            await self.store.ensure_indexes()

    async def run_job(self, job_id: str) -> Settlement:
        """Run one delivered job; says what to do with its message."""
        return await self.runner.run(job_id)

    def consuming(self) -> bool:
        """Whether this replica is connected to RabbitMQ and consuming; raises when it is not."""
        if not self.consumer.connected.is_set():
            raise RuntimeError("the job consumer is not connected to RabbitMQ")
        return True

    def check_health(self) -> None:
        if not self.consumer.is_alive():
            raise RuntimeError("the job consumer thread has stopped")
        for task in self.tasks:
            if task.done():
                raise RuntimeError(f"background task {task.get_name()} has stopped")

    # -- deliveries -----------------------------------------------------------------------

    def _on_delivery(self, job_id: str, settle) -> None:
        future = asyncio.run_coroutine_threadsafe(self._dispatch(job_id), self.loop)
        future.add_done_callback(lambda f: settle(*_settlement_of(f)))

    async def _dispatch(self, job_id: str) -> Settlement:
        try:
            return await self.dispatch.remote(job_id)
        except Exception as exc:  # the replica running it died or was stopped: retry later
            logger.warning("job %s did not finish on its replica: %r", job_id, exc)
            return Settlement(Disposition.RETRY, self.settings.job_retry_delay_s)

    # -- background duties ----------------------------------------------------------------

    async def _sweep_unpublished(self) -> None:
        """Publish jobs accepted but never published (a gateway that died between the two)."""
        while True:
            await asyncio.sleep(self.settings.job_sweep_interval_s)
            try:
                for job_id in await self.store.unpublished(self.settings.job_publish_grace_s):
                    await self.publisher.publish(job_id)
                    await self.store.mark_published(job_id)
                    logger.warning("published job %s that its gateway had not", job_id)
            except Exception as exc:  # a sweep that fails is tried again at the next interval
                logger.warning("sweep of unpublished jobs failed: %r", exc)

    async def __del__(self) -> None:
        # Stop taking messages first; what this replica holds unacknowledged is redelivered.
        await asyncio.to_thread(self.consumer.stop)
        for task in self.tasks:
            task.cancel()
        for close in (
            self.callbacks.close,
            lambda: asyncio.to_thread(self.publisher.close),
            self.outbound.aclose,
            self.mongo.close,
            self.redis.close,
        ):
            with contextlib.suppress(Exception):
                await close()


def _settlement_of(future) -> tuple[Disposition, float]:
    try:
        settlement = future.result()
    except Exception:
        return Disposition.RETRY, get_settings().job_retry_delay_s
    return settlement.disposition, settlement.delay_s
