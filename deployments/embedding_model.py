"""The pinned model deployment: weights from the object store, dynamic batching, live reconfigure.

It serves whatever task its model's manifest names: embeddings (a sentence encoder) or rerank
scores (a cross-encoder). The Serve config pins one model as `EmbeddingModel` (`args.model`) and
may pin more (`args.pinned`), each as a deployment of this class named `Pinned-<model>`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from ray import serve

from deployments.batcher import BatchFormed, Lane, PriorityBatcher, log_batch
from serve_app import events
from serve_app import metrics as product_metrics
from serve_app.embeddings.contract import EmbeddingBatch, ModelInfo, RerankBatch, joined, run_batch
from serve_app.model_repository import Manifest, ModelRepository, check_name
from serve_app.settings import get_settings

if TYPE_CHECKING:
    from deployments.cross_encoder import CrossEncoder
    from deployments.encoder import SentenceEncoder

logger = logging.getLogger("ray.serve")


class ModelConfig(BaseModel):
    """The deployment's `user_config`: changing it in the Serve config applies live, with no restart."""

    model_config = ConfigDict(extra="forbid")  # a misspelt key fails the deploy instead of being ignored

    version: str = Field(default_factory=lambda: get_settings().default_model_version)
    max_batch_texts: int = Field(64, ge=1, description="Texts per batch, summed over the requests in it.")
    max_batch_tokens: int = Field(
        2048,
        ge=1,
        description="Tokens per batch (the tokenizer's counts): a few long texts make a small batch, which takes "
        "about as long as a full batch of short ones.",
    )
    background_batch_texts: int = Field(
        16,
        ge=1,
        description="Texts per batch of job chunks, which run only while no interactive request waits: an "
        "interactive request that comes meanwhile waits for a short pass.",
    )
    background_share: float = Field(
        0.0,
        ge=0,
        le=1,
        description="The share of batches that go to job chunks while both lanes wait: 0 puts people first "
        "always; 0.5 alternates.",
    )
    interactive_first: bool = Field(
        True,
        description="Job chunks (the background lane) run only while no interactive request waits; false: one "
        "queue, first come first served (what it was before; kept to measure against).",
    )
    batch_wait_timeout_s: float = Field(
        0.0, ge=0, description="How long a batch waits to fill; 0: it takes what queued during the last forward pass."
    )
    forward_batch_size: int = Field(32, ge=1, description="Texts per forward pass within a batch.")
    torch_threads: int | None = Field(
        None, ge=1, description="intra-op threads (torch or ONNX Runtime); default: Ray's num_cpus."
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    backend: Literal["auto", "torch", "onnx"] = Field(
        "auto",
        description="auto: ONNX Runtime on CPU for a version with a checked ONNX export, torch otherwise "
        "(and always on CUDA).",
    )
    previous_version: str | None = Field(None, description="What `models rollback` returns to.")
    canary_version: str | None = Field(
        None, description="Another version of this model, served on demand to canary_percent of the requests."
    )
    canary_percent: float = Field(0.0, ge=0, le=100)

    @field_validator("version", "previous_version", "canary_version")
    @classmethod
    def _plain_version(cls, value: str | None) -> str | None:
        return value if value is None else check_name("version", value)


@dataclass(frozen=True)
class LoadedModel:
    manifest: Manifest
    source: str
    encoder: SentenceEncoder | CrossEncoder
    loaded_at: float


@serve.deployment(
    max_ongoing_requests=64,
    ray_actor_options={"num_cpus": 0.5},
    user_config=ModelConfig().model_dump(),
)
class EmbeddingModel:
    """Serves one sentence-embedding model; `version` in the user_config picks the weights."""

    def __init__(self, model_name: str) -> None:
        self.settings = get_settings()
        events.install(self.settings, "EmbeddingModel")
        product_metrics.start()
        self.model_name = model_name
        self.repository = ModelRepository.from_settings(self.settings)
        self.config = ModelConfig()
        self.loaded: LoadedModel | None = None
        self.batcher: PriorityBatcher = PriorityBatcher(self._run, on_batch=self._record)

    async def reconfigure(self, user_config: dict) -> None:
        """Apply a new user_config; a new version is loaded beside the old one, then swapped in.

        The new config takes effect only once its model is loaded: a failed load leaves the
        replica serving what it served, and the same config can be applied again.
        """
        config = ModelConfig.model_validate(user_config)
        needs_load = (
            self.loaded is None
            or config.version != self.config.version
            or config.device != self.config.device
            or config.forward_batch_size != self.config.forward_batch_size
            or config.backend != self.config.backend
            or (self.loaded.encoder.backend == "onnx" and config.torch_threads != self.config.torch_threads)
        )
        if needs_load:
            loaded = await asyncio.to_thread(self._load, config)
        _set_torch_threads(config.torch_threads)
        self.batcher.configure(
            max_texts=config.max_batch_texts,
            max_tokens=config.max_batch_tokens,
            background_max_texts=config.background_batch_texts,
            background_share=config.background_share,
            wait_s=config.batch_wait_timeout_s,
        )
        self.config = config
        if needs_load:
            self.loaded = loaded
            logger.info(
                "serving %s version %s from %s",
                self.model_name,
                config.version,
                loaded.source,
                extra={**events.EVENT, "model": f"{self.model_name}:{config.version}"},
            )

    def _load(self, config: ModelConfig) -> LoadedModel:
        from deployments.engines import build_engine

        local_dir, manifest = self.repository.fetch(
            self.model_name,
            config.version,
            self.settings.weights_cache_dir,
            max_bytes=self.settings.weights_cache_max_bytes,
        )
        encoder = build_engine(
            local_dir,
            manifest,
            device=config.device,
            backend=config.backend,
            forward_batch_size=config.forward_batch_size,
            threads=config.torch_threads,
        )
        return LoadedModel(
            manifest=manifest,
            source=self.repository.uri(self.model_name, config.version),
            encoder=encoder,
            loaded_at=time.time(),
        )

    def check_health(self) -> None:
        if self.loaded is None:
            raise RuntimeError("no model loaded")

    def info(self) -> ModelInfo:
        """What this replica serves and where its weights came from."""
        loaded = self._require_loaded()
        return ModelInfo(
            name=self.model_name,
            version=loaded.manifest.version,
            dims=loaded.encoder.dims,
            source=loaded.source,
            manifest_digest=loaded.manifest.digest,
            framework=loaded.manifest.framework,
            task=loaded.manifest.task,
            created=loaded.manifest.created.timestamp(),
            loaded_at=loaded.loaded_at,
            device=str(loaded.encoder.device),
            backend=loaded.encoder.backend,
            max_seq_length=loaded.encoder.max_tokens,
            canary_version=self.config.canary_version if self.config.canary_percent > 0 else None,
            canary_percent=self.config.canary_percent if self.config.canary_version else 0.0,
        )

    async def embed(self, texts: list[str], lane: Lane = "interactive") -> EmbeddingBatch:
        """Embeddings of texts, in order; a long list goes in parts that each fit a batch. `background`
        (job chunks) runs only while no interactive request waits (deployments/batcher.py)."""
        return await self._answer("embed", texts, lane)

    async def rerank(self, query: str, documents: list[str], lane: Lane = "interactive") -> RerankBatch:
        """Scores of documents against the query, in order (a rerank model); a long list goes in parts."""
        return await self._answer("rerank", [(query, d) for d in documents], lane)

    async def _answer(self, task: str, items: list, lane: Lane) -> EmbeddingBatch | RerankBatch:
        loaded = self._require_loaded(task)  # the wrong task is refused here, never queued
        if not self.config.interactive_first:
            lane = "interactive"
        answers = await self.batcher.submit_items(items, loaded.encoder.count_tokens, lane)
        if len({a.version for a in answers}) > 1:  # a version swap landed between parts: answer from one version
            return await self._answer(task, items, lane)
        return joined(answers)

    async def _run(self, requests: list[list]) -> list:
        """One batch through the engine: every request in it is of the model's task (checked on arrival)."""
        loaded = self._require_loaded()
        return await run_batch(loaded.encoder, loaded.manifest.task, self.model_name, loaded.manifest.version, requests)

    def _record(self, batch: BatchFormed) -> None:
        log_batch(self.model_name, batch)
        if not batch.ok:
            return
        product_metrics.batch_formed(self.model_name, batch.items, batch.tokens, batch.lane, batch.waits_s)
        product_metrics.batch_computed(self.model_name, batch.tokens, batch.forward_s)

    def _require_loaded(self, task: str | None = None) -> LoadedModel:
        if self.loaded is None:
            raise RuntimeError(f"model {self.model_name} is not loaded yet")
        if task is not None and self.loaded.manifest.task != task:
            raise ValueError(f"model {self.model_name} is a {self.loaded.manifest.task} model, not a {task} model")
        return self.loaded


def _set_torch_threads(threads: int | None) -> None:
    """torch intra-op threads: the config's, else as many as Ray gave the replica (OMP_NUM_THREADS)."""
    import torch

    from deployments.engines import intra_op_threads

    torch.set_num_threads(intra_op_threads(threads))
