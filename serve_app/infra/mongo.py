"""MongoDB: the one client factory (timeouts, credentials, timezone-aware dates)."""

from __future__ import annotations

from pymongo import AsyncMongoClient

from serve_app.settings import Settings


def mongo_client(settings: Settings) -> AsyncMongoClient:
    timeout_ms = int(settings.mongo_timeout_s * 1000)
    return AsyncMongoClient(
        settings.mongo_url,
        serverSelectionTimeoutMS=timeout_ms,
        connectTimeoutMS=timeout_ms,
        tz_aware=True,
        **settings.mongo_options(),
    )
