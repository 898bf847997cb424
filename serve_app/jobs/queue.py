"""RabbitMQ for asynchronous jobs (pika): the queues, a confirmed publisher and a consumer.

Topology, all durable, on the default exchange:
    <queue>         the work queue; a rejected message dead-letters to <queue>.dead
    <queue>.retry   no consumers; a message waits out its per-message TTL, then dead-letters
                    back to <queue> (delayed retry without a plugin)
    <queue>.dead    messages that could not be processed: malformed, or out of attempts
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum
from functools import partial

import pika
from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import AMQPError

from serve_app import metrics
from serve_app.infra.rabbitmq import connection_parameters
from serve_app.settings import Settings

logger = logging.getLogger("ray.serve")  # the replica's log (JSON, with the request id)


class Disposition(StrEnum):
    ACK = "ack"  # done with: finished, failed for good, or nothing to do
    RETRY = "retry"  # try again after a delay
    DEAD = "dead"  # to the dead-letter queue


class PublishError(RuntimeError):
    """The broker did not confirm a message."""


def declare_topology(channel: BlockingChannel, settings: Settings) -> None:
    channel.queue_declare(settings.job_dead_letter_queue, durable=True)
    channel.queue_declare(
        settings.job_retry_queue,
        durable=True,
        arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": settings.job_queue},
    )
    channel.queue_declare(
        settings.job_queue,
        durable=True,
        arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": settings.job_dead_letter_queue},
    )


def job_message(job_id: str) -> bytes:
    return json.dumps({"job_id": job_id}).encode()


def parse_job_message(body: bytes) -> str | None:
    """The job id of a well-formed message, else None."""
    try:
        job_id = json.loads(body).get("job_id")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None
    return job_id if isinstance(job_id, str) and 0 < len(job_id) <= 64 else None


def message_properties(
    job_id: str, *, delay_s: float | None = None, request_id: str | None = None
) -> pika.BasicProperties:
    """A persistent message for job_id; `request_id` (the submitting request's X-Request-ID) rides as its
    correlation id, so the worker's log lines for the job carry the id of the request that made it."""
    return pika.BasicProperties(
        content_type="application/json",
        delivery_mode=pika.DeliveryMode.Persistent,
        message_id=job_id,
        correlation_id=request_id or None,
        expiration=str(max(1, int(delay_s * 1000))) if delay_s is not None else None,
    )


class JobPublisher:
    """Publishes job messages with publisher confirms, from one thread that owns the connection."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="job-publisher")
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None

    async def publish(self, job_id: str, request_id: str | None = None) -> None:
        """Raises PublishError unless the broker confirmed a persistent message for job_id."""
        await asyncio.get_running_loop().run_in_executor(self._executor, self._publish, job_id, request_id)

    async def ping(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._ping)

    def _ping(self) -> None:
        try:
            self._open().connection.process_data_events(0)
        except (AMQPError, OSError):
            self._reset()
            self._open()

    def _open(self) -> BlockingChannel:
        if self._channel is None or not self._channel.is_open:
            self._reset()
            self._connection = pika.BlockingConnection(connection_parameters(self.settings))
            self._channel = self._connection.channel()
            self._channel.confirm_delivery()
            declare_topology(self._channel, self.settings)
        return self._channel

    def _reset(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.close()
        self._connection = self._channel = None

    def _publish(self, job_id: str, request_id: str | None) -> None:
        last_error: Exception | None = None
        for _ in range(2):  # a connection gone stale since the last publish gets one fresh try
            try:
                self._open().basic_publish(
                    exchange="",
                    routing_key=self.settings.job_queue,
                    body=job_message(job_id),
                    properties=message_properties(job_id, request_id=request_id),
                    mandatory=True,
                )
                return
            except (AMQPError, OSError) as exc:
                last_error = exc
                self._reset()
        raise PublishError(f"RabbitMQ did not take job {job_id}: {type(last_error).__name__}: {last_error}")

    def close(self) -> None:
        self._executor.submit(self._reset).result(timeout=10)
        self._executor.shutdown(wait=False)


# handle(job_id, settle, request_id): start work on a job; call settle(disposition, delay_s) when it is done.
# request_id: the X-Request-ID of the request that submitted the job ("" when the message carries none).
JobHandler = Callable[[str, Callable[[Disposition, float], None], str], None]


class JobConsumer(threading.Thread):
    """Consumes the job queue with a bounded prefetch and manual acks; reconnects when the broker goes.

    A message is acknowledged only once its job is settled; one still unsettled when the
    connection drops is redelivered by the broker (at-least-once).
    """

    def __init__(self, settings: Settings, handle: JobHandler) -> None:
        super().__init__(name="job-consumer", daemon=True)
        self.settings = settings
        self.handle = handle
        self.connected = threading.Event()
        self._stopping = threading.Event()
        self._connection: pika.BlockingConnection | None = None

    def run(self) -> None:
        backoff = 0.5
        while not self._stopping.is_set():
            try:
                self._consume()
                backoff = 0.5
            except (AMQPError, OSError) as exc:
                metrics.dependency_error("rabbitmq")
                logger.warning("job consumer lost RabbitMQ (%s); reconnecting in %.1fs", exc, backoff)
            finally:
                self.connected.clear()
            if not self._stopping.wait(backoff):
                backoff = min(backoff * 2, 5.0)

    def _consume(self) -> None:
        self._connection = pika.BlockingConnection(connection_parameters(self.settings))
        try:
            channel = self._connection.channel()
            channel.confirm_delivery()
            declare_topology(channel, self.settings)
            channel.basic_qos(prefetch_count=self.settings.job_prefetch)
            channel.basic_consume(self.settings.job_queue, on_message_callback=self._on_message)
            if self._stopping.is_set():
                return
            self.connected.set()
            logger.info("consuming %s (prefetch %d)", self.settings.job_queue, self.settings.job_prefetch)
            channel.start_consuming()
        finally:
            with contextlib.suppress(Exception):
                self._connection.close()

    def _on_message(self, channel: BlockingChannel, method, properties, body: bytes) -> None:
        job_id = parse_job_message(body)
        if job_id is None:
            logger.error("malformed job message dead-lettered: %r", body[:200])
            channel.basic_nack(method.delivery_tag, requeue=False)
            metrics.job("dead_lettered")
            return
        connection = self._connection
        tag = method.delivery_tag
        request_id = properties.correlation_id or ""

        def settle(disposition: Disposition, delay_s: float) -> None:
            # Called from any thread; the channel may only be used from this consumer's thread.
            with contextlib.suppress(Exception):
                connection.add_callback_threadsafe(
                    partial(self._settle, channel, tag, job_id, request_id, disposition, delay_s)
                )

        self.handle(job_id, settle, request_id)

    def _settle(
        self,
        channel: BlockingChannel,
        tag: int,
        job_id: str,
        request_id: str,
        disposition: Disposition,
        delay_s: float,
    ) -> None:
        if not channel.is_open:
            return  # the broker will redeliver the message to a new connection
        ids = {"job": job_id, "request_id": request_id}  # this thread has no Serve request context
        if disposition == Disposition.RETRY:
            try:
                channel.basic_publish(
                    exchange="",
                    routing_key=self.settings.job_retry_queue,
                    body=job_message(job_id),
                    properties=message_properties(job_id, delay_s=delay_s, request_id=request_id),
                    mandatory=True,
                )
            except AMQPError as exc:
                # No confirmed retry copy: put the message back instead (sooner, but not lost).
                logger.warning("retry of job %s not queued (%s); requeued now", job_id, exc)
                if channel.is_open:
                    channel.basic_nack(tag, requeue=True)
                return
            channel.basic_ack(tag)
            # Counted as retried by the runner, when an attempt failed; this is also a delivery deferred.
            logger.info("job %s requeued for %.1fs", job_id, delay_s, extra={**ids, "job_event": "requeued"})
        elif disposition == Disposition.DEAD:
            channel.basic_nack(tag, requeue=False)
            metrics.job("dead_lettered")
            logger.warning("job %s dead-lettered", job_id, extra={**ids, "job_event": "dead_lettered"})
        else:
            channel.basic_ack(tag)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopping.set()
        connection = self._connection
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.add_callback_threadsafe(lambda: connection.close())
        deadline = time.monotonic() + timeout_s
        while self.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
