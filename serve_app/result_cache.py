"""Per-item result cache in Redis: one key per (model, version, exact text).

A Redis outage never fails a request: after an error the cache stays out of the way for
`retry_after_s`, so requests are served uncached instead of each waiting for a timeout.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import time

import numpy as np
from redis.asyncio import Redis
from redis.exceptions import RedisError

from serve_app.settings import Settings

logger = logging.getLogger(__name__)

_TOKENS = struct.Struct("<I")


def cache_key(model: str, version: str, text: str) -> str:
    return f"emb:{model}:{version}:{hashlib.sha256(text.encode()).hexdigest()}"


def pack(vector: np.ndarray, token_count: int) -> bytes:
    return _TOKENS.pack(token_count) + vector.astype("<f4", copy=False).tobytes()


def unpack(blob: bytes) -> tuple[np.ndarray, int]:
    (token_count,) = _TOKENS.unpack_from(blob)
    return np.frombuffer(blob, dtype="<f4", offset=_TOKENS.size), token_count


class ResultCache:
    """Embeddings by cache key, with a TTL; degrades to a miss when Redis is unavailable."""

    def __init__(self, redis: Redis, ttl_s: int, retry_after_s: float) -> None:
        self.redis = redis
        self.ttl_s = ttl_s
        self.retry_after_s = retry_after_s
        self._skip_until = 0.0

    @classmethod
    def from_settings(cls, settings: Settings) -> ResultCache:
        redis = Redis.from_url(
            settings.redis_url,
            socket_timeout=settings.redis_timeout_s,
            socket_connect_timeout=settings.redis_timeout_s,
            health_check_interval=30,
        )
        return cls(redis, settings.cache_ttl_s, settings.redis_retry_after_s)

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._skip_until

    def _failed(self, exc: Exception) -> None:
        if self.available:
            logger.warning("result cache unavailable for %.1fs: %s", self.retry_after_s, exc)
        self._skip_until = time.monotonic() + self.retry_after_s

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        if not keys or not self.available:
            return [None] * len(keys)
        try:
            return await self.redis.mget(keys)
        except (RedisError, OSError) as exc:
            self._failed(exc)
            return [None] * len(keys)

    async def put_many(self, entries: dict[str, bytes]) -> None:
        if not entries or not self.available:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key, value in entries.items():
                    pipe.set(key, value, ex=self.ttl_s)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self._failed(exc)

    async def ping(self) -> None:
        """Raise if Redis does not answer; a success re-enables the cache at once."""
        try:
            await self.redis.ping()
        except (RedisError, OSError) as exc:
            self._failed(exc)
            raise
        self._skip_until = 0.0

    async def close(self) -> None:
        await self.redis.aclose()
