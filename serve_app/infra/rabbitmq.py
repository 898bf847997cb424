"""RabbitMQ: connection parameters for pika (credentials apart from the URL, short timeouts)."""

from __future__ import annotations

import pika

from serve_app.settings import Settings


def connection_parameters(settings: Settings) -> pika.URLParameters:
    params = pika.URLParameters(settings.rabbitmq_url)
    if (credentials := settings.rabbitmq_credentials()) is not None:
        params.credentials = pika.PlainCredentials(*credentials)
    params.socket_timeout = 5
    params.blocked_connection_timeout = 10
    params.connection_attempts = 1
    params.heartbeat = settings.rabbitmq_heartbeat_s
    return params


def queue_depths(settings: Settings) -> dict[str, tuple[int, int]]:
    """The job queues (jobs, retry, dead letters): (messages ready, consumers) each, by a passive declare;
    raises pika's errors (or OSError) when RabbitMQ cannot be read."""
    connection = pika.BlockingConnection(connection_parameters(settings))
    try:
        channel = connection.channel()
        depths = {}
        for queue in (settings.job_queue, settings.job_retry_queue, settings.job_dead_letter_queue):
            declared = channel.queue_declare(queue, passive=True).method
            depths[queue] = (declared.message_count, declared.consumer_count)
        return depths
    finally:
        connection.close()
