"""What a model deployment returns through its handle; shared by the gateway and the replicas."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


# A Redis hash: each on-demand pool replica's id -> {"ids": the model ids it holds, "at": when it said so}.
class ModelLoadError(Exception):
    """A model version the pool could not load (its files, its weights): the message says why."""


LOADED_KEY = "pool:loaded"
LOADED_TTL_S = 30  # an entry older than this is a replica that stopped saying (it died)


T = TypeVar("T")


def per_request(requests: Sequence[Sequence[object]], result_of: Callable[[slice], T]) -> list[T]:
    """A batch's result cut back into one per request: each request's items are consecutive in it."""
    results, start = [], 0
    for items in requests:
        results.append(result_of(slice(start, start + len(items))))
        start += len(items)
    return results
