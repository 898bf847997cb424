"""What a model deployment returns through its handle; shared by the gateway and the replicas."""

from __future__ import annotations

from dataclasses import dataclass

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
