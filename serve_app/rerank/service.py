"""Reranking for the gateway: scores of (query, document) pairs, cached per pair, misses sent to the model.

The cache key is (model, version, sha256 of query and document), so a pair scored once is never
scored again by the same weights, whichever request or ordering it comes in. With a WorkMeter, the
misses are priced in estimated tokens of their pairs and charged to the key's work budget first,
as embeddings are (serve_app/embeddings/service.py), and the call holds a lease on the key's
in-flight allowance while it runs.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from serve_app.embeddings.cache import ResultCache
from serve_app.embeddings.catalog import ModelCatalog, parse_model
from serve_app.embeddings.service import DEFAULT_MAX_TOKENS, estimate_tokens
from serve_app.errors import ServiceUnavailableError

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


class RerankService:
    def __init__(self, catalog: ModelCatalog, cache: ResultCache) -> None:
        self.catalog = catalog
        self.cache = cache

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
        misses = [d for d in unique if d not in found]
        results: dict[str, tuple[float, int]] = dict(found)
        if misses:
            max_tokens = info.max_seq_length or DEFAULT_MAX_TOKENS
            batch = await self._compute(client, query, misses, max_tokens, meter)
            if batch.version != version and parse_model(spec)[1] is not None:
                # The version asked for moved from its deployment to the pool (see EmbeddingService.embed).
                client.forget_info()
                client = (await self.catalog.resolve(spec, "rerank")).client
                if (await client.info(refresh=True)).version != version:
                    raise ServiceUnavailableError(f"model {spec!r} is switching versions; try again")
                batch = await self._compute(client, query, unique, max_tokens, None)
                if batch.version != version:
                    raise ServiceUnavailableError(f"model {spec!r} is switching versions; try again")
                misses, found, results = unique, {}, {}
            elif batch.version != version:  # the model switched version: answer wholly from the new one
                client.forget_info()
                version, results = batch.version, {}
                if found:
                    batch = await self._compute(client, query, unique, info.max_seq_length, None)
                    if batch.version != version:
                        raise ServiceUnavailableError(f"model {spec!r} is switching versions; try again")
                    misses, found = unique, {}
            computed = {d: (float(batch.scores[i]), int(batch.token_counts[i])) for i, d in enumerate(misses)}
            results.update(computed)
            await self.cache.put_many(
                {pair_key(client.name, version, query, d): _SCORE.pack(*computed[d]) for d in misses}
            )
        return RerankOutcome(
            model=client.name,
            version=version,
            scores=np.array([results[d][0] for d in documents], dtype=np.float32),
            token_counts=[results[d][1] for d in documents],
            cache_hits=sum(1 for d in documents if d in found),
        )

    async def _compute(self, client, query: str, documents: list[str], max_tokens: int, meter: WorkMeter | None):
        if meter is None or (meter.rate_per_s <= 0 and meter.max_inflight <= 0):
            return await client.rerank(query, documents)
        query_cost = estimate_tokens(query, max_tokens)
        cost = sum(min(max_tokens, query_cost + estimate_tokens(d, max_tokens)) for d in documents)
        # One call, holding at most the key's whole in-flight allowance while it runs.
        cost_in_flight = min(cost, meter.max_inflight) if meter.max_inflight > 0 else cost
        lease = await meter.admit(cost, cost_in_flight)
        try:
            if lease is None:
                lease = await self._wait_for_lease(meter, cost_in_flight)
            try:
                return await client.rerank(query, documents)
            finally:
                await asyncio.shield(meter.release(lease))
        except asyncio.CancelledError:
            raise  # the caller left: the model computes it anyway, so it stays paid for
        except BaseException:
            await asyncio.shield(meter.refund(cost))
            raise

    @staticmethod
    async def _wait_for_lease(meter: WorkMeter, tokens: int) -> str:
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            waited = loop.time() - started
            if waited >= meter.wait_s:
                raise meter.busy()
            await meter.wait(waited)
            lease = await meter.lease(tokens)
            if lease is not None:
                return lease
