"""Request history in MongoDB, written in bulk by a background task, off the hot path.

Records wait in a bounded in-memory buffer; a flush inserts them in one `insert_many`.
If MongoDB is down they stay buffered and are retried; past `history_buffer_size` the
oldest are dropped and counted (a documented degradation: history is not the truth of a
request's answer, and serving never waits for it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from datetime import UTC, datetime

from bson import ObjectId
from pymongo import ASCENDING, DESCENDING, AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.errors import (
    BulkWriteError,
    ConnectionFailure,
    NetworkTimeout,
    OperationFailure,
    PyMongoError,
    ServerSelectionTimeoutError,
)

from serve_app import metrics
from serve_app.settings import Settings

logger = logging.getLogger(__name__)

DUPLICATE_KEY = 11000
INDEX_OPTIONS_CONFLICT = 85


class HistoryWriter:
    """Buffers history records and writes them to `<db>.requests` in batches."""

    def __init__(
        self,
        collection: AsyncCollection,
        *,
        ttl_days: int,
        flush_interval_s: float,
        batch_size: int,
        buffer_size: int,
    ) -> None:
        self.collection = collection
        self.ttl_days = ttl_days
        self.flush_interval_s = flush_interval_s
        self.batch_size = batch_size
        self.buffer: deque[dict] = deque()
        self.buffer_size = buffer_size
        self.dropped = 0
        self.written = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._indexes_ready = False
        self._healthy = True  # while MongoDB fails, full batches wait for the backoff, not wake it

    @classmethod
    def from_settings(cls, settings: Settings, client: AsyncMongoClient) -> HistoryWriter:
        return cls(
            client[settings.mongo_db]["requests"],
            ttl_days=settings.history_ttl_days,
            flush_interval_s=settings.history_flush_interval_s,
            batch_size=settings.history_batch_size,
            buffer_size=settings.history_buffer_size,
        )

    def record(self, **fields: object) -> None:
        """Queue one record; never blocks and never raises."""
        doc = {"_id": ObjectId(), "ts": datetime.now(UTC), **fields}
        self.buffer.append(doc)
        if len(self.buffer) > self.buffer_size:
            self.buffer.popleft()
            self._drop(1)
            if self.dropped % 1000 == 1:
                logger.warning("history buffer full; %d records dropped so far", self.dropped)
        if len(self.buffer) >= self.batch_size and self._healthy:
            self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="history-writer")

    async def stop(self, timeout_s: float = 5.0) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        with contextlib.suppress(PyMongoError, TimeoutError):
            async with asyncio.timeout(timeout_s):
                while self.buffer and await self.flush():
                    pass

    async def ensure_indexes(self) -> None:
        ttl_s = self.ttl_days * 86400
        try:
            await self.collection.create_index([("ts", ASCENDING)], name="ts_ttl", expireAfterSeconds=ttl_s)
        except OperationFailure as exc:
            if exc.code != INDEX_OPTIONS_CONFLICT:
                raise
            await self.collection.database.command(
                "collMod", self.collection.name, index={"name": "ts_ttl", "expireAfterSeconds": ttl_s}
            )
        await self.collection.create_index([("request_id", ASCENDING)], name="request_id")
        await self.collection.create_index([("model", ASCENDING), ("ts", ASCENDING)], name="model_ts")
        await self.collection.create_index([("owner", ASCENDING), ("_id", DESCENDING)], name="owner_newest")
        self._indexes_ready = True

    async def page(self, owner: str, *, limit: int, before: str | None) -> tuple[list[dict], str | None]:
        """A page of one owner's records, newest first, older than the record `before` (an id) if
        given: (the records, the cursor of the next page or None)."""
        query: dict = {"owner": owner}
        if before is not None:
            if not ObjectId.is_valid(before):
                return [], None
            query["_id"] = {"$lt": ObjectId(before)}
        docs = await self.collection.find(query).sort("_id", DESCENDING).limit(limit + 1).to_list(limit + 1)
        page = docs[:limit]
        return page, str(page[-1]["_id"]) if len(docs) > limit else None

    async def stats(self, since: datetime, owner: str | None = None) -> dict[str, list[dict]]:
        """Numbers over the records since `since` (one tenant's when `owner` is given), by one MongoDB
        aggregation: for all of them ("overall"), per model and per route: requests, texts, cache hits among
        the texts of requests that read the cache, 4xx and 5xx counts, and p50 and p99 latency.

        Latency is counted in log-spaced buckets (LATENCY_BUCKETS_PER_DECADE, 0.6% wide), each with its
        largest value, so memory stays bounded however long the window (MongoDB 6.0 has no $percentile,
        and pushing every latency into a group hits its 100 MB limit); a percentile is the largest latency
        of the bucket holding its nearest rank: exact when the bucket holds one record, else at most 0.6%
        above the exact value."""
        match: dict = {"ts": {"$gte": since}}
        if owner is not None:
            match["owner"] = owner
        keys = {"overall": None, "by_model": "$model", "by_route": "$endpoint"}
        facets = {name: _counts(key) for name, key in keys.items()}
        facets |= {f"{name}_latency": _latency_buckets(key) for name, key in keys.items()}
        cursor = await self.collection.aggregate([{"$match": match}, {"$facet": facets}], allowDiskUse=True)
        (found,) = await cursor.to_list(1)
        result = {}
        for name in keys:
            buckets: dict[object, list[tuple[int, int, float]]] = {}
            for bucket in found[f"{name}_latency"]:
                group = bucket["_id"]
                # A record without the key's field (a login has no model) has no "key" here, and a null _id there.
                buckets.setdefault(group.get("key"), []).append((group["bucket"], bucket["n"], bucket["max"]))
            rows = found[name]
            for row in rows:
                ordered = sorted(buckets.get(row["_id"], []))
                row["p50_ms"], row["p99_ms"] = (_nearest_rank(ordered, q) for q in (0.50, 0.99))
            result[name] = rows
        return result

    async def flush(self) -> bool:
        """Write up to one batch; False if MongoDB was unreachable (the batch is kept for later)."""
        batch = [self.buffer.popleft() for _ in range(min(self.batch_size, len(self.buffer)))]
        if not batch:
            return True
        try:
            await self.collection.insert_many(batch, ordered=False)
        except BulkWriteError as exc:
            # A retried batch may be partly stored already: duplicates of our own ids are fine.
            errors = exc.details.get("writeErrors", [])
            others = [e for e in errors if e.get("code") != DUPLICATE_KEY]
            if others:
                logger.error("history: %d records refused: %s", len(others), others[0].get("errmsg"))
                self._drop(len(others))
            self.written += len(batch) - len(others)
            return True
        except (ConnectionFailure, ServerSelectionTimeoutError, NetworkTimeout) as exc:
            self._requeue(batch)
            metrics.dependency_error("mongodb")
            logger.warning("history write deferred (%d buffered): %s", len(self.buffer), exc)
            return False
        except asyncio.CancelledError:  # cancelled mid-write: the batch goes back, to be written later
            self._requeue(batch)
            raise
        except Exception as exc:  # a batch MongoDB will never take (it cannot be encoded, say)
            logger.error("history: dropping %d records MongoDB refused: %r", len(batch), exc)
            self._drop(len(batch))
            return True
        self.written += len(batch)
        return True

    def _requeue(self, batch: list[dict]) -> None:
        self.buffer.extendleft(reversed(batch))
        while len(self.buffer) > self.buffer_size:
            self.buffer.popleft()
            self._drop(1)

    def _drop(self, count: int) -> None:
        self.dropped += count
        metrics.history_dropped(count)

    async def _run(self) -> None:
        backoff = self.flush_interval_s
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff):
                    await self._wake.wait()
            self._wake.clear()
            try:
                if not self._indexes_ready:
                    await self.ensure_indexes()
                while self.buffer:
                    if not await self.flush():
                        raise ConnectionError("history flush failed")
                backoff = self.flush_interval_s
                self._healthy = True
            except Exception as exc:  # the writer outlives any one failure
                self._healthy = False
                backoff = min(backoff * 2, 30.0)
                logger.debug("history writer backing off %.1fs: %r", backoff, exc)


LATENCY_BUCKETS_PER_DECADE = 400


def _nearest_rank(buckets: list[tuple[int, int, float]], quantile: float) -> float | None:
    """From (bucket, count, largest value) in bucket order: the largest value of the bucket holding the
    nearest rank, ceil(q * n)."""
    total = sum(count for _, count, _ in buckets)
    if not total:
        return None
    rank, seen = max(math.ceil(quantile * total), 1), 0
    for _, count, largest in buckets:
        seen += count
        if seen >= rank:
            return largest
    return buckets[-1][2]


def _latency_buckets(key: str | None) -> list[dict]:
    """One $facet branch: the records' latencies counted per (key, log-spaced bucket), with each bucket's max."""
    bucket = {"$floor": {"$multiply": [{"$log10": {"$max": ["$latency_ms", 0.001]}}, LATENCY_BUCKETS_PER_DECADE]}}
    return [
        {"$match": {"latency_ms": {"$type": "number"}}},
        {"$group": {"_id": {"key": key, "bucket": bucket}, "n": {"$sum": 1}, "max": {"$max": "$latency_ms"}}},
    ]


def _counts(key: str | None) -> list[dict]:
    """One $facet branch: the records grouped by `key` (None: all together), counted."""

    def count_if(condition: dict) -> dict:
        return {"$sum": {"$cond": [condition, 1, 0]}}

    reads_cache = {"$ne": [{"$type": "$cache_hits"}, "missing"]}
    return [
        {
            "$group": {
                "_id": key,
                "requests": {"$sum": 1},
                "texts": {"$sum": {"$ifNull": ["$items", 0]}},
                "cache_hits": {"$sum": {"$ifNull": ["$cache_hits", 0]}},
                "cache_reads": {"$sum": {"$cond": [reads_cache, {"$ifNull": ["$items", 0]}, 0]}},
                "client_errors": count_if({"$and": [{"$gte": ["$status", 400]}, {"$lt": ["$status", 500]}]}),
                "server_errors": count_if({"$gte": ["$status", 500]}),
            }
        },
        {"$sort": {"requests": DESCENDING, "_id": ASCENDING}},
    ]
