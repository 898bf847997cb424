"""Embeddings for the gateway: cached items answered from Redis, only misses sent to the model.

With a WorkMeter (the gateway's requests), a request's misses are priced in estimated tokens and
charged to its key's work budget before any model work, then sent in model calls of at most
`call_max_tokens` (and at most the key's in-flight allowance) each, a sliding window of them at a
time, so a heavy key's work is cut into short forward passes that interleave with everyone else's
and never holds more than its allowance of the model. Without one (jobs, which pace themselves),
the misses go in one call.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

import numpy as np
from ray.serve.handle import DeploymentHandle

from serve_app import tracing
from serve_app.embeddings.cache import ResultCache, cache_key, pack, packed_size, unpack
from serve_app.embeddings.catalog import ModelCatalog, parse_model
from serve_app.embeddings.contract import EmbeddingBatch
from serve_app.embeddings.model_client import ModelClient
from serve_app.errors import InvalidRequestError, ServiceUnavailableError
from serve_app.infra.redis import GuardedRedis
from serve_app.model_repository import ModelRepository
from serve_app.settings import Settings

if TYPE_CHECKING:
    from serve_app.auth.work_budget import WorkMeter

Item = TypeVar("Item")
Value = TypeVar("Value")
DEFAULT_MAX_TOKENS = 256  # the model's own truncation, when it does not say
# Characters that WordPiece/BPE tokenizers tend to make a token of each: punctuation, symbols,
# anything not ASCII (CJK, emoji). Counted only in texts short enough for it to matter.
_ONE_TOKEN_EACH = re.compile(r"[^A-Za-z0-9\s]")


def estimate_tokens(text: str, max_tokens: int = DEFAULT_MAX_TOKENS) -> int:
    """What a text will cost the model, estimated without its tokenizer: a token per 4 characters,
    plus one per punctuation mark or non-ASCII character, plus [CLS] and [SEP]; at most the
    model's truncation length (which every text of 4 x max_tokens characters or more reaches)."""
    chars = len(text)
    if chars >= 4 * max_tokens:
        return max_tokens
    return min(max_tokens, math.ceil(chars / 4) + len(_ONE_TOKEN_EACH.findall(text)) + 2)


def split_by_tokens(
    texts: list[Item], costs: list[int], max_tokens: int, max_items: int | None = None
) -> list[tuple[list[Item], int]]:
    """Consecutive items grouped into parts of at most max_tokens (one bigger alone goes alone) and at most
    max_items items: (the items, their tokens) of each."""
    calls: list[tuple[list[Item], int]] = []
    current: list[Item] = []
    total = 0
    for text, cost in zip(texts, costs, strict=True):
        if current and (total + cost > max_tokens or (max_items is not None and len(current) >= max_items)):
            calls.append((current, total))
            current, total = [], 0
        current.append(text)
        total += cost
    if current:
        calls.append((current, total))
    return calls


Batch = TypeVar("Batch", bound="HasVersion")


class HasVersion(Protocol):
    version: str


async def metered_calls(
    items: list[Item],
    costs: list[int],
    meter: WorkMeter | None,
    call_max_tokens: int,
    send: Callable[[list[Item]], Awaitable[Batch]],
    on_done: Callable[[list[Item], Batch], Awaitable[None]],
    *,
    charge: bool,
) -> list[tuple[list[Item], Batch]]:
    """Items sent to the model as the meter allows: (the items of each call, what it answered).

    Without a meter that enforces anything (jobs, which pace themselves), one call. Otherwise the
    items are cut into calls of at most `call_max_tokens` (and at most the key's in-flight allowance),
    charged to the key's budget first when `charge`, and sent a sliding window at a time, each call
    holding a lease until it ends. `on_done` sees each call's answer as it comes (to cache it).
    """
    if meter is None or (meter.rate_per_s <= 0 and meter.max_inflight <= 0):
        batch = await send(items)
        await on_done(items, batch)
        return [(items, batch)]
    call_tokens = min(call_max_tokens, meter.max_inflight) if meter.max_inflight > 0 else call_max_tokens
    calls = split_by_tokens(items, costs, call_tokens)
    first_lease = await meter.admit(sum(costs), calls[0][1]) if charge else None
    done: list[tuple[list[Item], Batch]] = []
    paid: list[int] = []
    try:
        await _paced(calls, meter, first_lease, send, on_done, done, paid)
    except BaseException:
        # What the model did not compute is given back (a call never sent, or one that failed); a
        # call whose caller left is paid for: the model computes it anyway, so disconnecting
        # must not buy model time for free.
        if charge:
            await asyncio.shield(meter.refund(sum(costs) - sum(paid)))
        raise
    return done


async def _paced(calls, meter: WorkMeter, first_lease: str | None, send, on_done, done: list, paid: list[int]) -> None:
    """Model calls as the key's in-flight allowance admits them, each holding a lease until it ends."""

    async def call(call_items: list, tokens: int, lease: str) -> None:
        try:
            batch = await send(call_items)
        except asyncio.CancelledError:
            paid.append(tokens)
            raise
        finally:
            await asyncio.shield(meter.release(lease))
        paid.append(tokens)
        done.append((call_items, batch))
        await on_done(call_items, batch)

    running: set[asyncio.Task] = set()
    tokens_of: dict[asyncio.Task, int] = {}
    loop = asyncio.get_running_loop()
    waiting_since: float | None = None
    next_call = 0
    try:
        while next_call < len(calls) or running:
            while next_call < len(calls):
                call_items, tokens = calls[next_call]
                held = sum(tokens_of[task] for task in running)
                if held and held + tokens > meter.max_inflight > 0:
                    break  # our own calls fill the allowance (the bound holds here even without Redis)
                lease = first_lease if next_call == 0 and first_lease is not None else await meter.lease(tokens)
                if lease is None:
                    break
                task = asyncio.create_task(call(call_items, tokens, lease))
                running.add(task)
                tokens_of[task] = tokens
                next_call += 1
                waiting_since = None
            if running:  # our own calls hold the allowance: the next one ends frees some
                finished, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                failures = [task.exception() for task in finished if task.exception() is not None]
                if failures:  # a failed call fails the request
                    raise failures[0]
            elif next_call < len(calls):  # the key's other requests hold it: wait, within a bound
                waiting_since = waiting_since or loop.time()
                waited = loop.time() - waiting_since
                if waited >= meter.wait_s:
                    raise meter.busy()
                await meter.wait(waited)
    finally:
        for task in running:
            task.cancel()
        if running:
            await asyncio.gather(*running, return_exceptions=True)


@dataclass(frozen=True)
class Answer(Generic[Item, Value]):
    client: ModelClient  # what answered (another client when the version asked for moved)
    version: str
    found: dict[Item, Value]  # what the cache gave that the answer uses
    results: dict[Item, Value]  # every unique item's result


async def answer_from_one_version(
    spec: str,
    client: ModelClient,
    version: str,
    unique: list[Item],
    found: dict[Item, Value],
    compute: Callable[[ModelClient, list[Item], bool], Awaitable[tuple[dict[Item, Value], set[str]]]],
    resolve: Callable[[str], Awaitable[ModelClient]],
) -> Answer[Item, Value]:
    """The cache misses computed, and the whole answer from one model version, whatever switches meanwhile.

    `found` is what the cache held for `version`; `compute(client, items, charge)` gives results and
    the versions that made them. When the model answered with another version: a request that named
    its version is asked again from the start of whatever serves that version now (a promote moved
    it to the pool), never answered by another; a bare name is answered wholly by the new version
    (what the cache gave belongs to the old one).
    """
    misses = [item for item in unique if item not in found]
    results = dict(found)
    if not misses:
        return Answer(client, version, found, results)
    computed, versions = await compute(client, misses, True)
    if versions != {version} and parse_model(spec)[1] is not None:
        client.forget_info()
        client = await resolve(spec)
        if (await client.info(refresh=True)).version != version:
            raise ServiceUnavailableError(f"model {spec!r} is switching versions; try again")
        computed, versions = await compute(client, unique, False)
        if versions != {version}:
            raise ServiceUnavailableError(f"model {spec!r} is switching versions; try again")
        found, results = {}, {}
    elif versions != {version}:
        client.forget_info()
        if found or len(versions) > 1:
            found = {}
            computed, versions = await compute(client, unique, False)
            if len(versions) > 1:
                raise ServiceUnavailableError(f"model {spec!r} is switching versions; try again")
        (version,) = versions
        results = {}
    results.update(computed)
    return Answer(client, version, found, results)


@dataclass(frozen=True)
class EmbeddingOutcome:
    model: str
    version: str
    vectors: np.ndarray
    token_counts: list[int]
    cache_hits: int


Computed = dict[str, tuple[np.ndarray, int]]


class EmbeddingService:
    def __init__(
        self,
        models: dict[str, ModelClient],
        cache: ResultCache,
        *,
        call_max_tokens: int = 512,
        catalog: ModelCatalog | None = None,
    ) -> None:
        self.models = models  # the pinned ones
        self.cache = cache
        self.call_max_tokens = call_max_tokens
        self.catalog = catalog or ModelCatalog(models, None, None, refresh_s=2.0, timeout_s=60.0)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        handles: dict[str, DeploymentHandle],
        redis: GuardedRedis,
        pool: DeploymentHandle | None = None,
        *,
        lane: str = "interactive",
    ) -> EmbeddingService:
        """The same service for the gateway and the job workers: a client per pinned model, the on-demand
        pool for every other model in the repository, the Redis cache. The job workers' calls go in the
        `background` lane (deployments/batcher.py)."""
        timeout_s = settings.job_model_timeout_s if lane == "background" else settings.model_timeout_s
        models = {
            name: ModelClient(name, handle, refresh_s=settings.model_info_refresh_s, timeout_s=timeout_s, lane=lane)
            for name, handle in handles.items()
        }
        catalog = ModelCatalog(
            models,
            pool,
            ModelRepository.from_settings(settings, timeout_s=10.0) if pool is not None else None,
            refresh_s=settings.model_info_refresh_s,
            timeout_s=timeout_s,
            listing_ttl_s=settings.model_listing_ttl_s,
            lane=lane,
        )
        return cls(
            models,
            ResultCache(redis, settings.cache_ttl_s),
            call_max_tokens=settings.model_call_max_tokens,
            catalog=catalog,
        )

    async def model(self, spec: str, task: str = "embed") -> ModelClient:
        """The client serving `spec` (`name` or `name:version`) for `task`; 404/400 as ModelCatalog says."""
        return (await self.catalog.resolve(spec, task)).client

    async def embed(
        self,
        model_name: str,
        texts: list[str],
        dimensions: int | None = None,
        *,
        meter: WorkMeter | None = None,
    ) -> EmbeddingOutcome:
        """Embeddings of texts; with a meter, the misses are charged to its key and paced (see module doc)."""
        client = await self.model(model_name)
        info = await client.info()
        if dimensions is not None and dimensions != info.dims:
            raise InvalidRequestError(
                f"dimensions={dimensions} is not supported by {model_name!r}, which makes {info.dims}",
                param="dimensions",
            )
        unique = list(dict.fromkeys(texts))
        version = info.version
        keys = [cache_key(client.name, version, text) for text in unique]
        expected_size = packed_size(info.dims)
        with tracing.span("cache lookup", {"model": client.name, "texts": len(unique)}) as span:
            found = {
                text: unpack(blob)
                for text, blob in zip(unique, await self.cache.get_many(keys), strict=True)
                if blob is not None and len(blob) == expected_size  # anything else is not ours: a miss
            }
            span.set_attribute("hits", len(found))
        max_tokens = info.max_seq_length or DEFAULT_MAX_TOKENS

        async def compute(on: ModelClient, items: list[str], charge: bool) -> tuple[Computed, set[str]]:
            return await self._compute(on, items, max_tokens, meter, charge=charge)

        answer = await answer_from_one_version(model_name, client, version, unique, found, compute, self.model)
        client, version, found, results = answer.client, answer.version, answer.found, answer.results
        return EmbeddingOutcome(
            model=client.name,
            version=version,
            vectors=np.stack([results[text][0] for text in texts]),
            token_counts=[results[text][1] for text in texts],
            cache_hits=sum(1 for text in texts if text in found),
        )

    async def _compute(
        self, client: ModelClient, texts: list[str], max_tokens: int, meter: WorkMeter | None, *, charge: bool
    ) -> tuple[Computed, set[str]]:
        """Embeddings of texts from the model, cached as they come: (by text, the versions that answered)."""

        async def store(call_texts: list[str], batch: EmbeddingBatch) -> None:
            await self._store(client.name, call_texts, batch)

        async def send(call_texts: list[str]) -> EmbeddingBatch:
            with tracing.span(
                "model call", {"model": client.name, "texts": len(call_texts), "lane": client.lane}
            ) as span:
                batch = await client.embed(call_texts)
                span.set_attribute("version", batch.version)
                return batch

        costs = [estimate_tokens(text, max_tokens) for text in texts]
        done = await metered_calls(texts, costs, meter, self.call_max_tokens, send, store, charge=charge)
        computed: Computed = {}
        for call_texts, batch in done:
            computed.update(_by_text(call_texts, batch))
        return computed, {batch.version for _, batch in done}

    async def _store(self, model_name: str, texts: list[str], batch: EmbeddingBatch) -> None:
        await self.cache.put_many(
            {
                cache_key(model_name, batch.version, text): pack(batch.vectors[i], batch.token_counts[i])
                for i, text in enumerate(texts)
            }
        )


def _by_text(texts: list[str], batch: EmbeddingBatch) -> Computed:
    return {text: (batch.vectors[i], batch.token_counts[i]) for i, text in enumerate(texts)}
