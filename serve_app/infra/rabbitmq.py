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
