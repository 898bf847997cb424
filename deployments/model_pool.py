"""The on-demand model pool: any model version in the repository, loaded on first use.

One multiplexed deployment (`@serve.multiplexed`) serves every model the Serve config does not pin.
A request carries `multiplexed_model_id="name:version"` (serve_app/embeddings/catalog.py); Serve
routes it to a replica that already holds that model where one does, and a replica loads it
through the same sha256-checked node cache as the pinned replicas, keeping the
`max_models_per_replica` most recently used. Embedding and reranking requests are batched with
`@serve.batch`, which Ray splits by model id, so one forward pass never mixes models.

Each replica writes the ids it holds to Redis (its field of the hash `pool:loaded`, refreshed while
it lives), so GET /v1/models can say which models are loaded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from dataclasses import dataclass

import numpy as np
from ray import serve
from ray.serve import metrics

from serve_app.embeddings.contract import LOADED_KEY, EmbeddingBatch, ModelInfo, RerankBatch, per_request
from serve_app.infra.redis import GuardedRedis
from serve_app.model_repository import Manifest, ModelRepository, check_name
from serve_app.settings import get_settings

logger = logging.getLogger("ray.serve")

LOADED_REFRESH_S = 10
MAX_BATCH = 64  # texts (or pairs) per batch, summed over the requests in it


@dataclass(eq=False)
class PoolModel:
    manifest: Manifest
    source: str
    engine: object  # SentenceEncoder (embed) or CrossEncoder (rerank)
    loaded_at: float

    def info(self) -> ModelInfo:
        engine = self.engine
        return ModelInfo(
            name=self.manifest.name,
            version=self.manifest.version,
            dims=self.manifest.dims,
            source=self.source,
            manifest_digest=self.manifest.digest,
            framework=self.manifest.framework,
            task=self.manifest.task,
            created=self.manifest.created.timestamp(),
            loaded_at=self.loaded_at,
            device=str(engine.device),
            max_seq_length=int(getattr(engine, "max_tokens", 0) or engine.spec.max_seq_length),
        )


def load_pool_model(repository: ModelRepository, cache_root, name: str, version: str, device: str) -> PoolModel:
    """Fetch name:version into the node cache and build the engine its task needs."""
    import torch

    from deployments.cross_encoder import CrossEncoder
    from deployments.encoder import SentenceEncoder

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    local_dir, manifest = repository.fetch(name, version, cache_root)
    if manifest.task == "rerank":
        engine = CrossEncoder(local_dir, device=device, max_tokens=manifest.max_tokens or 512)
    else:
        engine = SentenceEncoder(local_dir, device=device)
    return PoolModel(manifest=manifest, source=repository.uri(name, version), engine=engine, loaded_at=time.time())


def _size(requests: list) -> int:
    return sum(len(items) for items in requests)


@serve.deployment(max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.25})
class ModelPool:
    """Serves whatever `name:version` each request's multiplexed model id names."""

    def __init__(self, max_models_per_replica: int = 2, device: str = "auto") -> None:
        import deployments.cross_encoder
        import deployments.encoder  # noqa: F401  torch and transformers now, not in a request's first load

        self.settings = get_settings()
        self.repository = ModelRepository.from_settings(self.settings)
        self.device = device
        self.redis = GuardedRedis.from_settings(self.settings)
        self._held: weakref.WeakValueDictionary[str, PoolModel] = weakref.WeakValueDictionary()
        self._publisher: asyncio.Task | None = None
        self._field = serve.get_replica_context().replica_id.unique_id
        self.texts_counter = metrics.Counter(
            "pool_items_computed", description="Texts embedded or pairs scored by the pool.", tag_keys=("model", "task")
        )

        async def load(model_id: str) -> PoolModel:
            name, _, version = model_id.partition(":")
            check_name("model name", name)
            check_name("version", version)
            started = time.perf_counter()
            model = await asyncio.to_thread(
                load_pool_model, self.repository, self.settings.weights_cache_dir, name, version, self.device
            )
            logger.info("pool loaded %s (%s) in %.1fs", model_id, model.manifest.task, time.perf_counter() - started)
            self._held[model_id] = model
            await self._publish()
            return model

        # Bound per instance so the limit comes from the Serve config (Ray detects this form too).
        self._get_model = serve.multiplexed(max_num_models_per_replica=max_models_per_replica)(load)

    async def _publish(self) -> None:
        """Write the ids this replica holds (the multiplexer drops evicted models; the weak dict follows)."""
        value = json.dumps({"ids": sorted(self._held.keys()), "at": time.time()})
        await self.redis.run(lambda r: r.hset(LOADED_KEY, self._field, value), None)
        if self._publisher is None:
            self._publisher = asyncio.create_task(self._keep_publishing())

    async def _keep_publishing(self) -> None:
        while True:
            await asyncio.sleep(LOADED_REFRESH_S)
            await self._publish()

    async def _model(self, task: str | None = None) -> PoolModel:
        model_id = serve.get_multiplexed_model_id()
        if not model_id:
            raise ValueError("a request to the model pool names no model (multiplexed_model_id)")
        model = await self._get_model(model_id)
        if task is not None and model.manifest.task != task:
            raise ValueError(f"{model_id} is a {model.manifest.task} model, not a {task} model")
        return model

    async def info(self) -> ModelInfo:
        """What the requested model is; loads it if this replica does not hold it."""
        return (await self._model()).info()

    async def embed(self, texts: list[str]) -> EmbeddingBatch:
        parts = [texts[i : i + MAX_BATCH] for i in range(0, len(texts), MAX_BATCH)]
        batches = await asyncio.gather(*(self._embed_batch(part) for part in parts))
        first = batches[0]
        if len(batches) == 1:
            return first
        return EmbeddingBatch(
            model=first.model,
            version=first.version,
            vectors=np.concatenate([b.vectors for b in batches]),
            token_counts=[n for b in batches for n in b.token_counts],
        )

    async def rerank(self, query: str, documents: list[str]) -> RerankBatch:
        parts = [documents[i : i + MAX_BATCH] for i in range(0, len(documents), MAX_BATCH)]
        batches = await asyncio.gather(*(self._rerank_batch([(query, d) for d in part]) for part in parts))
        first = batches[0]
        if len(batches) == 1:
            return first
        return RerankBatch(
            model=first.model,
            version=first.version,
            scores=np.concatenate([b.scores for b in batches]),
            token_counts=[n for b in batches for n in b.token_counts],
        )

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=0.005, batch_size_fn=_size)
    async def _embed_batch(self, requests: list[list[str]]) -> list[EmbeddingBatch]:
        model = await self._model("embed")  # Ray splits batches by model id: one model here
        flat = [text for texts in requests for text in texts]
        encoded = await asyncio.to_thread(model.engine.encode, flat)
        self.texts_counter.inc(len(flat), tags={"model": model.manifest.name, "task": "embed"})
        return per_request(
            requests,
            lambda part: EmbeddingBatch(
                model=model.manifest.name,
                version=model.manifest.version,
                vectors=encoded.vectors[part],
                token_counts=encoded.token_counts[part],
            ),
        )

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=0.005, batch_size_fn=_size)
    async def _rerank_batch(self, requests: list[list[tuple[str, str]]]) -> list[RerankBatch]:
        model = await self._model("rerank")
        flat = [pair for pairs in requests for pair in pairs]
        scored = await asyncio.to_thread(model.engine.score, flat)
        self.texts_counter.inc(len(flat), tags={"model": model.manifest.name, "task": "rerank"})
        return per_request(
            requests,
            lambda part: RerankBatch(
                model=model.manifest.name,
                version=model.manifest.version,
                scores=scored.scores[part],
                token_counts=scored.token_counts[part],
            ),
        )

    async def __del__(self) -> None:
        if self._publisher is not None:
            self._publisher.cancel()
        await self.redis.run(lambda r: r.hdel(LOADED_KEY, self._field), None)
        await self.redis.close()
