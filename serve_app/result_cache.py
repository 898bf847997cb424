"""Redis, used so that an outage never fails a request: the result cache and the job-status cache.

After an error, Redis is left alone for `retry_after_s`, so requests are served without it
instead of each waiting for a timeout.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import numpy as np
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from serve_app.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")
_TOKENS = struct.Struct("<I")


def cache_key(model: str, version: str, text: str) -> str:
    return f"emb:{model}:{version}:{hashlib.sha256(text.encode()).hexdigest()}"


def pack(vector: np.ndarray, token_count: int) -> bytes:
    return _TOKENS.pack(token_count) + vector.astype("<f4", copy=False).tobytes()


def packed_size(dims: int) -> int:
    return _TOKENS.size + 4 * dims


def unpack(blob: bytes) -> tuple[np.ndarray, int]:
    (token_count,) = _TOKENS.unpack_from(blob)
    return np.frombuffer(blob, dtype="<f4", offset=_TOKENS.size), token_count


class GuardedRedis:
    """One Redis client whose failures turn into a default answer, not an error."""

    def __init__(self, redis: Redis, retry_after_s: float) -> None:
        self.redis = redis
        self.retry_after_s = retry_after_s
        self._skip_until = 0.0

    @classmethod
    def from_settings(cls, settings: Settings) -> GuardedRedis:
        redis = Redis.from_url(
            settings.redis_url,
            socket_timeout=settings.redis_timeout_s,
            socket_connect_timeout=settings.redis_timeout_s,
            health_check_interval=30,
            **settings.redis_options(),
        )
        return cls(redis, settings.redis_retry_after_s)

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._skip_until

    async def run(self, call: Callable[[Redis], Awaitable[T]], default: T) -> T:
        if not self.available:
            return default
        try:
            return await call(self.redis)
        except ResponseError as exc:  # Redis answered: a refused command, not an outage
            logger.error("Redis refused a command: %s", exc)
            return default
        except (RedisError, OSError) as exc:
            if self.available:
                logger.warning("Redis unavailable; going without it for %.1fs: %s", self.retry_after_s, exc)
            self._skip_until = time.monotonic() + self.retry_after_s
            return default

    async def ping(self) -> None:
        """Raise if Redis does not answer; a success re-enables it at once."""
        try:
            await self.redis.ping()
        except (RedisError, OSError):
            self._skip_until = time.monotonic() + self.retry_after_s
            raise
        self._skip_until = 0.0

    async def close(self) -> None:
        await self.redis.aclose()


class ResultCache:
    """Embeddings by cache key, with a TTL; a miss when Redis is unavailable."""

    def __init__(self, guard: GuardedRedis, ttl_s: int) -> None:
        self.guard = guard
        self.ttl_s = ttl_s

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        if not keys:
            return []
        return await self.guard.run(lambda r: r.mget(keys), [None] * len(keys))

    async def put_many(self, entries: dict[str, bytes]) -> None:
        if not entries:
            return

        async def store(redis: Redis) -> None:
            async with redis.pipeline(transaction=False) as pipe:
                for key, value in entries.items():
                    pipe.set(key, value, ex=self.ttl_s)
                await pipe.execute()

        await self.guard.run(store, None)
