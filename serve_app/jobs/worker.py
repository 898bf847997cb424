"""A job worker's duties, apart from Ray Serve: consume RabbitMQ, run jobs, deliver callbacks, sweep.

deployments/job_worker.py wraps one of these in a Serve deployment and supplies `dispatch`: how a
delivered job reaches a replica's `run` (through the deployment's own handle, so Serve balances
jobs over replicas and autoscales on them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from pymongo.errors import PyMongoError
from ray.serve.handle import DeploymentHandle

from serve_app import metrics
from serve_app.auth.key_store import KeyStore
from serve_app.embeddings.service import EmbeddingService
from serve_app.infra.clients import Clients
from serve_app.jobs.callbacks import CallbackDispatcher, SecretCache
from serve_app.jobs.objects import JobObjects
from serve_app.jobs.queue import Disposition, JobConsumer, JobPublisher, PublishError
from serve_app.jobs.runner import JobRunner, Settlement
from serve_app.jobs.store import JobStore
from serve_app.outbound import Outbound
from serve_app.settings import Settings

logger = logging.getLogger("ray.serve")

Dispatch = Callable[[str], Awaitable[Settlement]]


def use_request_id(request_id: str) -> None:
    """Make `request_id` this task's Serve request id: handle calls made from here carry it, and Serve stamps it
    on log lines. Serve keeps it in a context variable with no public setter in Ray 2.60;
    tests/integration/infra/test_request_logs.py fails if this stops working."""
    if not request_id:
        return
    try:
        from ray.serve.context import _set_request_context

        _set_request_context(request_id=request_id)
    except Exception as exc:  # a Ray that moved it: the job runs under a fresh id, and its lines say job_id
        logger.debug("cannot set the Serve request id: %r", exc)


class JobWorkerRuntime:
    def __init__(
        self, settings: Settings, models: dict[str, DeploymentHandle], pool: DeploymentHandle | None = None
    ) -> None:
        self.settings = settings
        self.clients = Clients.from_settings(settings)
        self.store = JobStore(self.clients.db, settings, self.clients.redis)
        embeddings = EmbeddingService.from_settings(settings, models, self.clients.redis, pool, lane="background")
        self.runner = JobRunner(settings, self.store, embeddings, JobObjects(settings))
        self.publisher = JobPublisher(settings)
        self.outbound = Outbound.from_settings(settings)
        keys = KeyStore(self.clients.db, self.clients.redis, settings)
        self.callbacks = CallbackDispatcher(settings, self.store, SecretCache(keys.callback_secret), self.outbound)
        self.consumer: JobConsumer | None = None
        self.tasks: list[asyncio.Task] = []

    async def start(self, dispatch: Dispatch) -> None:
        """Consume the queue, handing each delivered job to `dispatch`; start the background duties."""
        loop = asyncio.get_running_loop()

        async def run_dispatched(job_id: str, request_id: str) -> Settlement:
            # The job runs, and calls the models, under the id of the request that submitted it: Serve
            # carries it on every handle call, and its log lines carry it (this task's own context).
            use_request_id(request_id)
            try:
                return await dispatch(job_id)
            except Exception as exc:  # the replica running it died or was stopped: retry later
                logger.warning("job %s did not finish on its replica: %r", job_id, exc)
                return Settlement(Disposition.RETRY, self.settings.job_retry_delay_s)

        def on_delivery(job_id: str, settle, request_id: str) -> None:
            future = asyncio.run_coroutine_threadsafe(run_dispatched(job_id, request_id), loop)
            future.add_done_callback(lambda f: settle(*self._settlement_of(f)))

        self.consumer = JobConsumer(self.settings, on_delivery)
        self.consumer.start()
        self.tasks = [
            loop.create_task(self._sweep_unpublished(), name="sweep-unpublished"),
            loop.create_task(self.callbacks.run(), name="deliver-callbacks"),
        ]
        with contextlib.suppress(Exception):
            await self.store.ensure_indexes()

    async def run(self, job_id: str) -> Settlement:
        """Run one delivered job; says what to do with its message."""
        return await self.runner.run(job_id)

    def consuming(self) -> bool:
        """Whether this worker is connected to RabbitMQ and consuming; raises when it is not."""
        if self.consumer is None or not self.consumer.connected.is_set():
            raise RuntimeError("the job consumer is not connected to RabbitMQ")
        return True

    def check_health(self) -> None:
        if self.consumer is None or not self.consumer.is_alive():
            raise RuntimeError("the job consumer thread has stopped")
        for task in self.tasks:
            if task.done():
                raise RuntimeError(f"background task {task.get_name()} has stopped")

    def _settlement_of(self, future) -> tuple[Disposition, float]:
        try:
            settlement = future.result()
        except Exception:
            return Disposition.RETRY, self.settings.job_retry_delay_s
        return settlement.disposition, settlement.delay_s

    async def _sweep_unpublished(self) -> None:
        """Publish jobs accepted but never published (a gateway that died between the two)."""
        while True:
            await asyncio.sleep(self.settings.job_sweep_interval_s)
            try:
                for job_id, request_id in await self.store.unpublished(self.settings.job_publish_grace_s):
                    await self.publisher.publish(job_id, request_id)
                    await self.store.mark_published(job_id)
                    logger.warning("published job %s that its gateway had not", job_id)
            except Exception as exc:  # a sweep that fails is tried again at the next interval
                if isinstance(exc, PublishError | PyMongoError):
                    metrics.dependency_error("rabbitmq" if isinstance(exc, PublishError) else "mongodb")
                logger.warning("sweep of unpublished jobs failed: %r", exc)

    async def stop(self) -> None:
        # Stop taking messages first; what this worker holds unacknowledged is redelivered.
        if self.consumer is not None:
            await asyncio.to_thread(self.consumer.stop)
        for task in self.tasks:
            task.cancel()
        for close in (
            self.callbacks.close,
            lambda: asyncio.to_thread(self.publisher.close),
            self.outbound.aclose,
            self.clients.close,
        ):
            with contextlib.suppress(Exception):
                await close()
