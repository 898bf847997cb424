"""Embeddings for the gateway: cached items answered from Redis, only misses sent to the model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ray.serve.handle import DeploymentHandle

from serve_app.errors import InvalidRequestError, ModelNotFoundError
from serve_app.model_client import ModelClient
from serve_app.result_cache import GuardedRedis, ResultCache, cache_key, pack, packed_size, unpack
from serve_app.settings import Settings


@dataclass(frozen=True)
class EmbeddingOutcome:
    model: str
    version: str
    vectors: np.ndarray
    token_counts: list[int]
    cache_hits: int


class EmbeddingService:
    def __init__(self, models: dict[str, ModelClient], cache: ResultCache) -> None:
        self.models = models
        self.cache = cache

    @classmethod
    def from_settings(
        cls, settings: Settings, handles: dict[str, DeploymentHandle], redis: GuardedRedis
    ) -> EmbeddingService:
        """The same service for the gateway and the job workers: a client per model, the Redis cache."""
        models = {
            name: ModelClient(name, handle, refresh_s=settings.model_info_refresh_s, timeout_s=settings.model_timeout_s)
            for name, handle in handles.items()
        }
        return cls(models, ResultCache(redis, settings.cache_ttl_s))

    def model(self, name: str) -> ModelClient:
        try:
            return self.models[name]
        except KeyError:
            served = ", ".join(sorted(self.models)) or "none"
            raise ModelNotFoundError(
                f"the model {name!r} does not exist; served models: {served}", param="model"
            ) from None

    async def embed(self, model_name: str, texts: list[str], dimensions: int | None = None) -> EmbeddingOutcome:
        client = self.model(model_name)
        info = await client.info()
        if dimensions is not None and dimensions != info.dims:
            raise InvalidRequestError(
                f"dimensions={dimensions} is not supported by {model_name!r}, which makes {info.dims}",
                param="dimensions",
            )
        unique = list(dict.fromkeys(texts))
        version = info.version
        keys = [cache_key(model_name, version, text) for text in unique]
        expected_size = packed_size(info.dims)
        found = {
            text: unpack(blob)
            for text, blob in zip(unique, await self.cache.get_many(keys), strict=True)
            if blob is not None and len(blob) == expected_size  # anything else is not ours: a miss
        }
        misses = [text for text in unique if text not in found]
        results = dict(found)
        if misses:
            batch = await client.embed(misses)
            if batch.version != version:
                # The model switched version since we last asked: what the cache gave us belongs
                # to the old one, so the whole request is answered by the new one.
                client.forget_info()
                if found:
                    found, misses = {}, unique
                    batch = await client.embed(unique)
                version = batch.version
                results = {}
            computed = {text: (batch.vectors[i], batch.token_counts[i]) for i, text in enumerate(misses)}
            results.update(computed)
            await self.cache.put_many({cache_key(model_name, version, t): pack(v, n) for t, (v, n) in computed.items()})
        return EmbeddingOutcome(
            model=model_name,
            version=version,
            vectors=np.stack([results[text][0] for text in texts]),
            token_counts=[results[text][1] for text in texts],
            cache_hits=sum(1 for text in texts if text in found),
        )
