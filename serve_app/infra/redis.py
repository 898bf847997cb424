"""Redis, used so that an outage never fails a request.

After an error, Redis is left alone for `retry_after_s`, so requests are served without it
instead of each waiting for a timeout. Every Redis user (the result cache, the key cache, rate
limits, job status, quotas) goes through one GuardedRedis.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from serve_app import metrics
from serve_app.events import EVENT
from serve_app.settings import Settings

logger = logging.getLogger(__name__)
DEPENDENCY = {"dependency": "redis"}

T = TypeVar("T")
UNAVAILABLE = object()  # a default for GuardedRedis.run that tells "Redis is down" from any answer


class GuardedRedis:
    """One Redis client whose failures turn into a default answer, not an error."""

    def __init__(self, redis: Redis, retry_after_s: float) -> None:
        self.redis = redis
        self.retry_after_s = retry_after_s
        self._skip_until = 0.0
        self._down = False  # an outage was logged; its end is logged once Redis answers again

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
            answer = await call(self.redis)
        except ResponseError as exc:  # Redis answered: a refused command, not an outage
            logger.error("Redis refused a command: %s", exc)
            metrics.dependency_error("redis")
            return default
        except (RedisError, OSError) as exc:
            metrics.dependency_error("redis")
            if self.available and not self._down:
                logger.warning(
                    "Redis unavailable; going without it for %.1fs: %s", self.retry_after_s, exc, extra=DEPENDENCY
                )
            self._down = True
            self._skip_until = time.monotonic() + self.retry_after_s
            return default
        self._answered()
        return answer

    def _answered(self) -> None:
        if self._down:
            self._down = False
            logger.info("Redis answers again", extra={**EVENT, **DEPENDENCY})

    async def ping(self) -> None:
        """Raise if Redis does not answer; a success re-enables it at once."""
        try:
            await self.redis.ping()
        except (RedisError, OSError):
            self._skip_until = time.monotonic() + self.retry_after_s
            raise
        self._skip_until = 0.0
        self._answered()

    async def close(self) -> None:
        await self.redis.aclose()
