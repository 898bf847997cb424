"""The on-demand model pool: any model version in the repository, loaded on first use.

One multiplexed deployment (`@serve.multiplexed`) serves every model the Serve config does not pin.
A request carries `multiplexed_model_id="name:version"` (serve_app/embeddings/catalog.py); Serve
routes it to a replica that already holds that model where one does, and a replica loads it
through the same sha256-checked node cache as the pinned replicas, keeping the
`max_models_per_replica` most recently used. Each model id has a batcher of its own
(deployments/batcher.py, as the pinned replicas have), so one forward pass never mixes models, a job's
chunks run only while no request of a person waits for that model, and a batch is bounded by texts and
by the tokenizer's token counts.

A version is loaded before the multiplexer makes room for it (`StagedLoads`): Serve's multiplexer
evicts its least recently used model first and loads after, so a version that fails to load would
otherwise cost a replica a good model. Loads run one at a time, so a replica briefly holds one model
more than its limit while a new one loads. A failed load is remembered for `FAILED_LOAD_RETRY_S`:
requests for that version meanwhile fail at once with the same reason instead of each downloading
it again.

Each replica writes the ids it holds to Redis (its field of the hash `pool:loaded`, refreshed while
it lives), so GET /v1/models can say which models are loaded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from ray import serve
from ray.serve import metrics

from deployments.batcher import LANES, BatchFormed, Lane, PriorityBatcher, log_batch
from serve_app import events
from serve_app import metrics as product_metrics
from serve_app.embeddings.contract import (
    LOADED_KEY,
    EmbeddingBatch,
    ModelInfo,
    ModelLoadError,
    RerankBatch,
    items_in,
    joined,
    run_batch,
)
from serve_app.infra.redis import GuardedRedis
from serve_app.model_repository import Manifest, ModelRepository, check_name
from serve_app.settings import get_settings

logger = logging.getLogger("ray.serve")

LOADED_REFRESH_S = 10
FAILED_LOAD_RETRY_S = 30.0
STAGED_KEEP_S = 60.0
MAX_BATCH = 64  # texts (or pairs) per batch, summed over the requests in it
MAX_BATCH_TOKENS = 2048  # tokens per batch (the pinned model's default, docs/benchmarks.md)
BACKGROUND_BATCH = 16  # texts per batch of job chunks


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
            backend=engine.backend,
            max_seq_length=engine.max_tokens,
        )


def load_pool_model(repository: ModelRepository, settings, name: str, version: str, device: str) -> PoolModel:
    """Fetch name:version into the node cache and build the engine its task needs."""
    from deployments.engines import build_engine

    local_dir, manifest = repository.fetch(
        name, version, settings.weights_cache_dir, max_bytes=settings.weights_cache_max_bytes
    )
    engine = build_engine(local_dir, manifest, device=device)
    return PoolModel(manifest=manifest, source=repository.uri(name, version), engine=engine, loaded_at=time.time())


M = TypeVar("M")


class StagedLoads(Generic[M]):
    """Loads a model before the multiplexer is asked for it, and remembers the loads that failed.

    `prepare(id)` loads it (once, however many requests want it) and keeps it aside; the
    multiplexer's loader then `take`s it, so the multiplexer evicts only to make room for a model
    that loaded. A failure is kept for `retry_after_s` and raised again at once as a ModelLoadError.
    """

    def __init__(self, load: Callable[[str], Awaitable[M]], retry_after_s: float = FAILED_LOAD_RETRY_S) -> None:
        self._load = load
        self.retry_after_s = retry_after_s
        self._staged: dict[str, tuple[float, M]] = {}
        self._failed: dict[str, tuple[float, str]] = {}
        self._loading: dict[str, asyncio.Task] = {}
        self._one_at_a_time = asyncio.Semaphore(1)  # as the multiplexer did: at most one model over the limit

    async def prepare(self, model_id: str) -> None:
        failed = self._failed.get(model_id)
        if failed is not None:
            if time.monotonic() < failed[0]:
                raise ModelLoadError(failed[1])
            del self._failed[model_id]
        now = time.monotonic()
        for stale in [k for k, (at, _) in self._staged.items() if now - at > STAGED_KEEP_S]:
            del self._staged[stale]  # loaded for callers that all left before taking it
        if model_id in self._staged:
            return
        task = self._loading.get(model_id)
        if task is None:
            task = asyncio.create_task(self._stage(model_id))
            self._loading[model_id] = task
        await asyncio.shield(task)  # a caller that leaves does not cancel the load others wait for

    async def _stage(self, model_id: str) -> None:
        try:
            async with self._one_at_a_time:
                model = await self._load(model_id)
            self._staged[model_id] = (time.monotonic(), model)
        except Exception as exc:
            # The client gets the kind of failure; the details (paths, endpoints) stay in this log.
            reason = f"{model_id} could not be loaded ({type(exc).__name__}); the model pool's log says why"
            logger.error("pool: %s could not be loaded: %r", model_id, exc)
            self._failed[model_id] = (time.monotonic() + self.retry_after_s, reason)
            raise ModelLoadError(reason) from None
        finally:
            del self._loading[model_id]

    def take(self, model_id: str) -> M | None:
        staged = self._staged.pop(model_id, None)
        return None if staged is None else staged[1]


@serve.deployment(max_ongoing_requests=32, ray_actor_options={"num_cpus": 0.25})
class ModelPool:
    """Serves whatever `name:version` each request's multiplexed model id names."""

    def __init__(self, max_models_per_replica: int = 2, device: str = "auto") -> None:
        import deployments.cross_encoder
        import deployments.encoder  # noqa: F401  torch and transformers now, not in a request's first load

        self.settings = get_settings()
        events.install(self.settings, "ModelPool")
        product_metrics.start()
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
            model = await asyncio.to_thread(load_pool_model, self.repository, self.settings, name, version, self.device)
            logger.info(
                "pool loaded %s (%s) in %.1fs",
                model_id,
                model.manifest.task,
                time.perf_counter() - started,
                extra={**events.EVENT, "model": model_id},
            )
            return model

        self._loads: StagedLoads[PoolModel] = StagedLoads(load)
        self._batchers: dict[str, PriorityBatcher] = {}

        async def hold(model_id: str) -> PoolModel:
            model = self._loads.take(model_id) or await load(model_id)  # staged, unless the multiplexer dropped it
            self._held[model_id] = model
            await self._publish()
            return model

        # Bound per instance so the limit comes from the Serve config (Ray detects this form too).
        self._get_model = serve.multiplexed(max_num_models_per_replica=max_models_per_replica)(hold)

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
        if model_id not in self._held:
            await self._loads.prepare(model_id)  # before the multiplexer evicts anything for it
        model = await self._get_model(model_id)
        if task is not None and model.manifest.task != task:
            raise ValueError(f"{model_id} is a {model.manifest.task} model, not a {task} model")
        return model

    async def info(self) -> ModelInfo:
        """What the requested model is; loads it if this replica does not hold it."""
        return (await self._model()).info()

    async def embed(self, texts: list[str], lane: Lane = "interactive") -> EmbeddingBatch:
        """Embeddings of texts, in order. `background` (job chunks) runs only while no interactive request for
        the same model waits here."""
        return await self._answer("embed", texts, lane)

    async def rerank(self, query: str, documents: list[str], lane: Lane = "interactive") -> RerankBatch:
        return await self._answer("rerank", [(query, d) for d in documents], lane)

    async def _answer(self, task: str, items: list, lane: Lane) -> EmbeddingBatch | RerankBatch:
        if lane not in LANES:  # before a model is loaded for it
            raise ValueError(f"lane {lane!r} is not one of {LANES}")
        model = await self._model(task)  # loaded (or refused) before anything queues
        batcher = self._batcher(serve.get_multiplexed_model_id())
        return joined(await batcher.submit_items(items, model.engine.count_tokens, lane))

    def _batcher(self, model_id: str) -> PriorityBatcher:
        """This model id's batcher, made at its first request. Batchers of models this replica no longer holds
        (the multiplexer evicted them) are stopped at a later request, once nothing waits in them; none holds a
        model itself."""
        batcher = self._batchers.get(model_id)
        if batcher is None:

            async def run(requests: list) -> list:
                # Held (a queued request keeps its model alive, so the weak dict still has it), or else the
                # multiplexer's, as a request would: staged first, so a failed load evicts nothing.
                model = self._held.get(model_id)
                if model is None:
                    await self._loads.prepare(model_id)
                    model = await self._get_model(model_id)
                task = model.manifest.task
                self.texts_counter.inc(items_in(requests), tags={"model": model.manifest.name, "task": task})
                return await run_batch(model.engine, task, model.manifest.name, model.manifest.version, requests)

            name = model_id.partition(":")[0]

            def record(batch: BatchFormed) -> None:
                log_batch(model_id, batch)
                if batch.ok:
                    product_metrics.batch_computed(name, batch.tokens, batch.forward_s)

            batcher = PriorityBatcher(
                run,
                max_texts=MAX_BATCH,
                max_tokens=MAX_BATCH_TOKENS,
                background_max_texts=BACKGROUND_BATCH,
                on_batch=record,
            )
            self._batchers[model_id] = batcher
        for gone in [k for k, b in self._batchers.items() if k != model_id and k not in self._held and b.idle()]:
            self._batchers.pop(gone).close()
        return batcher

    async def __del__(self) -> None:
        if self._publisher is not None:
            self._publisher.cancel()
        await self.redis.run(lambda r: r.hdel(LOADED_KEY, self._field), None)
        await self.redis.close()
