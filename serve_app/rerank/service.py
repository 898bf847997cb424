"""Reranking for the gateway: scores of (query, document) pairs, cached per pair, misses sent to the model.

The cache key is (model, version, sha256 of query and document), so a pair scored once is never
scored again by the same weights, whichever request or ordering it comes in. With a WorkMeter, the
misses are priced in estimated tokens of their pairs, charged to the key's work budget first and
sent in calls of at most `call_max_tokens` of pairs, each holding a lease on the key's in-flight
allowance while it runs, exactly as embeddings are (serve_app/embeddings/service.py).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from serve_app.embeddings.cache import ResultCache
from serve_app.embeddings.catalog import ModelCatalog
from serve_app.embeddings.contract import RerankBatch
from serve_app.embeddings.model_client import ModelClient
from serve_app.embeddings.service import DEFAULT_MAX_TOKENS, answer_from_one_version, estimate_tokens, metered_calls

if TYPE_CHECKING:
    from serve_app.auth.work_budget import WorkMeter

_SCORE = struct.Struct("<fI")  # score, tokens of the pair


def pair_key(model: str, version: str, query: str, document: str) -> str:
    digest = hashlib.sha256()
    for part in (query, document):  # length-prefixed: ("ab", "c") and ("a", "bc") differ
        data = part.encode()
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return f"rr:{model}:{version}:{digest.hexdigest()}"


@dataclass(frozen=True)
class RerankOutcome:
    model: str
    version: str
    scores: np.ndarray  # one per document, in the request's order
    token_counts: list[int]
    cache_hits: int


Scored = dict[str, tuple[float, int]]  # by document: (score, tokens of the pair)


class RerankService:
    def __init__(self, catalog: ModelCatalog, cache: ResultCache, *, call_max_tokens: int = 512) -> None:
        self.catalog = catalog
        self.cache = cache
        self.call_max_tokens = call_max_tokens

    async def rerank(
        self, spec: str, query: str, documents: list[str], *, meter: WorkMeter | None = None
    ) -> RerankOutcome:
        client = (await self.catalog.resolve(spec, "rerank")).client
        info = await client.info()
        version = info.version
        unique = list(dict.fromkeys(documents))
        keys = [pair_key(client.name, version, query, d) for d in unique]
        found = {
            doc: _SCORE.unpack(blob)
            for doc, blob in zip(unique, await self.cache.get_many(keys), strict=True)
            if blob is not None and len(blob) == _SCORE.size
        }
        max_tokens = info.max_seq_length or DEFAULT_MAX_TOKENS

        async def compute(on: ModelClient, docs: list[str], charge: bool) -> tuple[Scored, set[str]]:
            return await self._compute(on, query, docs, max_tokens, meter, charge=charge)

        async def resolve(model: str) -> ModelClient:
            return (await self.catalog.resolve(model, "rerank")).client

        answer = await answer_from_one_version(spec, client, version, unique, found, compute, resolve)
        client, version, found, results = answer.client, answer.version, answer.found, answer.results
        return RerankOutcome(
            model=client.name,
            version=version,
            scores=np.array([results[d][0] for d in documents], dtype=np.float32),
            token_counts=[results[d][1] for d in documents],
            cache_hits=sum(1 for d in documents if d in found),
        )

    async def _compute(
        self, client, query: str, documents: list[str], max_tokens: int, meter: WorkMeter | None, *, charge: bool
    ) -> tuple[Scored, set[str]]:
        """Scores of (query, document) pairs from the model, cached as they come: (by document, the versions
        that answered). Paced like embeddings: calls of at most call_max_tokens of pairs each."""

        async def send(docs: list[str]) -> RerankBatch:
            return await client.rerank(query, docs)

        async def store(docs: list[str], batch: RerankBatch) -> None:
            await self.cache.put_many(
                {
                    pair_key(client.name, batch.version, query, d): _SCORE.pack(
                        float(batch.scores[i]), int(batch.token_counts[i])
                    )
                    for i, d in enumerate(docs)
                }
            )

        query_cost = estimate_tokens(query, max_tokens)
        costs = [min(max_tokens, query_cost + estimate_tokens(d, max_tokens)) for d in documents]
        done = await metered_calls(documents, costs, meter, self.call_max_tokens, send, store, charge=charge)
        scored: Scored = {}
        for docs, batch in done:
            scored.update({d: (float(batch.scores[i]), int(batch.token_counts[i])) for i, d in enumerate(docs)})
        return scored, {batch.version for _, batch in done}
