"""Fakes for unit tests: a model deployment handle that computes deterministic vectors."""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import time

import numpy as np
from ray.exceptions import ActorDiedError

from serve_app.auth.credentials import Principal
from serve_app.embeddings.contract import EmbeddingBatch, ModelInfo, RerankBatch


def fake_vector(text: str, dims: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
    vector = np.random.default_rng(seed).standard_normal(dims).astype(np.float32)
    return vector / np.linalg.norm(vector)


class _Method:
    def __init__(self, fn) -> None:
        self.fn = fn

    def remote(self, *args, **kwargs):
        async def call():
            result = self.fn(*args, **kwargs)
            return await result if inspect.isawaitable(result) else result

        return call()


class FakeModelHandle:
    """Stands in for a DeploymentHandle to an EmbeddingModel."""

    def __init__(self, name: str = "fake-model", dims: int = 8, version: str = "1", task: str = "embed") -> None:
        self.name = name
        self.task = task
        self.reranked: list[tuple[str, list[str]]] = []
        self.dims = dims
        self.version = version
        self.embedded: list[list[str]] = []
        self.fail = False
        self.replica_deaths = 0  # the next this many calls fail as a replica that died under them
        self.delay_s = 0.0  # how long each embed call takes (then calls can overlap)
        self.active = 0
        self.max_active = 0  # the most embed calls in progress at once
        self.lanes: list[str] = []  # the lane each embed or rerank call asked for

    async def _embed_slowly(self, texts: list[str], lane: str = "interactive") -> EmbeddingBatch:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await asyncio.sleep(self.delay_s)
            return self._embed(texts, lane)
        finally:
            self.active -= 1

    def _embed(self, texts: list[str], lane: str = "interactive") -> EmbeddingBatch:
        self.lanes.append(lane)
        if self.replica_deaths:
            self.replica_deaths -= 1
            raise ActorDiedError()
        if self.fail:
            raise RuntimeError("replica died")
        self.embedded.append(list(texts))
        return EmbeddingBatch(
            model=self.name,
            version=self.version,
            vectors=np.stack([fake_vector(self.version + t, self.dims) for t in texts]),
            token_counts=[len(t.split()) + 2 for t in texts],
        )

    async def _rerank(self, query: str, documents: list[str], lane: str = "interactive") -> RerankBatch:
        self.lanes.append(lane)
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await asyncio.sleep(self.delay_s)
            if self.fail:
                raise RuntimeError("replica died")
            self.reranked.append((query, list(documents)))
            return RerankBatch(
                model=self.name,
                version=self.version,
                scores=np.array([float(fake_vector(query + d, 1)[0]) for d in documents], dtype=np.float32),
                token_counts=[len(query.split()) + len(d.split()) + 3 for d in documents],
            )
        finally:
            self.active -= 1

    @property
    def rerank(self) -> _Method:
        return _Method(self._rerank)

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
            task=self.task,
            created=0.0,
            loaded_at=time.time(),
            device="cpu",
            max_seq_length=16,
        )

    @property
    def embed(self) -> _Method:
        return _Method(self._embed_slowly if self.delay_s else self._embed)

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


class RedisServer:
    """A private redis-server on a free port under a temporary directory (started and stopped by its pid)."""

    def __init__(self, directory) -> None:
        import shutil
        import socket
        import subprocess

        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(directory),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.url = f"redis://127.0.0.1:{self.port}/0"
        import redis

        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise
                time.sleep(0.05)
        self.client = client

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except Exception:
            self.process.kill()
            self.process.wait()


class FakeKeyCollection:
    """The slice of MongoDB's `api_keys` that the key store and the authenticator use; `down` fails every call."""

    def __init__(self) -> None:
        self.docs: dict[str, dict] = {}
        self.down = False
        self.calls = 0

    def _check(self) -> None:
        from pymongo.errors import ServerSelectionTimeoutError

        self.calls += 1
        if self.down:
            raise ServerSelectionTimeoutError("MongoDB is down (fake)")

    async def create_index(self, *args, **kwargs) -> str:
        self._check()
        return "index"

    async def find_one(self, query: dict, *args) -> dict | None:
        self._check()
        return next((d for d in self.docs.values() if all(d.get(k) == v for k, v in query.items())), None)

    async def find_one_and_update(self, query: dict, update, return_document=None) -> dict | None:
        from datetime import UTC, datetime

        doc = await self.find_one(query)
        if doc is None:
            return None
        if isinstance(update, list):  # the revocation's pipeline
            doc.update(revoked=True, revoked_at=doc.get("revoked_at") or datetime.now(UTC))
        else:
            doc.update(update["$set"])
        return dict(doc)


# Who the unit tests' clients are (key lookup itself is tested against a real Redis and in integration).
CALLER = Principal(
    key_id="0123456789abcdef",
    owner="tester",
    scopes=("infer", "jobs", "admin"),
    rate_per_s=0,
    burst=1,
    max_jobs=0,
    expires_at=None,
)
