"""What a model deployment returns through its handle; shared by the gateway and the replicas."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np


@dataclass(frozen=True)
class EmbeddingBatch:
    """Embeddings of a list of texts, in the order asked, from one model version."""

    model: str
    version: str
    vectors: np.ndarray  # float32, shape (len(texts), dims)
    token_counts: list[int]


@dataclass(frozen=True)
class ModelInfo:
    """What a replica serves and where its weights came from."""

    name: str
    version: str
    dims: int
    source: str
    manifest_digest: str
    framework: str
    task: str
    created: float
    loaded_at: float
    device: str
    max_seq_length: int
    backend: str = "torch"  # what runs the forward pass: torch or onnx (ONNX Runtime)
    canary_version: str | None = None  # a second version that gets canary_percent of bare-name requests
    canary_percent: float = 0.0


@dataclass(frozen=True)
class RerankBatch:
    """Relevance scores of documents to one query, in the order asked, from one model version."""

    model: str
    version: str
    scores: np.ndarray  # float32, shape (len(documents),), each in [0, 1]
    token_counts: list[int]  # tokens of each (query, document) pair


PRIMARY_DEPLOYMENT = "EmbeddingModel"  # the deployment of the Serve config's `args.model`


def pinned_deployment(model: str, primary: str | None = None) -> str:
    """The name of the deployment that pins `model`: EmbeddingModel for the primary one, else Pinned-<model>."""
    return PRIMARY_DEPLOYMENT if model == primary else f"Pinned-{model}"


def model_id(name: str, version: str) -> str:
    """The multiplexed model id of a version served on demand."""
    return f"{name}:{version}"


class ModelLoadError(Exception):
    """A model version the pool could not load (its files, its weights): the message says why."""


# A Redis hash: each on-demand pool replica's id -> {"ids": the model ids it holds, "at": when it said so}.
LOADED_KEY = "pool:loaded"
LOADED_TTL_S = 30  # an entry older than this is a replica that stopped saying (it died)


T = TypeVar("T")


def items_in(requests: Sequence[Sequence[object]]) -> int:
    """The size of a batch of requests in items (texts, or pairs)."""
    return sum(len(items) for items in requests)


def per_request(requests: Sequence[Sequence[object]], result_of: Callable[[slice], T]) -> list[T]:
    """A batch's result cut back into one per request: each request's items are consecutive in it."""
    results, start = [], 0
    for items in requests:
        results.append(result_of(slice(start, start + len(items))))
        start += len(items)
    return results


Batch = EmbeddingBatch | RerankBatch
ENGINE_METHOD = {"embed": "encode", "rerank": "score"}  # SentenceEncoder.encode, CrossEncoder.score


def batch_of(task: str, model: str, version: str, values: np.ndarray, token_counts: list[int]) -> Batch:
    """The batch type of a task: vectors for embed, scores for rerank."""
    if task == "rerank":
        return RerankBatch(model=model, version=version, scores=values, token_counts=token_counts)
    return EmbeddingBatch(model=model, version=version, vectors=values, token_counts=token_counts)


async def run_batch(engine, task: str, model: str, version: str, requests: Sequence[Sequence[object]]) -> list[Batch]:
    """One forward pass of a model engine over every request's items (texts, or (query, document) pairs),
    off the event loop, cut back into a batch per request."""
    flat = [item for items in requests for item in items]
    out = await asyncio.to_thread(getattr(engine, ENGINE_METHOD[task]), flat)
    values = out.scores if task == "rerank" else out.vectors
    return per_request(requests, lambda part: batch_of(task, model, version, values[part], out.token_counts[part]))


B = TypeVar("B", EmbeddingBatch, RerankBatch)


def joined(parts: Sequence[B]) -> B:
    """One batch from the consecutive parts of a request, answered by one model version."""
    first = parts[0]
    if len(parts) == 1:
        return first
    field = "scores" if isinstance(first, RerankBatch) else "vectors"
    values = np.concatenate([getattr(p, field) for p in parts])
    return replace(first, **{field: values}, token_counts=[n for p in parts for n in p.token_counts])
