"""The S3 object store (MinIO in production, cluster/s3_server.py locally): the one client factory."""

from __future__ import annotations

from urllib.parse import urlparse

import urllib3
from minio import Minio

from serve_app.settings import Settings


def object_store_client(settings: Settings, timeout_s: float | None = None, *, endpoint: str | None = None) -> Minio:
    """A minio client; with timeout_s, one that gives up fast (for health checks)."""
    url = urlparse(endpoint or settings.s3_endpoint)
    http_client = None
    if timeout_s is not None:
        http_client = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=timeout_s, read=timeout_s), retries=urllib3.Retry(total=0)
        )
    return Minio(
        url.netloc,
        access_key=settings.s3_access_key,
        secret_key=settings.s3_secret_key.get_secret_value(),
        secure=url.scheme == "https",
        region=settings.s3_region,
        http_client=http_client,
    )
