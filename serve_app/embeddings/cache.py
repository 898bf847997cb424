"""The result cache: embeddings in Redis by (model, version, text), a miss whenever Redis is down."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
from redis.asyncio import Redis

from serve_app import metrics
from serve_app.infra.redis import GuardedRedis

_TOKENS = struct.Struct("<I")


def cache_key(model: str, version: str, text: str) -> str:
    return f"emb:{model}:{version}:{hashlib.sha256(text.encode()).hexdigest()}"


def model_of(key: str) -> str:
    """The model a cache key belongs to ("<kind>:<model>:<version>:<digest>")."""
    parts = key.split(":", 2)
    return parts[1] if len(parts) == 3 else "other"


def pack(vector: np.ndarray, token_count: int) -> bytes:
    return _TOKENS.pack(token_count) + vector.astype("<f4", copy=False).tobytes()


def packed_size(dims: int) -> int:
    return _TOKENS.size + 4 * dims


def unpack(blob: bytes) -> tuple[np.ndarray, int]:
    (token_count,) = _TOKENS.unpack_from(blob)
    return np.frombuffer(blob, dtype="<f4", offset=_TOKENS.size), token_count


class ResultCache:
    """Embeddings by cache key, with a TTL; a miss when Redis is unavailable."""

    def __init__(self, guard: GuardedRedis, ttl_s: int) -> None:
        self.guard = guard
        self.ttl_s = ttl_s

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        """The entries of keys (None: a miss), counted as hits and misses by model (keys of one model per call)."""
        if not keys:
            return []
        found = await self.guard.run(lambda r: r.mget(keys), [None] * len(keys))
        hits = sum(blob is not None for blob in found)
        metrics.cache_lookups(model_of(keys[0]), hits, len(keys) - hits)
        return found

    async def put_many(self, entries: dict[str, bytes]) -> None:
        if not entries:
            return

        async def store(redis: Redis) -> None:
            async with redis.pipeline(transaction=False) as pipe:
                for key, value in entries.items():
                    pipe.set(key, value, ex=self.ttl_s)
                await pipe.execute()

        await self.guard.run(store, None)
