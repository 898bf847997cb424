"""Fakes for unit tests: a model deployment handle that computes deterministic vectors."""

from __future__ import annotations

import hashlib
import time

import numpy as np

from serve_app.model_contract import EmbeddingBatch, ModelInfo


def fake_vector(text: str, dims: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    vector = np.random.default_rng(seed).standard_normal(dims).astype(np.float32)
    return vector / np.linalg.norm(vector)


class _Method:
    def __init__(self, fn) -> None:
        self.fn = fn

    def remote(self, *args):
        async def call():
            return self.fn(*args)

        return call()


class FakeModelHandle:
    """Stands in for a DeploymentHandle to an EmbeddingModel."""

    def __init__(self, name: str = "fake-model", dims: int = 8, version: str = "1") -> None:
        self.name = name
        self.dims = dims
        self.version = version
        self.embedded: list[list[str]] = []
        self.fail = False

    def _embed(self, texts: list[str]) -> EmbeddingBatch:
        if self.fail:
            raise RuntimeError("replica died")
        self.embedded.append(list(texts))
        return EmbeddingBatch(
            model=self.name,
            version=self.version,
            vectors=np.stack([fake_vector(self.version + t, self.dims) for t in texts]),
            token_counts=[len(t.split()) + 2 for t in texts],
        )

    def _info(self) -> ModelInfo:
        if self.fail:
            raise RuntimeError("replica died")
        return ModelInfo(
            name=self.name,
            version=self.version,
            dims=self.dims,
            source=f"s3://models/{self.name}/{self.version}/",
            manifest_digest="0" * 64,
            framework="fake",
            task="sentence-embedding",
            created=0.0,
            loaded_at=time.time(),
            device="cpu",
            max_seq_length=16,
        )

    @property
    def embed(self) -> _Method:
        return _Method(self._embed)

    @property
    def info(self) -> _Method:
        return _Method(self._info)


class DictCache:
    """The ResultCache interface over a dict."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        return [self.data.get(k) for k in keys]

    async def put_many(self, entries: dict[str, bytes]) -> None:
        self.data.update(entries)
