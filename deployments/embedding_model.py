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

from pydantic import BaseModel, Field, field_validator
from ray import serve
from ray.serve import metrics

from serve_app.embeddings.contract import EmbeddingBatch, ModelInfo, RerankBatch, items_in, joined, run_batch
from serve_app.model_repository import Manifest, ModelRepository, check_name
from serve_app.settings import get_settings

if TYPE_CHECKING:
    from deployments.cross_encoder import CrossEncoder
    from deployments.encoder import SentenceEncoder

logger = logging.getLogger("ray.serve")


class ModelConfig(BaseModel):
    """The deployment's `user_config`: changing it in the Serve config applies live, with no restart."""

    version: str = Field(default_factory=lambda: get_settings().default_model_version)
    max_batch_texts: int = Field(64, ge=1, description="Texts per batch, summed over the requests in it.")
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
        self.model_name = model_name
        self.repository = ModelRepository.from_settings(self.settings)
        self.config = ModelConfig()
        self.loaded: LoadedModel | None = None
        self.texts_counter = metrics.Counter(
            "embedding_texts_computed", description="Texts embedded by the model.", tag_keys=("model",)
        )
        self.batch_texts = metrics.Histogram(
            "embedding_batch_texts",
            description="Texts per model batch (all requests in the batch).",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256],
            tag_keys=("model",),
        )
        self.texts_counter.set_default_tags({"model": model_name})
        self.batch_texts.set_default_tags({"model": model_name})

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
        for batched in (self._embed_batch, self._rerank_batch):
            batched.set_max_batch_size(config.max_batch_texts)
            batched.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        self.config = config
        if needs_load:
            self.loaded = loaded
            logger.info("serving %s version %s from %s", self.model_name, config.version, loaded.source)

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

    async def embed(self, texts: list[str]) -> EmbeddingBatch:
        """Embeddings of texts, in order; long lists are split so each part fits one batch."""
        return await self._answer("embed", texts)

    async def rerank(self, query: str, documents: list[str]) -> RerankBatch:
        """Scores of documents against the query, in order (a rerank model); long lists are split."""
        return await self._answer("rerank", [(query, d) for d in documents])

    async def _answer(self, task: str, items: list) -> EmbeddingBatch | RerankBatch:
        parts = await asyncio.gather(*(self._part(task, part) for part in self._split(items)))
        if len({p.version for p in parts}) > 1:  # a version swap landed between parts: answer from one version
            return await self._answer(task, items)
        return joined(parts)

    def _split(self, items: list) -> list[list]:
        step = self.config.max_batch_texts
        return [items[i : i + step] for i in range(0, len(items), step)]

    async def _part(self, task: str, items: list) -> EmbeddingBatch | RerankBatch:
        try:
            return await (self._rerank_batch if task == "rerank" else self._embed_batch)(items)
        except RuntimeError:
            # max_batch_texts shrank after this part was cut: Serve refuses it; cut it again.
            if len(items) <= self.config.max_batch_texts:
                raise
            return await self._answer(task, items)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0, batch_size_fn=items_in)
    async def _embed_batch(self, requests: list[list[str]]) -> list[EmbeddingBatch]:
        return await self._run("embed", requests)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0, batch_size_fn=items_in)
    async def _rerank_batch(self, requests: list[list[tuple[str, str]]]) -> list[RerankBatch]:
        return await self._run("rerank", requests)

    async def _run(self, task: str, requests: list) -> list:
        loaded = self._require_loaded(task)
        size = items_in(requests)
        self.texts_counter.inc(size)
        self.batch_texts.observe(size)
        return await run_batch(loaded.encoder, task, self.model_name, loaded.manifest.version, requests)

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
